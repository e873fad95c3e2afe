"""From a validated request to what the engine needs: prompt ids, the cache, ``max_tokens``."""

from __future__ import annotations

import dataclasses
from typing import Any

from llamahome.errors import CacheError
from llamahome.kvcache.spec import POLICIES, CacheSpec
from llamahome.serving.errors import APIError
from llamahome.serving.schemas import ChatRequest, KVCacheOverride, Sampling


def cache_spec_for(override: KVCacheOverride | None, default: Any) -> Any:
    """Return the cache for one request: the server default, or the request's ``kv_cache``.

    A ``budget`` is a ratio in (0, 1] of prompt + completion (float) or a token count (int).
    Without a budget, the default's budget applies when the policy is the default's, else the
    policy's own default. ``min_tokens`` falls back to the server's.

    Raises:
        APIError: 400 for an unknown policy or a budget out of range.
    """
    if override is None:
        return default
    policy = override.policy or default.policy
    if policy not in POLICIES:
        raise APIError(
            400, f"kv_cache.policy={policy[:40]!r} is unknown: choose one of "
            f"{', '.join(POLICIES)}.", param="kv_cache.policy", code="invalid_kv_cache",
        )
    budget, kwargs = override.budget, {}
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise APIError(
            400, f"kv_cache.budget={budget} is out of range: give a ratio in (0, 1] of the "
            "sequence (0.2 keeps 20%) or a token count >= 1.", param="kv_cache.budget",
            code="invalid_kv_cache",
        )
    if isinstance(budget, int) and budget < 1:
        raise APIError(
            400, f"kv_cache.budget={budget} is out of range: a token count must be >= 1.",
            param="kv_cache.budget", code="invalid_kv_cache",
        )
    if isinstance(budget, float):
        kwargs["budget_ratio"] = budget
    elif isinstance(budget, int):
        kwargs["window_length"] = budget
    floor = override.min_tokens
    kwargs["min_tokens"] = floor if floor is not None else default.min_tokens
    try:
        if budget is None and policy == default.policy:
            return dataclasses.replace(default, **kwargs)
        return CacheSpec(policy=policy, **kwargs)
    except CacheError as err:
        message = str(err).replace("cache.budget_ratio", "kv_cache.budget")
        message = message.replace("cache.window_length", "kv_cache.budget")
        raise APIError(400, message, param="kv_cache", code="invalid_kv_cache") from err


def chat_prompt_ids(tokenizer: Any, request: ChatRequest) -> list[int]:
    """Token ids of the conversation, through the tokenizer's chat template when it has one.

    Raises:
        APIError: 400 for an empty conversation or a template that rejects it.
    """
    if not request.messages:
        raise APIError(400, "messages is empty: send at least one message.", param="messages",
                       code="empty_messages")
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in request.messages
    ]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja's TemplateError and the template's own raise_exception
            raise APIError(400, f"the chat template rejected the messages: {err}",
                           param="messages") from err
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # No template (a model trained from scratch): a plain transcript the model can continue.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


def max_tokens_for(request: Sampling, prompt_tokens: int, context: int, default: int) -> int:
    """Return the completion budget; 400 context_length_exceeded when it does not fit."""
    asked = request.max_completion_tokens or request.max_tokens
    if prompt_tokens >= context or (asked is not None and prompt_tokens + asked > context):
        raise APIError(
            400, f"This model's maximum context length is {context} tokens. However, you "
            f"requested {prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the prompt, "
            f"{asked or 1} for the completion). Please reduce the prompt or max_tokens.",
            param="messages", code="context_length_exceeded",
        )
    return asked if asked is not None else min(default, context - prompt_tokens)
