"""A multi-turn chat over any causal LM with a bounded KV cache that lives across turns.

:class:`ChatSession` keeps the history, renders it with the tokenizer's chat template, streams
the answer token by token, and keeps the KV cache of the conversation between turns: the next
turn feeds only the tokens the cache has not seen (the new user message), so a long history is
not prefilled again. When the cache cannot continue the new prompt (the re-rendered history no
longer starts with the tokens it holds and it has evicted, so it cannot be cut back; the policy
changed; the history was trimmed to fit the context) the whole conversation is prefilled into
a new cache, and the turn's :class:`TurnStats` says which happened.

Used by ``python -m llamahome.chat``; no Lightning, no training imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, TextStreamer

from llamahome.errors import CacheError, ConfigError
from llamahome.kvcache.spec import POLICIES, CacheSpec, full_kv_bytes, keep_ratio, kv_bytes
from llamahome.model.context import check_length, context_length
from llamahome.model.generation import cache_kwarg

# For tokenizers without a chat template (the local BPE of model=tiny): a plain transcript.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Cache settings a /cache command keeps from the current spec (the floor, the ratio basis...).
_CARRIED = ("min_tokens", "ratio_basis", "position_rolling")


@dataclass
class TurnStats:
    """What one answer cost.

    Attributes:
        new_tokens: Tokens generated.
        seconds: Wall time of the turn (prefill + decoding).
        prompt_tokens: Tokens of the whole rendered conversation given to the model.
        prefilled: Tokens the model had to process before decoding (the part not cached).
        reused: Tokens whose keys and values came from the previous turns' cache.
        note: Why the cache was not reused (empty when it was).
        kv_bytes: Bytes of keys and values the cache holds after the turn.
        full_kv_bytes: What a full cache would hold after the same tokens.
        kv_tokens: Tokens the cache holds (per layer).
        seen_tokens: Tokens the cache has seen (what a full cache holds).
        policy: The cache policy.
        dropped_turns: Oldest user + assistant turns dropped this turn to fit the context.
        context: The model's context in tokens (0 when unknown).
        keep_ratio: Tokens held / tokens seen over layers and KV heads (``keep_ratio``).
    """

    new_tokens: int
    seconds: float
    prompt_tokens: int
    prefilled: int
    reused: int
    note: str
    kv_bytes: int
    full_kv_bytes: int
    kv_tokens: int
    seen_tokens: int
    policy: str
    dropped_turns: int = 0
    context: int = 0
    keep_ratio: float = 1.0

    @property
    def tok_s(self) -> float:
        """Generated tokens per second over the whole turn."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def status_line(self) -> str:
        """One line for the terminal: tokens, tok/s, KV held vs full, cache reuse."""
        share = f" ({self.kv_bytes / self.full_kv_bytes:.0%})" if self.full_kv_bytes else ""
        reuse = (
            f"reused {self.reused} cached tokens, prefilled {self.prefilled}"
            if self.reused
            else f"prefilled {self.prefilled} tokens ({self.note or 'new cache'})"
        )
        dropped = ""
        if self.dropped_turns:
            turns = "turn" if self.dropped_turns == 1 else "turns"
            dropped = (
                f" | dropped the {self.dropped_turns} oldest {turns} to fit the "
                f"{self.context}-token context"
            )
        return (
            f"[chat] {self.new_tokens} tokens, {self.tok_s:.1f} tok/s | KV "
            f"{self.kv_bytes / 2**20:.2f} MiB held vs {self.full_kv_bytes / 2**20:.2f} MiB "
            f"full{share}, {self.kv_tokens} of {self.seen_tokens} tokens, keep "
            f"{self.keep_ratio:.0%} | cache={self.policy} | {reuse}{dropped}"
        )


class _CallbackStreamer(TextStreamer):
    """transformers' word-safe incremental decoding, handing each piece to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Forward decoded text (the base class prints it)."""
        if text:
            self._on_text(text)


def cache_spec_from_command(args: list[str], current: CacheSpec) -> CacheSpec:
    """Build the spec for ``/cache <policy> [budget]``.

    A budget in (0, 1] is a share of the sequence (``budget_ratio``); an integer > 1 is a
    token count (``window_length``). The floor and other settings of ``current`` are kept.

    Args:
        args: The words after ``/cache``, e.g. ``["h2o", "0.2"]``.
        current: The spec in use.

    Returns:
        The new, validated spec.

    Raises:
        CacheError: Unknown policy, bad budget, or too many words (the message says the usage).
    """
    usage = f"usage: /cache <{'|'.join(POLICIES)}> [ratio in (0, 1] or tokens]"
    if not 1 <= len(args) <= 2:
        raise CacheError(usage)
    policy = args[0]
    if policy not in POLICIES:
        raise CacheError(f"unknown cache policy {policy!r}; {usage}")
    kwargs: dict[str, Any] = {"policy": policy}
    # The floor travels through /cache full too: /cache full, then /cache h2o 0.2, keeps it.
    carried = _CARRIED if policy != "full" else ("min_tokens",)
    values = {k: getattr(current, k, None) for k in carried}
    kwargs.update({k: v for k, v in values.items() if v is not None})
    if len(args) == 2:
        if policy == "full":
            raise CacheError("the full cache has no budget: /cache full")
        try:
            budget = float(args[1])
        except ValueError:
            raise CacheError(f"budget {args[1]!r} is not a number; {usage}") from None
        if 0 < budget <= 1:
            kwargs["budget_ratio"] = budget
        elif budget > 1 and budget.is_integer():
            kwargs["window_length"] = int(budget)
        else:
            raise CacheError(f"budget {args[1]} is out of range; {usage}")
    try:
        return CacheSpec(**kwargs)
    except (TypeError, ValueError) as err:  # a key this policy does not take
        raise CacheError(f"/cache {' '.join(args)}: {err}") from err


class ChatSession:
    """History, chat template, streaming generation and a KV cache kept across turns.

    Args:
        model: A causal LM in eval mode (``llamahome.load_model``).
        tokenizer: Its tokenizer; without a chat template a plain transcript format is used.
        cache_spec: The cache policy and budget.
        generate_kwargs: ``model.generate`` keywords (``max_new_tokens``, sampling).
        system_prompt: An optional system message at the top of every conversation.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cache_spec: CacheSpec,
        generate_kwargs: dict[str, Any],
        system_prompt: str | None = None,
    ) -> None:
        self.model, self.tokenizer, self.cache_spec = model, tokenizer, cache_spec
        self.generate_kwargs = dict(generate_kwargs)
        self.max_new_tokens = int(self.generate_kwargs.get("max_new_tokens", 256))
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.context = context_length(model.config) or 0
        self.messages: list[dict[str, str]] = []
        self._cache: Any = None
        self._cached_ids: list[int] = []  # the tokens the cache has seen, in order
        self._why_new = "new cache"
        self.reset()

    # ---- commands ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation and its cache."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.messages = system
        self._drop_cache("new conversation")

    def set_cache(self, spec: CacheSpec) -> None:
        """Switch policy or budget; the next turn prefills the history into a new cache."""
        self.cache_spec = spec
        self._drop_cache("cache switched")

    # ---- one turn ------------------------------------------------------------------------
    def send(
        self, text: str, on_text: Callable[[str], None] | None = None
    ) -> tuple[str, TurnStats]:
        """Answer one user message, streaming the answer's text to ``on_text``.

        Args:
            text: The user's message.
            on_text: Called with each piece of decoded answer text as it is generated.

        Returns:
            The answer and the turn's figures.

        Raises:
            ConfigError: The message alone does not fit the model's context.
        """
        self.messages.append({"role": "user", "content": text})
        ids, dropped = self._fit_context()
        reused, note = self._prepare_cache(ids)
        streamer = _CallbackStreamer(self.tokenizer, on_text) if on_text else None
        kwargs = dict(self.generate_kwargs)
        if self.tokenizer.pad_token_id is not None:
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        input_ids = torch.tensor([ids], device=self.model.device)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    **{cache_kwarg(): self._cache},
                    **kwargs,
                )
        except BaseException:
            # Interrupted (Ctrl-C) or failed mid-answer: the cache is half-updated; drop it and
            # the unanswered message.
            self.messages.pop()
            self._drop_cache("previous answer interrupted")
            raise
        seconds = time.perf_counter() - start
        new = out[0, len(ids) :].tolist()
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        # generate() feeds every token but the last one it sampled through the model.
        self._cached_ids = (ids + new)[: self._cache.get_seq_length()]
        layer = self._cache.layers[0]
        stats = TurnStats(
            new_tokens=len(new),
            seconds=seconds,
            prompt_tokens=len(ids),
            prefilled=len(ids) - reused,
            reused=reused,
            note=note,
            kv_bytes=kv_bytes(self._cache),
            full_kv_bytes=full_kv_bytes(self._cache),
            kv_tokens=int(layer.keys.shape[-2]) if layer.keys is not None else 0,
            seen_tokens=int(self._cache.get_seq_length()),
            policy=self.cache_spec.policy,
            dropped_turns=dropped,
            context=self.context,
            keep_ratio=keep_ratio(self._cache),
        )
        return answer, stats

    # ---- internals -----------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the conversation, ending with the assistant's generation prompt."""
        template = None if self.has_template else FALLBACK_TEMPLATE
        ids = self.tokenizer.apply_chat_template(
            messages if messages is not None else self.messages,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def _fit_context(self) -> tuple[list[int], int]:
        """Render the history; drop the oldest turns while it does not fit the context.

        Returns:
            The token ids, and how many user + assistant turns were dropped.
        """
        ids = self.render()
        if not self.context:
            return ids, 0
        limit = self.context - self.max_new_tokens
        kept = list(self.messages)  # the history changes only if the new message fits
        first = 1 if kept and kept[0]["role"] == "system" else 0
        dropped = 0
        while len(ids) > limit and len(kept) - first > 1:
            del kept[first : first + 2]  # the oldest user + assistant pair
            dropped += 1
            ids = self.render(kept)
        try:
            check_length(
                "the message (with the chat template)", len(ids), self.context,
                self.max_new_tokens, "the answer (max_new_tokens)", hint="send a shorter message",
            )
        except ConfigError:
            self.messages.pop()
            raise
        if dropped:
            self.messages = kept
            self._why_new = "oldest turns dropped to fit the context"
        return ids, dropped

    def _prepare_cache(self, ids: list[int]) -> tuple[int, str]:
        """Reuse the cache when it holds a prefix of ``ids``; else start a new one.

        Returns:
            ``(reused tokens, why not reused)``.
        """
        seen = len(self._cached_ids)
        if self._cache is not None and seen:
            common = _common_prefix(self._cached_ids, ids)
            if common == seen and common < len(ids):
                return common, ""
            evicted = self._cache.layers[0].keys.shape[-2] < self._cache.get_seq_length()
            if 0 < common < len(ids) and isinstance(self._cache, DynamicCache) and not evicted:
                # The re-rendered history differs from what was generated (tokenization is not
                # round-trip stable): cut the cache back to the common prefix.
                self._cache.crop(common - seen)  # transformers 5: a negative count to remove
                return common, ""
            self._why_new = "history re-tokenized differently; cache has evicted"
        note = self._why_new
        seq_len = len(ids) + self.max_new_tokens
        self._cache = self.cache_spec.build(self.model.config, seq_len=seq_len)
        self._cached_ids, self._why_new = [], "new cache"
        return 0, note

    def _drop_cache(self, why: str) -> None:
        self._cache, self._cached_ids, self._why_new = None, [], why


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
