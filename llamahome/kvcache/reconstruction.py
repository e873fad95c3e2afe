r"""KVzip's reconstruction pass: the prompt, the scoring rule, and the pass through the model.

Paper: Kim et al., 2025, arXiv 2505.23416 (code: snu-mllab/KVzip; kvpress: ``KVzipPress``).
After a prefill, the model is fed ``"\n\nRepeat the previous context exactly." + <assistant
header> + chunk`` for each chunk of the context (`reconstruct`), and every context key is scored
by its largest attention from that repeat (`kvzip_chunk_scores`); ``kvzip.py``'s layers run it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llamahome.errors import CacheError

if TYPE_CHECKING:
    from llamahome.kvcache.kvzip import KVzipLayer

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LOG_FLOOR",
    "RepeatPrompt",
    "cache_keyword",
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
    # The query is pre-scaled once; keys are (b, kvh, d, s + c + r) for one batched product.
    keys_t = torch.cat((sink_keys, chunk_keys, repeat_keys), dim=2).float().transpose(-1, -2)
    fixed_bad = ~torch.cat((sink_ok, chunk_ok), dim=-1)[:, :, None, None, :]  # (b,kvh,1,1,s+c)
    any_fixed_bad = bool(fixed_bad.any())
    padded = not bool(repeat_ok.all())
    q_all = (query.float() * scale).view(bsz, kv_heads, groups, r, dim)
    best = torch.zeros(bsz, kv_heads, c, dtype=torch.float32, device=query.device)
    rows = max(1, block_elements // max(1, bsz * heads * (s + c + r)))
    keys_r = torch.arange(r, device=query.device)
    for lo in range(0, r, rows):
        hi = min(r, lo + rows)
        logits = torch.matmul(q_all[:, :, :, lo:hi], keys_t[:, :, None])  # (b,kvh,g,n,s+c+r)
        # Masks applied in place through broadcasting views: nothing of logits' size is built.
        hidden = keys_r[None, :] > torch.arange(lo, hi, device=query.device)[:, None]  # future
        if padded:
            hidden = hidden[None] | ~repeat_ok[:, None, :]
        logits[..., s + c :].masked_fill_(hidden[..., None, None, :, :] if padded else hidden,
                                           float("-inf"))
        if any_fixed_bad:
            logits[..., : s + c].masked_fill_(fixed_bad, float("-inf"))
        probs = torch.softmax(logits, dim=-1)[..., s : s + c]
        if padded:  # a padded query gives nothing (its row may even be empty: nan)
            probs = probs.nan_to_num(0.0).mul_(repeat_ok[:, None, None, lo:hi, None])
        best = torch.maximum(best, probs.amax(dim=(2, 3)))
    return best


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


def cache_keyword(decoder: torch.nn.Module) -> str:
    """``forward``'s cache keyword: ``cache`` (transformers 5.2x) or ``past_key_values``."""
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
    keyword = cache_keyword(decoder)

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
