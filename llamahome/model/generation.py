"""Prompt formatting and batch generation with a KV-cache policy (shared by callbacks and eval)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def format_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[str]:
    """Apply the tokenizer's chat template (instruct models) or return the prompts as they are."""
    if chat and getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    return list(prompts)


def cache_kwarg() -> str:
    """``generate``'s keyword for a cache object: ``cache`` since transformers 5.2x, else the old one."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompts: Sequence[str],
    cache_spec: Any = None,
    max_new_tokens: int = 32,
    chat: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy (or sampled, via kwargs) batch generation; returns only the new text per prompt.

    Args:
        model: A causal LM (PEFT-wrapped is fine).
        tokenizer: Its tokenizer; padding is on the left for batch generation.
        prompts: The prompts.
        cache_spec: A cache spec from ``conf/cache`` (``spec.build(config)``) or ``None`` for
            transformers' default dynamic cache.
        max_new_tokens: Tokens to generate.
        chat: Use the chat template when the tokenizer has one.
        **generate_kwargs: Passed to ``model.generate`` (``do_sample``, ``temperature``, ...).

    Returns:
        The decoded continuation of each prompt.
    """
    was_training = model.training
    model.eval()
    texts = format_prompts(tokenizer, prompts, chat=chat)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        device = next(model.parameters()).device
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
        if cache_spec is not None:
            # Ratio budgets are shares of the whole sequence: prompt + new tokens (H2O paper).
            seq_len = int(enc["input_ids"].shape[1]) + max_new_tokens
            generate_kwargs[cache_kwarg()] = cache_spec.build(model.config, seq_len=seq_len)
        generate_kwargs.setdefault("do_sample", False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **generate_kwargs,
        )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
