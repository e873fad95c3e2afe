"""Budget semantics: paper ratios fixed from the sequence length, the floor, pinned tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaConfig, LlamaForCausalLM

from llamahome.errors import CacheError
from llamahome.kvcache.attention import enable_hybrid_attention
from llamahome.kvcache.spec import SCORE_POLICIES, CacheSpec, keep_ratio, make_cache, pinned
from llamahome.kvcache.spec import POLICIES as ALL_POLICIES

# kvzip and learned need the model's hooks (a reconstruction prompt, a scorer) and keep per-head
# counts: tests/test_kvzip.py holds their budget tests.
POLICIES = tuple(p for p in ALL_POLICIES if p not in SCORE_POLICIES)


def tiny_config() -> LlamaConfig:
    return tiny_llama_config(max_position_embeddings=1024)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return enable_hybrid_attention(LlamaForCausalLM(tiny_config()).eval())


def _ids(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 96, (batch, length), generator=g)


def _feed(model, cache, prompt: torch.Tensor, steps: int) -> list[int]:
    """Prefill `prompt`, then `steps` greedy tokens one by one; kept count after each step."""
    kept = []
    with torch.no_grad():
        out = model(prompt, cache=cache)
        kept.append(cache.layers[0].keys.shape[2])
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
            kept.append(cache.layers[0].keys.shape[2])
    return kept


def test_ratio_budget_is_fixed_from_seq_len(model):
    # 20% of a 100-token sequence is 20 tokens, from the prefill on (the H2O paper's code).
    cache = make_cache("h2o", model.config, budget_ratio=0.2, min_tokens=0, seq_len=100)
    kept = _feed(model, cache, _ids(60), 40)
    assert kept == [20] * 41
    # Without seq_len, L is the prefill's length: 20% of 60.
    cache = make_cache("h2o", model.config, budget_ratio=0.2, min_tokens=0)
    assert _feed(model, cache, _ids(60), 10) == [12] * 11
    # The same L again after reset (a reused cache takes the next prefill's length).
    cache.reset()
    assert _feed(model, cache, _ids(30), 3) == [6] * 4


def test_running_ratio_keeps_the_old_behaviour(model):
    cache = make_cache(
        "h2o", model.config, budget_ratio=0.2, min_tokens=0, ratio_basis="running", seq_len=100
    )
    kept = _feed(model, cache, _ids(60), 40)
    assert kept == [int(0.2 * seen) for seen in range(60, 101)]


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
@pytest.mark.parametrize(
    "budget", [{"window_length": 8}, {"budget_ratio": 0.2}, {"budget_ratio": 0.5}]
)
def test_never_exceeds_budget_or_floor(model, policy, budget):
    if policy == "h2o" and "window_length" in budget:
        budget = {**budget, "heavy_hitter_tokens": 4}
    spec = CacheSpec(policy=policy, min_tokens=24, **budget)
    cache = spec.build(model.config, seq_len=90)
    kept = _feed(model, cache, _ids(50), 40)
    # A ratio budget is at least the floor (24); a count (8) is held as given.
    ratio = budget.get("budget_ratio")
    cap = max(24, int(ratio * 90)) if ratio else 8
    assert spec.budget.for_cache(90).total(10**6) == cap
    seen = range(50, 91)
    # Never above max(budget, floor); never evicts while holding <= floor tokens.
    assert all(k <= cap for k in kept)
    assert all(k == min(s, cap) for k, s in zip(kept, seen, strict=True))
    for layer in cache.layers:
        assert layer.kv_bytes() <= 2 * layer.keys[0, 0, 0].nbytes * 2 * (cap + 2)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_a_count_budget_is_held_as_given_below_the_floor(model, policy):
    # llama-recipes' counts are the user's budget: the default floor (1024) covers ratios only.
    counts = {"window_length": 24}
    if policy == "h2o":
        counts["heavy_hitter_tokens"] = 12
    cache = make_cache(policy, model.config, **counts)
    kept = _feed(model, cache, _ids(83), 5)
    assert kept == [24] * 6
    assert keep_ratio(cache) == pytest.approx(24 / 88)
    # The same policy with a ratio budget keeps everything under that floor.
    floored = make_cache(policy, model.config, budget_ratio=0.2, seq_len=88)
    assert _feed(model, floored, _ids(83), 5) == list(range(83, 89))


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_pinned_tokens_survive_on_top_of_the_budget(model, policy):
    cache = make_cache(policy, model.config, window_length=6, min_tokens=0)
    ctx, question = _ids(40, seed=1), _ids(5, seed=2)
    with torch.no_grad():
        model(ctx, cache=cache)
        with pinned(cache):
            out = model(question, cache=cache)
        for _ in range(20):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
    for layer in cache.layers:
        # Budget 6 + the 5 pinned question tokens, in every row and head.
        assert layer.keys.shape[2] == 11
        for t in range(40, 45):
            assert bool((layer.positions == t).any(-1).all()), f"pinned token {t} evicted"


@pytest.mark.parametrize("policy", POLICIES)
def test_short_inputs_equal_the_full_cache_under_the_floor(model, policy):
    """With greedy decoding, prompt + answer below the floor gives the full cache's tokens."""
    for seed, (length, new) in enumerate([(5, 20), (40, 60), (100, 27)]):
        ids = _ids(length, seed=seed, batch=2)
        kw = dict(max_new_tokens=new, do_sample=False, min_new_tokens=new)
        with torch.no_grad():
            ref = model.generate(ids, cache=make_cache("full", model.config), **kw)
            # The tightest budget, still covered by the default floor (1024 tokens).
            budget = {} if policy == "full" else {"budget_ratio": 0.05}
            cache = make_cache(policy, model.config, seq_len=length + new, **budget)
            got = model.generate(ids, cache=cache, **kw)
        assert torch.equal(ref, got), (policy, length, new)


def test_make_cache_without_a_model_config_is_a_clear_error():
    with pytest.raises(CacheError, match="model.config"):
        make_cache("h2o", None)
    with pytest.raises(CacheError, match="seq_len"):
        make_cache("h2o", tiny_config(), seq_len=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_keep_ratio_is_tokens_held_over_tokens_seen(model, policy):
    # 20% of 100 tokens = 20 held at every step (full: all of them); padding is not held.
    cache = make_cache(policy, model.config, budget_ratio=0.2, min_tokens=0, seq_len=100)
    _feed(model, cache, _ids(60), 40)
    expected = 1.0 if policy == "full" else 20 / 100
    assert keep_ratio(cache) == pytest.approx(expected)
