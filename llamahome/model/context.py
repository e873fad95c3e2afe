"""The model's context window: one check, shared by every eval task and entry point.

Past ``max_position_embeddings`` a Llama sees positions it was never trained on: it scores and
answers garbage, and at 100k tokens it also tries to allocate tens of GB. So a length beyond
the context is refused with one line naming the key, the length and the context
(:func:`check_length`), before the model loads where the length is known from the config alone
(:func:`model_context` reads ``config.json`` without the weights), and again against the loaded
model's config once prompts are tokenized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamahome.errors import ConfigError

__all__ = ["check_length", "context_length", "fit_new_tokens", "model_context"]


def context_length(model_config: Any) -> int | None:
    """Return the model's context in tokens (``max_position_embeddings``), or None if unknown."""
    text = model_config
    if hasattr(model_config, "get_text_config"):
        text = model_config.get_text_config(decoder=True)
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def check_length(
    subject: str,
    tokens: int,
    context: int | None,
    reserved: int = 0,
    reserved_for: str = "the answer",
    hint: str | None = None,
) -> None:
    """Refuse ``tokens`` (+ ``reserved`` generated after them) beyond the model's context.

    Args:
        subject: What the length comes from, with its key: ``task.lengths=[4096]``,
            ``prompt_file=notes.txt``, ``task.data_file=x.jsonl line 3``.
        tokens: The length in tokens.
        context: The model's context (:func:`context_length`); ``None`` checks nothing.
        reserved: Tokens generated after the ``tokens`` (the answer), which must fit too.
        reserved_for: What the reserved tokens are, for the message.
        hint: What to do instead; by default, the longest length that fits.

    Raises:
        ConfigError: ``tokens + reserved`` exceed ``context``.
    """
    if context is None or tokens + reserved <= context:
        return
    plus = f" (+ {reserved} for {reserved_for})" if reserved else ""
    hint = hint or (
        f"use at most {max(0, context - reserved)} tokens, or a model with a longer context"
    )
    raise ConfigError(
        f"{subject} is {tokens} tokens{plus} but the model's context is {context} tokens "
        f"(max_position_embeddings): {hint}."
    )


def fit_new_tokens(
    prompt_tokens: int, max_new_tokens: int, model_config: Any, what: str = "prompt"
) -> int:
    """Check that a prompt fits the context; cap the answer to what is left of it.

    Past the context the model's positions are ones it was never trained on, and it produces
    garbage; a prompt that already fills the context is refused instead.

    Args:
        prompt_tokens: Length of the prompt in tokens (after the chat template).
        max_new_tokens: Tokens asked for.
        model_config: The model's config, or its context in tokens (``model_context``).
        what: The key the prompt came from, named in the error (``prompt``, ``prompt_file=x``).

    Returns:
        ``max_new_tokens``, or fewer so that prompt + answer fit the context.

    Raises:
        ConfigError: The prompt leaves no room for a single new token.
    """
    context = model_config if isinstance(model_config, int) else context_length(model_config)
    if context is None:
        return max_new_tokens
    check_length(what, prompt_tokens, context, reserved=1, hint="shorten it")
    return min(max_new_tokens, context - prompt_tokens)


def model_context(spec: Any) -> int | None:
    """The context of the model ``spec`` names, read from its config alone (no weights).

    Random init: the spec's architecture. A local directory, a train run or its export: its
    ``config.json`` (a damaged one fails here, naming the file). A GGUF source: the converted
    copy's config when it exists, else the published architecture in the spec. A hub id: the
    local HF cache's config, else ``None`` (the check then runs on the loaded model).

    Args:
        spec: A ``ModelSpec``.

    Returns:
        ``max_position_embeddings``, or ``None`` when it cannot be known without loading.

    Raises:
        ModelError: A local model directory whose ``config.json`` is missing or damaged.
        ConfigError: A random-init architecture that is not a valid ``LlamaConfig``.
    """
    from llamahome.model.files import read_config
    from llamahome.model.gguf import converted_path
    from llamahome.model.hub import hub_kwargs
    from llamahome.model.load import is_hf_dir, local_model_dir, resolve_location

    if spec.pretrained is None:
        return context_length(spec.llama_config())
    where = local_model_dir(resolve_location(spec.pretrained, spec))
    if is_hf_dir(where):
        return context_length(read_config(Path(where), **hub_kwargs(spec)))
    if spec.gguf_file:
        converted = converted_path(where, spec)
        if converted is not None and is_hf_dir(str(converted)):
            return context_length(read_config(converted))
        published = (spec.config or {}).get("max_position_embeddings")
        return int(published) if published else None
    if Path(where).exists():
        return None  # not a model directory: loading it says so
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(where, local_files_only=True, **hub_kwargs(spec))
    except Exception:  # noqa: BLE001 - not cached: the real load reports what is wrong
        return None
    return context_length(config)
