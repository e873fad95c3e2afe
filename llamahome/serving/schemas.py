r"""Request and response models following the OpenAI API (chat, completions, models, errors).

Types are strict, as the OpenAI API's are: ``"stream": "yes"``, ``"temperature": "0.5"`` or
``"max_tokens": 1.5`` are a 400 naming the field, never coerced (an integer is still a number).
Every text field must be valid Unicode: a lone surrogate (``"\ud800"`` in the JSON: legal
there, not in UTF-8) is a 400 at the edge, not a failure deep in the tokenizer. ``seed`` is an
int64.

Requests accept unknown fields (``extra="allow"``): OpenAI clients send fields we do not use,
and rejecting them would break those clients. Known fields we accept and ignore
(``presence_penalty``, ``logit_bias``, ``user``, ...) are still type-checked. The LlamaHome
extensions are ``kv_cache`` (``{"policy": "h2o", "budget": 0.2, "min_tokens": 0}``) and
``ignore_eos`` (as vLLM's: generate ``max_tokens`` tokens whatever the model's end token).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

ROLES = ("system", "developer", "user", "assistant", "tool")
INT64 = 2**63


def _unicode(text: str) -> str:
    """Reject text that UTF-8 cannot encode (a lone UTF-16 surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"holds an invalid character at position {err.start} (a lone UTF-16 surrogate): "
            "send valid Unicode text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class KVCacheOverride(BaseModel):
    """The per-request cache: a policy and a budget (a ratio in (0, 1] or a token count)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    policy: Text | None = None
    budget: Number | int | None = None
    min_tokens: int | None = Field(default=None, ge=0, lt=INT64)

    @field_validator("budget", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        # Strict mode keeps an int an int (a count) and a float a float (a ratio); a bool is
        # neither, and JSON's 1.0 must stay a ratio, not become the count 1.
        if isinstance(value, bool):
            raise ValueError("must be a ratio in (0, 1] or a token count, not a boolean")
        return value


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` ends the stream with a usage chunk."""

    include_usage: bool | None = None


class Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: Text
    max_tokens: int | None = Field(default=None, ge=1, lt=INT64)
    max_completion_tokens: int | None = Field(default=None, ge=1, lt=INT64)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    kv_cache: KVCacheOverride | None = None
    ignore_eos: bool = False
    # Accepted for compatibility, not used (type-checked all the same).
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Number] | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of up to 4 of them")
        return value

    def stop_list(self) -> list[str]:
        """Return the stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (OpenAI's stream_options)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Strict):
    """A text content part: ``{"type": "text", "text": "..."}``."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    """One message; ``content`` is a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if part.get("type") != "text":
                    raise ValueError(
                        f"a content part of type {str(part.get('type'))[:40]!r} is not supported:"
                        " this server reads text parts only"
                    )
                TextPart.model_validate(part)
        return value

    def text(self) -> str:
        """Return the message text (text parts joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part["text"] for part in self.content)


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(Sampling):
    """POST /v1/completions (one prompt per request)."""

    prompt: Text | list[Text]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: Text | None = None

    def prompt_text(self) -> str:
        """Return the single prompt.

        Raises:
            ValueError: When a list holds other than exactly one prompt.
        """
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("send one prompt per request (a list of exactly one string)")
        return self.prompt[0]


def new_id(prefix: str) -> str:
    """Make an OpenAI-style object id, e.g. ``chatcmpl-1f3a...``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix seconds, the ``created`` field."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, kv_cache: dict[str, Any]) -> dict:
    """OpenAI's usage object plus the KV cache figures (policy, bytes, keep ratio, pool)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "kv_cache": kv_cache,
    }


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
