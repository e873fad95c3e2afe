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


# ---- SnapKV and Knorm against kvpress's rules (issue #15, part 6) ----------------------------
def _prefill_capture(model, ids, policy, **budget):
    """Prefill `ids` through a fresh cache; return it and each layer's (query, key) at prefill."""
    cache = make_cache(policy, model.config, min_tokens=0, seq_len=ids.shape[1], **budget)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for idx, layer in enumerate(cache.layers):

        def prepare(query, key, mask, pos, _orig=layer.prepare, _i=idx):
            seen[_i] = (query.detach().clone(), key.detach().clone())
            return _orig(query, key, mask, pos)

        layer.prepare = prepare
    with torch.no_grad():
        model(ids, cache=cache)
    return cache, seen


def _kvpress_snapkv_keep(query, key, window, n_kept, kernel=5):
    """kvpress's SnapKVPress rule, written out: the kept positions per (row, KV head).

    Softmax of the last `window` queries over every key (causal), the older keys' columns
    averaged over the window, ``avg_pool1d(kernel, padding=kernel // 2)``, averaged over the query
    heads of each KV head; the window gets the max score + 1; the top `n_kept` are kept.
    """
    bsz, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    keys = key.repeat_interleave(groups, dim=1).double()
    logits = query[:, :, -window:].double() @ keys.transpose(-1, -2) / math.sqrt(dim)
    future = torch.ones(window, length, dtype=torch.bool).triu(length - window + 1)
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    older = probs[..., : length - window].mean(dim=-2)
    pooled = torch.nn.functional.avg_pool1d(older, kernel, stride=1, padding=kernel // 2)
    scores = pooled.view(bsz, kv_heads, groups, length - window).mean(dim=2)
    scores = torch.nn.functional.pad(scores, (0, window), value=float(scores.max()) + 1)
    return [
        [set(scores[b, h].topk(n_kept).indices.tolist()) for h in range(kv_heads)]
        for b in range(bsz)
    ]


def test_snapkv_prefill_keeps_what_kvpress_snapkvpress_keeps(model, monkeypatch, one_thread):
    """Window, pooling (average, kernel 5), GQA grouping: the kept sets are kvpress's."""
    from llamahome.kvcache import snapkv

    monkeypatch.setattr(snapkv, "OBSERVATION_WINDOW", 16)  # the tiny prompt's window (64 at L>64)
    length, ratio = 80, 0.4
    ids = torch.randint(2, 96, (2, length), generator=torch.Generator().manual_seed(11))
    cache, seen = _prefill_capture(model, ids, "snapkv", budget_ratio=ratio)
    n_kept = math.floor(ratio * length)
    for i, layer in enumerate(cache.layers):
        query, key = seen[i]
        want = _kvpress_snapkv_keep(query, key, 16, n_kept)
        pos = layer.positions
        got = [[set(pos[b, h].tolist()) for h in range(pos.shape[1])] for b in range(2)]
        assert got == want, f"layer {i}"


def test_snapkv_window_is_the_question_only_when_the_question_is_compressed(model, one_thread):
    """kvpress's protocol compresses the context first: the window is then the context's end."""
    from llamahome.kvcache.snapkv import OBSERVATION_WINDOW
    from llamahome.kvcache.spec import pinned

    context, question = 200, 70
    ids = torch.randint(2, 96, (1, context + question), generator=torch.Generator().manual_seed(5))
    assert OBSERVATION_WINDOW == 64  # the authors' and kvpress's default
    # Question compressed: one prefill, the last 64 prompt tokens (all question) are the window.
    whole = make_cache("snapkv", model.config, budget_ratio=0.5, min_tokens=0)
    with torch.no_grad():
        model(ids, cache=whole)
    window = set(range(context + question - 64, context + question))
    assert all(window <= set(row.tolist()) for row in whole.layers[0].positions[0])
    # Question protected: the context alone is compressed; its last 64 tokens are the window and
    # the question, fed pinned afterwards, is held on top of the budget.
    part = make_cache("snapkv", model.config, budget_ratio=0.5, min_tokens=0, seq_len=context)
    with torch.no_grad():
        model(ids[:, :context], cache=part)
        window = set(range(context - 64, context))
        assert all(window <= set(row.tolist()) for row in part.layers[0].positions[0])
        with pinned(part):
            model(ids[:, context:], cache=part)
    held = part.layers[0].positions[0]
    assert held.shape[-1] == 100 + question


def test_knorm_is_kvpress_knorm_plus_a_tenth_of_the_budget_as_recent_window(model, one_thread):
    """The deliberate difference: kvpress keeps the lowest-norm keys only; we keep the newest 10%
    of the budget whole (an answer's own tokens stay while decoding), then the lowest norms."""
    length, ratio = 100, 0.3
    ids = torch.randint(2, 96, (2, length), generator=torch.Generator().manual_seed(3))
    cache, seen = _prefill_capture(model, ids, "knorm", budget_ratio=ratio)
    total = math.floor(ratio * length)
    recent = math.floor(ratio * 0.1 * length)
    for i, layer in enumerate(cache.layers):
        _, key = seen[i]
        norms = key.double().norm(dim=-1)  # (b, kvh, L)
        for b in range(2):
            for h in range(key.shape[1]):
                window = set(range(length - recent, length))
                got = set(layer.positions[b, h].tolist())
                assert len(got) == total and window <= got, (i, b, h)
                # The rest: the lowest norms of the older keys (a repeated token id has the same
                # key norm at any position, RoPE being a rotation: ties may go either way).
                kept = [float(norms[b, h, p]) for p in got - window]
                dropped = [float(norms[b, h, p]) for p in set(range(length)) - got]
                assert max(kept) <= min(dropped) + 1e-5, (i, b, h)

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
    # knorm and keydiff: 90% scored, a 10% recent window
    recent = math.floor(RATIO * 0.1 * length)
    if policy == "knorm":
        score = -keys.norm(dim=-1)  # low norm is kept
    else:
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
