"""The response objects of one request (chat or text completion), whole or streamed as SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llamahome.serving.decoding import Finished, GenRequest
from llamahome.serving.schemas import error_body, new_id, now, usage


@dataclass
class Shape:
    """Builds the response objects of one request."""

    chat: bool
    model: str
    prompt_tokens: int

    def __post_init__(self) -> None:
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = now()

    def usage(self, done: Finished) -> dict:
        """OpenAI's usage object with this request's KV figures."""
        return usage(self.prompt_tokens, done.completion_tokens, done.kv_cache)

    def base(self, obj: str) -> dict:
        """The fields every object of this response carries."""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, done: Finished) -> dict:
        """The non-streamed response."""
        finish = "length" if done.reason == "length" else "stop"
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            return {**self.base("chat.completion"), "choices": [choice], "usage": self.usage(done)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self.base("text_completion"), "choices": [choice], "usage": self.usage(done)}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        """One streamed chunk."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self.base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self.base("text_completion"), "choices": [choice]}


def _event(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def sse(
    shape: Shape, events: asyncio.Queue, job: GenRequest, include_usage: bool, echo: str
) -> AsyncIterator[str]:
    """Server-sent events: role chunk, text chunks, the finish chunk, [usage], ``[DONE]``.

    A client that goes away cancels this generator; ``finally`` then frees its engine row.
    """
    try:
        yield _event(shape.chunk(echo or None, first=True))
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield _event(shape.chunk(value))
            elif kind == "error":
                yield _event(error_body(value, "server_error"))
                break
            else:
                finish = "length" if value.reason == "length" else "stop"
                yield _event(shape.chunk(None, finish))
                if include_usage:
                    obj = "chat.completion.chunk" if shape.chat else "text_completion"
                    yield _event({**shape.base(obj), "choices": [], "usage": shape.usage(value)})
                break
        yield _event("[DONE]")
    finally:
        job.cancelled.set()
