"""Prompt templates: llama-recipes' alpaca and samsum prompts, a plain one, and chat templates.

Every renderer returns *segments*: ``(text, trainable)`` pairs. Segments are tokenized one by
one, so the boundary between prompt (masked to -100) and answer is exact at the token level, as
in llama-recipes (which encodes prompt and response separately too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llamahome.errors import ConfigError, DataError

Segments = list[tuple[str, bool]]

# llama-recipes' alpaca prompts (src/llama_recipes/datasets/alpaca_dataset.py). llama-recipes puts
# "\n\n### Response:" in the *response* and so trains on it; here it ends the prompt, so only the
# answer is learnt. The text the model sees is identical.
ALPACA_TEMPLATE: dict[str, str] = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
    "response": "{output}",
}

# For instruction data when the tokenizer has no chat template (e.g. the local BPE of model=tiny).
PLAIN_TEMPLATE: dict[str, str] = {
    "prompt_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "prompt_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
    "response": "{output}",
}

# llama-recipes' samsum prompt (src/llama_recipes/datasets/samsum_dataset.py), summary trained.
SAMSUM_TEMPLATE: dict[str, str] = {
    "prompt": "Summarize this dialog:\n{dialog}\n---\nSummary:\n",
    "response": "{summary}",
}

_TEMPLATE_FIELDS = {
    "prompt_input": {"instruction", "input"},
    "prompt_no_input": {"instruction"},
    "response": {"output", "summary"},
    "prompt": {"dialog"},
}


def merge_template(
    default: Mapping[str, str], override: Mapping[str, Any] | None
) -> dict[str, str]:
    """Overlay a user's template keys on a default and check each placeholder.

    Args:
        default: The built-in template.
        override: ``data.template`` from the config (any subset of the keys), or None.

    Returns:
        The merged template.

    Raises:
        ConfigError: An unknown key, a non-string value or an unknown ``{placeholder}``.
    """
    merged = dict(default)
    for key, value in (override or {}).items():
        if key not in default:
            raise ConfigError(
                f"data.template.{key}: unknown key (expected one of {', '.join(default)})"
            )
        if not isinstance(value, str):
            raise ConfigError(f"data.template.{key}: must be a string")
        merged[key] = value
    for key, value in merged.items():
        try:
            value.format_map({name: "" for name in _TEMPLATE_FIELDS[key]})
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"data.template.{key}: bad placeholder {e} (allowed: "
                f"{', '.join('{' + f + '}' for f in sorted(_TEMPLATE_FIELDS[key]))}; "
                "write {{ and }} for literal braces)"
            ) from e
    return merged


def fill(template: str, **values: str) -> str:
    """Fill a checked template; values are inserted verbatim (braces in data are safe)."""
    return template.format_map(values)


def has_chat_template(tokenizer: Any) -> bool:
    """Return whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], origin: str) -> Segments:
    """Render a conversation with the tokenizer's chat template; only assistant turns train.

    Each assistant turn's segment is what the template adds for that message (content plus the
    template's end-of-turn marker), found by rendering growing prefixes of the conversation.
    Templates that are not prefix-stable fall back to locating the contents in one rendering.

    Args:
        tokenizer: A tokenizer with a chat template.
        messages: ``{"role", "content"}`` dicts, already validated.
        origin: Where the record came from, for errors.

    Returns:
        Segments covering the whole rendered conversation.

    Raises:
        DataError: The template rejects the conversation.
    """
    try:
        segments = _render_by_prefixes(tokenizer, messages)
        if segments is None:
            segments = _render_by_search(tokenizer, messages)
    except DataError:
        raise
    except Exception as e:  # jinja raises its own error types (e.g. "roles must alternate")
        raise DataError(f"{origin}: the tokenizer's chat template rejected this record: {e}") from e
    return segments


def _apply(tokenizer: Any, messages: Sequence[Mapping[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=gen
    )


def _render_by_prefixes(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> Segments | None:
    segments: Segments = []
    prev = ""
    for i, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        if is_assistant and i > 0:
            head = _apply(tokenizer, messages[:i], gen=True)
            if not head.startswith(prev):
                return None
            segments.append((head[len(prev) :], False))
            prev = head
        full = _apply(tokenizer, messages[: i + 1], gen=False)
        if not full.startswith(prev):
            return None
        delta = full[len(prev) :]
        if is_assistant:
            # Anything the template put before the content (a system prompt, a role header when
            # the conversation opens with the assistant) is prompt, not answer.
            start = delta.find(message["content"]) if message["content"] else 0
            if start < 0:
                return None
            segments.append((delta[:start], False))
            segments.append((delta[start:], True))
        else:
            segments.append((delta, False))
        prev = full
    return [s for s in segments if s[0]]


def _render_by_search(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> Segments:
    text = _apply(tokenizer, messages, gen=False)
    eos = getattr(tokenizer, "eos_token", None) or ""
    segments: Segments = []
    cursor = 0
    for message in messages:
        content = message["content"]
        at = text.find(content, cursor) if content else -1
        if at < 0:
            continue
        end = at + len(content)
        if message["role"] == "assistant":
            # Train on the end-of-turn token too, so the model learns to stop.
            if eos and text.startswith(eos, end):
                end += len(eos)
            segments.append((text[cursor:at], False))
            segments.append((text[at:end], True))
            cursor = end
    segments.append((text[cursor:], False))
    return [s for s in segments if s[0]]


def render_plain_chat(messages: Sequence[Mapping[str, str]], eos_token: str | None) -> Segments:
    """Render a conversation without a chat template: ``### Role:`` headers, eos after answers.

    Args:
        messages: ``{"role", "content"}`` dicts.
        eos_token: Appended (trainable) after each assistant turn, when the tokenizer has one.

    Returns:
        Segments; assistant contents (and their eos) are trainable.
    """
    segments: Segments = []
    for i, message in enumerate(messages):
        role = message["role"]
        segments.append((("\n\n" if i else "") + f"### {role.capitalize()}:\n", False))
        if role == "assistant":
            segments.append((message["content"] + (eos_token or ""), True))
        else:
            segments.append((message["content"], False))
    return [s for s in segments if s[0]]
