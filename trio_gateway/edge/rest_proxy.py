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
peer) and ``X-Forwarded-Proto``; ``Host`` and ``Content-Length`` come from the runtime pool
(``upstream/http_stream.py``, shared with turns; a stale pooled connection is retried by its
rule). The hot path is served below Quart, as plain ASGI (``rest_door.py``).

Failures the gateway itself produces use one JSON shape, ``{"error", "error_description"}``:
runtime unreachable 502, runtime timeout 504, gateway saturated 503 with ``Retry-After``,
request body too large 413, state backend (Redis or SQLite) unavailable 503 on routes that need
ownership. A runtime 429 is passed through with its headers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_plus

import orjson
import trio
from quart import Response, request

from ..client_address import Network, address_in, forwarded_chain, peer_address
from ..limits import acquire_within
from ..observability import Metrics, request_id_var, user_var
from ..protocol import valid_session_id
from ..security.auth import Identity
from ..security.security import INTERNAL, Refusal, Security, user_headers
from ..settings import Settings
from ..state.state import STATE_UNAVAILABLE, StateUnavailable
from ..upstream.http_stream import (
    ConnectionPool,
    PoolTimeout,
    StreamBroken,
    StreamConnectError,
    StreamTimeout,
)
from .rest_routes import ProxyRoute

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


def _header_bytes(text: str) -> bytes:
    """A header value the gateway made, as bytes for h11 (which would encode ``str`` as ASCII
    and fail): latin-1 when it fits, else UTF-8 (a token claim in ``X-User-ID`` may need it).
    Client headers are forwarded as the scope's bytes and never pass through ``str`` (before
    that, a non-ASCII octet in a forwarded header made the proxy answer 500, found by
    tests/hostile/test_fuzz.py)."""
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


def header_value(scope: dict[str, Any], name: bytes) -> str | None:
    """The first ``name`` header line of the request (``name`` lower-case), as latin-1 text."""
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def query_values(raw: bytes, name: str) -> list[str]:
    """Every value of the query parameter ``name`` in the raw query string, in order (escapes
    decoded as UTF-8 with bad octets replaced, blank values kept, as Werkzeug's ``args``)."""
    # Text in, not bytes: parse_qsl's bytes mode re-encodes as ASCII and fails on the first
    # percent-escaped non-ASCII octet (found by tests/hostile/test_schemathesis.py).
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, errors="replace")
    return [value for key, value in pairs if key == name]


def _forwarded_query(route: ProxyRoute, raw: bytes) -> bytes:
    """The query string for the runtime: the client's, byte for byte, except that an empty
    session filter (``?session_id=``, "no filter") is left out rather than sent as ``""``."""
    name = route.session_query
    if name is None or not raw:
        return raw
    values = query_values(raw, name)
    if not values or values[0] != "":
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


@dataclass(slots=True)
class Answer:
    """A proxied request's response, framework-free: the ASGI door (``rest_door.py``) sends it,
    the Quart fallback route wraps it in a Quart ``Response``."""

    status: int
    body: bytes
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)  # besides Content-Type/-Length


class AnswerNow(Exception):
    """Raised by a body reader to answer at once (e.g. 408 when the body is too slow)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


# Reads the request's body: at most a little over ``limit`` bytes (more means 413), or
# raises :class:`AnswerNow`.
BodyReader = Callable[[int], Awaitable[bytes]]


def error_answer(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> Answer:
    """The JSON error shape of every failure the gateway itself produces."""
    body = orjson.dumps({"error": error, "error_description": description})
    return Answer(status, body, "application/json", dict(headers) if headers else {})


def error_response(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> Response:
    """:func:`error_answer` as a Quart response (for Quart's own routes and error handlers)."""
    return answer_response(error_answer(status, error, description, headers))


def answer_response(answer: Answer) -> Response:
    """An :class:`Answer` as a Quart response."""
    response = Response(
        answer.body, status=answer.status, headers=answer.headers, content_type=answer.content_type
    )
    if answer.content_type is None:
        response.headers.pop("Content-Type", None)
    return response


def incoming_request_id(supplied: str | None) -> str:
    """The client's X-Request-ID when it is sane (short, no odd characters), else a new one."""
    if supplied and _SANE_REQUEST_ID.match(supplied):
        return supplied
    # 128 random bits as 32 hex digits, like uuid4().hex at a fraction of its cost.
    return os.urandom(16).hex()


class ResponseTooLarge(Exception):
    """The runtime's answer exceeds ``MAX_RESPONSE_BODY_BYTES``."""


class RestProxy:
    """Forwards the routes of :data:`~trio_gateway.edge.rest_routes.ROUTES` over the app's
    runtime pool (shared with turns).

    Framework-free: :meth:`forward` takes the request's ASGI scope and a body reader and
    returns an :class:`Answer`, so the same code serves the raw ASGI door (the hot path, below
    Quart) and the Quart fallback routes (``HEAD``, and anything the door does not match).
    """

    def __init__(self, settings: Settings, metrics: Metrics, security: Security) -> None:
        self.settings = settings
        self.metrics = metrics
        self.security = security
        self.pool: ConnectionPool | None = None  # the app's, set when the app starts
        self._slots = trio.CapacityLimiter(settings.max_concurrent_requests)
        self._trusted_proxies = settings.trusted_proxy_networks
        # Labelled metric children, looked up once: ``labels()`` takes a lock and builds a key
        # on every call (~5 us each on the hot path). Bounded: routes x statuses seen.
        # Keyed by strings (cached hashes), not by the route (a dataclass hashes every field).
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[str, Any] = {}

    async def forward(
        self,
        route: ProxyRoute,
        path_params: dict[str, str],
        scope: dict[str, Any],
        read_body: BodyReader,
    ) -> Answer:
        """Proxy the request of ``scope`` along ``route``; metrics count every answer."""
        started = trio.current_time()
        answer = await self._forward(route, path_params, scope, read_body)
        key = (route.template, route.method, answer.status)
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = self.metrics.rest_requests.labels(
                route.template, route.method, str(answer.status)
            )
        counter.inc()
        timer = self._timed.get(route.template)
        if timer is None:
            timer = self._timed[route.template] = self.metrics.rest_latency.labels(route.template)
        timer.observe(trio.current_time() - started)
        return answer

    async def _authorize(
        self, route: ProxyRoute, path_params: dict[str, str], scope: dict[str, Any]
    ) -> Identity:
        """Who is calling and whether they may use ``route``; raises :class:`Refusal`."""
        security = self.security
        internal = security.internal_caller(header_value(scope, b"x-internal-auth"))
        if internal:
            identity = INTERNAL
        else:
            identity = await security.identify_header(header_value(scope, b"authorization"))
        user_var.set(identity.sub)
        required = self.settings.read_scope if route.method == "GET" else self.settings.write_scope
        security.require_scope(identity, required)
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
            values = query_values(scope.get("query_string") or b"", route.session_query)
            if len(values) > 1 or (values and values[0] and not valid_session_id(values[0])):
                # The runtime may read another value than we checked (first vs last).
                raise Refusal(400, "invalid_request", f"Give '{route.session_query}' once")
            if values and values[0]:
                await security.check_owner(values[0], identity)
        return identity

    async def _forward(
        self,
        route: ProxyRoute,
        path_params: dict[str, str],
        scope: dict[str, Any],
        read_body: BodyReader,
    ) -> Answer:
        try:
            identity = await self._authorize(route, path_params, scope)
            # Before the body: a request whose headers are refused is never sent anyway.
            client_headers = select_request_headers(scope["headers"])
        except Refusal as refused:
            return error_answer(
                refused.status, refused.error, refused.description, refused.headers()
            )
        limit = self.settings.max_request_body_bytes
        length = header_value(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return self._too_large()
        try:
            body = await read_body(limit)
        except AnswerNow as now:
            return now.answer
        if len(body) > limit:
            return self._too_large()
        path = route.runtime_path.format(
            **{name: quote(value, safe="") for name, value in path_params.items()}
        )
        query = _forwarded_query(route, scope.get("query_string") or b"")
        target = f"{path}?{query.decode('latin-1')}" if query else path
        headers = client_headers + forwarding_headers(scope, self._trusted_proxies)
        request_id = request_id_var.get()
        if request_id:
            headers.append((b"x-request-id", request_id.encode("ascii")))
        headers += [
            (name.lower().encode("ascii"), _header_bytes(value))
            for name, value in user_headers(identity).items()
        ]
        if route.method == "POST" and route.path == "/api/v1/sessions" and body:
            refusal = await self._refuse_foreign_session_id(body, identity, scope)
            if refusal is not None:
                return refusal

        if not await acquire_within(self._slots, self.settings.saturation_wait):
            return self._saturated()
        try:
            status, upstream_headers, content = await self._exchange(route, target, body, headers)
        except PoolTimeout:  # every runtime connection is in use (turns and REST together)
            return self._saturated()
        except StreamTimeout:
            logger.warning("runtime timed out", extra={"event": "runtime_timeout"})
            return error_answer(504, "runtime_timeout", "The agent runtime did not answer in time")
        except ResponseTooLarge:
            self.metrics.limit_hits.labels("response_body").inc()
            logger.warning(
                "runtime answer too large",
                extra={"event": "limit_hit", "limit": "response_body"},
            )
            return error_answer(
                502,
                "response_too_large",
                f"The agent runtime's answer exceeds {self.settings.max_response_body_bytes} bytes",
            )
        except (StreamConnectError, StreamBroken) as error:
            # Also a malformed answer (h11 refused it): the runtime is not usable as a peer.
            logger.warning(
                "runtime unreachable: %s",
                type(error).__name__,
                extra={"event": "runtime_unreachable"},
            )
            return error_answer(502, "runtime_unavailable", "The agent runtime is unreachable")
        finally:
            self._slots.release()
        answer = _relay(status, upstream_headers, content)
        if self.security.enabled and identity is not INTERNAL:
            await self._record_ownership(route, path_params, status, content, answer, identity)
        return answer

    async def _exchange(
        self, route: ProxyRoute, target: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, dict[str, str], bytes]:
        """Send the request on the pool and read the whole answer (bounded)."""
        assert self.pool is not None, "the app's connection pool is not open"
        limit = self.settings.max_response_body_bytes
        timeout = route.timeout or self.settings.request_timeout
        async with self.pool.stream(
            route.method,
            target,
            body,
            headers,
            idle_timeout=timeout,
            slot_wait=self.settings.saturation_wait,
        ) as response:
            # One byte over the limit is enough to know; the half-read connection is then
            # closed, not pooled (the pool reuses only answers read to their end).
            content = await response.read_limited(limit + 1)
            status, upstream_headers = response.status_code, response.headers
        if len(content) > limit:
            raise ResponseTooLarge
        return status, upstream_headers, content

    def _saturated(self) -> Answer:
        self.metrics.limit_hits.labels("concurrent_requests").inc()
        logger.warning(
            "REST proxy saturated",
            extra={"event": "limit_hit", "limit": "concurrent_requests"},
        )
        return error_answer(
            503,
            "saturated",
            "The gateway is handling too many requests; retry shortly",
            {"Retry-After": "1"},
        )

    async def _refuse_foreign_session_id(
        self, body: bytes, identity: Identity, scope: dict[str, Any]
    ) -> Answer | None:
        """400 for a body the gateway cannot check, 403 for another user's ``session_id``.

        Fails closed: the body is forwarded only if this strict parse read it (the same bytes
        go on), so a body in UTF-16, with a ``NaN`` or a BOM (which lenient parsers such as the
        runtime's may still accept) can no longer carry a foreign id past the check.
        """
        try:
            wanted = read_json_object(body, header_value(scope, b"content-type")).get("session_id")
        except BodyRefused as refused:
            return error_answer(400, "invalid_request", str(refused))
        if wanted is None:
            return None  # the runtime picks a new id (read back from its 201)
        if not isinstance(wanted, str) or not valid_session_id(wanted):
            return error_answer(400, "invalid_session_id", "Malformed session_id in the body")
        if self.security.enabled:
            try:
                owner = await self.security.ownership.owner(wanted)
            except StateUnavailable:
                self.metrics.state_backend_failures.labels("owner").inc()
                return error_answer(
                    503, "state_unavailable", STATE_UNAVAILABLE, {"Retry-After": "5"}
                )
            if owner is not None and owner != identity.sub:
                return error_answer(403, "forbidden", "This session belongs to another user")
        return None

    async def _record_ownership(
        self,
        route: ProxyRoute,
        path_params: dict[str, str],
        status: int,
        content: bytes,
        answer: Answer,
        identity: Identity,
    ) -> None:
        # Claims follow the runtime's answer: only sessions that exist get an owner (a 404 for a
        # made-up id claims nothing, so ids cannot be squatted through the REST door).
        security = self.security
        ok = 200 <= status < 300
        if route.path == "/api/v1/sessions" and route.method == "POST":
            created = _json_object(content)
            if status == 201 and isinstance(created.get("id"), str):
                try:
                    await security.claim_session(created["id"], identity)
                except Refusal as refused:
                    logger.warning("session created but not owned: %s", refused.error)
        elif route.own_sessions_in is not None:
            if status == 200:
                await self._only_own_sessions(content, answer, identity, *route.own_sessions_in)
        elif route.method == "DELETE" and route.per_session and status == 204:
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
        self, content: bytes, answer: Answer, identity: Identity, list_key: str, id_key: str
    ) -> None:
        # The runtime knows no users: the gateway filters its list to the caller's sessions.
        listing = _json_object(content)
        items = listing.get(list_key)
        if not isinstance(items, list):
            # Fail closed: an unexpected shape must not pass every user's sessions through.
            answer.status = 502
            answer.body = orjson.dumps(
                {"error": "bad_gateway", "error_description": f"Unexpected {list_key} list"}
            )
            return
        try:
            mine = await self.security.owned_sessions(identity)
        except Refusal as refused:  # fail closed: without ownership nothing can be shown
            answer.status = refused.status
            answer.headers.update(refused.headers())
            answer.body = orjson.dumps(
                {"error": refused.error, "error_description": refused.description}
            )
            return
        listing[list_key] = [
            item for item in items if isinstance(item, dict) and item.get(id_key) in mine
        ]
        listing["total"] = len(listing[list_key])
        answer.body = orjson.dumps(listing)

    def _too_large(self) -> Answer:
        self.metrics.limit_hits.labels("request_body").inc()
        # The body is not read (or not all of it): the connection cannot be reused, and the
        # client is told so (see request_gate.RequestBodyGate).
        return error_answer(
            413,
            "request_too_large",
            f"Request body exceeds {self.settings.max_request_body_bytes} bytes",
            {"Connection": "close"},
        )


def _relay(status: int, headers: dict[str, str], content: bytes) -> Answer:
    """The runtime's answer for the client: status, body, its content type (none if it sent
    none) and the headers of :data:`_PASS_RESPONSE_HEADERS`."""
    passed = {name: headers[name] for name in _PASS_RESPONSE_HEADERS if name in headers}
    content_type = headers.get("content-type")
    if not content and status in (204, 304):
        content_type = None
    return Answer(status, content, content_type, passed)


def route_handler(proxy: RestProxy, route: ProxyRoute) -> Any:
    """A Quart view function for ``route``: the fallback for what the ASGI door does not serve
    (``HEAD`` of a GET route, paths Werkzeug matches differently). Quart reads the body (its
    own limit and timeout, 413/408 through the app's error handlers)."""

    async def view(**path_params: str) -> Response:
        async def read_body(_limit: int) -> bytes:
            body = await request.get_data(cache=False)
            assert isinstance(body, bytes)
            return body

        answer = await proxy.forward(route, path_params, dict(request.scope), read_body)
        return answer_response(answer)

    view.__name__ = f"proxy_{route.method.lower()}_{route.path}"
    view.__doc__ = route.summary
    return view
