"""The app factory: one :class:`GatewayApp` per :class:`~trio_gateway.settings.Settings`.

Everything mutable hangs off the app (``app.gateway``), so tests build as many independent
gateways as they like. HTTP routes and the lifespan are quart-trio's; WebSocket scopes under
``/api/v1/ws/`` go straight to the session engine (see ``session/transport.py`` for why).
"""

from __future__ import annotations

import hmac
import logging
from http import HTTPStatus
from typing import Any

import httpx
import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import __version__
from .client_address import address_in, client_address
from .observability import Metrics, request_id_var
from .openapi import PROTOCOL_PATH, build_openapi, load_protocol_document, render_docs_html
from .protocol import WS_PATH
from .rest_proxy import (
    REQUEST_ID_HEADER,
    ROUTES,
    RestProxy,
    error_response,
    incoming_request_id,
    make_http_client,
    make_transport,
    route_handler,
)
from .runtime_client import RuntimeClient
from .security.limits import ConnectionCounter
from .security.security import Security
from .session.manager import SessionManager
from .session.transport import WebSocketConnection
from .settings import Settings
from .ws_handshake import open_session_socket

logger = logging.getLogger("trio_gateway.app")

WS_PREFIX = f"{WS_PATH}/"
HTTP1_VERSIONS = ("1.0", "1.1")
READINESS_CACHE_SECONDS = 1.0


class Gateway:
    """The per-app state: settings, the shared HTTP client, the runtime client, the sessions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.security = Security(settings, self.metrics)
        self.proxy = RestProxy(settings, self.metrics, self.security)
        self.http: httpx.AsyncClient | None = None
        self.runtime: RuntimeClient | None = None
        self.sessions: SessionManager | None = None
        # Sockets waiting for their first-frame auth, per client address and in total: their
        # own caps, so anonymous sockets cannot take the connection slots of users.
        self.pending_auth = ConnectionCounter(
            settings.max_pending_auth_per_address, settings.max_pending_auth
        )
        self.metrics.pending_auth_websockets.set_function(lambda: self.pending_auth.total)
        self._manager_scope: trio.CancelScope | None = None
        self._state_scope: trio.CancelScope | None = None
        self._readiness_lock = trio.Lock()
        self._readiness: tuple[float, dict[str, Any]] | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the state backend (Redis client and health), open the HTTP pool and start the
        session manager inside ``nursery``."""
        warn_about_exposure(self.settings)
        # The state first: the first handshakes already need it. It reports started after one
        # probe, up or down, so a gateway whose Redis is down still starts (not ready).
        self._state_scope = trio.CancelScope()

        async def run_state(task_status: trio.TaskStatus[None]) -> None:
            assert self._state_scope is not None
            with self._state_scope:
                await self.security.run_state(task_status=task_status)

        await nursery.start(run_state)
        transport = make_transport(self.settings)
        self.http = make_http_client(self.settings, transport)
        self.proxy.transport = transport
        self.security.start(self.http)
        self.runtime = RuntimeClient(self.settings)
        nursery.start_soon(self.runtime.run_pool)  # ends with runtime.aclose() in stop()
        self.sessions = SessionManager(self.settings, self.runtime, self.metrics, self.security)
        self._manager_scope = trio.CancelScope()

        async def run_manager(task_status: trio.TaskStatus[None]) -> None:
            assert self.sessions is not None and self._manager_scope is not None
            with self._manager_scope:
                if self.security.redis is not None:
                    from .state.cluster import (
                        Cluster,  # imports coredis: only for the redis backend
                    )

                    cluster = Cluster.for_settings(self.security.redis, self.settings)
                    self.sessions.share_state(cluster)
                await self.sessions.run(task_status=task_status)

        await nursery.start(run_manager)

    async def stop(self) -> None:
        """Cancel every session and close the HTTP pool."""
        if self.sessions is not None:
            self.sessions.stop()
        if self._manager_scope is not None:
            self._manager_scope.cancel()
        if self.http is not None:
            with trio.CancelScope(shield=True):
                await self.http.aclose()
        if self.runtime is not None:
            await self.runtime.aclose()  # idle pooled turn connections
        # Last: sessions ending above still give their connections back to Redis.
        if self._state_scope is not None:
            self._state_scope.cancel()

    async def readiness(self) -> dict[str, Any]:
        """The readiness report, probed at most once per READINESS_CACHE_SECONDS.

        Anyone may call the readiness route: without the cache (and the lock that makes
        concurrent callers share one probe) each call would cost a runtime request from the
        pool the REST proxy depends on.
        """
        async with self._readiness_lock:
            cached = self._readiness
            if cached is not None and trio.current_time() - cached[0] < READINESS_CACHE_SECONDS:
                report = dict(cached[1])
            else:
                report = await self._probe_readiness()
                self._readiness = (trio.current_time(), report)
        if self.draining:  # never served stale once a drain has begun
            report = {
                **report,
                "status": "not_ready",
                "checks": {**report["checks"], "draining": True},
            }
        return report

    async def _probe_readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {"draining": self.draining}
        ready = not self.draining and self.http is not None
        if self.http is not None:
            try:
                answer = await self.http.get(
                    "/health", timeout=min(5.0, self.settings.request_timeout)
                )
                checks["runtime"] = (
                    "ok" if answer.status_code == 200 else f"http {answer.status_code}"
                )
            except httpx.HTTPError as error:
                checks["runtime"] = f"unreachable ({type(error).__name__})"
            ready = ready and checks["runtime"] == "ok"
        if self.security.redis is not None:
            # Without the shared state this replica refuses every new session: take it out
            # of the load balancer until the health probe sees Redis again.
            up = self.security.state_available
            checks["state_backend"] = "ok" if up else "redis unavailable"
            ready = ready and up
        if self.security.enabled:
            checks["jwks"] = "ok" if await self.security.keys_available() else "unavailable"
            ready = ready and checks["jwks"] == "ok"
        return {
            "status": "ready" if ready else "not_ready",
            "version": __version__,
            "checks": checks,
        }

    @property
    def draining(self) -> bool:
        """True once a drain has started."""
        return self.sessions is not None and self.sessions.draining

    async def drain(self, timeout: float) -> None:
        """Graceful drain: see :meth:`SessionManager.drain`."""
        if self.sessions is not None:
            await self.sessions.drain(timeout)


def warn_about_exposure(settings: Settings) -> None:
    """Say at startup, as a warning, what an operator must not run by accident."""
    if not settings.use_jwt_auth:
        logger.warning(
            "JWT AUTHENTICATION IS OFF (GATEWAY__USE_JWT_AUTH=false): anyone who can reach "
            "this gateway can use every session and the whole REST API; per-user limits apply "
            "per client address. Development and tests only.",
            extra={"event": "auth_disabled"},
        )
    elif settings.ws_auth_mode == "session-id":
        logger.warning(
            "GATEWAY__WS_AUTH_MODE=session-id: a WebSocket without a token is admitted to any "
            "session that has an owner, as that owner; whoever knows a session id can use that "
            "session (as with the old gateway). REST still requires tokens. Switch to "
            "WS_AUTH_MODE=token once clients send a token on their WebSocket.",
            extra={"event": "session_id_auth"},
        )


def _json(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


class GatewayApp(QuartTrio):
    """quart-trio app whose session WebSockets are served by the session engine."""

    gateway: Gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"].startswith(WS_PREFIX):
            await open_session_socket(self.gateway, WebSocketConnection(scope, receive, send))
        elif scope["type"] == "websocket":
            # The app has no other WebSocket route. Quart's own websocket path answered some
            # upgrades here with 500 (an empty Sec-WebSocket-Protocol header) and raced
            # hypercorn's own 400 for others (found by tests/test_fuzz.py): answer 404 here.
            event = await receive()
            if event.get("type") == "websocket.connect":
                await _refuse(scope, send, 404, "not_found", "No WebSocket route here")
        elif scope["type"] == "http" and scope.get("http_version") not in HTTP1_VERSIONS:
            # With hypercorn's HTTP/2 switch disabled (hypercorn_patches.py, item 5), the
            # cleartext HTTP/2 preface ("PRI * HTTP/2.0") arrives here: HTTP/1.x only.
            await _refuse(
                scope, send, 400, "invalid_request", "Only HTTP/1.1 is served", close=True
            )
        elif scope["type"] == "http" and _has_ambiguous_framing(scope):
            # RFC 9112 6.3: Content-Length next to Transfer-Encoding is a smuggling attempt
            # (a proxy in front may have framed the body by the other header). Refused before
            # the body, and the connection closed after the answer: what follows on it cannot
            # be trusted to start where we think it does.
            await _refuse(
                scope,
                send,
                400,
                "invalid_request",
                "Content-Length and Transfer-Encoding together",
                close=True,
            )
        elif scope["type"] == "http" and not _host_is_valid(scope):
            await _refuse(scope, send, 400, "invalid_request", "Malformed Host header")
        elif scope["type"] == "http" and _announces_acceptable_body(
            scope, self.gateway.settings.max_request_body_bytes
        ):
            # Only requests with a body to wait for are gated: a bodiless GET (the REST hot
            # path) pays for no event and no wrappers.
            settings = self.gateway.settings
            gate = RequestBodyGate(settings.max_request_body_bytes, settings.request_timeout)
            await super().__call__(scope, gate.receive(receive), gate.send(send))
        else:
            await super().__call__(scope, receive, send)


class RequestBodyGate:
    """Holds an HTTP response back until the request's body has arrived (bounded).

    hypercorn 0.18 (h11) can keep a connection alive only if the request's body had arrived
    in full when the response ended; otherwise it means to close the connection, but that
    close runs in the app's task right after hypercorn queued ``http.disconnect``, which
    quart-trio answers by cancelling that task: the socket stays open, the late body is
    dropped, and the client's next request on the connection never gets an answer. Clients
    such as requests/urllib3 write a request's head and body separately, so now and then the
    body comes a few milliseconds after the head, and any answer that does not need the body
    (Quart's automatic ``OPTIONS``, 404, 405, a refusal, a view that never reads it) could go
    out first: found by schemathesis, about 1 request in 600. quart-trio reads the body in
    its own task whatever the view does, so waiting for it here costs the body's transit time
    only, and covers every route at once.

    (Shielding hypercorn's end of request instead was tried and reverted: with it the short
    soak test, ``tests/test_soak_short.py``, failed every time with connections left in
    CLOSE-WAIT, two tasks each.)

    Not waited for: a body announced larger than ``limit`` (the 413 goes out at once with
    ``Connection: close``, so the client does not reuse the connection), more than ``limit``
    bytes received (a chunked body without an announced length), nor longer than ``timeout``
    seconds in all.
    """

    def __init__(self, limit: int, timeout: float) -> None:
        """A gate for one request that announced a body of at most ``limit`` bytes."""
        self._complete = trio.Event()
        self._limit = limit
        self._timeout = timeout
        self._received = 0

    def receive(self, receive: Any) -> Any:
        """``receive`` that notes when the whole body (or a disconnect) has come through."""

        async def gated_receive() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                self._received += len(message.get("body", b""))
                if not message.get("more_body", False) or self._received > self._limit:
                    self._complete.set()
            else:  # http.disconnect: nothing more will come
                self._complete.set()
            return message

        return gated_receive

    def send(self, send: Any) -> Any:
        """``send`` that starts a response only once the body is in (or the gate gave up)."""

        async def gated_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and not self._complete.is_set():
                with trio.move_on_after(self._timeout):
                    await self._complete.wait()
            await send(message)

        return gated_send


def _announces_acceptable_body(scope: dict[str, Any], limit: int) -> bool:
    """Whether the request announces a body (of at most ``limit`` bytes, when it says)."""
    for key, value in scope.get("headers") or []:
        name = key.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:  # h11 refuses these before the app sees them
                return False
            return 0 < length <= limit
    return False


def _has_ambiguous_framing(scope: dict[str, Any]) -> bool:
    """Whether the request carries both ``Content-Length`` and ``Transfer-Encoding``."""
    names = {key.lower() for key, _ in scope.get("headers") or []}
    return b"content-length" in names and b"transfer-encoding" in names


def _host_is_valid(scope: dict[str, Any]) -> bool:
    """Whether Quart can route with this request's ``Host`` header.

    Werkzeug encodes the host name with IDNA while Quart builds the request context, outside
    Quart's error handling: a label over 63 octets or a character IDNA refuses raised an
    uncaught error and the client got a 500 (found by tests/test_fuzz.py).
    """
    for key, value in scope.get("headers") or []:
        if key.lower() == b"host":
            name = value.decode("latin-1").partition(":")[0]
            try:
                name.encode("idna")
            except UnicodeError:
                return False
    return True


async def _refuse(
    scope: dict[str, Any],
    send: Any,
    status: int,
    code: str,
    text: str,
    *,
    close: bool = False,
) -> None:
    """Answer ``status`` with the gateway's JSON error body, below Quart (plain ASGI);
    ``close``: with ``Connection: close`` (hypercorn then closes the connection)."""
    body = orjson.dumps({"error": code, "error_description": text})
    prefix = "websocket.http" if scope["type"] == "websocket" else "http"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})


def create_app(settings: Settings) -> GatewayApp:
    """Build a gateway app from ``settings``. Nothing is shared between two apps."""
    app = GatewayApp(__name__)
    # No redirect is ever built from the request: Werkzeug's routing answers "//" in a path
    # (merge_slashes) with a 308 whose Location comes from the Host header, with an HTML body.
    # Off before any rule is added (rules take the map's value when bound): such paths are
    # plain 404s. The other redirect source, strict_slashes, only redirects to rules that end
    # in "/" (none here); the HTTPException handler below turns any redirect into a 404.
    app.url_map.merge_slashes = False
    app.config["RESPONSE_TIMEOUT"] = None  # streaming and proxy timeouts are ours
    app.config["BODY_TIMEOUT"] = settings.request_timeout
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_body_bytes
    gateway = Gateway(settings)
    app.gateway = gateway
    metrics_networks = settings.metrics_networks
    trusted_proxies = settings.trusted_proxy_networks
    internal_key = settings.internal_api_key.get_secret_value().encode()
    openapi_document = build_openapi()
    openapi_json = orjson.dumps(openapi_document)
    docs_html = render_docs_html(openapi_document)
    protocol_text = load_protocol_document()

    @app.before_serving
    async def _start() -> None:
        await gateway.start(app.nursery)

    @app.after_serving
    async def _stop() -> None:
        await gateway.stop()

    @app.before_request
    async def _bind_request_id() -> None:
        # Quart runs hooks and the view in one task: the id is visible to both and to logs.
        request_id_var.set(incoming_request_id())

    @app.after_request
    async def _return_request_id(response: Response) -> Response:
        request_id = request_id_var.get()
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    for status, code, text in (
        (404, "not_found", "No such route"),
        (405, "method_not_allowed", "Method not allowed on this route"),
        (413, "request_too_large", f"Request body exceeds {settings.max_request_body_bytes} bytes"),
    ):
        app.register_error_handler(status, _error_handler(status, code, text))
    # Every other HTTP error Quart or Werkzeug raises (400, 408, 415, a redirect should one
    # ever come back...) in the same JSON shape, never Werkzeug's HTML page.
    app.register_error_handler(HTTPException, _http_exception_handler)

    for route in ROUTES:
        app.add_url_rule(
            route.quart_rule,
            endpoint=f"{route.method} {route.path}",
            view_func=route_handler(gateway.proxy, route),
            methods=[route.method],
        )

    @app.get("/health")
    async def health() -> Response:
        """Liveness: answers without touching the runtime."""
        return _json({"status": "ok", "service": "trio-gateway", "version": __version__})

    @app.get("/api/v1/health")
    async def readiness() -> Response:
        """Readiness: runtime reachable, signing keys loaded, shared state (Redis) answering,
        not draining (cached ~1 s)."""
        body = await gateway.readiness()
        return _json(body, 200 if body["status"] == "ready" else 503)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        """The OpenAPI document of the REST surface."""
        return Response(openapi_json, content_type="application/json")

    @app.get("/docs")
    async def docs() -> Response:
        """Human-readable API documentation."""
        return Response(docs_html, content_type="text/html; charset=utf-8")

    @app.get(PROTOCOL_PATH)
    async def protocol_document() -> Response:
        """The WebSocket protocol (Markdown source, shown as text), linked from /docs."""
        if protocol_text is None:  # an installation without the package data
            return _json({"error": "not_found", "error_description": "Not packaged"}, 404)
        return Response(protocol_text, content_type="text/plain; charset=utf-8")

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics, for allowed networks or callers with the internal key."""
        supplied = request.headers.get("X-Internal-Auth", "").encode()
        # Behind a reverse proxy on the same host every peer is 127.0.0.1: the address checked
        # is the client's as trusted proxies forwarded it (GATEWAY__TRUSTED_PROXIES), never a
        # proxy's own. METRICS_ALLOW empty: the internal key only.
        remote = client_address(dict(request.scope), trusted_proxies)
        key_ok = (
            bool(supplied) and bool(internal_key) and hmac.compare_digest(supplied, internal_key)
        )
        allowed = key_ok or address_in(remote, metrics_networks)
        if not allowed:
            return error_response(403, "forbidden", "Metrics are restricted")
        return Response(generate_latest(gateway.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    return app


async def _http_exception_handler(error: HTTPException) -> Response:
    status = error.code or 500
    if 300 <= status < 400:  # a routing redirect: the route as asked for does not exist
        return error_response(404, "not_found", "No such route")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    code = "internal_error" if status >= 500 else "invalid_request"
    return error_response(status, code, phrase)


def _error_handler(status: int, code: str, text: str) -> Any:
    # A 413 is sent without reading the body: the connection cannot be reused (see
    # RequestBodyGate), and the client must be told so.
    headers = {"Connection": "close"} if status == 413 else None

    async def handle(_error: Exception) -> Response:
        return error_response(status, code, text, headers)

    return handle
