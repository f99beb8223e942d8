"""The HTTP plumbing every dialect shares: the server's state, its errors, and the ASGI
middleware that runs before any route.

Every error, unknown routes, bad bodies and auth failures included, is OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with the status the real API uses:
400 for an invalid request (FastAPI's 422 is turned into 400, as OpenAI does), 401 for a
missing or wrong key, 404 for an unknown route, 413 for a body over the limit, 500
(``server_error``) for damaged state or an error no route expected, logged with its
traceback, on a connection that stays open for the client's next request.

The middleware, outermost first::

    Authorize     the key, from the headers alone: 401 before anything reads the body
    BodyLimit     413 by Content-Length at once, or while the body streams in
    ServerErrors  an exception no route expected: OpenAI's 500 body, the connection kept

A dialect is a :class:`Dialect`: its routes, the paths where it takes uploads, and the
hooks by which the shared layers ask it about a model name or a chat answer.
"""
from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .jobs import Trainer
from .store import DamagedRecord, Store, describe, now

log = logging.getLogger("semievol.server")

JSON_BODY_LIMIT = 16 * 2**20
"""The largest body a route that takes no upload reads."""


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        self.status, self.message, self.param, self.code, self.type = \
            status, message, param, code, type
        super().__init__(message)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code,
                              type=self.type)


@dataclass(frozen=True)
class Dialect:
    """What one API dialect adds to the app. The hooks are how the shared layers (the
    service, OpenAI's routes) leave a dialect's rules to its own module."""

    router: APIRouter
    upload_paths: tuple[str, ...] = ()
    """Where a body may be as large as an upload (the rest get :data:`JSON_BODY_LIMIT`)."""
    resolve: Callable[[Server, str, dict | None], str | None] | None = None
    """``(server, name, its model entry or None)``: the backend reference of a name this
    dialect serves, None to leave the name to the store, or an :class:`ApiError`."""
    chat: Callable[[object, list, dict], dict] | None = None
    """``(request, generations, answer)``: a chat completion in this dialect's shape,
    or ``answer`` unchanged when the request is not in this dialect."""


@dataclass
class Server:
    """What every route needs: the backend, its lock, the state and the settings."""

    backend: object
    store: Store
    trainer: Trainer
    backend_lock: threading.Lock
    api_key: str | None
    max_upload_bytes: int
    dialects: tuple[Dialect, ...] = ()
    started: int = field(default_factory=now)


def server_of(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server_of)]


def install(app: FastAPI, server: Server) -> None:
    """Put ``server`` on ``app``: its dialects' routes, the error handlers and the
    middleware."""
    app.state.server = server
    for dialect in server.dialects:
        app.include_router(dialect.router)
    app.add_exception_handler(ApiError, lambda request, e: e.response())
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DamagedRecord, _damaged)
    app.add_middleware(ServerErrors)
    uploads = tuple(path for d in server.dialects for path in d.upload_paths)
    app.add_middleware(BodyLimit, upload_limit=server.max_upload_bytes, upload_paths=uploads)
    app.add_middleware(Authorize, api_key=server.api_key)  # the outermost: runs first


# -- auth ------------------------------------------------------------------------------
def authorize(request: Request) -> None:
    """The routes' own check of the key (a dependency of every dialect's router)."""
    problem = _auth_problem(request.headers.get("authorization", ""),
                            server_of(request).api_key, request.headers.get("x-api-key", ""))
    if problem is not None:
        raise problem


def _auth_problem(header: str, key: str | None, api_key_header: str = "") -> ApiError | None:
    """Why an ``Authorization`` header (or, without one, an ``X-API-Key`` header: the
    Tinker SDK's) does not carry the server's key (None: it does)."""
    if key is None:
        return None
    if not header and api_key_header:
        if hmac.compare_digest(api_key_header.strip().encode(), key.encode()):
            return None
        return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    if not header:
        return ApiError(401, "You didn't provide an API key. You need to provide your API key "
                        "in an Authorization header using Bearer auth (i.e. Authorization: "
                        "Bearer YOUR_KEY).")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             key.encode()):
        return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return None


class Authorize:
    """Check the bearer key from the request's headers before anything reads its body: an
    unauthenticated client is answered 401 at once, and never makes the server read or
    spool an upload. (The routes check again, as a dependency.)"""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            problem = _auth_problem(headers.get(b"authorization", b"").decode("latin-1"),
                                    self.api_key,
                                    headers.get(b"x-api-key", b"").decode("latin-1"))
            if problem is not None:
                return await problem.response()(scope, receive, send)
        await self.app(scope, receive, send)


# -- errors ----------------------------------------------------------------------------
def error_response(status: int, message: str, *, param=None, code=None,
                   type: str = "invalid_request_error") -> JSONResponse:
    """OpenAI's error body with ``status``."""
    return JSONResponse({"error": {"message": message, "type": type, "param": param,
                                   "code": code}}, status_code=status)


def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(400, "We could not parse the JSON body of your request. (HINT: "
                              "This likely means you aren't using your HTTP library "
                              "correctly.)")
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    if first["type"] == "missing":
        return error_response(400, f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    return error_response(400, f"Invalid value for '{param}': {first['msg']}.", param=param,
                          code="invalid_value")


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code in (404, 405):
        return error_response(exc.status_code,
                              f"Invalid URL ({request.method} {request.url.path})")
    return error_response(exc.status_code, str(exc.detail))


def _damaged(request: Request, exc: DamagedRecord) -> JSONResponse:
    log.error("%s (serving %s %s)", exc, request.method, request.url.path)
    return error_response(500, f"The server's state is damaged: {exc}.", type="server_error")


class ServerErrors:
    """Answer an exception that no route expected with OpenAI's 500 body, log it with its
    traceback (an OSError, the disk's doing, in one line that names the path the client is
    not shown), and keep the connection. (A handler for ``Exception`` would sit on
    Starlette's ServerErrorMiddleware, which raises again after answering; uvicorn then
    closes the keep-alive connection, and the client's next request on it is reset.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            if started:  # too late for an error body: uvicorn ends the connection
                raise
            if isinstance(e, OSError):  # the disk: one line that says what and where
                log.error("%s %s failed: %s", scope["method"], scope["path"], e)
            else:
                log.exception("error serving %s %s", scope["method"], scope["path"])
            response = error_response(500, "The server had an error while processing your "
                                      f"request: {describe(e)}", type="server_error")
            await response(scope, receive, send)


# -- body size ---------------------------------------------------------------------------
class BodyLimit:
    """Refuse request bodies over the limit with 413 before they are read into memory or
    spooled to disk: by ``Content-Length`` at once, and by counting while they stream.
    Bodies to ``upload_paths`` may be as large as an upload (with room for the form)."""

    def __init__(self, app, upload_limit: int, upload_paths: tuple[str, ...]):
        self.app, self.upload_limit, self.upload_paths = app, upload_limit, upload_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = (self.upload_limit + 2**16 if scope["path"].rstrip("/") in self.upload_paths
                 else JSON_BODY_LIMIT)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await error_response(413, _too_large(limit))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> str:
    return f"Request body too large: the limit is {limit // 2**20} MB."
