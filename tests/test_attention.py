"""Hybrid attention: registration, SDPA parity without a cache hook, and the chunked scores."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llamahome.kvcache.attention import (
    HYBRID_ATTENTION,
    HYBRID_EAGER_ATTENTION,
    attention_column_sums,
    eager_column_sums,
    enable_hybrid_attention,
)
from llamahome.kvcache.spec import make_cache


def tiny_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.0,
    )
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pair():
    """The same random tiny GQA Llama twice: plain SDPA and hybrid."""
    torch.manual_seed(0)
    sdpa = LlamaForCausalLM(tiny_config()).eval()
    hybrid = LlamaForCausalLM(tiny_config()).eval()
    hybrid.load_state_dict(sdpa.state_dict())
    return sdpa, enable_hybrid_attention(hybrid)


def test_registration_is_idempotent_and_switches_the_model(pair):
    _, model = pair
    assert enable_hybrid_attention(enable_hybrid_attention(model)) is model
    assert model.config._attn_implementation == HYBRID_ATTENTION
    for name in (HYBRID_ATTENTION, HYBRID_EAGER_ATTENTION):
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError, match="implementation"):
        enable_hybrid_attention(model, "nope")


def _inputs(bsz=2, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (bsz, length), generator=g)


def test_no_cache_is_bitwise_sdpa_with_padding_and_without(pair):
    sdpa, hybrid = pair
    ids = _inputs()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            assert torch.equal(sdpa(ids, **kw).logits, hybrid(ids, **kw).logits)


def test_packed_sequences_and_4d_masks_match_sdpa(pair):
    sdpa, hybrid = pair
    ids = _inputs(bsz=1, length=20)
    # Packed documents: position_ids reset per document, no attention mask (transformers only
    # detects packing without a cache, as in training).
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    # A prepared 4-D boolean mask (block diagonal, causal) goes through as-is.
    doc = torch.tensor([0] * 8 + [1] * 12)
    mask4d = (doc[:, None] == doc[None, :]) & torch.ones(20, 20, dtype=torch.bool).tril()
    with torch.no_grad():
        a = sdpa(ids, position_ids=pos, use_cache=False).logits
        b = hybrid(ids, position_ids=pos, use_cache=False).logits
        assert torch.equal(a, b)
        c = sdpa(ids, attention_mask=mask4d[None, None], position_ids=pos).logits
        d = hybrid(ids, attention_mask=mask4d[None, None], position_ids=pos).logits
        assert torch.equal(c, d)
    # Packing really separates the documents: the second one does not see the first.
    alone = sdpa(ids[:, 8:], position_ids=pos[:, 8:], use_cache=False).logits
    torch.testing.assert_close(b[:, 8:], alone, atol=1e-5, rtol=1e-5)


def test_training_loss_and_gradients_equal_sdpa(pair):
    sdpa, hybrid = pair
    ids = _inputs()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    losses, grads = [], []
    for model in (sdpa, hybrid):
        model.train()
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
        model.eval()
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("chunk", [64, 1000, 2**22])
@pytest.mark.parametrize("kind", ["causal", "padded", "per_head", "decode"])
def test_chunked_scores_equal_eager_column_sums(groups, chunk, kind):
    g = torch.Generator().manual_seed(groups * 7 + chunk % 97)
    bsz, kvh, dim, kv_len = 2, 2, 16, 45
    q_len = 1 if kind == "decode" else 30
    query = torch.randn(bsz, kvh * groups, q_len, dim, generator=g) * 2
    key = torch.randn(bsz, kvh, kv_len, dim, generator=g) * 2
    mask = None
    if kind in ("padded", "decode"):
        pad = torch.ones(bsz, kv_len, dtype=torch.bool)
        pad[0, :9] = False
        mask = sdpa_mask(
            batch_size=bsz,
            q_length=q_len,
            kv_length=kv_len,
            q_offset=kv_len - q_len,
            attention_mask=pad,
            allow_is_causal_skip=False,
        )
    elif kind == "per_head":
        # Generation masks are causal; within that, any per-head pattern.
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        mask = (torch.rand(bsz, kvh * groups, q_len, kv_len, generator=g) > 0.3) & causal
    got = attention_column_sums(query, key, mask, scaling=0.3, chunk_elements=chunk)
    ref = eager_column_sums(query, key, mask, scaling=0.3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert got.shape == (bsz, kvh, kv_len)
    # Each non-empty query row hands out exactly one unit of mass per query head.
    heads = kvh * groups
    rows = heads * q_len if mask is None else int(mask.expand(bsz, heads, -1, -1)[0].any(-1).sum())
    assert abs(float(got[0].sum()) - rows) < 1e-3


def test_fully_masked_rows_give_no_mass():
    query, key = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    mask = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :3] = True
    got = attention_column_sums(query, key, mask, chunk_elements=8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(), torch.tensor(2.0))


def test_eager_reference_path_matches_hybrid_with_eviction():
    torch.manual_seed(3)
    fast = enable_hybrid_attention(LlamaForCausalLM(tiny_config()).eval())
    ref = LlamaForCausalLM(tiny_config()).eval()
    ref.load_state_dict(fast.state_dict())
    enable_hybrid_attention(ref, HYBRID_EAGER_ATTENTION)
    ids = _inputs(length=40)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    caches = [
        make_cache("h2o", m.config, window_length=12, heavy_hitter_tokens=6) for m in (fast, ref)
    ]
    with torch.no_grad():
        outs = [
            m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache=c)
            for m, c in zip((fast, ref), caches, strict=True)
        ]
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(a.positions.sort(-1).values, b.positions.sort(-1).values)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)
