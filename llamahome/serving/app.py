"""FastAPI routes of the OpenAI-compatible server: chat, completions, models, health.

Every error, ours or the framework's (malformed JSON, a wrong field type, an unknown route),
leaves as OpenAI's error object with a 4xx code; an unexpected failure is a 500 with the same
shape and no traceback. The engine thread does the work; handlers only validate, tokenize,
queue and relay the engine's events (streamed as server-sent events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamahome.errors import CacheError
from llamahome.kvcache.spec import POLICIES, CacheSpec
from llamahome.serving.engine import Engine, GenRequest, QueueFull
from llamahome.serving.schemas import (
    ChatRequest,
    CompletionRequest,
    KVCacheOverride,
    Sampling,
    error_body,
    new_id,
    now,
    usage,
)

log = logging.getLogger("llamahome.serve")
_TAGS = {"float", "int", "str", "bool", "dict", "list"}


class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Keep the fields of the response."""
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        """Return the JSON response."""
        return JSONResponse(
            error_body(self.message, self.type, self.param, self.code),
            status_code=self.status,
            headers=self.headers,
        )


@dataclass
class ServeSettings:
    """What the routes need besides the engine.

    Attributes:
        model_ids: Names a request's ``model`` may use; the first is listed by /v1/models.
        default_cache: The server's ``CacheSpec`` (from the Hydra ``cache`` group).
        context_length: Prompt + completion tokens at most (the model's positions).
        max_new_tokens: Completion tokens when a request gives no ``max_tokens``.
        temperature: Sampling temperature when a request gives none (OpenAI's default is 1).
        top_p: Nucleus mass when a request gives none.
        api_key: Bearer token required on /v1 routes, or None.
    """

    model_ids: list[str]
    default_cache: Any
    context_length: int
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    api_key: str | None = None


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
            400, f"kv_cache.policy={policy!r} is unknown: choose one of {', '.join(POLICIES)}.",
            param="kv_cache.policy", code="invalid_kv_cache",
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
        APIError: 400 for an empty conversation, a non-text part, or a template that rejects it.
    """
    if not request.messages:
        raise APIError(400, "messages is empty: send at least one message.", param="messages",
                       code="empty_messages")
    try:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
    except ValueError as err:
        raise APIError(400, str(err), param="messages", code="invalid_value") from err
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


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """Make the FastAPI application over a started :class:`Engine`.

    Args:
        engine: The engine (its thread owns the model).
        settings: Model names, default cache, limits, sampling defaults and the API key.

    Returns:
        The ASGI app, ready for uvicorn.
    """
    app = FastAPI(title="LlamaHome", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    tokenizer = engine.tokenizer
    key = settings.api_key.encode() if settings.api_key else None

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        # Before the body is read: a caller without the key learns nothing, not even a 400.
        if key is not None and request.url.path.startswith("/v1"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
                return APIError(
                    401, "Missing or incorrect API key: send `Authorization: Bearer <key>` "
                    "(serve.api_key / LLAMAHOME_API_KEY).", "authentication_error",
                    code="invalid_api_key",
                ).response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = (err.errors() or [{}])[0]
        # Drop "body" and pydantic's union-member tags ("float", "list[str]") from the path.
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and str(p) not in _TAGS]
        loc = [p for p in loc if "[" not in p]
        if first.get("type") == "json_invalid":
            message, code = "The request body is not valid JSON.", "invalid_json"
        elif not loc:
            message = "The request body must be a JSON object (Content-Type: application/json)."
            code = "invalid_json"
        elif first.get("type") == "missing":
            message, code = f"{'.'.join(loc)} is required.", "missing_field"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
            code = "invalid_kv_cache" if loc[:1] == ["kv_cache"] else "invalid_value"
        return APIError(400, message, param=".".join(loc) or None, code=code).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return APIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(err).__name__}", "server_error").response()

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok", "model": settings.model_ids[0], "queued": engine.queued,
            "batches": engine.batches, "requests": engine.rows, "tokens": engine.tokens,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(settings.model_ids[0])]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _check_model(model_id, settings)
        return _model_card(settings.model_ids[0])

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        _check_model(request.model, settings)
        ids = chat_prompt_ids(tokenizer, request)
        return await _complete(request, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        _check_model(request.model, settings)
        try:
            text = request.prompt_text()
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from err
        ids = tokenizer(text)["input_ids"]
        if not ids:
            raise APIError(400, "prompt is empty: send some text to continue.", param="prompt")
        return await _complete(request, ids, chat=False, echo=text if request.echo else "")

    async def _complete(request: Sampling, ids: list[int], chat: bool, echo: str = ""):
        max_tokens = _max_tokens(request, len(ids), settings)
        spec = cache_spec_for(request.kv_cache, settings.default_cache)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = GenRequest(
            prompt_ids=ids,
            max_tokens=max_tokens,
            cache_spec=spec,
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            temperature=settings.temperature if request.temperature is None
            else request.temperature,
            top_p=settings.top_p if request.top_p is None else request.top_p,
            stop=request.stop_list(),
            seed=request.seed,
        )
        try:
            engine.submit(job)
        except QueueFull as err:
            raise APIError(
                429, f"The server is busy ({err}); retry after a second.", "rate_limit_error",
                code="rate_limit_exceeded", headers={"Retry-After": "1"},
            ) from err
        shape = _Shape(chat, request.model, len(ids), spec.policy)
        if request.stream:
            return StreamingResponse(
                _sse(shape, events, job, request.include_usage(), echo),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        parts = [echo]
        try:
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    parts.append(value)
                elif kind == "error":
                    raise APIError(500, value, "server_error")
                else:
                    return shape.whole("".join(parts), value)
        finally:
            job.cancelled.set()  # a client gone mid-answer frees its batch row

    return app


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "llamahome"}


def _check_model(name: str, settings: ServeSettings) -> None:
    if name not in settings.model_ids:
        raise APIError(
            404, f"The model {name!r} does not exist: this server serves "
            f"{settings.model_ids[0]!r} (see GET /v1/models).", param="model",
            code="model_not_found",
        )


def _max_tokens(request: Sampling, prompt_tokens: int, settings: ServeSettings) -> int:
    """Return the completion budget; 400 context_length_exceeded when it does not fit."""
    limit = settings.context_length
    asked = request.max_completion_tokens or request.max_tokens
    if prompt_tokens >= limit or (asked is not None and prompt_tokens + asked > limit):
        raise APIError(
            400, f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the prompt, "
            f"{asked or 1} for the completion). Please reduce the prompt or max_tokens.",
            param="messages", code="context_length_exceeded",
        )
    return asked if asked is not None else min(settings.max_new_tokens, limit - prompt_tokens)


@dataclass
class _Shape:
    """Builds the response objects of one request (chat or text completion)."""

    chat: bool
    model: str
    prompt_tokens: int
    policy: str

    def __post_init__(self) -> None:
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = now()

    def usage(self, done: tuple) -> dict:
        _, completion, policy, held, full = done
        return usage(
            self.prompt_tokens, completion,
            {"policy": policy, "bytes_held": held, "bytes_full": full},
        )

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, done: tuple) -> dict:
        finish = "length" if done[0] == "length" else "stop"
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            return {**self._base("chat.completion"), "choices": [choice],
                    "usage": self.usage(done)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice], "usage": self.usage(done)}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}


def _event(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _sse(
    shape: _Shape, events: asyncio.Queue, job: GenRequest, include_usage: bool, echo: str
) -> AsyncIterator[str]:
    """Server-sent events: role chunk, text chunks, the finish chunk, [usage], ``[DONE]``."""
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
                finish = "length" if value[0] == "length" else "stop"
                yield _event(shape.chunk(None, finish))
                if include_usage:
                    yield _event({**shape._base(shape.chunk(None)["object"]), "choices": [],
                                  "usage": shape.usage(value)})
                break
        yield _event("[DONE]")
    finally:
        job.cancelled.set()
