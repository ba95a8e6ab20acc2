"""A faithful REST proxy to the Agent Runtime, declared as one route table.

Faithful means: method, path (path parameters re-encoded), query string, body and its content
type go to the runtime; status, body and content type come back unchanged (201 stays 201, the
runtime's ``{"detail": ...}`` reaches the client). Hop-by-hop and credential headers are not
forwarded; ``X-Internal-Auth`` (on the shared client) and ``X-Request-ID`` are added.

Failures the gateway itself produces use one JSON shape, ``{"error", "error_description"}``:
runtime unreachable 502, runtime timeout 504, gateway saturated 503 with ``Retry-After``,
request body too large 413, shared state (Redis) unavailable 503 on routes that need
ownership. A runtime 429 is passed through with its headers.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus

import httpx
import orjson
import trio
from quart import Response, request

from .auth import Identity
from .limits import acquire_within
from .observability import Metrics, request_id_var, user_var
from .protocol import valid_session_id
from .security import INTERNAL, Refusal, Security, user_headers
from .settings import Settings
from .state import STATE_UNAVAILABLE, StateUnavailable

logger = logging.getLogger("trio_gateway.rest")

API_PREFIX = "/api/v1"
REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# Never forwarded upstream: hop-by-hop headers (RFC 9110 7.6.1), what httpx sets itself, and
# the caller's credentials (the runtime trusts X-Internal-Auth, which the gateway sets).
_DROP_REQUEST_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "host", "content-length", "authorization", "cookie", "x-internal-auth",
        "proxy-authorization", "x-request-id", "x-user-id", "x-user-scopes", "accept-encoding",
    }
)  # fmt: skip
# Passed back to the client besides the body and its content type.
_PASS_RESPONSE_HEADERS = ("retry-after", "location", "etag", "last-modified", "cache-control")


@dataclass(frozen=True)
class ProxyRoute:
    """One proxied route: ``{name}`` placeholders are path parameters."""

    method: str
    path: str  # gateway path, under /api/v1
    runtime_path: str
    summary: str
    timeout: float | None = None  # None: GATEWAY__REQUEST_TIMEOUT
    per_session: bool = False  # the route addresses one session (ownership checks apply)
    request_body: str | None = None  # name of the request model in the OpenAPI document
    success_status: int = 200
    query: tuple[tuple[str, str, str], ...] = ()  # (name, type, description)
    # Cross-session data: the runtime knows no users, so an ordinary caller's answer is
    # filtered to the sessions they own: ``(list key, session id key)`` of the runtime's JSON
    # answer. Services (internal key) see everything.
    own_sessions_in: tuple[str, str] | None = None
    # A query parameter naming one session: checked for ownership when given (an empty value
    # means no filter, as at the runtime, and is not forwarded).
    session_query: str | None = None

    @property
    def quart_rule(self) -> str:
        """The path in Quart's routing syntax."""
        return re.sub(r"\{(\w+)\}", r"<\1>", self.path)

    @property
    def template(self) -> str:
        """The path template, used as a metrics label (bounded cardinality)."""
        return self.path


ROUTES: tuple[ProxyRoute, ...] = (
    ProxyRoute("GET", "/api/v1/agents", "/agents", "List the available agents."),
    ProxyRoute(
        "GET", "/api/v1/agents/{session_id}/current", "/agents/{session_id}/current",
        "Current agent of a session.", per_session=True,
        query=(("include_history", "boolean", "Include the agent switch history."),),
    ),
    ProxyRoute(
        "POST", "/api/v1/agents/{session_id}/switch", "/agents/{session_id}/switch",
        "Switch a session's agent.", per_session=True, request_body="SwitchAgentRequest",
    ),
    ProxyRoute(
        "GET", "/api/v1/sessions", "/sessions", "List your sessions.",
        own_sessions_in=("sessions", "id"),
        query=(
            ("limit", "integer", "Page size."),
            ("offset", "integer", "Page start."),
            ("active_only", "boolean", "Only active sessions."),
        ),
    ),
    ProxyRoute(
        "POST", "/api/v1/sessions", "/sessions", "Create a session.",
        request_body="CreateSessionRequest", success_status=201,
    ),
    ProxyRoute(
        "GET", "/api/v1/sessions/{session_id}", "/sessions/{session_id}", "One session.",
        per_session=True,
        query=(("include_messages", "boolean", "Include the messages."),),
    ),
    ProxyRoute(
        "PATCH", "/api/v1/sessions/{session_id}", "/sessions/{session_id}",
        "Update a session.", per_session=True, request_body="UpdateSessionRequest",
    ),
    ProxyRoute(
        "DELETE", "/api/v1/sessions/{session_id}", "/sessions/{session_id}",
        "Delete a session.", per_session=True, success_status=204,
    ),
    ProxyRoute(
        "GET", "/api/v1/sessions/{session_id}/history", "/sessions/{session_id}/history",
        "Message history of a session.", per_session=True,
    ),
    ProxyRoute(
        "GET", "/api/v1/sessions/{session_id}/pending-approvals",
        "/sessions/{session_id}/pending-approvals",
        "Tool calls of a session waiting for approval.", per_session=True,
    ),
    ProxyRoute("GET", "/api/v1/events/metrics", "/events/metrics", "Runtime metrics."),
    ProxyRoute(
        "GET", "/api/v1/events/metrics/sessions", "/events/metrics/sessions",
        "Per-session metrics summary of your sessions (services: every session).",
        own_sessions_in=("sessions", "session_id"),
    ),
    ProxyRoute(
        "GET", "/api/v1/events/metrics/session/{session_id}",
        "/events/metrics/session/{session_id}", "Metrics of one session.", per_session=True,
    ),
    ProxyRoute(
        "GET", "/api/v1/events/audit-log", "/events/audit-log",
        "Audit log of your sessions, or of one of them (services: every session). The runtime "
        "applies limit before the gateway leaves out other users' events.",
        own_sessions_in=("events", "session_id"), session_query="session_id",
        query=(
            ("session_id", "string", "Only this session."),
            ("event_type", "string", "Only this event type."),
            ("limit", "integer", "Most recent N events."),
        ),
    ),
    ProxyRoute("GET", "/api/v1/events/stats", "/events/stats", "Event statistics."),
)  # fmt: skip


def make_transport(settings: Settings) -> httpx.AsyncHTTPTransport:
    """The app's one connection pool to the runtime (keep-alive, limits from settings)."""
    return httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=settings.runtime_max_connections,
            max_keepalive_connections=min(settings.runtime_max_connections, 100),
        ),
        trust_env=False,
    )


def make_http_client(settings: Settings, transport: httpx.AsyncHTTPTransport) -> httpx.AsyncClient:
    """The app's one HTTP client, over ``transport``; the proxy sends through the transport
    itself (see :meth:`RestProxy._send`), health checks and JWKS fetches through the client."""
    return httpx.AsyncClient(
        base_url=settings.agent_url,
        transport=transport,
        timeout=httpx.Timeout(settings.request_timeout),
        # No default X-Internal-Auth: this client also fetches the JWKS from the Auth
        # Service, which must never see the runtime's key. Callers add it per request.
        follow_redirects=False,
        trust_env=False,
    )


def _header_bytes(text: str) -> bytes:
    """A header name or value as bytes for httpx, which would encode ``str`` as ASCII and fail.

    Incoming header values are latin-1 decoded (ASGI), so latin-1 gives the client's bytes back
    unchanged; a value we made from a token claim (``X-User-ID``) may need UTF-8. Before this,
    any non-ASCII octet in a forwarded header made the proxy answer 500 (found by
    tests/test_fuzz.py).
    """
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _json_object(content: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _forwarded_query(route: ProxyRoute) -> bytes:
    """The query string for the runtime: the client's, byte for byte, except that an empty
    session filter (``?session_id=``, "no filter") is left out rather than sent as ``""``."""
    raw = request.query_string or b""
    name = route.session_query
    if name is None or not raw or request.args.get(name, None) != "":
        return raw
    kept = [
        part
        for part in raw.split(b"&")
        if unquote_plus(part.partition(b"=")[0].decode("latin-1")) != name
    ]
    return b"&".join(kept)


def error_response(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> Response:
    """The JSON error shape of every failure the gateway itself produces."""
    body = orjson.dumps({"error": error, "error_description": description})
    return Response(body, status=status, content_type="application/json", headers=headers)


def incoming_request_id() -> str:
    """The client's X-Request-ID when it is sane (short, no odd characters), else a new one."""
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    return supplied if _SANE_REQUEST_ID.match(supplied) else uuid.uuid4().hex


class RestProxy:
    """Forwards the routes of :data:`ROUTES` over the app's pooled HTTP client."""

    def __init__(self, settings: Settings, metrics: Metrics, security: Security) -> None:
        self.settings = settings
        self.metrics = metrics
        self.security = security
        self.transport: httpx.AsyncHTTPTransport | None = None
        self._slots = trio.CapacityLimiter(settings.max_concurrent_requests)
        self._default_timeout = httpx.Timeout(settings.request_timeout)
        self._base_url = settings.agent_url
        self._internal_key = settings.internal_api_key.get_secret_value()

    async def forward(self, route: ProxyRoute, path_params: dict[str, str]) -> Response:
        """Proxy the current request along ``route``."""
        started = trio.current_time()
        response = await self._forward(route, path_params)
        self.metrics.rest_requests.labels(
            route.template, route.method, str(response.status_code)
        ).inc()
        self.metrics.rest_latency.labels(route.template).observe(trio.current_time() - started)
        return response

    async def _authorize(self, route: ProxyRoute, path_params: dict[str, str]) -> Identity:
        """Who is calling and whether they may use ``route``; raises :class:`Refusal`."""
        security = self.security
        internal = security.internal_caller(request.headers.get("X-Internal-Auth"))
        if internal:
            identity = INTERNAL
        else:
            identity = await security.identify_header(request.headers.get("Authorization"))
        user_var.set(identity.sub)
        scope = self.settings.read_scope if route.method == "GET" else self.settings.write_scope
        security.require_scope(identity, scope)
        session_id = path_params.get("session_id")
        if session_id is not None and not valid_session_id(session_id):
            raise Refusal(400, "invalid_session_id", "Malformed session id")
        if internal or not security.enabled:
            return identity
        await security.check_rest_rate(identity)
        if route.path == "/api/v1/sessions":
            # Creating claims the new session and listing filters by ownership: refuse before
            # the runtime creates a session nobody would own.
            security.require_state()
        if session_id is not None:
            await security.check_owner(session_id, identity)
        if route.session_query is not None:
            values = request.args.getlist(route.session_query)
            if len(values) > 1 or (values and values[0] and not valid_session_id(values[0])):
                # The runtime may read another value than we checked (first vs last).
                raise Refusal(400, "invalid_request", f"Give '{route.session_query}' once")
            if values and values[0]:
                await security.check_owner(values[0], identity)
        return identity

    async def _forward(self, route: ProxyRoute, path_params: dict[str, str]) -> Response:
        try:
            identity = await self._authorize(route, path_params)
        except Refusal as refused:
            return error_response(
                refused.status, refused.error, refused.description, refused.headers()
            )
        length = request.content_length
        if length is not None and length > self.settings.max_request_body_bytes:
            return self._too_large()
        body = await request.get_data(cache=False)
        assert isinstance(body, bytes)
        if len(body) > self.settings.max_request_body_bytes:
            return self._too_large()
        path = route.runtime_path.format(
            **{name: quote(value, safe="") for name, value in path_params.items()}
        )
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() not in _DROP_REQUEST_HEADERS
        }
        request_id = request_id_var.get()
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        headers.update(user_headers(identity))
        if route.method == "POST" and route.path == "/api/v1/sessions" and body:
            foreign = await self._refuse_foreign_session_id(body, identity)
            if foreign is not None:
                return foreign
        url = httpx.URL(self._base_url + path, query=_forwarded_query(route))
        timeout = httpx.Timeout(route.timeout) if route.timeout else self._default_timeout

        if not await acquire_within(self._slots, self.settings.saturation_wait):
            self.metrics.limit_hits.labels("concurrent_requests").inc()
            logger.warning(
                "REST proxy saturated",
                extra={"event": "limit_hit", "limit": "concurrent_requests"},
            )
            return error_response(
                503,
                "saturated",
                "The gateway is handling too many requests; retry shortly",
                {"Retry-After": "1"},
            )
        try:
            upstream = await self._send(route.method, url, body, headers, timeout)
        except httpx.TimeoutException:
            logger.warning("runtime timed out", extra={"event": "runtime_timeout"})
            return error_response(
                504, "runtime_timeout", "The agent runtime did not answer in time"
            )
        except httpx.TransportError as error:
            logger.warning(
                "runtime unreachable: %s",
                type(error).__name__,
                extra={"event": "runtime_unreachable"},
            )
            return error_response(502, "runtime_unavailable", "The agent runtime is unreachable")
        finally:
            self._slots.release()
        response = self._relay_response(upstream)
        if self.security.enabled and identity is not INTERNAL:
            await self._record_ownership(route, path_params, upstream, response, identity)
        return response

    async def _refuse_foreign_session_id(self, body: bytes, identity: Identity) -> Response | None:
        # POST /sessions may name its id: refuse one that another user owns.
        try:
            wanted = orjson.loads(body).get("session_id")
        except (orjson.JSONDecodeError, AttributeError):
            return None  # the runtime answers bad bodies itself
        if isinstance(wanted, str) and self.security.enabled:
            try:
                owner = await self.security.ownership.owner(wanted)
            except StateUnavailable:
                self.metrics.state_backend_failures.labels("owner").inc()
                return error_response(
                    503, "state_unavailable", STATE_UNAVAILABLE, {"Retry-After": "5"}
                )
            if owner is not None and owner != identity.sub:
                return error_response(403, "forbidden", "This session belongs to another user")
        return None

    async def _record_ownership(
        self,
        route: ProxyRoute,
        path_params: dict[str, str],
        upstream: httpx.Response,
        response: Response,
        identity: Identity,
    ) -> None:
        # Claims follow the runtime's answer: only sessions that exist get an owner (a 404 for a
        # made-up id claims nothing, so ids cannot be squatted through the REST door).
        security = self.security
        ok = 200 <= upstream.status_code < 300
        if route.path == "/api/v1/sessions" and route.method == "POST":
            created = _json_object(upstream.content)
            if upstream.status_code == 201 and isinstance(created.get("id"), str):
                try:
                    await security.claim_session(created["id"], identity)
                except Refusal as refused:
                    logger.warning("session created but not owned: %s", refused.error)
        elif route.own_sessions_in is not None:
            if upstream.status_code == 200:
                await self._only_own_sessions(
                    upstream.content, response, identity, *route.own_sessions_in
                )
        elif route.method == "DELETE" and route.per_session and upstream.status_code == 204:
            try:
                await security.ownership.forget(path_params["session_id"])
            except StateUnavailable:
                # The session is gone at the runtime; a leftover record only keeps its id
                # reserved for the same user.
                self.metrics.state_backend_failures.labels("forget").inc()
                logger.warning("session deleted but its ownership record kept")
        elif ok and route.per_session:
            try:
                await security.claim_session(path_params["session_id"], identity)
            except Refusal as refused:
                logger.warning("session used but not owned: %s", refused.error)

    async def _only_own_sessions(
        self, content: bytes, response: Response, identity: Identity, list_key: str, id_key: str
    ) -> None:
        # The runtime knows no users: the gateway filters its list to the caller's sessions.
        listing = _json_object(content)
        items = listing.get(list_key)
        if not isinstance(items, list):
            # Fail closed: an unexpected shape must not pass every user's sessions through.
            response.status_code = 502
            response.set_data(
                orjson.dumps(
                    {"error": "bad_gateway", "error_description": f"Unexpected {list_key} list"}
                )
            )
            return
        try:
            mine = await self.security.owned_sessions(identity)
        except Refusal as refused:  # fail closed: without ownership nothing can be shown
            response.status_code = refused.status
            response.headers.update(refused.headers())
            response.set_data(
                orjson.dumps({"error": refused.error, "error_description": refused.description})
            )
            return
        listing[list_key] = [
            item for item in items if isinstance(item, dict) and item.get(id_key) in mine
        ]
        listing["total"] = len(listing[list_key])
        response.set_data(orjson.dumps(listing))

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        body: bytes,
        headers: dict[str, str],
        timeout: httpx.Timeout,
    ) -> httpx.Response:
        # Straight to the client's transport (its pool), not client.request(): the client
        # layers (auth and redirect handling, cookies, event hooks, URL merging), none of which
        # a proxy wants, cost ~40% of httpx's time per request on this hot path (measured).
        assert self.transport is not None, "the app's connection pool is not open"
        headers["X-Internal-Auth"] = self._internal_key
        outgoing = httpx.Request(
            method,
            url,
            headers=[
                (_header_bytes(name), _header_bytes(value)) for name, value in headers.items()
            ],
            content=body,
            extensions={"timeout": timeout.as_dict()},
        )
        response = await self.transport.handle_async_request(outgoing)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    def _relay_response(self, upstream: httpx.Response) -> Response:
        headers = {
            name: upstream.headers[name]
            for name in _PASS_RESPONSE_HEADERS
            if name in upstream.headers
        }
        response = Response(
            upstream.content,
            status=upstream.status_code,
            headers=headers,
            content_type=upstream.headers.get("content-type"),
        )
        if not upstream.content and upstream.status_code in (204, 304):
            response.headers.pop("Content-Type", None)
        return response

    def _too_large(self) -> Response:
        self.metrics.limit_hits.labels("request_body").inc()
        # The body is not read (or not all of it): the connection cannot be reused, and the
        # client is told so (see RequestBodyGate in app.py).
        return error_response(
            413,
            "request_too_large",
            f"Request body exceeds {self.settings.max_request_body_bytes} bytes",
            {"Connection": "close"},
        )


def route_handler(proxy: RestProxy, route: ProxyRoute) -> Any:
    """A Quart view function for ``route``."""

    async def view(**path_params: str) -> Response:
        return await proxy.forward(route, path_params)

    view.__name__ = f"proxy_{route.method.lower()}_{route.path}"
    view.__doc__ = route.summary
    return view
