"""The model's context window: prompts that do not fit fail with one clear line."""

from __future__ import annotations

from typing import Any

from llamahome.errors import ConfigError


def context_length(model_config: Any) -> int | None:
    """Return the model's context in tokens (``max_position_embeddings``), or None if unknown."""
    text = model_config
    if hasattr(model_config, "get_text_config"):
        text = model_config.get_text_config(decoder=True)
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def fit_new_tokens(
    prompt_tokens: int, max_new_tokens: int, model_config: Any, what: str = "prompt"
) -> int:
    """Check that a prompt fits the context; cap the answer to what is left of it.

    Past the context the model's positions are ones it was never trained on, and it produces
    garbage; a prompt that already fills the context is refused instead.

    Args:
        prompt_tokens: Length of the prompt in tokens (after the chat template).
        max_new_tokens: Tokens asked for.
        model_config: The model's config.
        what: The key the prompt came from, named in the error (``prompt``, ``prompt_file=x``).

    Returns:
        ``max_new_tokens``, or fewer so that prompt + answer fit the context.

    Raises:
        ConfigError: The prompt alone fills the context.
    """
    context = context_length(model_config)
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise ConfigError(
            f"{what} is {prompt_tokens} tokens but the model's context is {context} tokens "
            "(max_position_embeddings): shorten it, or use a model with a longer context."
        )
    return min(max_new_tokens, context - prompt_tokens)
