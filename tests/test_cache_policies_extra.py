"""keydiff, knorm, tova and snapkv: budgets on a real tiny Llama, kept sets against references.

The fidelity tests drive one cache layer through ``Cache.update`` and the hybrid attention exactly
as ``LlamaAttention`` does, with random queries and keys, and replay each paper's rule on the full
history in plain PyTorch: the kept positions must be the same at every step.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import one_layer_config, tiny_llama_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM
from transformers.masking_utils import sdpa_mask

from llamahome import make_cache
from llamahome.kvcache import snapkv
from llamahome.kvcache.attention import enable_hybrid_attention, hybrid_attention_forward
from llamahome.kvcache.spec import POLICIES, CacheSpec

NEW = ("keydiff", "knorm", "tova", "snapkv")
CONF = Path(__file__).resolve().parents[1] / "llamahome" / "conf" / "cache"
# Measure the policy itself: no floor under which nothing is evicted (where the spec has one).
NO_FLOOR = {"min_tokens": 0}  # the rules are about the policies themselves
DIM = 8


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    return enable_hybrid_attention(LlamaForCausalLM(tiny_llama_config()).eval())


def _batch(length: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2, row 0 left-padded by `pad`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 96, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad], ids[0, :pad] = 0, 0
    return ids, mask


# ---- budgets on a real model ----------------------------------------------------------------
@pytest.mark.parametrize("policy", NEW)
@pytest.mark.parametrize(
    ("budget", "bound"),
    [
        ({"window_length": 12}, lambda seen: 12),
        ({"budget_ratio": 0.2}, lambda seen: int(0.2 * seen + 1e-9)),
    ],
)
def test_never_exceeds_the_budget(model, policy, budget, bound):
    ids, mask = _batch(40, pad=7, seed=3)
    cache = make_cache(policy, model.config, **budget, **NO_FLOOR)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, cache=cache)
        for step in range(24):
            seen = cache.get_seq_length()
            for layer in cache.layers:
                assert layer.keys.shape[2] <= bound(seen), (step, seen)
                assert bool(layer.valid.all())  # row 0's padding never takes a real token's slot
                assert bool((layer.positions == seen - 1).any(-1).all())  # newest kept
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = model(nxt, attention_mask=mask, position_ids=pos, cache=cache)
    assert cache.get_seq_length() == 40 + 24


@pytest.mark.parametrize("policy", NEW)
def test_generate_works(model, policy):
    ids, mask = _batch(48, pad=9, seed=4)
    cache = make_cache(policy, model.config, window_length=16, **NO_FLOOR)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache=cache
        )
    assert out.shape == (2, 60)
    assert cache.policy == policy
    assert all(layer.keys.shape == (2, 2, 16, 16) for layer in cache.layers)
    # With a budget that covers everything, the tokens equal the full cache's.
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        got = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            cache=make_cache(policy, model.config, window_length=100),
        )
    assert torch.equal(ref, got)


@pytest.mark.parametrize("policy", NEW)
def test_registered_with_a_config(policy):
    assert policy in POLICIES
    spec = instantiate(OmegaConf.load(CONF / f"{policy}.yaml"), budget_ratio=0.2)
    assert isinstance(spec, CacheSpec) and spec.policy == policy
    # budget_ratio: keydiff and knorm give a tenth to the recent window, the others split as h2o.
    heavy, recent = (0.18, 0.02) if policy in ("keydiff", "knorm") else (0.1, 0.1)
    assert spec.budget.heavy_ratio == pytest.approx(heavy)
    assert spec.budget.recent_ratio == pytest.approx(recent)


# ---- kept sets against plain references -------------------------------------------------------
class Driver:
    """Feeds one cache layer as LlamaAttention does; keeps every query and key for the reference.

    After each step, `check` replays the policy's rule in plain PyTorch on the candidates of that
    step (the slots kept before it + the new tokens): the layer must keep the protected tokens and
    a top-scoring rest (ties, which max-pooling makes, may go either way).
    """

    def __init__(self, policy: str, total: int, bsz: int = 2, kv_heads: int = 2, groups: int = 2):
        cfg = one_layer_config(kv_heads, groups, DIM)
        self.cache = make_cache(policy, cfg, window_length=total, **NO_FLOOR)
        self.total, self.bsz, self.kvh, self.groups = total, bsz, kv_heads, groups
        self.module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
        self.queries = torch.empty(bsz, kv_heads * groups, 0, DIM)
        self.keys = torch.empty(bsz, kv_heads, 0, DIM)
        self.gen = torch.Generator().manual_seed(7)
        self.before = [[[] for _ in range(kv_heads)] for _ in range(bsz)]
        self.seen = 0

    def step(self, q_len: int) -> None:
        seen = self.seen
        layer = self.cache.layers[0]
        self.before = [[[] for _ in range(self.kvh)] for _ in range(self.bsz)]
        if layer.positions is not None:
            self.before = layer.positions.tolist()
        kv_len, kv_off = self.cache.get_mask_sizes(q_len, 0)
        mask = sdpa_mask(
            batch_size=self.bsz,
            q_length=q_len,
            kv_length=kv_len,
            q_offset=seen,
            kv_offset=kv_off,
            attention_mask=torch.ones(self.bsz, seen + q_len, dtype=torch.bool),
        )
        # Scaled up so attention is peaked.
        q = 2 * torch.randn(self.bsz, self.kvh * self.groups, q_len, DIM, generator=self.gen)
        k = 2 * torch.randn(self.bsz, self.kvh, q_len, DIM, generator=self.gen)
        v = torch.randn(self.bsz, self.kvh, q_len, DIM, generator=self.gen)
        kw: dict = {}
        keys, values = self.cache.update(k, v, 0, kwargs=kw)
        hybrid_attention_forward(self.module, q, keys, values, mask, **kw)
        self.queries = torch.cat([self.queries, q], dim=2)
        self.keys = torch.cat([self.keys, k], dim=2)
        self.seen += q_len

    def candidates(self, b: int, kvh: int) -> list[int]:
        return sorted(self.before[b][kvh]) + list(range(self.new_start, self.seen))

    @property
    def new_start(self) -> int:
        return self.seen - self.last_q

    def check(self, b: int, kvh: int, scores: dict[int, float], protected: set[int]) -> None:
        """The layer kept `protected` and a top-scoring rest of the candidates."""
        cand = self.candidates(b, kvh)
        kept = set(self.cache.layers[0].positions[b, kvh].tolist())
        assert len(kept) == min(self.total, len(cand))
        if len(cand) <= self.total:
            assert kept == set(cand)
            return
        assert protected <= kept, (b, kvh, sorted(protected - kept))
        rest_kept = [scores[p] for p in kept - protected]
        evicted = [scores[p] for p in set(cand) - kept]
        assert not rest_kept or min(rest_kept) >= max(evicted) - 1e-6, (b, kvh)


def _probs(query: torch.Tensor, keys: torch.Tensor, qpos: int, kpos: list[int]) -> torch.Tensor:
    """Softmax of one query (head_dim,) over keys (n, head_dim) at positions kpos, causal."""
    logits = keys @ query / DIM**0.5
    logits[torch.tensor(kpos) > qpos] = float("-inf")
    return torch.softmax(logits, dim=0)


def _drive(policy: str, total: int, steps: list[int], check_step) -> None:
    drv = Driver(policy, total)
    state: dict = {}
    for q_len in steps:
        drv.last_q = q_len
        drv.step(q_len)
        for b in range(drv.bsz):
            for kvh in range(drv.kvh):
                check_step(drv, b, kvh, state)


STEPS = [30, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1]


def test_tova_kept_set_equals_the_reference():
    """TOVA: the newest + the top by the last query's attention, averaged over all heads."""

    def check(drv: Driver, b: int, kvh: int, state: dict) -> None:
        cand, last = drv.candidates(b, kvh), drv.seen - 1
        heads = drv.kvh * drv.groups
        score = torch.zeros(len(cand))
        for h in range(heads):  # every head of the layer, over the same candidates
            keys = drv.keys[b, h // drv.groups, cand]
            score += _probs(drv.queries[b, h, last], keys, last, cand) / heads
        drv.check(b, kvh, dict(zip(cand, score.tolist(), strict=True)), {last})
        # One layer-wide ranking: every KV head keeps the same tokens.
        positions = drv.cache.layers[0].positions[b].sort(dim=-1).values
        assert bool((positions == positions[:1]).all())

    _drive("tova", 10, STEPS, check)


@pytest.mark.parametrize(("window", "total", "prompt"), [(4, 12, 30), (32, 40, 44)])
def test_snapkv_kept_set_equals_the_reference(monkeypatch, window, total, prompt):
    """SnapKV: pooled observation-window attention at prefill, then accumulated attention."""
    monkeypatch.setattr(snapkv, "OBSERVATION_WINDOW", window)
    w = min(window, prompt - 1)
    recent = min(w, total)

    def check(drv: Driver, b: int, kvh: int, state: dict) -> None:
        cand = drv.candidates(b, kvh)
        heads = range(kvh * drv.groups, (kvh + 1) * drv.groups)
        keys = drv.keys[b, kvh, cand]
        if drv.seen == prompt:  # prefill: the window's attention, pooled per query head
            score = dict.fromkeys(cand, 0.0)
            for h in heads:
                sums = sum(
                    _probs(drv.queries[b, h, t], keys, t, cand) for t in range(prompt - w, prompt)
                )
                for p in cand:
                    if p >= prompt - w:
                        score[p] += float(sums[p])
                        continue
                    # Average over 5 neighbours of the older part, zero beyond its edges.
                    near = range(max(0, p - 2), min(prompt - w, p + 3))
                    score[p] += sum(float(sums[j]) for j in near) / 5
        else:  # decode: add the attention each new query gives each candidate
            score = {p: state[b, kvh].get(p, 0.0) for p in cand}
            for t in range(drv.new_start, drv.seen):
                for h in heads:
                    probs = _probs(drv.queries[b, h, t], keys, t, cand).tolist()
                    for p, pr in zip(cand, probs, strict=True):
                        score[p] += pr
        drv.check(b, kvh, score, set(range(drv.seen - recent, drv.seen)))
        # The layer's accumulated scores are the reference's, for what it kept.
        layer = drv.cache.layers[0]
        for p, s in zip(
            layer.positions[b, kvh].tolist(), layer.scores[b, kvh].tolist(), strict=True
        ):
            assert s == pytest.approx(score[p], rel=1e-4, abs=1e-5)
        state[b, kvh] = score

    _drive("snapkv", total, [prompt, *STEPS[1:]], check)


def test_keydiff_kept_set_equals_the_reference():
    """KeyDiff: the recent window + the keys least cosine-similar to the mean normalised key."""
    total = 10
    recent = total - total // 2  # window_length's default split, as for h2o

    def check(drv: Driver, b: int, kvh: int, state: dict) -> None:
        cand = drv.candidates(b, kvh)
        keys = drv.keys[b, kvh, cand]
        anchor = F.normalize(keys, dim=-1).mean(dim=0)
        cos = F.cosine_similarity(keys, anchor[None], dim=-1)
        score = dict(zip(cand, (-cos).tolist(), strict=True))
        drv.check(b, kvh, score, set(range(drv.seen - recent, drv.seen)))

    _drive("keydiff", total, STEPS, check)


def test_knorm_keeps_the_lowest_norm_keys():
    """Knorm: the recent window + the keys of lowest L2 norm."""
    total = 10
    recent = total - total // 2

    def check(drv: Driver, b: int, kvh: int, state: dict) -> None:
        cand = drv.candidates(b, kvh)
        norms = {p: -float(drv.keys[b, kvh, p].norm()) for p in cand}
        drv.check(b, kvh, norms, set(range(drv.seen - recent, drv.seen)))

    _drive("knorm", total, STEPS, check)
