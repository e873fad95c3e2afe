"""The all-layer h2o decode eviction (`DecodeGroup`) keeps what per-layer eviction keeps."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamahome.kvcache.attention import enable_hybrid_attention
from llamahome.kvcache.spec import make_cache


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return enable_hybrid_attention(LlamaForCausalLM(config).eval())


def _run(model, ids, cache, steps=25):
    logits = []
    with torch.no_grad():
        out = model(ids, cache=cache)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
    kept = [layer.positions.sort(-1).values for layer in cache.layers]
    return torch.stack(logits), kept


def test_batched_victims_equal_per_layer_victims():
    model = _model()
    ids = torch.randint(2, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    kw = dict(budget_ratio=0.3, min_tokens=0, seq_len=65)
    batched = make_cache("h2o", model.config, **kw)
    assert batched.layers[0]._group is not None
    per_layer = make_cache("h2o", model.config, **kw)
    for layer in per_layer.layers:
        layer._group = None  # the plain per-layer eviction
    # A third cache is read mid-step: layer 0's deferred victim resolves on its own.
    mixed = make_cache("h2o", model.config, **kw)
    first = mixed.layers[0]
    orig = first.finish

    def finish(scores, _orig=orig):
        _orig(scores)
        _ = first.keys  # settles the pending eviction before the other layers finish

    first.finish = finish
    a, kept_a = _run(model, ids, batched)
    b, kept_b = _run(model, ids, per_layer)
    c, kept_c = _run(model, ids, mixed)
    assert batched.layers[0]._group._stacks is not None  # the batched path actually ran
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    for x, y, z in zip(kept_a, kept_b, kept_c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert kept_a[0].shape[-1] == int(0.3 * 65)
