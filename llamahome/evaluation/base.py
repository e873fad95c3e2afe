"""What every eval task shares: its outcome, KV accounting, batch generation with a cache."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamahome.errors import ConfigError

NO_EVICTION = "no eviction"


@dataclass
class Outcome:
    """What a task measured with one cache policy and budget.

    Attributes:
        metric: The headline metric's name (``ppl``, ``accuracy``, ``rougeL``).
        value: Its value.
        higher_is_better: Whether a larger value is better (False for perplexity).
        extras: Further metrics, flat (``nll``, ``rouge1``, ``accuracy@512``, ...).
        kv_bytes: KV bytes the cache held at the end of the largest sequence.
        full_kv_bytes: What a full cache would have held there.
        tokens: Tokens that went through the model (prompt + decoded).
        seconds: Model time (prefill + decode), without loading.
        evicted: Whether the cache ever dropped a token (False: "no eviction").
        keep_ratio: Tokens held / tokens seen at the end of each sequence (``keep_ratio``),
            averaged over the sequences weighted by their length.
    """

    metric: str
    value: float
    higher_is_better: bool
    extras: dict[str, Any] = field(default_factory=dict)
    kv_bytes: int = 0
    full_kv_bytes: int = 0
    tokens: int = 0
    seconds: float = 0.0
    evicted: bool = True
    keep_ratio: float | None = None

    @property
    def note(self) -> str:
        """``"no eviction"`` when the budget covered every token, else empty."""
        return "" if self.evicted else NO_EVICTION

    @classmethod
    def measured(
        cls,
        metric: str,
        value: float,
        meter: KVMeter,
        watch: Stopwatch,
        tokens: int,
        extras: dict[str, Any] | None = None,
        higher_is_better: bool = True,
    ) -> Outcome:
        """An outcome whose memory and time figures come from a task's meter and stopwatch."""
        return cls(
            metric=metric,
            value=value,
            higher_is_better=higher_is_better,
            extras=extras or {},
            kv_bytes=meter.kv_bytes,
            full_kv_bytes=meter.full_kv_bytes,
            tokens=tokens,
            seconds=watch.seconds,
            evicted=meter.evicted,
            keep_ratio=meter.keep_ratio,
        )


class KVMeter:
    """Tracks KV bytes (the largest cache seen) and whether any cache evicted."""

    def __init__(self) -> None:
        """Start empty."""
        self.kv_bytes = 0
        self.full_kv_bytes = 0
        self.evicted = False
        self._kept = self._seen = 0.0

    @property
    def keep_ratio(self) -> float | None:
        """Tokens held / tokens seen over every cache added, weighted by length (None: none)."""
        return self._kept / self._seen if self._seen else None

    def add(self, cache: Any) -> None:
        """Account for a cache after its sequence is done."""
        from llamahome.kvcache.spec import full_kv_bytes, keep_ratio, kv_bytes

        full = full_kv_bytes(cache)
        if full >= self.full_kv_bytes:
            self.kv_bytes, self.full_kv_bytes = kv_bytes(cache), full
        self.evicted = self.evicted or evicted(cache)
        self._kept += keep_ratio(cache) * full
        self._seen += full


def evicted(cache: Any) -> bool:
    """Whether `cache` dropped any token: some layer keeps fewer slots than tokens it saw."""
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.dim() == 4 and keys.shape[-2] < layer.get_seq_length():
            return True
    return False


def positive_int(key: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer config value; raise ConfigError naming ``key``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}.")
    return value


def int_list(key: str, values: Any, minimum: int = 1) -> list[int]:
    """Validate a non-empty list of integers (a single number is a list of one)."""
    values = [values] if isinstance(values, int | float) else list(values or [])
    if not values:
        raise ConfigError(f"{key} is empty: give at least one value.")
    return [positive_int(key, v, minimum) for v in values]


def progress(iterable: Iterable, total: int | None, desc: str, enabled: bool = True) -> Iterable:
    """Wrap `iterable` in a tqdm bar on stderr (long loops; off in tests and callbacks)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    cache_spec: Any,
    max_new_tokens: int,
    chat: bool,
    meter: KVMeter,
) -> tuple[list[str], int]:
    """Greedy generation for a batch of prompts with a fresh cache of ``cache_spec``.

    Unlike ``llamahome.model.generation.generate_text`` this keeps the cache, so the KV bytes it
    held are measured; prompts are formatted the same way (``format_prompts``).

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer (left padding is used).
        prompts: The prompts.
        cache_spec: A ``CacheSpec``.
        max_new_tokens: Tokens to generate.
        chat: Wrap prompts in the chat template when the tokenizer has one.
        meter: Receives the cache after generation.

    Returns:
        The new text of each prompt, and the tokens processed (prompt + new, padding excluded).
    """
    from llamahome.model.generation import cache_kwarg, format_prompts

    texts = format_prompts(tokenizer, prompts, chat=chat)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    # Ratio budgets are shares of the sequence: the (padded) prompt + the new tokens.
    cache = cache_spec.build(model.config, seq_len=int(enc["input_ids"].shape[1]) + max_new_tokens)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **{cache_kwarg(): cache},
    )
    meter.add(cache)
    new = out[:, enc["input_ids"].shape[1] :]
    tokens = int(enc["attention_mask"].sum()) + int(new.numel())
    return tokenizer.batch_decode(new, skip_special_tokens=True), tokens


class Stopwatch:
    """Accumulates the seconds spent inside ``with watch:`` blocks."""

    def __init__(self) -> None:
        """Start at zero."""
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        """Start timing."""
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop timing and add the interval."""
        self.seconds += time.perf_counter() - self._start


def flag(key: str, value: Any) -> bool:
    """Validate a true/false config value; raise ConfigError naming ``key``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false.")
    return value


def depth_list(values: Any, key: str = "task.depths") -> list[float]:
    """Validate needle depths: a non-empty list of fractions in [0, 1] (0 = start, 1 = end)."""
    values = [values] if isinstance(values, int | float) else list(values or [])
    if not values:
        raise ConfigError(f"{key} is empty: give depths in [0, 1], e.g. [0.1, 0.5, 0.9].")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(f"{key} has {value!r}: depths are fractions in [0, 1].")
    return [float(v) for v in values]
