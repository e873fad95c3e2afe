r"""KVzip (``cache=kvzip``): keep the KV pairs the model needs to reconstruct its own context.

Paper: Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", arXiv 2505.23416 (code: snu-mllab/KVzip; kvpress: ``KVzipPress``).

Rule. After a prefill of the context, the model is asked to repeat it: for each chunk of the
context (``chunk_size`` tokens, default 2,048 as in kvpress) the input
``"\\n\\nRepeat the previous context exactly." + <assistant header> + chunk`` (later chunks:
``"...Repeat the part of the previous context exactly, starting with" + the previous chunk's last
8 tokens``) is run through the model with the context in the cache. In every layer, each query of
that repeat attends (softmax) to the attention sinks, the chunk's own keys and the repeat's keys
(causally); a context key's score is its largest attention probability over the repeat's queries
and over the query heads of its KV head (GQA). A KV pair scores high when reproducing the context
needs it, whatever the question will be (query-agnostic). The cache stores the log of that
probability (`log_scores`), the scale the learned scorer predicts and ``cache.threshold`` is
given in. The first ``sink_tokens`` (4) real tokens are always kept, as in kvpress.

Budgets per KV head are non-uniform, as in the paper: by default (``head_budgets=global``) the
cache's whole budget (layers x KV heads x the per-head budget) goes to the highest scores over
every layer and head, so one head may keep most of the context and another almost none
(``head_budgets=layer``: AdaKV-style within each layer; ``uniform``: every head the same;
``threshold``: every pair scoring at least the threshold). See ``head_budget.py``.

Cost: about one more prefill. The context is kept whole until the reconstruction pass has run
through it (the layers are *deferred*), so the KV of the whole prompt is held once, for every
layer, as a full cache would; the pass itself processes one chunk at a time (the repeat's
queries over the held keys, scores in blocks of 16 MiB of logits), so its activations are those
of a ``chunk_size``-token prefill. The prefill's own logits are the full cache's (nothing is
evicted before them).

Decode. KVzip compresses a context once; decoded tokens have no reconstruction score. When the
model carries a learned scorer (``model=<kv_scorer run>``, ``learned.py``), each decoded token
gets the scorer's prediction of its log KVzip score and competes with the context on the same
scale (KVzap's use of a surrogate at decode). Without one, decoded tokens are kept while in the
recent window (the budget's recent part) and, once out of it, are the first to go (oldest
first), so the compressed context stays as it was chosen. Either way each head keeps its count:
the cache never exceeds its budget. A later multi-token forward (the next chat turn, a second
document) is scored the same way: its tokens are reconstructed, then the whole cache is evicted
down to the budget again.

How it runs inside any ``model(...)`` / ``model.generate(...)`` call: the model carries a forward
hook on its decoder (``model_hooks.enable_cache_hooks``, installed by ``llamahome.load_model``)
that, after a forward which left kvzip layers deferred, runs the reconstruction pass through the
same decoder and then evicts (``head_budget.settle``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from llamahome.errors import CacheError
from llamahome.kvcache.attention import CACHE_HOOK_KWARG
from llamahome.kvcache.head_budget import HeadBudgetLayer
from llamahome.kvcache.learned import KVScorer, ScorerInputs
from llamahome.kvcache.slots import new_token_validity

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LOG_FLOOR",
    "KVzipLayer",
    "RepeatPrompt",
    "kvzip_chunk_scores",
    "log_scores",
    "reconstruct",
    "repeat_prompt",
]

DEFAULT_CHUNK_SIZE = 2048
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
PREVIOUS_TAIL = 8  # tokens of the previous chunk that open the next chunk's repeat prompt
# Elements of one block of scoring logits (float32): 2**22 = 16 MiB, as the hybrid attention.
SCORE_BLOCK_ELEMENTS = 2**22
# A decoded token's score: its position minus 2**23, below any log score and exact in float32
# (older decoded tokens go first).
_DECODED = float(2**23)
# Probabilities below this are all "never needed": log() of them is clamped (log 1e-9 = -20.7).
LOG_FLOOR = 1e-9


def log_scores(scores: torch.Tensor) -> torch.Tensor:
    """The stored score: the log of the KVzip probability, clamped below at `LOG_FLOOR`."""
    return scores.clamp(min=LOG_FLOOR).log()


@dataclass(frozen=True)
class RepeatPrompt:
    """Token ids of the reconstruction prompt, in the model's tokenizer.

    Attributes:
        first: The instruction before the first chunk.
        next: The instruction before a later chunk (the previous chunk's tail follows it).
        suffix: What opens the answer (the chat template's assistant header, else a newline).
        tail: Tokens of the previous chunk repeated after ``next``.
    """

    first: tuple[int, ...]
    next: tuple[int, ...]
    suffix: tuple[int, ...]
    tail: int = PREVIOUS_TAIL


def repeat_prompt(tokenizer: Any) -> RepeatPrompt:
    """The reconstruction prompt in `tokenizer`'s ids (its chat template's assistant header).

    Args:
        tokenizer: The model's tokenizer.

    Returns:
        The prompt, as kvpress builds it.
    """

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    suffix = "\n"
    if getattr(tokenizer, "chat_template", None):
        dummy, separator = "dummy context", "\n" + "#" * 13
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": dummy + separator}],
            add_generation_prompt=True,
            tokenize=False,
        )
        if isinstance(text, str) and separator in text:
            suffix = text.split(separator, 1)[1]
    return RepeatPrompt(encode(FIRST_PROMPT), encode(NEXT_PROMPT), encode(suffix))


def kvzip_chunk_scores(
    query: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_ok: torch.Tensor,
    chunk_keys: torch.Tensor,
    chunk_ok: torch.Tensor,
    repeat_keys: torch.Tensor,
    repeat_ok: torch.Tensor,
    scaling: float | None = None,
    block_elements: int = SCORE_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """KVzip's score of each chunk key: its top attention from the repeat's queries.

    The softmax runs over the sinks, the chunk and the repeat's own keys (causal), as KVzip
    subsamples them; the score is the maximum probability over the repeat's (real) queries and
    over the query heads of each KV head.

    Args:
        query: (batch, heads, r, head_dim), the repeat's rotated queries.
        sink_keys: (batch, kv_heads, s, head_dim) (s may be 0).
        sink_ok: (batch, kv_heads, s) bool, False where a sink is missing or padding.
        chunk_keys: (batch, kv_heads, c, head_dim), the context chunk being reconstructed.
        chunk_ok: (batch, kv_heads, c) bool, False on padding.
        repeat_keys: (batch, kv_heads, r, head_dim).
        repeat_ok: (batch, r) bool, False on the repeat's padding (as keys and as queries).
        scaling: Logit scale (default head_dim ** -0.5).
        block_elements: Upper bound on the elements of one block of logits.

    Returns:
        float32 (batch, kv_heads, c).
    """
    bsz, heads, r, dim = query.shape
    kv_heads, s, c = chunk_keys.shape[1], sink_keys.shape[2], chunk_keys.shape[2]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    keys = torch.cat((sink_keys, chunk_keys, repeat_keys), dim=2).float()
    keys_t = keys.transpose(-1, -2)  # (b, kvh, d, s + c + r)
    fixed_ok = torch.cat((sink_ok, chunk_ok), dim=-1)[:, :, None, None, :]  # (b,kvh,1,1,s+c)
    q_all = query.float().view(bsz, kv_heads, groups, r, dim)
    best = torch.zeros(bsz, kv_heads, c, dtype=torch.float32, device=query.device)
    width = s + c + r
    rows = max(1, block_elements // max(1, bsz * heads * width))
    for lo in range(0, r, rows):
        hi = min(r, lo + rows)
        logits = torch.matmul(q_all[:, :, :, lo:hi], keys_t[:, :, None]).mul_(scale)
        causal = torch.arange(r, device=query.device)[None, :] <= torch.arange(
            lo, hi, device=query.device
        )[:, None]
        rep_ok = (causal[None] & repeat_ok[:, None, :])[:, None, None]  # (b,1,1,n,r)
        allowed = torch.cat(
            (fixed_ok.expand(-1, -1, -1, hi - lo, -1), rep_ok.expand(-1, kv_heads, -1, -1, -1)),
            dim=-1,
        )
        logits.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)[..., s : s + c]
        probs.mul_(repeat_ok[:, None, None, lo:hi, None])  # padded queries give nothing
        best = torch.maximum(best, probs.amax(dim=(2, 3)))
    return best


class KVzipLayer(ScorerInputs, HeadBudgetLayer):
    """Reconstruction scores at prefill, per KV head; decoded tokens as the module doc says."""

    policy = "kvzip"
    needs_reconstruction = True

    def __init__(
        self,
        *args: Any,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        score_only: bool = False,
        scorer: KVScorer | None = None,
        layer_idx: int = 0,
        **kwargs: Any,
    ) -> None:
        """See `HeadBudgetLayer`.

        Args:
            *args: The budget (and ``inv_freq``).
            chunk_size: Context tokens reconstructed per pass.
            score_only: Score every prefill but never evict (the teacher for the learned scorer).
            scorer: The model's learned scorer, if it has one: it scores decoded tokens.
            layer_idx: This layer's index in the model.
            **kwargs: ``threshold``, ``head_budgets``.
        """
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size
        self.score_only = score_only
        self.scorer = None if score_only else scorer
        self.layer_idx = layer_idx
        self._scoring: tuple[int, int] | None = None  # slot range of the chunk being scored
        self._probe: tuple[Any, ...] | None = None

    def _should_defer(self, q: int) -> bool:
        return q > 1 and not self._pinning and (self.score_only or not self._never_evicts())

    def _entry_score(self, bsz: int, kv_heads: int, q: int, device: torch.device) -> Any:
        # Prefill tokens are scored by the reconstruction. A decoded token gets the learned
        # scorer's prediction of its (log) KVzip score when the model has a scorer, else it
        # ranks by its age (below every context token once out of the recent window).
        if q == 1 and self.scorer is not None:
            return self._predicted(bsz, kv_heads, q, device)
        self._forget_inputs()
        return float(self._seen_before) - _DECODED if q == 1 else 0.0

    def settle(self, adapt: bool = False) -> None:
        """Evict after the reconstruction (a score-only layer only forgets it was deferred)."""
        if self.score_only:
            self._deferred = 0
            return
        super().settle(adapt)

    # ---- the reconstruction pass ---------------------------------------------------------
    def fresh_slots(self) -> tuple[int, int]:
        """Slot range of the deferred tokens (the last slots, in order)."""
        return self._n - self._deferred, self._n

    def begin_scoring(self, start: int, stop: int) -> None:
        """Score the deferred slots [start, stop) from the next forward (a repeat chunk)."""
        self._compact()
        self._scoring = (start, stop)

    def end_scoring(self) -> None:
        """Back to normal steps."""
        self._scoring = None
        self._probe = None

    def update(self, key_states, value_states, *args: Any, **kwargs: Any):  # noqa: D102
        if self._scoring is None:
            return super().update(key_states, value_states, *args, **kwargs)
        # A repeat chunk: attend over the held slots + the repeat, store nothing.
        attn_kwargs = kwargs.get("kwargs")
        if not isinstance(attn_kwargs, dict):
            raise CacheError("cache.policy=kvzip: this model's attention does not feed the cache.")
        attn_kwargs[CACHE_HOOK_KWARG] = self
        self._awaiting = True
        n, q = self._n, key_states.shape[-2]
        self._q = q
        self._seen_before = self.cumulative_length
        self.cumulative_length += q
        keys = torch.cat((self._state["keys"][:, :, :n], key_states), dim=2)
        values = torch.cat((self._state["values"][:, :, :n], value_states), dim=2)
        return keys, values

    def prepare(self, query, key, attention_mask, position_ids):  # noqa: D102
        if self._scoring is None:
            return super().prepare(query, key, attention_mask, position_ids)
        q, n = self._q, self._n
        mask = self._mask(attention_mask, query, q, n)
        repeat_ok = new_token_validity(attention_mask, q, query.shape[0])
        self._probe = (query, key, repeat_ok)
        return query, key, mask

    def finish(self, scores: torch.Tensor | None) -> None:  # noqa: D102
        if self._scoring is None:
            super().finish(scores)
            return
        query, key, repeat_ok = self._probe
        self._probe = None
        n, q = self._n, self._q
        start, stop = self._scoring
        state = self._state
        bsz, kv_heads = key.shape[0], key.shape[1]
        if repeat_ok is None:
            repeat_ok = torch.ones(bsz, q, dtype=torch.bool, device=key.device)
        # Sinks outside the chunk (inside it they are chunk keys already).
        sink = state["sink"][:, :, :n].clone()
        sink[:, :, start:stop] = False
        count = min(self.budget.sink, n)
        if count:
            flag, index = sink.to(torch.float32).topk(count, dim=-1)
            sink_ok = flag > 0
            sink_keys = key[:, :, :n].gather(2, index[..., None].expand(-1, -1, -1, key.shape[-1]))
        else:
            sink_ok = torch.zeros(bsz, kv_heads, 0, dtype=torch.bool, device=key.device)
            sink_keys = key[:, :, :0]
        chunk_ok = state["valid"][:, :, start:stop]
        state["score"][:, :, start:stop] = log_scores(
            kvzip_chunk_scores(
                query, sink_keys, sink_ok, key[:, :, start:stop], chunk_ok, key[:, :, n:], repeat_ok
            )
        )
        self.cumulative_length = self._seen_before
        self._awaiting = False
        self._work = {}

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self.end_scoring()
        self._forget_inputs()

    def _map_state(self, fn: Any) -> None:
        super()._map_state(fn)
        self._forget_inputs()


def _forward_inputs(
    decoder: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None:
        raise CacheError(
            "cache.policy=kvzip reconstructs the context from its token ids: call the model with "
            "input_ids (inputs_embeds cannot be reconstructed), or use another cache policy."
        )
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    return ids, mask


def _cache_keyword(decoder: torch.nn.Module) -> str:
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def reconstruct(
    decoder: torch.nn.Module,
    cache: Any,
    layers: list[KVzipLayer],
    prompt: RepeatPrompt | None,
    args: tuple,
    kwargs: dict[str, Any],
) -> None:
    """Score the deferred tokens of `layers` by KVzip's reconstruction, one chunk at a time.

    Args:
        decoder: The model's decoder (``model.get_decoder()``), whose forward just prefilled.
        cache: The cache that forward used.
        layers: Its deferred kvzip layers (all of them).
        prompt: The reconstruction prompt in the model's tokenizer.
        args: The prefill forward's positional arguments.
        kwargs: The prefill forward's keyword arguments (``input_ids``, ``attention_mask``).

    Raises:
        CacheError: No prompt (the model was enabled without a tokenizer), no input ids, or a
            mask that is not a 2-D padding mask.
    """
    if prompt is None:
        raise CacheError(
            "cache.policy=kvzip needs its reconstruction prompt in the model's tokenizer: load "
            "the model with llamahome.load_model, or call "
            "llamahome.kvcache.model_hooks.enable_cache_hooks(model, tokenizer)."
        )
    ids, mask = _forward_inputs(decoder, args, kwargs)
    first = layers[0]
    fresh = first._deferred
    bsz, device = ids.shape[0], ids.device
    seen = first.cumulative_length
    if ids.shape[1] != fresh:
        raise CacheError(
            f"cache.policy=kvzip: the forward fed {ids.shape[1]} tokens but {fresh} wait for "
            "scoring; feed new tokens in one call per step."
        )
    if mask is None:
        mask = torch.ones(bsz, seen, dtype=torch.long, device=device)
    elif mask.dim() != 2 or mask.shape[-1] != seen:
        raise CacheError(
            "cache.policy=kvzip needs a 2-D attention_mask over every token seen "
            f"(batch x {seen}); got shape {tuple(mask.shape)}."
        )
    mask = mask.to(torch.long)
    fresh_ok = mask[:, -fresh:]
    slot0 = first.fresh_slots()[0]
    keyword = _cache_keyword(decoder)

    def ids_of(values: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=ids.dtype, device=device).expand(bsz, len(values))

    chunk = max(1, first.chunk_size)
    for lo in range(0, fresh, chunk):
        hi = min(fresh, lo + chunk)
        if lo == 0:
            head, head_ok = ids_of(prompt.first), torch.ones(bsz, len(prompt.first), device=device)
        else:
            tail = slice(max(0, lo - prompt.tail), lo)
            head = torch.cat((ids_of(prompt.next), ids[:, tail]), dim=1)
            ones = torch.ones(bsz, len(prompt.next), device=device)
            head_ok = torch.cat((ones, fresh_ok[:, tail].float()), dim=1)
        suffix = ids_of(prompt.suffix)
        repeat = torch.cat((head, suffix, ids[:, lo:hi]), dim=1)
        repeat_mask = torch.cat(
            (head_ok.long(), torch.ones_like(suffix), fresh_ok[:, lo:hi]), dim=1
        )
        full = torch.cat((mask, repeat_mask), dim=1)
        positions = (full.cumsum(-1) - 1).clamp_(min=0)[:, -repeat.shape[1] :]
        for layer in layers:
            layer.begin_scoring(slot0 + lo, slot0 + hi)
        try:
            decoder(
                input_ids=repeat,
                attention_mask=full,
                position_ids=positions,
                use_cache=True,
                **{keyword: cache},
            )
        finally:
            for layer in layers:
                layer.end_scoring()
