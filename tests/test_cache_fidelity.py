"""Fidelity: h2o keeps exactly the tokens of a plain reference implementation of the H2O rule.

The reference is the paper's rule written out loop by loop (Zhang et al. 2023, and the authors'
code): every key accumulates the softmax attention it receives from every query (summed over the
query heads of its KV head), and after each step a KV head keeps the recent window plus the
highest accumulated scores among the older tokens, ``int(ratio * L)`` in all, L fixed once.
It sees the same queries and keys as the model (recorded from the cache layers) and decides on
its own; the kept sets must agree at every step of prefill and decoding.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from llamahome.kvcache.attention import enable_hybrid_attention
from llamahome.kvcache.spec import make_cache

PROMPT, STEPS, RATIO = 40, 30, 0.3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = tiny_llama_config(max_position_embeddings=256)
    return enable_hybrid_attention(LlamaForCausalLM(config).eval())


class ReferenceH2O:
    """The H2O rule for one layer, plainly: dicts of positions, Python loops over heads."""

    def __init__(self, batch: int, kv_heads: int, seq_len: int) -> None:
        self.total = math.floor(RATIO * seq_len)
        self.recent = max(1, math.floor(RATIO / 2 * seq_len))
        self.keys: list[torch.Tensor] = []  # new keys of each step, (b, kvh, q, d)
        self.kept = [[set() for _ in range(kv_heads)] for _ in range(batch)]
        self.acc = [[{} for _ in range(kv_heads)] for _ in range(batch)]
        self.seen = 0

    def step(self, query: torch.Tensor, new_keys: torch.Tensor) -> None:
        bsz, heads, q_len, dim = query.shape
        kv_heads = new_keys.shape[1]
        groups = heads // kv_heads
        self.keys.append(new_keys.double())
        history = torch.cat(self.keys, dim=2)  # every key so far, by position
        start = self.seen
        self.seen += q_len
        for b in range(bsz):
            for h in range(kv_heads):
                cands = sorted(self.kept[b][h] | set(range(start, self.seen)))
                acc = self.acc[b][h]
                for p in range(start, self.seen):
                    acc[p] = 0.0
                for g in range(groups):
                    for i in range(q_len):
                        visible = [p for p in cands if p <= start + i]
                        qv = query[b, h * groups + g, i].double()
                        logits = torch.stack([history[b, h, p] @ qv for p in visible])
                        probs = torch.softmax(logits / math.sqrt(dim), dim=0)
                        for p, w in zip(visible, probs.tolist(), strict=True):
                            acc[p] += w
                total = min(self.seen, self.total)
                recent = {p for p in cands if p >= self.seen - self.recent}
                older = sorted((p for p in cands if p not in recent), key=lambda p: -acc[p])
                self.kept[b][h] = recent | set(older[: total - len(recent)])


def _run(model, ids, check_every_step: bool):
    """Generate greedily with h2o; the reference follows. Returns logits and final kept sets."""
    cache = make_cache(
        "h2o", model.config, budget_ratio=RATIO, min_tokens=0, seq_len=PROMPT + STEPS
    )
    refs = [ReferenceH2O(ids.shape[0], 2, PROMPT + STEPS) for _ in cache.layers]
    pending: dict[int, torch.Tensor] = {}
    for idx, layer in enumerate(cache.layers):

        def update(key_states, value_states, *a, _orig=layer.update, _i=idx, **k):
            pending[_i] = key_states.detach().clone()
            return _orig(key_states, value_states, *a, **k)

        def prepare(query, key, mask, pos, _orig=layer.prepare, _i=idx):
            refs[_i].step(query.detach(), pending.pop(_i))
            return _orig(query, key, mask, pos)

        layer.update, layer.prepare = update, prepare

    def kept(layer):
        pos = layer.positions
        return [[set(pos[b, h].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]

    def check():
        for layer, ref in zip(cache.layers, refs, strict=True):
            assert kept(layer) == ref.kept, f"step {ref.seen}: kept sets differ"

    logits = []
    with torch.no_grad():
        out = model(ids, cache=cache)
        if check_every_step:
            check()
        for _ in range(STEPS):
            logits.append(out.logits[:, -1])
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
            if check_every_step:
                check()
    check()
    return torch.stack(logits), [kept(layer) for layer in cache.layers]


@pytest.mark.parametrize("batch", [1, 2])
def test_h2o_keeps_what_the_reference_rule_keeps(model, batch, one_thread):
    ids = torch.randint(2, 96, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    stepwise, kept_a = _run(model, ids, check_every_step=True)
    # Reading the kept set settles pending evictions; untouched, the fast decode path must
    # keep the same tokens and give the same logits.
    untouched, kept_b = _run(model, ids, check_every_step=False)
    assert kept_a == kept_b
    torch.testing.assert_close(untouched, stepwise, rtol=0, atol=0)


# ---- The hand-over from the floor ------------------------------------------------------------
# A ratio budget with a floor keeps everything until the sequence passes `min_tokens`; from then
# on the cache holds `min_tokens` tokens. The first eviction must be the policy's own choice
# over everything seen, as if no floor had deferred it: h2o's scores accumulated from the first
# token, knorm's and keydiff's scores over every key, TOVA's from the current query.
FLOOR = 50  # > RATIO * (PROMPT + STEPS) = 21: the floor is the budget once it is passed


def _recording(cache) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record, per layer and step, the query the attention sees and the step's new keys."""
    steps: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in cache.layers]
    pending: dict[int, torch.Tensor] = {}
    for idx, layer in enumerate(cache.layers):

        def update(key_states, value_states, *a, _orig=layer.update, _i=idx, **k):
            pending[_i] = key_states.detach().clone()
            return _orig(key_states, value_states, *a, **k)

        def prepare(query, key, mask, pos, _orig=layer.prepare, _i=idx):
            steps[_i].append((query.detach().clone(), pending.pop(_i)))
            return _orig(query, key, mask, pos)

        layer.update, layer.prepare = update, prepare
    return steps


def _kept(layer) -> list[list[set[int]]]:
    pos = layer.positions
    return [[set(pos[b, h].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]


def _reference_scores(policy: str, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Eviction scores when FLOOR + 1 tokens are held and FLOOR are kept: the lowest goes.

    `keys` are every key seen, in position order (nothing was evicted under the floor); `query`
    is the current (last) query. Plain formulas from the papers, in float64; inf = never evicted.
    Returns (batch, kv_heads, FLOOR + 1).
    """
    bsz, kv_heads, seen, dim = keys.shape
    keys, query = keys.double(), query.double()
    length = PROMPT + STEPS
    positions = torch.arange(seen, dtype=torch.float64).expand(bsz, kv_heads, seen).clone()
    if policy == "window":
        return positions  # the oldest goes
    if policy == "sink":
        return positions.masked_fill(positions < 4, math.inf)  # the oldest after the 4 sinks
    if policy == "tova":
        groups = query.shape[1] // kv_heads
        expanded = keys.repeat_interleave(groups, dim=1)
        probs = torch.softmax(query @ expanded.transpose(-1, -2) / math.sqrt(dim), dim=-1)
        score = probs.mean(dim=(1, 2))[:, None].expand(bsz, kv_heads, seen).clone()
        score[..., -1] = math.inf  # the newest is always kept
        return score
    if policy == "knorm":
        recent = math.floor(RATIO / 2 * length)
        score = -keys.norm(dim=-1)  # low norm is kept
    else:  # keydiff: 90% scored, a 10% recent window
        recent = math.floor(RATIO * 0.1 * length)
        unit = keys / keys.norm(dim=-1, keepdim=True)
        anchor = unit.mean(dim=2, keepdim=True)
        score = -(unit * anchor / anchor.norm(dim=-1, keepdim=True)).sum(-1)
    score[..., seen - max(1, recent) :] = math.inf
    return score


@pytest.mark.parametrize("policy", ["window", "sink", "knorm", "keydiff", "tova"])
def test_the_first_eviction_past_the_floor_is_the_policys_choice(model, policy, one_thread):
    cache = make_cache(
        policy, model.config, budget_ratio=RATIO, min_tokens=FLOOR, seq_len=PROMPT + STEPS
    )
    steps = _recording(cache)
    ids = torch.randint(2, 96, (2, PROMPT), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = model(ids, cache=cache)
        for _ in range(FLOOR - PROMPT):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
        for layer in cache.layers:  # under the floor: every token held
            assert _kept(layer) == [[set(range(FLOOR))] * 2] * 2
        model(out.logits[:, -1:].argmax(-1), cache=cache)
    for layer, recorded in zip(cache.layers, steps, strict=True):
        keys = torch.cat([new_keys for _, new_keys in recorded], dim=2)
        score = _reference_scores(policy, recorded[-1][0], keys)
        for b, row in enumerate(_kept(layer)):
            for h, kept in enumerate(row):
                (victim,) = set(range(FLOOR + 1)) - kept  # exactly one token evicted
                # The reference's lowest score; a tie within float32 error may go either way
                # (in layer 0 a repeated token's keys differ by a rotation only: equal norms).
                lowest = float(score[b, h].min())
                assert float(score[b, h, victim]) <= lowest + 1e-5, (policy, b, h, victim)


@pytest.mark.parametrize("batch", [1, 2])
def test_h2o_hand_over_from_the_floor_keeps_what_the_reference_keeps(model, batch, one_thread):
    """Scores accumulate under the floor, so the first evictions past it are the paper's."""
    cache = make_cache(
        "h2o", model.config, budget_ratio=RATIO, min_tokens=FLOOR, seq_len=PROMPT + STEPS
    )
    refs = [ReferenceH2O(batch, 2, PROMPT + STEPS) for _ in cache.layers]
    for ref in refs:
        ref.total = FLOOR  # max(floor, int(RATIO * L)): the floor is the budget here
    steps = _recording(cache)
    ids = torch.randint(2, 96, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        out = model(ids, cache=cache)
        for _ in range(STEPS):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
            for layer, ref, recorded in zip(cache.layers, refs, steps, strict=True):
                while ref.seen < cache.get_seq_length():
                    ref.step(*recorded[len(ref.keys)])
                assert _kept(layer) == ref.kept, f"step {ref.seen}: kept sets differ"
    assert cache.layers[0].keys.shape[2] == FLOOR  # it did evict, down to the floor
