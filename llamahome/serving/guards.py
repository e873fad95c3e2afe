"""The server's door: bearer-token auth and the request-body limit, before the app reads a byte.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which wraps ``receive`` and
hides a client's disconnect from the handlers). For a ``/v1`` route without the right key it
answers 401 and reads nothing. A body whose ``Content-Length`` exceeds ``serve.max_body_bytes``
gets 413 at once, unread; a body without one (chunked) is read up to the limit and gets 413 as
soon as it passes it. Reading is asynchronous, so a huge upload never blocks other requests.
The body is then handed to the app whole; later ``receive`` calls reach the server's own, so the
handlers still learn when the client goes away.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from llamahome.serving.errors import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_WITHOUT_BODY = {"GET", "HEAD", "OPTIONS", "DELETE"}


def _too_large(size: int | None, limit: int) -> APIError:
    told = f"is {size} bytes" if size is not None else f"passed {limit} bytes"
    return APIError(
        413, f"The request body {told}, more than this server accepts "
        f"(serve.max_body_bytes={limit}): send a shorter prompt or conversation.",
        code="request_too_large",
    )


class Guard:
    """ASGI middleware: auth for ``/v1`` routes and a body-size limit for every request."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        """Wrap `app`.

        Args:
            app: The ASGI application.
            api_key: The bearer token ``/v1`` routes require, or None (no auth).
            max_body_bytes: Largest request body accepted.
        """
        self.app = app
        self.state = getattr(app, "state", None)  # the FastAPI app's state (settings, engine)
        self.key = api_key.encode() if api_key else None
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request, read its body within the limit, then run the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", ())}
        if self.key is not None and scope.get("path", "").startswith("/v1"):
            scheme, _, token = headers.get("authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = APIError(
                    401, "Missing or incorrect API key: send `Authorization: Bearer <key>` "
                    "(serve.api_key / LLAMAHOME_API_KEY).", "authentication_error",
                    code="invalid_api_key",
                )
                await error.response()(scope, receive, send)
                return
        if scope.get("method", "GET") in _WITHOUT_BODY:
            await self.app(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None:
            text = length.decode("latin-1").strip()
            if not text.isdigit():
                error = APIError(400, f"Content-Length {text[:20]!r} is not a byte count.",
                                 code="invalid_content_length")
                await error.response()(scope, receive, send)
                return
            if int(text) > self.limit:
                await _too_large(int(text), self.limit).response()(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _too_large(None, self.limit).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
