"""A faithful REST proxy to the Agent Runtime, declared as one route table.

Faithful means: method, path (path parameters re-encoded), query string, body and its content
type go to the runtime; status, body and content type come back unchanged (201 stays 201, the
runtime's ``{"detail": ...}`` reaches the client). Bodies go byte for byte; the one body the
gateway reads, ``POST /sessions`` (to refuse another user's ``session_id``), must be strict
UTF-8 JSON or the request is refused with 400 before the runtime sees it, so the runtime never
reads a body the gateway could not check.

Request headers: an allow-list (:data:`FORWARDED_REQUEST_HEADERS`: ``Accept``,
``Accept-Language``, ``Cache-Control``, ``Content-Type``, ``If-Match``, ``If-Modified-Since``,
``If-None-Match``, ``If-Unmodified-Since``, ``User-Agent``), minus any named in the request's
``Connection`` header. Every other client header is dropped: ``X-Forwarded-*``, ``Forwarded``,
``X-Real-IP``, method overrides, path rewrites (``X-Original-URL``), identity claims
(``Remote-User``, ``X-User-ID`` in any case or with underscores), ``Remote-Addr``, credentials,
hop-by-hop headers. The gateway alone sets ``X-Internal-Auth``, ``X-User-ID``,
``X-User-Scopes``, ``X-Request-ID`` (the client's when sane), ``X-Forwarded-For`` (the client
and proxies :func:`~trio_gateway.client_address.forwarded_chain` can vouch for, then the TCP
peer) and ``X-Forwarded-Proto``; ``Host`` and ``Content-Length`` come from httpx.

Failures the gateway itself produces use one JSON shape, ``{"error", "error_description"}``:
runtime unreachable 502, runtime timeout 504, gateway saturated 503 with ``Retry-After``,
request body too large 413, state backend (Redis or SQLite) unavailable 503 on routes that need
ownership. A runtime 429 is passed through with its headers.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, unquote_plus

import httpx
import orjson
import trio
from quart import Response, request

from .client_address import Network, address_in, forwarded_chain, peer_address
from .observability import Metrics, request_id_var, user_var
from .protocol import valid_session_id
from .security.auth import Identity
from .security.limits import acquire_within
from .security.security import INTERNAL, Refusal, Security, user_headers
from .settings import Settings
from .state.state import STATE_UNAVAILABLE, StateUnavailable

logger = logging.getLogger("trio_gateway.rest")

API_PREFIX = "/api/v1"
REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# Request headers a client may pass to the runtime (lower-case): content negotiation, the
# body's type, conditional requests and caching (the runtime's ETag/Last-Modified come back),
# and the client's name for the runtime's logs. An allow-list, not a deny-list: the runtime
# trusts whoever reaches it with the internal key, so any header it (or a framework in front
# of it) might read as identity, address, method or path must be the gateway's or absent.
# Not Accept-Encoding: the gateway reads answers (the session list filter) and serves them
# itself; compressing the loopback/LAN hop only costs CPU on both ends.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept", "accept-language", "cache-control", "content-type", "if-match",
        "if-modified-since", "if-none-match", "if-unmodified-since", "user-agent",
    }
)  # fmt: skip
# At most one field line each (400 otherwise): two could be read differently by the gateway
# and the runtime (first or last), and these are not lists that may be split over lines.
SINGLE_REQUEST_HEADERS = frozenset(
    {"content-type", "if-modified-since", "if-unmodified-since", "user-agent"}
)
_FORWARDED = frozenset(name.encode() for name in FORWARDED_REQUEST_HEADERS)
_SINGLE = frozenset(name.encode() for name in SINGLE_REQUEST_HEADERS)
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
    """A header value the gateway made, as bytes for httpx (which would encode ``str`` as ASCII
    and fail): latin-1 when it fits, else UTF-8 (a token claim in ``X-User-ID`` may need it).
    Client headers are forwarded as the scope's bytes and never pass through ``str`` (before
    that, a non-ASCII octet in a forwarded header made the proxy answer 500, found by
    tests/test_fuzz.py)."""
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


def select_request_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's header lines the runtime may see: allow-listed, in order, bytes unchanged.

    ``raw`` is the ASGI scope's header list (the client's bytes; not Quart's ``Headers``, into
    which Quart puts a ``Remote-Addr`` of its own that a client's ``Remote-Addr`` line then
    followed). Names listed in ``Connection`` are hop-by-hop (RFC 9110 7.6.1) and never go on,
    even when allow-listed. Raises :class:`Refusal`: 400 for a repeated single-valued header,
    415 for a ``Content-Encoding`` (not forwarded, so the runtime would read other bytes than
    the client meant, and the gateway could not check a body it had to decode first).
    """
    raw = list(raw)
    hop_by_hop: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            hop_by_hop.update(token.strip().lower() for token in value.split(b","))
    selected: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for name, value in raw:
        lower = name.lower()
        if lower == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise Refusal(415, "unsupported_content_encoding", "Send the body uncompressed")
        if lower not in _FORWARDED or lower in hop_by_hop:
            continue
        if lower in _SINGLE:
            if lower in seen:
                raise Refusal(
                    400, "invalid_request", f"Give the {lower.decode().title()} header once"
                )
            seen.add(lower)
        selected.append((lower, value))
    return selected


def forwarding_headers(
    scope: dict[str, Any], trusted_proxies: list[Network]
) -> list[tuple[bytes, bytes]]:
    """``X-Forwarded-For`` and ``X-Forwarded-Proto`` as the gateway vouches for them.

    For: see :func:`~trio_gateway.client_address.forwarded_chain` (just the peer unless the
    peer is a trusted proxy). Proto: a trusted proxy's own ``X-Forwarded-Proto`` when it is
    exactly ``http`` or ``https`` (it terminated TLS), else the scheme the gateway was reached
    with.
    """
    chain = forwarded_chain(scope, trusted_proxies)
    proto = str(scope.get("scheme") or "http").encode("latin-1")
    if trusted_proxies and address_in(peer_address(scope), trusted_proxies):
        given = [v for n, v in scope.get("headers") or [] if n.lower() == b"x-forwarded-proto"]
        if len(given) == 1 and given[0].strip().lower() in (b"http", b"https"):
            proto = given[0].strip().lower()
    return [
        (b"x-forwarded-for", ", ".join(chain).encode("latin-1")),
        (b"x-forwarded-proto", proto),
    ]


class BodyRefused(Exception):
    """A body the gateway has to read but cannot trust; carries the 400's description."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise BodyRefused("Duplicate keys in the JSON body")
    return value


def read_json_object(body: bytes, content_type: str | None) -> dict[str, Any]:
    """A body the gateway inspects, as a JSON object, or :class:`BodyRefused`.

    Strict, so that the runtime cannot read anything else out of the same bytes: UTF-8 only
    (a declared charset must say so), no BOM, no ``NaN``/``Infinity``, no lone surrogates
    (orjson refuses all of these), no duplicate keys (the gateway and the runtime might keep
    different ones), and an object at the top. The caller forwards exactly these bytes.
    """
    if content_type is not None:
        for parameter in content_type.split(";")[1:]:
            key, _, charset = parameter.partition("=")
            if key.strip().lower() == "charset" and charset.strip().strip('"').lower() not in (
                "utf-8",
                "utf8",
            ):
                raise BodyRefused("The JSON body must be UTF-8")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BodyRefused(
            "The body must be JSON in UTF-8 (no byte order mark, NaN or Infinity)"
        ) from None
    if not isinstance(value, dict):
        raise BodyRefused("The JSON body must be an object")
    # orjson keeps the last of duplicate keys silently; the stdlib parser can say so. Only on
    # the few small bodies the gateway inspects (bounded by MAX_REQUEST_BODY_BYTES).
    try:
        json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError):  # orjson read it, so only nesting could get here
        raise BodyRefused("The JSON body is nested too deeply") from None
    return value


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
        self._internal_key = _header_bytes(settings.internal_api_key.get_secret_value())
        self._trusted_proxies = settings.trusted_proxy_networks

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
            # Before the body: a request whose headers are refused is never sent anyway.
            client_headers = select_request_headers(request.scope["headers"])
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
        headers = client_headers + forwarding_headers(
            cast(dict[str, Any], request.scope), self._trusted_proxies
        )
        request_id = request_id_var.get()
        if request_id:
            headers.append((b"x-request-id", request_id.encode("ascii")))
        headers += [
            (name.lower().encode("ascii"), _header_bytes(value))
            for name, value in user_headers(identity).items()
        ]
        if route.method == "POST" and route.path == "/api/v1/sessions" and body:
            answer = await self._refuse_foreign_session_id(body, identity)
            if answer is not None:
                return answer
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
        """400 for a body the gateway cannot check, 403 for another user's ``session_id``.

        Fails closed: the body is forwarded only if this strict parse read it (the same bytes
        go on), so a body in UTF-16, with a ``NaN`` or a BOM (which lenient parsers such as the
        runtime's may still accept) can no longer carry a foreign id past the check.
        """
        try:
            wanted = read_json_object(body, request.headers.get("Content-Type")).get("session_id")
        except BodyRefused as refused:
            return error_response(400, "invalid_request", str(refused))
        if wanted is None:
            return None  # the runtime picks a new id (read back from its 201)
        if not isinstance(wanted, str) or not valid_session_id(wanted):
            return error_response(400, "invalid_session_id", "Malformed session_id in the body")
        if self.security.enabled:
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
        elif ok and route.per_session and identity.has_scopes(self.settings.write_scope):
            # Only a caller who may write claims a session by using it: with
            # WS_AUTH_MODE=session-id an owned session admits tokenless sockets that write as
            # the owner, so a read-only caller must not become one by reading.
            try:
                await security.claim_session(path_params["session_id"], identity)
            except Refusal as refused:
                logger.warning("session used but not owned: %s", refused.error)
        elif ok and route.per_session:
            # A read-only owner's use still keeps its record alive (SESSION_OWNERSHIP_TTL).
            try:
                if await security.ownership.owner(path_params["session_id"]) == identity.sub:
                    await security.claim_session(path_params["session_id"], identity)
            except (Refusal, StateUnavailable) as problem:
                logger.warning("session use not recorded: %s", type(problem).__name__)

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
        headers: list[tuple[bytes, bytes]],
        timeout: httpx.Timeout,
    ) -> httpx.Response:
        # Straight to the client's transport (its pool), not client.request(): the client
        # layers (auth and redirect handling, cookies, event hooks, URL merging), none of which
        # a proxy wants, cost ~40% of httpx's time per request on this hot path (measured).
        assert self.transport is not None, "the app's connection pool is not open"
        outgoing = httpx.Request(
            method,
            url,
            headers=[*headers, (b"x-internal-auth", self._internal_key)],
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
