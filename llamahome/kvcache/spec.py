"""KV-cache policies on the transformers 5.x Cache API: full, window, sink and h2o.

``make_cache(policy, model_config, **budget)`` returns a `transformers.Cache` that
``model.generate(..., past_key_values=cache)`` uses unchanged. ``conf/cache/*.yaml`` instantiate a
`CacheSpec` (validated on construction, so a bad budget fails before any model is loaded) whose
``build(model_config)`` does the same.

Budgets, two ways (see docs/h2o.md):

* llama-recipes counts: ``window_length`` (total kept) and ``heavy_hitter_tokens`` (h2o),
  ``sink_tokens`` (sink);
* H2O-paper ratios: ``heavy_ratio`` + ``recent_ratio`` (default 0.1 + 0.1), or the sweep
  shorthand ``budget_ratio`` (h2o: half heavy, half recent; window: all recent; sink:
  ``sink_tokens`` + the rest recent). ``ratio_basis="sequence"`` (default, the paper's code):
  ``int(ratio * L)`` fixed once, L = ``seq_len`` given to ``build`` / ``make_cache`` (generation:
  prompt + max_new_tokens; eval: the scored length), else the prefill's length;
  ``ratio_basis="running"``: a share of the tokens seen so far.

Ratio budgets have a floor, ``min_tokens`` (default 1024): such a cache keeps max(budget,
min_tokens) tokens, so it never evicts while it holds no more than that, and a short chat turn is
exactly the full cache's output. A count budget (``window_length``) is the user's own and is held
as given, below the floor or not. Benchmarks and eval tasks that measure a policy set
``min_tokens=0``.

``with pinned(cache): model(question_ids, cache=cache)`` protects the tokens appended inside the
block: they are never evicted and are held on top of the budget (the question-protected protocol).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from llamahome.errors import CacheError, ConfigError
from llamahome.kvcache.budget import RATIO_BASES, Budget

# torch and transformers load in `build`, not here: conf/cache/*.yaml instantiate `CacheSpec`
# while the command line is checked, and a bad budget must fail before torch loads (issue #18).
if TYPE_CHECKING:
    from transformers import Cache, PretrainedConfig

POLICIES = (
    "full", "window", "sink", "h2o", "keydiff", "knorm", "tova", "snapkv", "kvzip", "learned"
)
# Policies that score each slot and may keep different counts per head (head_budget.py).
SCORE_POLICIES = ("kvzip", "learned")
DEFAULT_HEAVY_RATIO = 0.1
DEFAULT_RECENT_RATIO = 0.1
DEFAULT_SINK_TOKENS = 4
DEFAULT_MIN_TOKENS = 1024

__all__ = [
    "POLICIES",
    "SCORE_POLICIES",
    "CacheBudgetError",
    "CacheSpec",
    "full_kv_bytes",
    "keep_ratio",
    "kv_bytes",
    "make_cache",
    "pinned",
]


class CacheBudgetError(CacheError, ConfigError):
    """A cache policy or budget key is wrong: both a `CacheError` and a `ConfigError`."""


def __getattr__(name: str) -> Any:
    # The Cache classes subclass transformers' and live in caches.py; reached here on first use.
    if name in ("FullCache", "PolicyCache"):
        from llamahome.kvcache import caches

        return getattr(caches, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _integer(key: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CacheBudgetError(f"cache.{key}={value!r} must be an integer >= {minimum}.")
    if value < minimum:
        raise CacheBudgetError(
            f"cache.{key}={value} must be >= {minimum}: a budget of no tokens keeps nothing."
        )
    return value


def _ratio(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise CacheBudgetError(
            f"cache.{key}={value!r} must be a ratio in (0, 1] of the sequence length "
            "(0.1 = 10% of the tokens)."
        )
    return float(value)


@dataclass
class CacheSpec:
    """A validated cache policy and budget; ``build(model_config)`` makes the Cache.

    Attributes:
        policy: full, window, sink or h2o.
        window_length: Total tokens kept (counts mode; llama-recipes' ``window_length``).
        heavy_hitter_tokens: Heavy hitters among them (h2o; default half of window_length).
        heavy_ratio: Heavy-hitter share of the length (h2o; default 0.1).
        recent_ratio: Recent-window share of the length (h2o: default 0.1; window).
        sink_tokens: Attention-sink tokens kept forever (sink; default 4).
        budget_ratio: Total share of the length, split per policy (sweep shorthand).
        position_rolling: Re-rotate kept keys to their slot rank (llama-recipes'
            ``enable_position_rolling``).
        min_tokens: The floor of a ratio budget: never evict while holding <= this many
            tokens; the cache holds max(budget, min_tokens). A count budget
            (``window_length``) ignores it. 0 = no floor (what eval and benchmarks use).
        ratio_basis: ``sequence`` (ratios of the sequence length L, fixed once: the paper) or
            ``running`` (ratios of the tokens seen so far).
        threshold: kvzip, learned: keep every slot scoring at least this (adaptive per prompt,
            layer and head), at most the budget per head when one is given.
        head_budgets: kvzip, learned: ``uniform``, ``layer`` (AdaKV) or ``global`` (KVzip):
            how the budget is shared among heads and layers (``head_budget.py``).
        chunk_size: kvzip: context tokens per reconstruction pass.

    Raises:
        CacheBudgetError: On construction, naming the first bad ``cache.<key>``.
    """

    policy: str = "full"
    window_length: int | None = None
    heavy_hitter_tokens: int | None = None
    heavy_ratio: float | None = None
    recent_ratio: float | None = None
    sink_tokens: int | None = None
    budget_ratio: float | None = None
    position_rolling: bool = False
    min_tokens: int = DEFAULT_MIN_TOKENS
    ratio_basis: str = "sequence"
    threshold: float | None = None
    head_budgets: str | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        """Validate every key and resolve the budget."""
        if self.policy not in POLICIES:
            raise CacheBudgetError(
                f"cache.policy={self.policy!r} is unknown: choose one of {', '.join(POLICIES)}."
            )
        if not isinstance(self.position_rolling, bool):
            raise CacheBudgetError(
                f"cache.position_rolling={self.position_rolling!r} must be true or false."
            )
        self.window_length = _integer("window_length", self.window_length, 1)
        self.heavy_hitter_tokens = _integer("heavy_hitter_tokens", self.heavy_hitter_tokens, 1)
        self.sink_tokens = _integer("sink_tokens", self.sink_tokens, 1)
        self.heavy_ratio = _ratio("heavy_ratio", self.heavy_ratio)
        self.recent_ratio = _ratio("recent_ratio", self.recent_ratio)
        self.budget_ratio = _ratio("budget_ratio", self.budget_ratio)
        self.min_tokens = _integer("min_tokens", self.min_tokens, 0)
        if self.min_tokens is None:
            raise CacheBudgetError("cache.min_tokens=null: give an integer >= 0 (0 = no floor).")
        if self.ratio_basis not in RATIO_BASES:
            raise CacheBudgetError(
                f"cache.ratio_basis={self.ratio_basis!r} is unknown: choose sequence (a share of "
                "the sequence length, fixed once: the H2O paper) or running (of the tokens seen)."
            )
        if self.heavy_ratio is not None or self.recent_ratio is not None:
            heavy = self.heavy_ratio if self.heavy_ratio is not None else DEFAULT_HEAVY_RATIO
            recent = self.recent_ratio if self.recent_ratio is not None else DEFAULT_RECENT_RATIO
            if self.policy == "h2o" and heavy + recent > 1 + 1e-9:
                key = "heavy_ratio" if self.heavy_ratio is not None else "recent_ratio"
                raise CacheBudgetError(
                    f"cache.{key}: cache.heavy_ratio + cache.recent_ratio = {heavy + recent:g} "
                    "exceeds 1 (the whole sequence); lower one of them."
                )
        self._check_score_keys()
        budget = getattr(self, f"_resolve_{self.policy}")()
        if budget is not None:
            # The floor protects short inputs from a *share* of their length; a count is the
            # user's budget and is honoured as given (llama-recipes' window_length=24 keeps 24).
            floor = self.min_tokens if budget.is_ratio else 0
            budget = replace(budget, floor=floor, basis=self.ratio_basis)
        self.budget: Budget | None = budget

    # ---- one resolver per policy -------------------------------------------------------------
    def _given(self, *keys: str) -> list[str]:
        return [k for k in keys if getattr(self, k) is not None]

    def _reject(self, keys: tuple[str, ...], why: str) -> None:
        if given := self._given(*keys):
            raise CacheBudgetError(
                f"cache.{given[0]} is not used by cache.policy={self.policy}: {why}."
            )

    def _one_mode(self, counts: tuple[str, ...], ratios: tuple[str, ...]) -> None:
        c, r = self._given(*counts), self._given(*ratios)
        if c and r:
            raise CacheBudgetError(
                f"cache.{c[0]} and cache.{r[0]} are both set: give the budget either as counts "
                f"({', '.join(counts)}) or as ratios ({', '.join(ratios)}), not both."
            )
        if "budget_ratio" in r and len(r) > 1:
            other = next(k for k in r if k != "budget_ratio")
            raise CacheBudgetError(
                f"cache.budget_ratio and cache.{other} are both set: budget_ratio is the "
                "shorthand for the whole split; set one or the other."
            )

    def _resolve_full(self) -> None:
        # budget_ratio is tolerated so a sweep over policies can include the full baseline.
        self._reject(
            ("window_length", "heavy_hitter_tokens", "heavy_ratio", "recent_ratio", "sink_tokens"),
            "the full cache keeps every token; remove the budget or pick window, sink or h2o",
        )
        if self.position_rolling:
            raise CacheBudgetError(
                "cache.position_rolling is not used by cache.policy=full (nothing is evicted)."
            )
        return None

    def _resolve_window(self) -> Budget:
        self._reject(("heavy_hitter_tokens", "heavy_ratio"), "heavy hitters are policy=h2o")
        self._reject(("sink_tokens",), "sink tokens are policy=sink")
        self._one_mode(("window_length",), ("recent_ratio", "budget_ratio"))
        if self.window_length is not None:
            return Budget(recent=self.window_length)
        ratio = self.budget_ratio or self.recent_ratio or DEFAULT_HEAVY_RATIO + DEFAULT_RECENT_RATIO
        return Budget(recent_ratio=ratio)

    def _resolve_sink(self) -> Budget:
        self._reject(("heavy_hitter_tokens", "heavy_ratio"), "heavy hitters are policy=h2o")
        self._reject(
            ("recent_ratio",), "give the total as cache.budget_ratio or cache.window_length"
        )
        self._one_mode(("window_length",), ("budget_ratio",))
        sink = self.sink_tokens if self.sink_tokens is not None else DEFAULT_SINK_TOKENS
        if self.window_length is not None:
            if self.sink_tokens is None:
                sink = min(sink, self.window_length)  # the default adapts to a tiny window
            if sink > self.window_length:
                raise CacheBudgetError(
                    f"cache.sink_tokens={sink} exceeds cache.window_length={self.window_length} "
                    "(the total kept, sinks included)."
                )
            return Budget(sink=sink, recent=self.window_length - sink)
        ratio = self.budget_ratio or DEFAULT_HEAVY_RATIO + DEFAULT_RECENT_RATIO
        return Budget(sink=sink, recent_ratio=ratio)

    def _resolve_h2o(self) -> Budget:
        self._reject(("sink_tokens",), "sink tokens are policy=sink")
        self._one_mode(
            ("window_length", "heavy_hitter_tokens"),
            ("heavy_ratio", "recent_ratio", "budget_ratio"),
        )
        if self.heavy_hitter_tokens is not None and self.window_length is None:
            raise CacheBudgetError(
                "cache.heavy_hitter_tokens needs cache.window_length (the total kept: heavy "
                "hitters + recent window)."
            )
        if self.window_length is not None:
            heavy = self.heavy_hitter_tokens
            heavy = self.window_length // 2 if heavy is None else heavy
            if heavy > self.window_length:
                raise CacheBudgetError(
                    f"cache.heavy_hitter_tokens={heavy} exceeds cache.window_length="
                    f"{self.window_length} (the total kept: heavy hitters + recent window)."
                )
            return Budget(heavy=heavy, recent=self.window_length - heavy)
        if self.budget_ratio is not None:
            return Budget(heavy_ratio=self.budget_ratio / 2, recent_ratio=self.budget_ratio / 2)
        return Budget(
            heavy_ratio=self.heavy_ratio if self.heavy_ratio is not None else DEFAULT_HEAVY_RATIO,
            recent_ratio=self.recent_ratio
            if self.recent_ratio is not None
            else DEFAULT_RECENT_RATIO,
        )

    # keydiff, knorm, tova, snapkv take h2o's budget keys (tova and snapkv use the total only).
    _resolve_tova = _resolve_snapkv = _resolve_h2o

    def _resolve_keydiff(self) -> Budget:
        # budget_ratio: 90% scored, a 10% recent window. KeyDiff (paper, kvpress) keeps no window;
        # h2o's half-and-half split spends the budget on recent filler (passkey 20%, protected:
        # 26/30 with the split, 30/30 with this one; see kvcache/keydiff.py).
        budget = self._resolve_h2o()
        if self.budget_ratio is None:
            return budget
        return replace(
            budget, heavy_ratio=self.budget_ratio * 0.9, recent_ratio=self.budget_ratio * 0.1
        )

    # knorm: the same 90/10 split. kvpress's KnormPress keeps no window; with h2o's half-and-half
    # split ours scored 0.375 on 16 needle prompts at 20% (kvpress 0.406), 0.469 with this one.
    _resolve_knorm = _resolve_keydiff

    def _check_score_keys(self) -> None:
        from llamahome.kvcache.score_spec import check_score_keys

        check_score_keys(self)

    def _resolve_kvzip(self) -> Budget:
        from llamahome.kvcache.score_spec import score_budget

        return score_budget(self)

    _resolve_learned = _resolve_kvzip

    # ---- building ------------------------------------------------------------------------
    def build(self, model_config: PretrainedConfig, seq_len: int | None = None) -> Cache:
        """Make an empty cache for a model with `model_config`.

        Args:
            model_config: The model's config (``model.config``).
            seq_len: The sequence length L that ratio budgets are shares of (generation: prompt
                + max_new_tokens; eval: the scored length). None: the first update's length.

        Returns:
            A `FullCache` (policy full) or a `PolicyCache` with one evicting layer per layer.

        Raises:
            CacheError: If `model_config` is not a model config, or `seq_len` is not >= 1.
            CacheBudgetError: If the model uses an attention that cannot feed the eviction.
        """
        if not hasattr(model_config, "get_text_config"):
            raise CacheError(
                f"cache.policy={self.policy}: the model config is {type(model_config).__name__}, "
                "not a transformers config: pass model.config to make_cache / CacheSpec.build."
            )
        if seq_len is not None and (
            isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1
        ):
            raise CacheError(f"seq_len={seq_len!r} must be an integer >= 1 (or None).")
        from llamahome.kvcache.caches import FullCache, PolicyCache
        from llamahome.kvcache.decode_group import DecodeGroup
        from llamahome.kvcache.policies import rope_inv_freq

        if self.policy == "full":
            return FullCache(config=model_config)
        _use_hybrid_attention(model_config, self.policy)
        text = model_config.get_text_config(decoder=True)
        inv_freq = rope_inv_freq(text) if self.position_rolling else None
        layer_cls = _layer_types()[self.policy]
        # One Budget per cache, shared by its layers: L is fixed once for the whole sequence.
        budget = self.budget.for_cache(seq_len)
        options: dict[str, Any] = {}
        if self.policy in SCORE_POLICIES:
            from llamahome.kvcache.score_spec import layer_options

            options = layer_options(self, model_config)
        layers = [
            layer_cls(budget, inv_freq, layer_idx=i, **options)
            for i in range(text.num_hidden_layers)
        ]
        if layer_cls.batched_decode:
            DecodeGroup(layers)
        return PolicyCache(layers, self.policy)


def _layer_types() -> dict[str, type]:
    """Every evicting layer class by policy (the score policies load on first use)."""
    from llamahome.kvcache.kvzip import KVzipLayer
    from llamahome.kvcache.learned import LearnedLayer
    from llamahome.kvcache.policies import LAYER_TYPES

    return {**LAYER_TYPES, "kvzip": KVzipLayer, "learned": LearnedLayer}


def _use_hybrid_attention(config: PretrainedConfig, policy: str) -> None:
    """Make sure the model whose config this is feeds its cache layers (see attention.py)."""
    from llamahome.kvcache.attention import (
        HYBRID_ATTENTION,
        HYBRID_EAGER_ATTENTION,
        HYBRID_IMPLEMENTATIONS,
        register_hybrid_attention,
    )

    # Attention implementations a cache may switch to their hybrid twin (same output).
    same_numerics = {"sdpa": HYBRID_ATTENTION, "eager": HYBRID_EAGER_ATTENTION}
    impl = getattr(config, "_attn_implementation", None)
    if impl in HYBRID_IMPLEMENTATIONS or impl is None:
        return  # None: a config not yet bound to a model; update() raises if it never gets one
    if impl in same_numerics:
        # The hybrid functions compute what sdpa / eager compute (plus the statistics), so
        # switching the model's shared config object switches all its attention modules, safely.
        register_hybrid_attention()
        config._attn_implementation_internal = same_numerics[impl]
        return
    raise CacheBudgetError(
        f"cache.policy={policy} needs the hybrid attention, but the model uses {impl!r}: load it "
        "with llamahome.load_model (or attn_implementation=hybrid), or use cache.policy=full."
    )


def make_cache(
    policy: str, config: PretrainedConfig, *, seq_len: int | None = None, **budget: Any
) -> Cache:
    """Make a KV cache with eviction policy `policy` for a model with `config`.

    Args:
        policy: full, window, sink or h2o (see `POLICIES`).
        config: The model config (``model.config``).
        seq_len: The sequence length ratio budgets are shares of (prompt + max_new_tokens);
            None: the prefill's length.
        **budget: window_length, heavy_hitter_tokens, heavy_ratio, recent_ratio, sink_tokens,
            budget_ratio, position_rolling (alias: enable_position_rolling), min_tokens,
            ratio_basis.

    Returns:
        A `transformers.Cache`. ``cache.layers[i].keys`` / ``.values`` are the kept states
        (batch x kv_heads x kept x head_dim); ``cache.get_seq_length()`` counts tokens seen.

    Raises:
        CacheBudgetError: For an unknown policy or key, or a bad budget (names the key).

    Example:
        >>> cache = make_cache("h2o", model.config, budget_ratio=0.2, seq_len=n_prompt + 64)
        >>> model.generate(**inputs, cache=cache, max_new_tokens=64)
    """
    if "enable_position_rolling" in budget:
        budget["position_rolling"] = budget.pop("enable_position_rolling")
    known = {f.name for f in fields(CacheSpec)} - {"policy"}
    for key in budget:
        if key not in known:
            raise CacheBudgetError(
                f"cache.{key} is not a cache setting: use one of {', '.join(sorted(known))}."
            )
    if not hasattr(config, "num_hidden_layers"):  # None, a dict, a model instead of its config
        raise CacheBudgetError(
            f"make_cache: config must be the model's config (model.config), got "
            f"{type(config).__name__}."
        )
    return CacheSpec(policy=policy, **budget).build(config, seq_len=seq_len)


@contextmanager
def pinned(cache: Cache) -> Iterator[Cache]:
    """Protect the tokens appended to `cache` inside the block: they are never evicted.

    They are held on top of the budget. This is the question-protected protocol: compress the
    context, then ``with pinned(cache): model(question_ids, cache=cache)``.

    Args:
        cache: A cache from `make_cache` / `CacheSpec.build` (a full cache is left as is).

    Yields:
        The same cache.
    """
    layers = [layer for layer in getattr(cache, "layers", ()) if hasattr(layer, "_pinning")]
    for layer in layers:
        layer._pinning = True
    try:
        yield cache
    finally:
        for layer in layers:
            layer._pinning = False


def kv_bytes(cache: Cache) -> int:
    """Bytes the cache holds for keys and values (allocated buffers)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "kv_bytes"):
            total += layer.kv_bytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
    return total


def full_kv_bytes(cache: Cache) -> int:
    """Bytes a full (no eviction) cache would hold after the same tokens."""
    total = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4:
            continue
        bsz, heads, _, dim = keys.shape
        total += 2 * bsz * heads * dim * keys.element_size() * layer.get_seq_length()
    return total


def keep_ratio(cache: Cache) -> float:
    """Share of the tokens seen that the cache holds, over all layers, rows and KV heads.

    A policy with per-head budgets (threshold or AdaKV-style) keeps different counts per head;
    this is their mean, the figure reported as ``keep`` in eval rows, the chat and generate
    status lines and serve's ``usage.kv_cache``. Padding slots are not counted as kept.

    Args:
        cache: Any cache from `make_cache` / `CacheSpec.build` (a full cache gives 1.0).

    Returns:
        kept / seen in [0, 1]; 1.0 for an empty cache.
    """
    kept = seen = 0
    for layer in getattr(cache, "layers", ()):
        counts = getattr(layer, "kept_counts", None)
        if counts is not None:
            k, s = counts()
        else:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.dim() != 4:
                continue
            k = s = keys.shape[0] * keys.shape[1] * layer.get_seq_length()
        kept, seen = kept + k, seen + s
    return kept / seen if seen else 1.0
