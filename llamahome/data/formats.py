"""Record formats: turn one raw record (alpaca, chat, samsum, text or pre-tokenized) into a Sample.

A Sample is text segments marked trainable or not (or ready token ids), plus how the encoder
should wrap it. Templates live in :mod:`llamahome.data.templates`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamahome.data.sources.files import Record, require_str
from llamahome.data.templates import (
    ALPACA_TEMPLATE,
    PLAIN_TEMPLATE,
    SAMSUM_TEMPLATE,
    Segments,
    fill,
    has_chat_template,
    merge_template,
    render_chat,
    render_plain_chat,
)
from llamahome.errors import ConfigError, DataError

RECORD_FORMATS = ("alpaca", "chat", "samsum", "text", "tokenized")
PROMPT_STYLES = ("alpaca", "chat", "plain", "auto")


@dataclass
class Sample:
    """One example ready for the tokenizer.

    Attributes:
        segments: ``(text, trainable)`` pairs, tokenized separately and concatenated.
        origin: Where it came from, for messages.
        add_bos: Prepend the special tokens the tokenizer itself adds (Llama's ``<s>``).
        add_eos: Append eos as a trainable token (chat templates bring their own end markers).
        splittable: Long documents may be cut into several rows instead of truncated (plain
            text has no prompt to lose; an instruction cut in two would lose its answer).
        token_ids: Pre-tokenized ids (custom hooks, tokenized HF sets); segments are unused.
        token_labels: Labels for ``token_ids`` (default: the ids themselves).
    """

    segments: Segments
    origin: str
    add_bos: bool = True
    add_eos: bool = True
    splittable: bool = False
    token_ids: list[int] | None = None
    token_labels: list[int] | None = field(default=None)


@dataclass
class FieldNames:
    """Which record fields hold what (``data.fields.*``); defaults follow llama-recipes/HF sets."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    dialogue: str = "dialogue"
    summary: str = "summary"
    text: str = "text"


def detect_record_format(columns: Sequence[str], names: FieldNames, where: str) -> str:
    """Guess a record format from column names (HF datasets, custom hooks).

    Args:
        columns: The available fields.
        names: The configured field names.
        where: What is being inspected, for the error.

    Returns:
        One of :data:`RECORD_FORMATS`.

    Raises:
        DataError: No known layout fits.
    """
    cols = set(columns)
    if "input_ids" in cols:
        return "tokenized"
    if names.messages in cols:
        return "chat"
    if {names.instruction, names.output} <= cols:
        return "alpaca"
    if {names.dialogue, names.summary} <= cols:
        return "samsum"
    if names.text in cols:
        return "text"
    raise DataError(
        f"{where}: cannot tell the record format from columns {sorted(cols)}; set "
        "data.record_format (alpaca, chat, samsum, text) and data.fields.* to name the columns"
    )


class Renderer:
    """Turns records of one format into Samples for one tokenizer.

    Args:
        tokenizer: The tokenizer (its chat template and eos are used).
        record_format: One of :data:`RECORD_FORMATS`.
        prompt_style: For instruction records: ``alpaca`` (llama-recipes template),
            ``chat`` (the tokenizer's chat template), ``plain``, or ``auto`` (chat when the
            tokenizer has a template, else plain).
        template: Overrides for the alpaca/plain/samsum template keys.
        fields: Field names.
        system_prompt: Optional system message for the ``chat`` prompt style.

    Raises:
        ConfigError: Unknown format/style or a bad template.
    """

    def __init__(
        self,
        tokenizer: Any,
        record_format: str,
        prompt_style: str = "alpaca",
        template: Mapping[str, Any] | None = None,
        fields: FieldNames | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if record_format not in RECORD_FORMATS:
            raise ConfigError(
                f"data.record_format={record_format!r}: expected one of {', '.join(RECORD_FORMATS)}"
            )
        if prompt_style not in PROMPT_STYLES:
            raise ConfigError(
                f"data.prompt_style={prompt_style!r}: expected one of {', '.join(PROMPT_STYLES)}"
            )
        self.tokenizer = tokenizer
        self.record_format = record_format
        self.fields = fields or FieldNames()
        self.system_prompt = system_prompt
        if prompt_style == "auto":
            prompt_style = "chat" if has_chat_template(tokenizer) else "plain"
        self.prompt_style = prompt_style
        if record_format == "samsum":
            self.template = merge_template(SAMSUM_TEMPLATE, template)
        else:
            base = PLAIN_TEMPLATE if prompt_style == "plain" else ALPACA_TEMPLATE
            self.template = merge_template(base, template if prompt_style != "chat" else None)

    def options(self) -> dict[str, Any]:
        """Everything that changes the rendering, for cache keys."""
        return {
            "record_format": self.record_format,
            "prompt_style": self.prompt_style,
            "template": self.template,
            "fields": vars(self.fields),
            "system_prompt": self.system_prompt,
        }

    def __call__(self, record: Record) -> Sample:
        """Render one record.

        Args:
            record: The raw record.

        Returns:
            Its Sample.

        Raises:
            DataError: A field is missing or has the wrong type (message names origin + field).
        """
        return getattr(self, f"_{self.record_format}")(record)

    def _alpaca(self, record: Record) -> Sample:
        f = self.fields
        instruction = require_str(record, f.instruction)
        extra = require_str(record, f.input, optional=True)
        output = require_str(record, f.output)
        if self.prompt_style == "chat":
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            return self._chat_sample(messages, record)
        key = "prompt_input" if extra.strip() else "prompt_no_input"
        prompt = fill(self.template[key], instruction=instruction, input=extra)
        answer = fill(self.template["response"], output=output)
        return Sample([(prompt, False), (answer, True)], origin=record.origin)

    def _samsum(self, record: Record) -> Sample:
        dialog = require_str(record, self.fields.dialogue)
        summary = require_str(record, self.fields.summary)
        prompt = fill(self.template["prompt"], dialog=dialog)
        answer = fill(self.template["response"], summary=summary)
        return Sample([(prompt, False), (answer, True)], origin=record.origin)

    def _text(self, record: Record) -> Sample:
        text = require_str(record, self.fields.text)
        return Sample([(text, True)], origin=record.origin, splittable=True)

    def _chat(self, record: Record) -> Sample:
        messages = validate_messages(record, self.fields.messages)
        return self._chat_sample(messages, record)

    def _chat_sample(self, messages: list[dict[str, str]], record: Record) -> Sample:
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if has_chat_template(self.tokenizer):
            segments = render_chat(self.tokenizer, messages, record.origin)
            # The template brings its own bos and end-of-turn tokens.
            return Sample(segments, origin=record.origin, add_bos=False, add_eos=False)
        segments = render_plain_chat(messages, getattr(self.tokenizer, "eos_token", None))
        return Sample(segments, origin=record.origin, add_eos=False)

    def _tokenized(self, record: Record) -> Sample:
        ids = _int_list(record, "input_ids")
        labels = _int_list(record, "labels") if record.data.get("labels") is not None else None
        if labels is not None and len(labels) != len(ids):
            raise DataError(
                f"{record.origin}: 'labels' has {len(labels)} entries, 'input_ids' {len(ids)}"
            )
        return Sample([], origin=record.origin, token_ids=ids, token_labels=labels)


def validate_messages(record: Record, key: str) -> list[dict[str, str]]:
    """Check a chat record's messages and return them as plain dicts.

    Args:
        record: The record.
        key: The field holding the messages.

    Returns:
        ``[{"role", "content"}, ...]`` with at least one assistant turn.

    Raises:
        DataError: Missing field, wrong shape, or no assistant turn (nothing to train on).
    """
    messages = record.data.get(key)
    if messages is None:
        have = ", ".join(sorted(map(str, record.data))) or "none"
        raise DataError(f"{record.origin}: record is missing field '{key}' (fields: {have})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{record.origin}: field '{key}' must be a non-empty list of messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{record.origin}: {key}[{i}] must be an object with role and content")
        for part in ("role", "content"):
            value = message.get(part)
            if not isinstance(value, str):
                problem = "is missing" if value is None else "must be a string"
                raise DataError(f"{record.origin}: field '{key}[{i}].{part}' {problem}")
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            f"{record.origin}: field '{key}' has no assistant message (nothing to train on)"
        )
    return out


def _int_list(record: Record, key: str) -> list[int]:
    value = record.data.get(key)
    if hasattr(value, "tolist"):  # numpy arrays / tensors from datasets or custom hooks
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise DataError(f"{record.origin}: field '{key}' must be a list of token ids")
    return value
