"""The cache keys of the score policies (kvzip, learned): validation, budget, layer options.

``CacheSpec`` (spec.py) calls these for ``cache.policy=kvzip`` and ``learned``; the keys they
add (``threshold``, ``head_budgets``, ``chunk_size``) are refused for every other policy.

Budgets, per KV head (the cap with a threshold):

* ``budget_ratio`` (default 0.2): 90% scored, a 10% recent window; the first ``sink_tokens`` (4)
  real tokens always kept, within the budget (as ``cache=keydiff`` splits it, and kvpress keeps 4
  sinks for KVzip);
* ``heavy_ratio`` + ``recent_ratio``, or counts ``window_length`` (+ ``heavy_hitter_tokens``);
* ``threshold`` alone: no cap, a recent window of `THRESHOLD_WINDOW` tokens (DMS / KVzap keep a
  sliding window whole, arXiv 2601.07891).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from llamahome.kvcache.budget import Budget

if TYPE_CHECKING:
    from llamahome.kvcache.spec import CacheSpec

__all__ = [
    "DEFAULT_HEAD_BUDGETS",
    "HEAD_BUDGETS",
    "check_score_keys",
    "holds_whole_prompt",
    "layer_options",
    "prefills_whole",
    "score_budget",
]

SCORE_KEYS = ("threshold", "head_budgets", "chunk_size")
# How a budget is shared among heads (head_budget.py); here, torch-free, for the config checks.
HEAD_BUDGETS = ("uniform", "layer", "global")
DEFAULT_HEAD_BUDGETS = {"kvzip": "global", "learned": "global"}
DEFAULT_RATIO = 0.2
RECENT_SHARE = 0.1  # of the budget: the recent window (decoded tokens live there)
DEFAULT_SINKS = 4
THRESHOLD_WINDOW = 64


def _error(message: str) -> Exception:
    from llamahome.kvcache.spec import CacheBudgetError

    return CacheBudgetError(message)


def check_score_keys(spec: CacheSpec) -> None:
    """Validate ``threshold``, ``head_budgets`` and ``chunk_size``; fill the policy defaults.

    Raises:
        CacheBudgetError: A key set for a policy that does not use it, or a bad value.
    """
    if spec.policy not in DEFAULT_HEAD_BUDGETS:
        for key in SCORE_KEYS:
            if getattr(spec, key) is not None:
                raise _error(
                    f"cache.{key} is used by cache.policy=kvzip and cache.policy=learned only "
                    f"(not {spec.policy}); remove it or pick one of those."
                )
        return
    if spec.threshold is not None:
        value = spec.threshold
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise _error(f"cache.threshold={value!r} must be a finite number (a score).")
        spec.threshold = float(value)
    if spec.head_budgets is None:
        spec.head_budgets = DEFAULT_HEAD_BUDGETS[spec.policy]
    if spec.head_budgets not in HEAD_BUDGETS:
        raise _error(
            f"cache.head_budgets={spec.head_budgets!r} is unknown: choose uniform (every head "
            "keeps the budget), layer (AdaKV: shared among a layer's heads) or global (KVzip: "
            "shared among every layer and head)."
        )
    if spec.chunk_size is not None:
        if spec.policy != "kvzip":
            raise _error("cache.chunk_size is used by cache.policy=kvzip only (reconstruction).")
        value = spec.chunk_size
        if isinstance(value, bool) or not isinstance(value, int) or value < 16:
            raise _error(f"cache.chunk_size={value!r} must be an integer >= 16 (tokens).")
    if spec.position_rolling:
        raise _error(f"cache.position_rolling is not supported by cache.policy={spec.policy}.")


def score_budget(spec: CacheSpec) -> Budget:
    """The per-head budget of a kvzip / learned spec (see the module doc).

    Raises:
        CacheBudgetError: Counts and ratios mixed, or sinks that do not fit the window.
    """
    spec._one_mode(
        ("window_length", "heavy_hitter_tokens"), ("heavy_ratio", "recent_ratio", "budget_ratio")
    )
    sink = spec.sink_tokens if spec.sink_tokens is not None else DEFAULT_SINKS
    given = spec._given("window_length", "heavy_hitter_tokens", "heavy_ratio", "recent_ratio")
    given += spec._given("budget_ratio")
    if spec.threshold is not None and not given:
        return Budget(sink=sink, heavy=10**12, recent=THRESHOLD_WINDOW)
    if spec.heavy_hitter_tokens is not None and spec.window_length is None:
        raise _error("cache.heavy_hitter_tokens needs cache.window_length (the total kept).")
    if spec.window_length is not None:
        total = spec.window_length
        heavy = spec.heavy_hitter_tokens
        if heavy is None:
            heavy = max(0, total - sink - max(1, round(RECENT_SHARE * total)))
        if sink + heavy >= total:
            raise _error(
                f"cache.window_length={total} leaves no recent slot after {sink} sinks and "
                f"{heavy} scored tokens: raise it or lower cache.heavy_hitter_tokens."
            )
        return Budget(sink=sink, heavy=heavy, recent=total - sink - heavy)
    if spec.heavy_ratio is not None or spec.recent_ratio is not None:
        recent = spec.recent_ratio if spec.recent_ratio is not None else DEFAULT_RATIO * 0.1
        heavy = spec.heavy_ratio if spec.heavy_ratio is not None else DEFAULT_RATIO * 0.9
        if heavy + recent > 1 + 1e-9:
            raise _error("cache.heavy_ratio + cache.recent_ratio exceeds 1; lower one of them.")
        return Budget(sink=sink, heavy_ratio=heavy, recent_ratio=recent)
    ratio = spec.budget_ratio if spec.budget_ratio is not None else DEFAULT_RATIO
    return Budget(
        sink=sink, heavy_ratio=ratio * (1 - RECENT_SHARE), recent_ratio=ratio * RECENT_SHARE
    )


def layer_options(spec: CacheSpec, model_config: Any) -> dict[str, Any]:
    """Keyword arguments of every layer of a kvzip / learned cache for `model_config`.

    Raises:
        CacheError: ``learned`` on a model with no scorer attached (names the command).
    """
    options: dict[str, Any] = {"threshold": spec.threshold, "head_budgets": spec.head_budgets}
    if spec.policy == "kvzip":
        from llamahome.kvcache.kvzip import DEFAULT_CHUNK_SIZE
        from llamahome.kvcache.learned import scorer_for

        options["chunk_size"] = spec.chunk_size or DEFAULT_CHUNK_SIZE
        options["scorer"] = scorer_for(model_config)  # scores decoded tokens, when there is one
    else:
        from llamahome.kvcache.learned import require_scorer

        options["scorer"] = require_scorer(model_config)
    return options


def prefills_whole(spec: Any) -> bool:
    """Whether a cache for `spec` keeps each multi-token forward whole until the model's settle.

    KVzip scores a prompt by reconstructing it, and a global head budget ranks every layer's
    slots at once (``model_hooks``): both see one forward's tokens together, so a prompt fed in
    chunks would be scored chunk by chunk. Callers that chunk prompts (the serving engine) feed
    these in one forward.
    """
    policy = getattr(spec, "policy", None)
    if policy == "kvzip":
        return True
    return policy == "learned" and spec.head_budgets == "global" and spec.threshold is None


def holds_whole_prompt(spec: Any) -> bool:
    """Whether a cache for `spec` may hold (allocate) a whole prompt, whatever its budget.

    True when it prefills whole (:func:`prefills_whole`) or shares a budget among heads (a
    layer's buffers are sized to its largest head, which may keep most of the context).
    """
    if getattr(spec, "policy", None) not in DEFAULT_HEAD_BUDGETS:
        return False
    return prefills_whole(spec) or spec.head_budgets != "uniform"
