"""Every error leaves as JSON `{"detail": ...}`: the SDK retries 4xx replies with an empty body. The OpenAI-compatible
routes answer in OpenAI's shape instead (`OpenAIError`: `{"error": {"message", "type", "param", "code"}}`); the
uploaded files' routes, read by OpenAI clients and curl alike, carry both (`detail` and `error`)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinkerd.protocol.types import BadRequest
from tinkerd.control.openai_requests import OpenAIError
from tinkerd.control.plane import Gone, NotFound
from tinkerd.server.refused_order import hold_place_of_invalid_body

log = logging.getLogger(__name__)
OPENAI_PREFIXES = ("/oai/api/v1/", "/v1/")  # routes/openai.py
BOTH_SHAPES = ("/api/v1/files",)  # routes/files.py


def _detail(request: Request, detail, status: int, headers: dict | None = None, **extra) -> JSONResponse:
    """`{"detail": ...}`; on `BOTH_SHAPES` also OpenAI's `error` object, whose message the openai client shows."""
    body = {"detail": detail, **extra}
    if request.url.path.startswith(BOTH_SHAPES) and isinstance(detail, str):
        field = detail.split(":", 1)[0]
        body["error"] = {"message": detail, "type": "invalid_request_error",
                         "param": field if field.isidentifier() else None, "code": None}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        status = getattr(exc, "status_code", 400)  # 400; a subclass may say otherwise (413: a file too large)
        if request.url.path.startswith(OPENAI_PREFIXES):
            field = str(exc).split(":", 1)[0]
            param = field if field.isidentifier() else None
            return await openai_error(request, OpenAIError(status, str(exc), param=param))
        return _detail(request, str(exc), status)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        headers = {"Retry-After": f"{exc.retry_after:g}"} if exc.retry_after is not None else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field; the offending input is not echoed (it may not even be valid JSON)."""
        errors = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]

        def where(error: dict, kind: str) -> str:  # "seq_id", "query offset", "body" (for unparsable JSON)
            loc = error["loc"]
            if kind == "json_invalid" or len(loc) < 2:
                return loc[0] if loc else "body"
            return ".".join(loc[1:]) if loc[0] == "body" else f"{loc[0]} parameter {'.'.join(loc[1:])}"

        summary = "; ".join(f"{where(e, raw.get('type', ''))}: {e['msg']}" for e, raw in zip(errors, exc.errors()))
        await hold_place_of_invalid_body(request, exc.body, summary or "invalid request")
        return _detail(request, summary or "invalid request", 422, errors=errors)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        if request.url.path.startswith(OPENAI_PREFIXES):
            return await openai_error(request, OpenAIError(404, str(exc), code="not_found"))
        return _detail(request, str(exc), 404)

    @app.exception_handler(Gone)
    async def gone(request: Request, exc: Gone) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=410)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown path, wrong method), saying which path and method."""
        if exc.status_code == 404 and exc.detail == "Not Found":
            detail = f"path {request.url.path!r} is not a route of this server"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on path {request.url.path!r}"
        else:
            detail = exc.detail
        return _detail(request, detail, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        if request.url.path.startswith(OPENAI_PREFIXES):
            return await openai_error(request, OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                           type="server_error"))
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
