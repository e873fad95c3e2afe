"""The two protocols of a task with a question: compress the context only, or the whole prompt.

Every prompt of a question task is a *context* (instruction + haystack) followed by a *question*
(and, for completion-style prompts, the answer's first words). kvpress evaluates KV compression
with the question protected, and so do we by default (``task.question_protected=true``):

* **question protected**: the context is prefilled through the cache, which evicts down to its
  budget right away; the budget's ratio is of the **context length**
  (``seq_len = context tokens``, so ``budget_ratio=0.2`` keeps 20% of the context). The question
  tokens are then fed inside ``pinned(cache)``: they are never evicted and are held *in addition*
  to the budget. Greedy decoding follows, the decoded tokens competing for the budget as usual.
* **question compressed** (``task.question_protected=false``): context and question are prefilled
  together and the whole prompt is compressed; the ratio is of the **prompt length** (context +
  question), and the question's tokens may be evicted like any other.

Both protocols feed exactly the same token ids (the context and the question are tokenized
apart and concatenated), so they differ only in what the cache may evict. A batch is padded on
the left of the context *and* on the left of the question (so every row's question starts at the
same column); the padding is masked, and the cache layers never keep it over real tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llamahome.errors import ConfigError
from llamahome.evaluation.base import KVMeter

log = logging.getLogger(__name__)

PROTECTED = "question_protected"
COMPRESSED = "question_compressed"


@dataclass(frozen=True)
class Prompt:
    """One prompt of a question task.

    Attributes:
        context: The instruction and the haystack (what the cache compresses).
        question: The question, ending with the answer's first words for completion prompts.
    """

    context: str
    question: str


def protocol_name(question_protected: bool) -> str:
    """Return the ``protocol`` column of a result row."""
    return PROTECTED if question_protected else COMPRESSED


def split_prompt(text: str, question: str) -> Prompt:
    """Split `text` before its last occurrence of `question`.

    Whitespace right before the question goes with the question (BPE tokenizers attach a
    leading space to the following word).

    Raises:
        ValueError: `question` is not in `text`.
    """
    at = text.rfind(question)
    if at < 0:
        raise ValueError(f"the question {question[:40]!r} is not in the prompt")
    while at > 0 and text[at - 1] in " \t":
        at -= 1
    return Prompt(text[:at], text[at:])


def encode(tokenizer: Any, prompt: Prompt, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the question (chat template applied when `chat`).

    With the chat template the context is everything up to the question inside the user turn
    and the question is the rest, template suffix (``assistant`` header) included.
    """
    from llamahome.model.generation import format_prompts

    text = format_prompts(tokenizer, [prompt.context + prompt.question], chat=chat)[0]
    if text != prompt.context + prompt.question:
        prompt = split_prompt(text, prompt.question.strip())
    context = tokenizer(prompt.context, add_special_tokens=not chat)["input_ids"]
    question = tokenizer(prompt.question, add_special_tokens=False)["input_ids"]
    return list(context), list(question)


def pinned(cache: Any) -> contextlib.AbstractContextManager:
    """``llamahome.kvcache.pinned(cache)``: tokens appended inside the block are never evicted."""
    for where in ("llamahome.kvcache", "llamahome.kvcache.spec", "llamahome.core.cache"):
        try:
            module = __import__(where, fromlist=["pinned"])
        except ImportError:
            continue
        if hasattr(module, "pinned"):
            return module.pinned(cache)
    raise ConfigError(
        "task.question_protected=true needs llamahome.kvcache.pinned, which this install lacks; "
        "set task.question_protected=false."
    )


def build_cache(cache_spec: Any, model_config: Any, seq_len: int) -> Any:
    """Make a fresh cache whose ratio budget is of `seq_len` tokens, without the chat floor.

    Eval measures the policy itself, so ``min_tokens`` (the floor under which a cache never
    evicts, for short chat turns) is 0 here.
    """
    names = {f.name for f in dataclasses.fields(cache_spec)}
    if "min_tokens" in names and cache_spec.min_tokens != 0:
        cache_spec = dataclasses.replace(cache_spec, min_tokens=0)
    try:
        return cache_spec.build(model_config, seq_len=seq_len)
    except TypeError:  # a CacheSpec without the sequence-length budget (older API)
        return cache_spec.build(model_config)


@dataclass
class Batch:
    """A padded batch: ids and mask (rows, context + question), and the context's width."""

    ids: torch.Tensor
    mask: torch.Tensor
    context_width: int


def pad_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Left-pad every context to the longest, then every question to the longest."""
    width_c = max(len(c) for c, _ in pairs)
    width_q = max(len(q) for _, q in pairs)
    ids, mask = [], []
    for context, question in pairs:
        pc, pq = width_c - len(context), width_q - len(question)
        ids.append([pad_id] * pc + context + [pad_id] * pq + question)
        mask.append([0] * pc + [1] * len(context) + [0] * pq + [1] * len(question))
    return Batch(torch.tensor(ids), torch.tensor(mask), width_c)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a padding mask, as ``generate`` computes them (padding at 1)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def prefill(
    model: Any, batch: Batch, cache_spec: Any, question_protected: bool
) -> tuple[Any, Any, torch.Tensor]:
    """Run the prompt through a fresh cache under one protocol.

    Returns:
        The cache, the last forward's output (its last logits predict the first new token),
        and the attention mask so far.
    """
    device = next(model.parameters()).device
    ids, mask = batch.ids.to(device), batch.mask.to(device)
    positions = _positions(mask)
    width = batch.context_width
    cache = build_cache(cache_spec, model.config, width if question_protected else ids.shape[1])
    key = _cache_key(model)

    def step(lo: int, hi: int) -> Any:
        return model(
            input_ids=ids[:, lo:hi],
            attention_mask=mask[:, :hi],
            position_ids=positions[:, lo:hi],
            use_cache=True,
            logits_to_keep=1,
            **{key: cache},
        )

    if question_protected:
        step(0, width)
        with pinned(cache):
            out = step(width, ids.shape[1])
    else:
        out = step(0, ids.shape[1])
    return cache, out, mask


def _cache_key(model: Any) -> str:
    """Return ``forward``'s cache keyword: ``cache`` (transformers 5.2x) or the old one."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def answer(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    cache_spec: Any,
    max_new_tokens: int,
    chat: bool,
    question_protected: bool,
    meter: KVMeter,
) -> tuple[list[str], int]:
    """Greedy answers to a batch of prompts with a fresh cache, under one protocol.

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer.
        prompts: Context/question pairs.
        cache_spec: A ``CacheSpec``.
        max_new_tokens: Tokens to generate (fewer when every row has ended).
        chat: Wrap prompts in the chat template when the tokenizer has one.
        question_protected: The protocol (see the module docstring).
        meter: Receives the cache after generation.

    Returns:
        The new text of each prompt, and the tokens processed (prompt + new, padding excluded).
    """
    was_training = model.training
    model.eval()
    try:
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad
        batch = pad_batch([encode(tokenizer, p, chat) for p in prompts], int(pad or 0))
        cache, out, mask = prefill(model, batch, cache_spec, question_protected)
        stops = _stop_ids(model, tokenizer)
        rows = len(prompts)
        new: list[list[int]] = [[] for _ in range(rows)]
        done = torch.zeros(rows, dtype=torch.bool)
        device = mask.device
        key = _cache_key(model)
        for i in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            for r, t in enumerate(token.tolist()):
                if not done[r]:
                    if t in stops:
                        done[r] = True
                    else:
                        new[r].append(t)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            mask = torch.cat((mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)), -1)
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                use_cache=True,
                **{key: cache},
            )
        meter.add(cache)
    finally:
        model.train(was_training)
    tokens = int(batch.mask.sum()) + sum(len(n) for n in new)
    return [tokenizer.decode(n, skip_special_tokens=True) for n in new], tokens


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    stops: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            stops.add(value)
        elif value:
            stops.update(int(v) for v in value)
    return stops
