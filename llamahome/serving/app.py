"""FastAPI routes of the OpenAI-compatible server: chat, completions, models, health, metrics.

Handlers only validate (strict types, see ``schemas``), tokenize (on a worker thread, so a long
prompt never blocks the event loop), check the KV pool, queue, and relay the engine's events
(streamed as server-sent events). Auth and the body limit run before any of that (``guards``);
every failure leaves as OpenAI's error object (``errors``). A client that goes away frees its
engine row, streaming or not.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from llamahome.serving.decoding import GenRequest
from llamahome.serving.engine import Engine, QueueFull
from llamahome.serving.errors import APIError, install_error_handlers
from llamahome.serving.guards import Guard
from llamahome.serving.inputs import cache_spec_for, chat_prompt_ids, max_tokens_for
from llamahome.serving.metrics import CONTENT_TYPE
from llamahome.serving.responses import Shape, sse
from llamahome.serving.schemas import ChatRequest, CompletionRequest, Sampling

MiB = 2**20


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
        max_body_bytes: Largest request body accepted (413 beyond).
    """

    model_ids: list[str]
    default_cache: Any
    context_length: int
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    api_key: str | None = None
    max_body_bytes: int = 4 * MiB


def create_app(engine: Engine, settings: ServeSettings) -> Any:
    """Make the ASGI application over a started :class:`Engine`.

    Args:
        engine: The engine (its thread owns the model).
        settings: Model names, default cache, limits, sampling defaults and the API key.

    Returns:
        The ASGI app, ready for uvicorn (the FastAPI app behind its ``Guard``; the FastAPI
        app itself is ``.app``, its settings ``.state.settings``).
    """
    app = FastAPI(title="LlamaHome", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.engine = engine
    install_error_handlers(app)
    tokenizer, metrics = engine.tokenizer, engine.metrics
    # Tokenizers are not documented as safe to share between threads: one encode at a time.
    encode_lock = threading.Lock()

    def encode(fn: Any, *args: Any) -> Any:
        with encode_lock:
            return fn(*args)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_ids[0], **engine.stats}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(settings.model_ids[0])]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _check_model(model_id, settings)
        return _model_card(settings.model_ids[0])

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest, http: Request):
        _check_model(request.model, settings)
        ids = await asyncio.to_thread(encode, chat_prompt_ids, tokenizer, request)
        return await _complete(http, request, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        _check_model(request.model, settings)
        try:
            text = request.prompt_text()
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from err
        ids = (await asyncio.to_thread(encode, tokenizer, text))["input_ids"]
        if not ids:
            raise APIError(400, "prompt is empty: send some text to continue.", param="prompt")
        return await _complete(http, request, ids, chat=False, echo=text if request.echo else "")

    async def _complete(http: Request, request: Sampling, ids: list[int], chat: bool,
                        echo: str = ""):
        max_tokens = max_tokens_for(
            request, len(ids), settings.context_length, settings.max_new_tokens
        )
        spec = cache_spec_for(request.kv_cache, settings.default_cache)
        need = engine.worst_case(spec, len(ids), max_tokens)
        if need > engine.pool.capacity:
            metrics.rejected.labels(reason="too_large").inc()
            raise APIError(
                400, f"This request may need {need / MiB:.1f} MiB of KV cache ({len(ids)} "
                f"prompt + {max_tokens} completion tokens, kv_cache policy {spec.policy}), more "
                f"than the server's pool holds ({engine.pool.capacity / MiB:.1f} MiB of "
                "serve.kv_memory): lower max_tokens, shorten the prompt, or ask for an evicting "
                'cache ("kv_cache": {"policy": "h2o", "budget": 0.2, "min_tokens": 0}).',
                param="max_tokens", code="kv_memory_exceeded",
            )
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
            ignore_eos=request.ignore_eos,
            kv_bytes=need,
        )
        try:
            engine.submit(job)
        except QueueFull as err:
            metrics.rejected.labels(reason="queue_full").inc()
            raise APIError(
                429, f"The server is busy ({err}); retry after a second.", "rate_limit_error",
                code="rate_limit_exceeded", headers={"Retry-After": "1"},
            ) from err
        shape = Shape(chat, request.model, len(ids))
        if request.stream:
            return StreamingResponse(
                sse(shape, events, job, request.include_usage(), echo),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        gone = asyncio.create_task(_until_disconnected(http))
        parts = [echo]
        try:
            while True:
                event = asyncio.ensure_future(events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    return Response(status_code=499)  # nobody is listening any more
                kind, value = event.result()
                if kind == "delta":
                    parts.append(value)
                elif kind == "error":
                    raise APIError(500, value, "server_error")
                else:
                    return shape.whole("".join(parts), value)
        finally:
            gone.cancel()
            job.cancelled.set()  # finished, failed or abandoned: the engine drops the row

    return Guard(app, settings.api_key, settings.max_body_bytes)


async def _until_disconnected(http: Request) -> None:
    """Return when the client closes its connection (what ``is_disconnected`` polls for)."""
    try:
        while True:
            message = await http.receive()
            if message.get("type") == "http.disconnect":
                return
            await asyncio.sleep(0.05)  # a server that answers with empty bodies: do not spin
    except OSError:  # the connection broke: the client is gone all the same
        return


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "llamahome"}


def _check_model(name: str, settings: ServeSettings) -> None:
    if name not in settings.model_ids:
        raise APIError(
            404, f"The model {name[:200]!r} does not exist: this server serves "
            f"{settings.model_ids[0]!r} (see GET /v1/models).", param="model",
            code="model_not_found",
        )
