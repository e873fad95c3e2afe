"""Request and response models following the OpenAI API (chat, completions, models, errors).

Requests accept unknown fields (``extra="allow"``): OpenAI clients send fields we do not use
(``user``, ``logit_bias``...), and rejecting them would break those clients. The one LlamaHome
extension is ``kv_cache``: ``{"policy": "h2o", "budget": 0.2, "min_tokens": 0}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

ROLES = ("system", "developer", "user", "assistant", "tool")


class KVCacheOverride(BaseModel):
    """The per-request cache: a policy and a budget (a ratio in (0, 1] or a token count)."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = None
    budget: StrictFloat | StrictInt | None = None
    min_tokens: int | None = Field(default=None, ge=0)


class Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    kv_cache: KVCacheOverride | None = None

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
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Return the message text (text parts joined).

        Raises:
            ValueError: For a part that is not text (images and audio are not served).
        """
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]


class CompletionRequest(Sampling):
    """POST /v1/completions (one prompt per request)."""

    prompt: str | list[str]
    echo: bool = False

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
    """OpenAI's usage object plus the KV cache figures (policy, bytes_held, bytes_full)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "kv_cache": kv_cache,
    }


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
