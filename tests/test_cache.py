"""KV-cache policies on a real tiny GQA Llama: exactness, generate(), budgets, errors, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import Cache, DynamicCache, LlamaConfig, LlamaForCausalLM

from llamahome import make_cache as _make_cache
from llamahome.errors import CacheError, ConfigError
from llamahome.kvcache.attention import (
    HYBRID_ATTENTION,
    HYBRID_EAGER_ATTENTION,
    enable_hybrid_attention,
)
from llamahome.kvcache.spec import CacheSpec, full_kv_bytes, kv_bytes

CONF = Path(__file__).resolve().parents[1] / "llamahome" / "conf" / "cache"
POLICIES = ("full", "window", "sink", "h2o")


def make_cache(policy, config, **kw):
    """These tests measure the policies on short texts: no floor unless a test sets one."""
    return _make_cache(policy, config, **{"min_tokens": 0, **kw})


def tiny_config(**kw) -> LlamaConfig:
    return tiny_llama_config(**kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return enable_hybrid_attention(LlamaForCausalLM(tiny_config()).eval())


def _batch(length=14, pad=5, seed=0):
    """Batch 2, row 0 left-padded by `pad`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 96, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def _decode_logits(model, cache, ids, mask, steps=32):
    """Prefill + `steps` greedy decode steps by hand; stacked last-token logits."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=pos, cache=cache)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(nxt, attention_mask=mask, position_ids=pos, cache=cache)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


EXACT_BUDGETS = [
    ("window", {"window_length": 64}),
    ("window", {"recent_ratio": 1.0, "ratio_basis": "running"}),
    ("sink", {"window_length": 64, "sink_tokens": 4}),
    ("sink", {"budget_ratio": 1.0, "seq_len": 14 + 32}),
    ("h2o", {"window_length": 64, "heavy_hitter_tokens": 20}),
    ("h2o", {"heavy_ratio": 0.5, "recent_ratio": 0.5, "seq_len": 14 + 32}),
    ("h2o", {"window_length": 46, "heavy_hitter_tokens": 46}),
    ("h2o", {"window_length": 64, "position_rolling": True}),
]


@pytest.mark.parametrize(("policy", "budget"), EXACT_BUDGETS)
def test_budget_covering_the_sequence_equals_dynamic_cache(model, policy, budget):
    ids, mask = _batch()
    with torch.no_grad():
        ref = _decode_logits(model, DynamicCache(config=model.config), ids, mask)
        cache = make_cache(policy, model.config, **budget)
        got = _decode_logits(model, cache, ids, mask)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ids.shape[1] + 32
    assert cache.layers[0].keys.shape == (2, 2, ids.shape[1] + 32, 16)


@pytest.mark.parametrize("policy", POLICIES)
def test_generate_is_token_identical_with_a_covering_budget(model, policy):
    ids, mask = _batch(seed=1)
    kw = {} if policy == "full" else {"window_length": 100}
    with torch.no_grad(), pytest.warns(FutureWarning):  # the API spelling, still accepted
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        got = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=24,
            do_sample=False,
            past_key_values=make_cache(policy, model.config, **kw),
        )
    assert torch.equal(ref, got)


@pytest.mark.parametrize(
    ("policy", "budget", "kept"),
    [
        ("window", {"window_length": 10}, 10),
        ("sink", {"window_length": 10, "sink_tokens": 2}, 10),
        ("h2o", {"window_length": 10, "heavy_hitter_tokens": 4}, 10),
        ("h2o", {"heavy_ratio": 0.1, "recent_ratio": 0.1}, int(0.2 * 52)),
        ("h2o", {"budget_ratio": 0.2, "position_rolling": True}, int(0.2 * 52)),
    ],
)
@pytest.mark.parametrize("sample", [False, True])
def test_generate_evicts_to_the_budget(model, policy, budget, kept, sample):
    ids, mask = _batch(length=32, pad=9, seed=2)
    cache = make_cache(policy, model.config, **budget)
    assert isinstance(cache, Cache)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=20, do_sample=sample, cache=cache
        )
    assert out.shape == (2, 52)
    # generate() does not feed the last sampled token back: 51 tokens went through the cache.
    assert cache.get_seq_length() == 51
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape
        assert layer.keys.shape[:2] == (2, 2) and layer.keys.shape[3] == 16
        assert layer.keys.shape[2] <= max(kept, int(0.2 * 51))
        # The newest token is always kept; row 0's padding (positions 0..8) never takes a slot
        # from a real token.
        assert bool((layer.positions == 50).any(-1).all())
        assert bool(layer.valid.all())
    assert kv_bytes(cache) < full_kv_bytes(cache)


def test_ratio_budget_holds_about_a_fifth_of_the_bytes(model):
    ids = torch.randint(2, 96, (1, 400), generator=torch.Generator().manual_seed(5))
    cache = make_cache("h2o", model.config, heavy_ratio=0.1, recent_ratio=0.1)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
    assert kv_bytes(cache) <= 0.21 * full_kv_bytes(cache)


def test_beam_search_and_multiple_return_sequences(model):
    ids, mask = _batch(seed=3)
    with torch.no_grad():
        beams = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            num_beams=2,
            do_sample=False,
            cache=make_cache("h2o", model.config, window_length=8),
        )
        many = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=True,
            num_return_sequences=3,
            cache=make_cache("sink", model.config, window_length=8, sink_tokens=2),
        )
    assert beams.shape == (2, 20) and many.shape == (6, 20)


def test_crop_removes_the_newest_tokens(model):
    ids, mask = _batch(seed=4)
    cache = make_cache("h2o", model.config, window_length=10, heavy_hitter_tokens=4)
    with torch.no_grad():
        _decode_logits(model, cache, ids, mask, steps=4)
    seen = cache.get_seq_length()
    cache.crop(-2)
    assert cache.get_seq_length() == seen - 2
    for layer in cache.layers:
        assert layer.keys.shape[2] == 8 and bool((layer.positions < seen - 2).all())
    with pytest.raises(ValueError):
        cache.crop(3)


BAD = [
    ({"policy": "lru"}, "cache.policy"),
    ({"policy": "h2o", "window_length": 0}, "cache.window_length"),
    ({"policy": "window", "window_length": -3}, "cache.window_length"),
    ({"policy": "h2o", "window_length": 8, "heavy_hitter_tokens": 0}, "cache.heavy_hitter_tokens"),
    ({"policy": "h2o", "window_length": 8, "heavy_hitter_tokens": 9}, "cache.heavy_hitter_tokens"),
    ({"policy": "h2o", "heavy_hitter_tokens": 4}, "cache.heavy_hitter_tokens"),
    ({"policy": "h2o", "heavy_ratio": 0.0}, "cache.heavy_ratio"),
    ({"policy": "h2o", "recent_ratio": 1.5}, "cache.recent_ratio"),
    ({"policy": "h2o", "heavy_ratio": -0.1}, "cache.heavy_ratio"),
    ({"policy": "window", "budget_ratio": 2}, "cache.budget_ratio"),
    ({"policy": "h2o", "window_length": 8, "heavy_ratio": 0.1}, "cache.window_length"),
    ({"policy": "h2o", "budget_ratio": 0.2, "heavy_ratio": 0.1}, "cache.budget_ratio"),
    ({"policy": "sink", "window_length": 4, "sink_tokens": 5}, "cache.sink_tokens"),
    ({"policy": "sink", "sink_tokens": 0}, "cache.sink_tokens"),
    ({"policy": "window", "heavy_ratio": 0.1}, "cache.heavy_ratio"),
    ({"policy": "h2o", "sink_tokens": 4}, "cache.sink_tokens"),
    ({"policy": "full", "window_length": 8}, "cache.window_length"),
    ({"policy": "h2o", "window_length": "big"}, "cache.window_length"),
    ({"policy": "h2o", "position_rolling": "yes"}, "cache.position_rolling"),
    ({"policy": "h2o", "min_tokens": -1}, "cache.min_tokens"),
    ({"policy": "window", "min_tokens": "lots"}, "cache.min_tokens"),
    ({"policy": "h2o", "ratio_basis": "prefill"}, "cache.ratio_basis"),
    ({"policy": "h2o", "heavy_ratio": 0.7, "recent_ratio": 0.6}, "cache.heavy_ratio"),
    ({"policy": "h2o", "recent_ratio": 0.95}, "cache.recent_ratio"),
]


@pytest.mark.parametrize(("kwargs", "key"), BAD)
def test_bad_budgets_raise_one_clear_error_naming_the_key(model, kwargs, key):
    policy = kwargs.pop("policy")
    for exc in (CacheError, ConfigError):
        with pytest.raises(exc, match=key.replace(".", r"\.")):
            make_cache(policy, model.config, **dict(kwargs))
        with pytest.raises(exc, match=key.replace(".", r"\.")):
            CacheSpec(policy=policy, **dict(kwargs))


def test_unknown_keyword_is_named(model):
    with pytest.raises(CacheError, match=r"cache\.window_size"):
        make_cache("window", model.config, window_size=8)


@pytest.mark.parametrize("policy", POLICIES)
def test_hydra_configs_instantiate_validated_specs(model, policy):
    spec = instantiate(OmegaConf.load(CONF / f"{policy}.yaml"))
    assert isinstance(spec, CacheSpec) and spec.policy == policy
    assert isinstance(spec.build(model.config), Cache)
    if policy != "full":
        swept = instantiate(OmegaConf.load(CONF / f"{policy}.yaml"), budget_ratio=0.5)
        assert swept.budget.total(1000) == 1000  # the floor (min_tokens: 1024) covers it
        assert swept.budget.total(4000) == 2000
    bad = OmegaConf.load(CONF / f"{policy}.yaml")
    bad.window_length = 0
    # Hydra wraps what the target raises; the cause is our one-line ConfigError.
    with pytest.raises(Exception) as info:
        instantiate(bad)
    cause = info.value if isinstance(info.value, ConfigError) else info.value.__cause__
    assert isinstance(cause, ConfigError) and "cache.window_length" in str(cause)


def test_budget_ratio_split_per_policy():
    assert CacheSpec("h2o", budget_ratio=0.2).budget.sizes(1000) == (0, 100, 100)
    assert CacheSpec("window", budget_ratio=0.2).budget.sizes(1000) == (0, 0, 200)
    assert CacheSpec("sink", budget_ratio=0.2, sink_tokens=4).budget.sizes(1000) == (4, 0, 196)
    assert CacheSpec("h2o").budget.sizes(1000) == (0, 100, 100)  # the paper's default
    assert CacheSpec("h2o", window_length=256, heavy_hitter_tokens=128).budget.sizes(9) == (
        0,
        128,
        128,
    )


def test_attention_must_feed_the_cache():
    torch.manual_seed(0)
    flash = tiny_config()
    flash._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(CacheError, match="hybrid attention"):
        make_cache("h2o", flash)
    # Plain SDPA / eager models switch to their hybrid twin, which computes the same output.
    sdpa = LlamaForCausalLM(tiny_config())
    assert isinstance(make_cache("window", sdpa.config, window_length=4), Cache)
    assert sdpa.config._attn_implementation == HYBRID_ATTENTION
    eager = LlamaForCausalLM(tiny_config(attn_implementation="eager")).eval()
    ids, mask = _batch()
    with torch.no_grad():
        ref = eager.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        cache = make_cache("h2o", eager.config, window_length=64)
        assert eager.config._attn_implementation == HYBRID_EAGER_ATTENTION
        got = eager.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache=cache
        )
    assert torch.equal(ref, got)
    # A cache built from a config before its model exists fails loudly if nobody feeds it.
    cfg = tiny_config()
    cache = make_cache("h2o", cfg, window_length=4)
    plain = LlamaForCausalLM(cfg)
    plain.set_attn_implementation("eager")
    ids, mask = _batch()
    with pytest.raises(CacheError, match="hybrid attention"), torch.no_grad():
        plain.generate(ids, attention_mask=mask, max_new_tokens=3, cache=cache)
