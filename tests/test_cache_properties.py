"""Property tests of the eviction invariants, driving the cache layers through the hybrid attention.

No model: random queries/keys go through ``Cache.update`` and ``hybrid_attention_forward`` exactly
as ``LlamaAttention`` sends them, with the masks transformers builds. A reference keeps the whole
history and recomputes every score with the eager (full-matrix) path.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import one_layer_config
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.masking_utils import sdpa_mask

from llamahome.kvcache.attention import (
    eager_column_sums,
    hybrid_attention_forward,
)
from llamahome.kvcache.spec import make_cache as _make_cache


def make_cache(policy, config, **kw):
    """The invariants are about the policies: no floor."""
    return _make_cache(policy, config, **{"min_tokens": 0, **kw})

DIM = 8
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def _config(kv_heads: int, groups: int) -> LlamaConfig:
    return one_layer_config(kv_heads, groups, DIM)


class Driver:
    """Feeds one cache layer like LlamaAttention does and keeps the full history as reference."""

    def __init__(self, cache, bsz: int, kv_heads: int, groups: int, pads: list[int]):
        self.cache, self.bsz, self.kvh, self.groups = cache, bsz, kv_heads, groups
        self.module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
        self.pads = pads
        self.keys = torch.empty(bsz, kv_heads, 0, DIM)
        self.mask2d = torch.empty(bsz, 0, dtype=torch.bool)
        self.ref_scores = torch.zeros(bsz, kv_heads, 0)
        self.gen = torch.Generator().manual_seed(1234)

    @property
    def layer(self):
        return self.cache.layers[0]

    def step(self, q_len: int) -> dict:
        seen = self.cache.get_seq_length()
        layer = self.layer
        before_pos = layer.positions.clone() if layer.positions is not None else None
        # Left padding only inside the prompt: the first `pad` tokens of row b.
        new_mask = torch.stack([torch.arange(seen, seen + q_len) >= p for p in self.pads])
        self.mask2d = torch.cat([self.mask2d, new_mask], dim=1)
        kv_len, kv_off = self.cache.get_mask_sizes(q_len, 0)
        mask = sdpa_mask(
            batch_size=self.bsz,
            q_length=q_len,
            kv_length=kv_len,
            q_offset=seen,
            kv_offset=kv_off,
            attention_mask=self.mask2d,
        )
        heads = self.kvh * self.groups
        q = torch.randn(self.bsz, heads, q_len, DIM, generator=self.gen)
        k = torch.randn(self.bsz, self.kvh, q_len, DIM, generator=self.gen)
        v = torch.randn(self.bsz, self.kvh, q_len, DIM, generator=self.gen)
        kw: dict = {}
        keys, values = self.cache.update(k, v, 0, kwargs=kw)
        assert keys.shape[2] == kv_len
        hybrid_attention_forward(self.module, q, keys, values, mask, scaling=0.5, **kw)
        # Reference: the keys this step attended = kept slots (by position) + the new ones.
        self.keys = torch.cat([self.keys, k], dim=2)
        self.ref_scores = torch.cat([self.ref_scores, torch.zeros(self.bsz, self.kvh, q_len)], 2)
        new_pos = torch.arange(seen, seen + q_len).expand(self.bsz, self.kvh, q_len)
        cand = new_pos if before_pos is None else torch.cat([before_pos, new_pos], dim=2)
        cand_keys = self.keys.gather(2, cand[..., None].expand(-1, -1, -1, DIM))
        valid = self.mask2d[:, None, :].expand(-1, self.kvh, -1).gather(2, cand)
        causal = cand[:, :, None, :] <= torch.arange(seen, seen + q_len)[None, None, :, None]
        allowed = (valid[:, :, None, :] & causal).repeat_interleave(self.groups, dim=1)
        sums = eager_column_sums(q, cand_keys, allowed, scaling=0.5)
        self.ref_scores.scatter_add_(2, cand, sums)
        return {"cand": cand, "valid": valid, "seen": seen + q_len}


def _check_common(drv: Driver, info: dict, budget_total: int, recent: int) -> None:
    layer = drv.layer
    seen = info["seen"]
    assert drv.cache.get_seq_length() == seen
    n = layer.keys.shape[2]
    assert n <= budget_total and n == min(seen, budget_total)
    pos = layer.positions
    # The kept keys are the real keys of those positions.
    expect = drv.keys.gather(2, pos[..., None].expand(-1, -1, -1, DIM))
    torch.testing.assert_close(layer.keys, expect, rtol=0, atol=0)
    # The last `recent` tokens are always kept, in every row and head.
    for t in range(max(0, seen - recent), seen):
        assert bool((pos == t).any(dim=-1).all()), f"recent token {t} evicted"


budgets = st.one_of(
    st.tuples(st.just("counts"), st.integers(1, 24), st.floats(0, 1)),
    st.tuples(st.just("ratios"), st.floats(0.05, 0.95), st.floats(0.05, 1.0)),
    st.tuples(st.just("running"), st.floats(0.05, 0.95), st.floats(0.05, 1.0)),
)


@SETTINGS
@given(
    budget=budgets,
    bsz=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    prompt=st.integers(1, 40),
    steps=st.lists(st.sampled_from([1, 1, 1, 2, 5]), max_size=12),
    pad_frac=st.lists(st.floats(0, 0.9), min_size=3, max_size=3),
)
# Found by hypothesis: a decode token written into a slot freed from padding, with no mask.
@example(
    budget=("ratios", 0.5, 1.0), bsz=3, kv_heads=1, groups=1, prompt=2, steps=[1, 1],
    pad_frac=[0.0, 0.0, 0.5],
)
def test_h2o_invariants(budget, bsz, kv_heads, groups, prompt, steps, pad_frac):
    mode, a, b = budget
    if mode == "counts":
        kw = {"window_length": a, "heavy_hitter_tokens": max(1, round(a * b))}
    else:
        # heavy + recent <= 1 (a larger sum is rejected); both bases.
        kw = {"heavy_ratio": a, "recent_ratio": b * (1 - a)}
        kw["ratio_basis"] = "running" if mode == "running" else "sequence"
    cache = make_cache("h2o", _config(kv_heads, groups), **kw)
    pads = [int(f * prompt) for f in pad_frac[:bsz]]
    drv = Driver(cache, bsz, kv_heads, groups, pads)
    for q_len in [prompt, *steps]:
        info = drv.step(q_len)
        seen = info["seen"]
        _, heavy, recent = drv.layer.budget.sizes(seen)
        _check_common(drv, info, heavy + recent, recent)
        layer = drv.layer
        pos, kept_valid = layer.positions, layer.valid
        # Accumulated scores equal the eager reference (all queries so far, GQA group summed).
        ref = drv.ref_scores.gather(2, pos)
        torch.testing.assert_close(layer.scores, ref, atol=1e-5, rtol=1e-5)
        # Among the older candidates, the kept ones are the top-k: no evicted candidate beats a
        # kept one, and padding never wins over a real token.
        cand, cvalid = info["cand"], info["valid"]
        older = cand < seen - recent
        kept = (cand[..., :, None] == pos[..., None, :]).any(-1)
        score = drv.ref_scores.gather(2, cand).masked_fill(~cvalid, -1.0)
        for bi in range(bsz):
            for h in range(kv_heads):
                k_sel = older[bi, h] & kept[bi, h]
                e_sel = older[bi, h] & ~kept[bi, h]
                if k_sel.any() and e_sel.any():
                    assert score[bi, h][k_sel].min() >= score[bi, h][e_sel].max() - 1e-5
        assert kept_valid.shape == pos.shape


@SETTINGS
@given(
    window=st.integers(1, 20),
    sink=st.integers(0, 5),
    bsz=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 2),
    prompt=st.integers(1, 30),
    steps=st.lists(st.sampled_from([1, 1, 3]), max_size=10),
    pad_frac=st.lists(st.floats(0, 0.9), min_size=3, max_size=3),
)
def test_window_and_sink_invariants(window, sink, bsz, kv_heads, groups, prompt, steps, pad_frac):
    pads = [int(f * prompt) for f in pad_frac[:bsz]]
    if sink == 0:
        cache, recent = (
            make_cache("window", _config(kv_heads, groups), window_length=window),
            window,
        )
    else:
        sink = min(sink, window)
        cache = make_cache(
            "sink", _config(kv_heads, groups), window_length=window, sink_tokens=sink
        )
        recent = window - sink
    drv = Driver(cache, bsz, kv_heads, groups, pads)
    for q_len in [prompt, *steps]:
        info = drv.step(q_len)
        _check_common(drv, info, window, recent)
        if sink:
            # The sinks are the first `sink` real (non-padding) tokens of each row.
            for bi, p in enumerate(pads):
                first = range(p, min(p + sink, info["seen"]))
                for t in first:
                    assert bool((drv.layer.positions[bi] == t).any(-1).all())


@SETTINGS
@given(
    policy=st.sampled_from(["window", "sink", "h2o"]),
    prompt=st.integers(1, 30),
    steps=st.lists(st.sampled_from([1, 2]), max_size=8),
    extra=st.integers(0, 10),
)
def test_budget_at_least_context_never_evicts(policy, prompt, steps, extra):
    total = prompt + sum(steps)
    cache = make_cache(policy, _config(1, 2), window_length=total + extra)
    drv = Driver(cache, 1, 1, 2, [0])
    for q_len in [prompt, *steps]:
        info = drv.step(q_len)
        assert drv.layer.positions[0, 0].tolist() == list(range(info["seen"]))
