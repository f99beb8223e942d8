"""One fake per boundary: the fault-injecting HTTP transport that every hosted SDK's tests use.

A hosted API is played in memory by a *world*: a callable that takes the request as the
SDK's own httpx client built it and returns what the API answers: a JSON-able payload
(status 200), ``bytes`` (a file's content), or a ``(status, payload)`` pair.
:class:`Transport` puts a world behind the SDK's real client (``transport.client()``), so
the SDK's request building, retries, backoff, Retry-After, timeouts and error classes all
run as they do against the real API; nothing patches the SDK. The two SDKs ship on two
forks of httpx (``openai`` on ``httpx2``, ``together`` on ``httpx``), so the transport takes
the module (``http=``) and answers with its classes.

``transport.fault(method, route, nth)`` (``nth``: the how-many-th request to that route,
from 1) may return a :class:`Fault` to misbehave as a network or an API does:

* an HTTP error answer: ``Fault(429, {"retry-after": "1"})``, ``Fault(500)``, with the API's
  error object where given (``error=``);
* a slow answer: ``Fault(delay=s)`` waits ``s`` seconds first; a wait past the request's own
  read timeout ends there in the client's ``ReadTimeout``, as a real stalled server's does;
* a dropped connection: ``Fault(drop=True)`` never reaches the API (connection refused);
* a lost answer: ``after=True`` lets the world act first (a job is created), then answers
  with the error or drops the connection, as when a process dies before the answer arrives.

For a test that needs another process (one killed mid-job), :func:`serve` puts the same
transport, world and faults behind a loopback socket.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType

import httpx


@dataclass(frozen=True)
class Fault:
    """How one request misbehaves (see the module docstring)."""

    status: int | None = None
    """Answer this HTTP status instead (with ``headers`` and the ``error`` object)."""
    headers: dict = field(default_factory=dict)
    error: dict | None = None
    delay: float = 0.0
    """Seconds to wait first; past the request's read timeout, a ReadTimeout."""
    drop: bool = False
    """The connection drops: before the API sees the request, or (``after``) after."""
    after: bool = False
    """The world handles the request first; its answer is lost."""


class Transport:
    """A world behind an SDK's own httpx client, with faults injected by rule. ``route``
    names a request's path for counting and for ``fault`` (e.g. ids replaced by
    placeholders); ``requests`` lists (method, route, what it got) for every request."""

    def __init__(self, world: Callable, http: ModuleType = httpx, *,
                 route: Callable[[str], str] = lambda path: path):
        self.world, self.http, self.route = world, http, route
        self.fault: Callable[[str, str, int], Fault | None] | None = None
        self.requests: list[tuple[str, str, object]] = []
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def client(self, **options):
        """An ``http.Client`` whose requests this transport answers (the SDK's http_client)."""
        return self.http.Client(transport=self.http.MockTransport(self), **options)

    def __call__(self, request):
        method, route = request.method, self.route(request.url.path)
        with self._lock:
            self.counts[method, route] += 1
            nth = self.counts[method, route]
        fault = self.fault(method, route, nth) if self.fault else None
        if fault is None:
            return self._answer(method, route, self.world(request))
        if fault.delay:
            self._wait(request, fault.delay)
        if fault.after:
            self.world(request)
        if fault.drop:
            self.requests.append((method, route, "dropped"))
            error = self.http.RemoteProtocolError if fault.after else self.http.ConnectError
            raise error(f"connection dropped (injected on {method} {route})", request=request)
        if fault.status is None:  # only slow
            return self._answer(method, route, self.world(request))
        error = fault.error or {"message": f"injected {fault.status}", "type": "injected"}
        return self._answer(method, route, (fault.status, {"error": error}), fault.headers)

    def _wait(self, request, delay: float) -> None:
        timeout = (request.extensions.get("timeout") or {}).get("read")
        if timeout is not None and delay > timeout:
            time.sleep(timeout)
            raise self.http.ReadTimeout(f"no answer within {timeout} s (injected)",
                                        request=request)
        time.sleep(delay)

    def _answer(self, method: str, route: str, answer, headers: dict | None = None):
        status, payload = answer if isinstance(answer, tuple) else (200, answer)
        self.requests.append((method, route, status))
        if isinstance(payload, bytes):
            return self.http.Response(status, content=payload, headers={
                "content-type": "application/octet-stream", **(headers or {})})
        return self.http.Response(status, json=payload, headers=headers)


@contextmanager
def serve(transport: Transport):
    """The transport behind a loopback HTTP server, for a client in another process; yields
    its root URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _serve(self):
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            request = transport.http.Request(self.command, f"http://loopback{self.path}",
                                             headers=dict(self.headers.items()), content=raw)
            request.extensions["timeout"] = {}
            try:
                response = transport(request)
            except transport.http.TransportError:
                self.close_connection = True  # an injected drop: no answer at all
                return
            self.send_response(response.status_code)
            for name, value in response.headers.items():
                if name.lower() not in ("content-length", "connection"):
                    self.send_header(name, value)
            self.send_header("content-length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
