"""The app factory: one :class:`GatewayApp` per :class:`~trio_gateway.settings.Settings`.

Everything mutable hangs off the app (``app.gateway``), so tests build as many independent
gateways as they like. HTTP routes and the lifespan are quart-trio's; WebSocket scopes under
``WS_PREFIX`` go straight to the door (``edge/ws_handshake.py``, see ``session/transport.py``
for why); the per-app state is :class:`~trio_gateway.gateway.Gateway`.
"""

from __future__ import annotations

import hmac
import logging
from http import HTTPStatus
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ._version import __version__
from .client_address import address_in, client_address
from .edge.request_gate import (
    RequestBodyGate,
    announces_acceptable_body,
    has_ambiguous_framing,
    host_is_valid,
    refuse,
)
from .edge.rest_proxy import (
    REQUEST_ID_HEADER,
    error_response,
    incoming_request_id,
    route_handler,
)
from .edge.rest_routes import ROUTES
from .edge.ws_handshake import open_session_socket
from .gateway import Gateway
from .observability import request_id_var
from .openapi import PROTOCOL_PATH, build_openapi, load_protocol_document, render_docs_html
from .protocol import WS_PATH
from .session.transport import WebSocketConnection
from .settings import Settings

logger = logging.getLogger("trio_gateway.app")

WS_PREFIX = f"{WS_PATH}/"
HTTP1_VERSIONS = ("1.0", "1.1")


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
            # hypercorn's own 400 for others (found by tests/hostile/test_fuzz.py): answer 404 here.
            event = await receive()
            if event.get("type") == "websocket.connect":
                await refuse(scope, send, 404, "not_found", "No WebSocket route here")
        elif scope["type"] == "http" and scope.get("http_version") not in HTTP1_VERSIONS:
            # With hypercorn's HTTP/2 switch disabled (hypercorn_patches.py, item 5), the
            # cleartext HTTP/2 preface ("PRI * HTTP/2.0") arrives here: HTTP/1.x only.
            await refuse(scope, send, 400, "invalid_request", "Only HTTP/1.1 is served", close=True)
        elif scope["type"] == "http" and has_ambiguous_framing(scope):
            # RFC 9112 6.3: Content-Length next to Transfer-Encoding is a smuggling attempt
            # (a proxy in front may have framed the body by the other header). Refused before
            # the body, and the connection closed after the answer: what follows on it cannot
            # be trusted to start where we think it does.
            await refuse(
                scope,
                send,
                400,
                "invalid_request",
                "Content-Length and Transfer-Encoding together",
                close=True,
            )
        elif scope["type"] == "http" and not host_is_valid(scope):
            await refuse(scope, send, 400, "invalid_request", "Malformed Host header")
        elif scope["type"] == "http":
            settings = self.gateway.settings
            # Only requests with a body to wait for are gated: a bodiless GET (the REST hot
            # path) pays for no event and no wrappers.
            if announces_acceptable_body(scope, settings.max_request_body_bytes):
                gate = RequestBodyGate(settings.max_request_body_bytes, settings.request_timeout)
                receive, send = gate.receive(receive), gate.send(send)
            door = self.gateway.rest_door
            matched = door.match(scope["method"], scope["path"])
            if matched is not None:  # a proxied route: plain ASGI, below Quart (rest_door.py)
                await door.serve(matched[0], matched[1], scope, receive, send)
            else:
                await super().__call__(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


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
        request_id_var.set(incoming_request_id(request.headers.get(REQUEST_ID_HEADER)))

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
