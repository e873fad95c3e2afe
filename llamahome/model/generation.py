"""Prompt formatting and batch generation with a KV-cache policy (shared by callbacks and eval)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llamahome.errors import ConfigError

# The sampling keys of conf/generate.yaml and conf/chat.yaml (transformers generate() knobs).
SAMPLING_KEYS = (
    "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty"
)


def sampling_kwargs(
    max_new_tokens: Any,
    do_sample: Any = False,
    temperature: Any = None,
    top_p: Any = None,
    top_k: Any = None,
    repetition_penalty: Any = 1.0,
) -> dict[str, Any]:
    """Validate sampling settings into ``model.generate`` keyword arguments.

    Args:
        max_new_tokens: Tokens to generate (an integer >= 1).
        do_sample: Sample (True) or decode greedily (False).
        temperature: Softmax temperature (> 0), used when sampling.
        top_p: Nucleus mass in (0, 1], used when sampling.
        top_k: Top-k cut (>= 0, 0 = off), used when sampling.
        repetition_penalty: > 0; 1.0 = off.

    Returns:
        The keyword arguments (sampling knobs only when ``do_sample``).

    Raises:
        ConfigError: Naming the first key out of range.
    """
    whole = isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool)
    if not whole or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": bool(do_sample)}
    # 0 is a value (refused below), not "off": only None means the default.
    penalty = 1.0 if repetition_penalty is None else float(repetition_penalty)
    if penalty <= 0:
        raise ConfigError(f"repetition_penalty={penalty} must be > 0 (1.0 = off)")
    if penalty != 1.0:
        kwargs["repetition_penalty"] = penalty
    if kwargs["do_sample"]:
        if temperature is None or temperature <= 0:
            raise ConfigError(f"temperature={temperature!r} must be > 0 when do_sample=true")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"top_p={top_p!r} must be in (0, 1]")
        if top_k is not None and top_k < 0:
            raise ConfigError(f"top_k={top_k!r} must be >= 0 (0 = off)")
        kwargs.update(temperature=float(temperature), top_p=top_p, top_k=top_k)
    return kwargs


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
    """The ``generate`` keyword for a cache: ``cache`` since transformers 5.2x, else the old."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


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
    # No torch import at module level (sampling_kwargs validates the CLI before torch loads);
    # model.generate runs under torch.no_grad itself.
    was_training = model.training
    model.eval()
    texts = format_prompts(tokenizer, prompts, chat=chat)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        device = next(model.parameters()).device
        enc = tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=not chat
        ).to(device)
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
