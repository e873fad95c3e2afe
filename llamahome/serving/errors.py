"""OpenAI-style errors: one ``APIError`` type and the handlers that turn every failure into one.

Every error, ours or the framework's (malformed JSON, a wrong field type, an unknown route),
leaves as OpenAI's error object with a 4xx code and nothing in the log: a client's mistake is
the client's business. Only an unexpected failure is logged (with its traceback) and answered
500 ``server_error``. Error bodies are ASCII JSON, so text a client sent (a lone surrogate, say)
can never make the error response itself fail.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamahome.serving.schemas import error_body

log = logging.getLogger("llamahome.serve")

# pydantic's union-member tags in an error location ("float", "list[str]", "function-after[...]").
_TAGS = {"float", "int", "str", "bool", "dict", "list"}
# pydantic error type -> what the field should have been (OpenAI: "expected a boolean, ...").
_EXPECTED = {
    "bool_type": "a boolean",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "an array",
    "literal_error": None,
}
_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "an array", type(None): "null"}


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: always encodable, whatever it quotes."""

    def render(self, content: Any) -> bytes:
        """Serialise `content` as compact ASCII JSON."""
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


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
        return AsciiJSONResponse(
            error_body(self.message, self.type, self.param, self.code),
            status_code=self.status,
            headers=self.headers,
        )


def _field(error: dict) -> list[str]:
    """The field path of a pydantic error, without "body" and union-member tags."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and str(p) not in _TAGS]
    return [p for p in loc if "[" not in p]


def _pick(errors: list[dict]) -> dict:
    r"""The error to report: the first field's, preferring a value error over a union's type miss.

    For ``stop: ["a\ud800"]`` (a lone surrogate) pydantic reports both "not a string" (the
    ``str`` member of the union) and the surrogate (the ``list`` member); the second is what
    the client must fix.
    """
    first = errors[0]
    same = [e for e in errors if _field(e)[:1] == _field(first)[:1]]
    if first.get("type", "").endswith("_type"):
        value_errors = [e for e in same if not e.get("type", "").endswith("_type")]
        if value_errors:
            return value_errors[0]
    return first


def validation_error(err: RequestValidationError) -> APIError:
    """Turn FastAPI's validation error into one OpenAI-style 400 naming the field."""
    errors = err.errors() or [{}]
    first = _pick(list(errors))
    loc, kind = _field(first), first.get("type", "")
    name = ".".join(loc)
    if kind == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    if not loc:
        return APIError(
            400, "The request body must be a JSON object (Content-Type: application/json).",
            code="invalid_json",
        )
    if kind == "missing":
        return APIError(400, f"{name} is required.", param=name, code="missing_field")
    if kind in _EXPECTED and _EXPECTED[kind]:
        got = _JSON_TYPES.get(type(first.get("input")), "another type")
        message = f"Invalid type for '{name}': expected {_EXPECTED[kind]}, but got {got} instead."
        return APIError(400, message, param=name, code="invalid_type")
    detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    code = "invalid_kv_cache" if loc[:1] == ["kv_cache"] else "invalid_value"
    return APIError(400, f"{name}: {detail}", param=name, code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure as OpenAI's error object (4xx for the client's, 500 for ours)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return APIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(err).__name__}", "server_error").response()
