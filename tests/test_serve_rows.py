"""``kvcache.rows.RowsCache``: rows with different caches (policy, budget, length) decoded in one
forward give each row the logits it gets alone; a failing row ends alone; scorers see their row.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config

from llamahome.errors import CacheError
from llamahome.kvcache import CacheSpec
from llamahome.kvcache.attention import enable_hybrid_attention
from llamahome.kvcache.rows import RowsCache

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [
    CacheSpec("full"),
    CacheSpec("h2o", budget_ratio=0.3, min_tokens=0),
    CacheSpec("window", window_length=9, min_tokens=0),
    CacheSpec("tova", window_length=11, min_tokens=0),
    CacheSpec("snapkv", budget_ratio=0.5, min_tokens=0),
]
STEPS = 10


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=64)).eval()
    return enable_hybrid_attention(model)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(2, 64, (n,), generator=gen).tolist() for n in (7, 23, 16, 30, 12)]


@torch.inference_mode()
def prefill(model, spec: CacheSpec, ids: list[int], chunk: int = 8):
    """Chunked prefill on the row's own cache; returns (cache, first token)."""
    cache = spec.build(model.config, seq_len=len(ids) + STEPS)
    for start in range(0, len(ids), chunk):
        part = torch.tensor([ids[start : start + chunk]])
        positions = torch.arange(start, start + part.shape[1])[None]
        out = model(input_ids=part, position_ids=positions, cache=cache, logits_to_keep=1)
    return cache, int(out.logits[0, -1].argmax())


@torch.inference_mode()
def decode_alone(model, spec, ids) -> tuple[list[int], list[torch.Tensor]]:
    cache, token = prefill(model, spec, ids)
    tokens, logits = [token], []
    for step in range(STEPS):
        out = model(
            input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[len(ids) + step]]),
            cache=cache,
        )
        logits.append(out.logits[0, -1])
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
    return tokens, logits


def test_rows_with_different_caches_decode_as_they_do_alone(model):
    alone = [decode_alone(model, spec, ids) for spec, ids in zip(SPECS, prompts(), strict=True)]
    rows = [prefill(model, spec, ids) for spec, ids in zip(SPECS, prompts(), strict=True)]
    caches, tokens = [c for c, _ in rows], [[t] for _, t in rows]
    lengths = [len(ids) for ids in prompts()]
    with torch.inference_mode():
        for step in range(STEPS):
            batch = RowsCache(caches, model.config)
            out = model(
                input_ids=torch.tensor([[t[-1]] for t in tokens]),
                position_ids=torch.tensor([[n + step] for n in lengths]),
                cache=batch,
            )
            assert not batch.failures
            for i, row in enumerate(tokens):
                torch.testing.assert_close(out.logits[i, -1], alone[i][1][step], atol=2e-5, rtol=0)
                row.append(int(out.logits[i, -1].argmax()))
    assert tokens == [a[0] for a in alone]
    # Each evicting row kept its own budget, whatever the others held.
    held = [c.layers[0].get_seq_length() for c in caches]
    kept = [c.layers[0].keys.shape[2] for c in caches]
    assert held == [n + STEPS for n in lengths]
    assert kept[0] == held[0] and kept[2] <= 9 + 1 and kept[3] <= 11 + 1
    assert kept[1] < held[1] and kept[4] < held[4]


def test_a_row_that_fails_ends_alone(model):
    ids = prompts()
    good = decode_alone(model, SPECS[0], ids[0])[0]
    (c0, t0), (c1, t1) = prefill(model, SPECS[0], ids[0]), prefill(model, SPECS[1], ids[1])
    layer = c1.layers[1]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in one row's cache")

    layer.finish = broken  # the h2o row's second layer breaks at its next step
    tokens = [t0]
    with torch.inference_mode():
        batch = RowsCache([c0, c1], model.config)
        out = model(
            input_ids=torch.tensor([[t0], [t1]]),
            position_ids=torch.tensor([[len(ids[0])], [len(ids[1])]]), cache=batch,
        )
    assert list(batch.failures) == [1] and "simulated" in str(batch.failures[1])
    tokens.append(int(out.logits[0, -1].argmax()))
    assert tokens == good[:2]  # the full row's step is what it is alone
    assert torch.isfinite(out.logits).all()  # the failed row's zeros leak no NaN


def test_observe_hidden_reaches_each_row(model):
    seen: dict[int, torch.Tensor] = {}

    class Observer:
        def __init__(self, layer, row):
            self.layer, self.row = layer, row

        def __getattr__(self, name):
            return getattr(self.layer, name)

        def observe_hidden(self, hidden):
            seen[self.row] = hidden

    caches = [prefill(model, SPECS[i], ids)[0] for i, ids in ((0, [5, 6, 7]), (1, [9, 8]))]
    batch = RowsCache(caches, model.config)
    layer = batch.layers[0]
    layer.rows = [Observer(row_layer, i) for i, row_layer in enumerate(layer.rows)]
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    layer.observe_hidden(hidden)
    assert torch.equal(seen[0], hidden[:1]) and torch.equal(seen[1], hidden[1:])


def test_rows_cache_refuses_misuse(model):
    cache = prefill(model, SPECS[0], [3, 4, 5])[0]
    with pytest.raises(CacheError, match="at least one row"):
        RowsCache([])
    batch = RowsCache([cache], model.config)
    with pytest.raises(CacheError, match="decode steps"), torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2]]), cache=batch)
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(tiny_llama_config(vocab_size=64))
    plain.config._attn_implementation_internal = "sdpa"
    with pytest.raises(CacheError, match="hybrid attention"):
        RowsCache([cache], plain.config)
