"""The WebSocket door: every check a session socket passes before the session engine runs it.

Order: session id, drain and global caps, Origin, then the caller's identity (from the
``Authorization`` header, a ``bearer.<token>`` subprotocol entry, an opted-in query parameter,
or else a first ``{"type":"auth"}`` frame), the write scope, session ownership, then the
per-user handshake rate, live-session cap and connection cap (per client address with JWT auth
off). Refusals before the accept are real HTTP answers (401 with
``WWW-Authenticate``, 403, 429, 503); refusals after it (first-frame auth) are close codes
(4401, 4403, 4429, 1013).

A socket opened without a token is anonymous until its ``auth`` frame, so what it may cost is
bounded separately: it takes a slot of ``MAX_PENDING_AUTH`` (process) and of
``MAX_PENDING_AUTH_PER_ADDRESS`` (its client address), not of ``MAX_CONNECTIONS``, for at most
``WS_AUTH_TIMEOUT`` plus the verification of the token it sent (one JWKS fetch at worst, bounded
by its own timeout); and only one message of at most :data:`AUTH_FRAME_MAX_BYTES` is read from
it before it has authenticated (``transport.FirstMessageLimit``).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import orjson

from ..client_address import client_address
from ..protocol import (
    SUBPROTOCOL_V2,
    WS_PATH,
    CloseCode,
    FrameError,
    parse_client_frame,
    valid_session_id,
)
from ..security.auth import Identity
from ..security.security import Refusal
from ..session.transport import ConnectionClosed, WebSocketConnection
from ..state.state import STATE_UNAVAILABLE, StateUnavailable

if TYPE_CHECKING:
    from ..limits import ConnectionCounter
    from ..observability import Metrics
    from ..security.security import Security
    from ..session.manager import SessionManager
    from ..settings import Settings

logger = logging.getLogger("trio_gateway.handshake")

BEARER_SUBPROTOCOL_PREFIX = "bearer."
# Largest first message of a socket that authenticates with its first frame (an auth frame
# with a token of at most 16 KiB, protocol.md). Larger closes 1009.
AUTH_FRAME_MAX_BYTES = 16 * 1024 + 256
# Identity.client_id of a socket admitted by its session id (WS_AUTH_MODE=session-id).
SESSION_ID_CLIENT = "session-id"


class Gateway(Protocol):
    """What the door uses of the app's state (``gateway.Gateway`` provides it). A protocol
    rather than an import: the door sits below the gateway that owns it."""

    settings: Settings
    metrics: Metrics
    security: Security
    sessions: SessionManager | None
    pending_auth: ConnectionCounter


_CLOSE_FOR_STATUS = {
    401: CloseCode.UNAUTHORIZED,
    403: CloseCode.FORBIDDEN,
    429: CloseCode.RATE_LIMITED,
    503: CloseCode.TRY_AGAIN_LATER,
}


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def handshake_token(scope: dict[str, Any], allow_query: bool) -> str | None:
    """The token offered with the handshake, if any (header, subprotocol, or query)."""
    authorization = _header(scope, b"authorization")
    if authorization is not None:
        return authorization  # the whole header: bearer_token() parses and checks the scheme
    for protocol in scope.get("subprotocols") or []:
        if protocol.startswith(BEARER_SUBPROTOCOL_PREFIX):
            return "Bearer " + str(protocol[len(BEARER_SUBPROTOCOL_PREFIX) :])
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if "access_token" in query:
        if not allow_query:
            raise Refusal(
                401,
                "invalid_request",
                "Tokens in the query string are not accepted; use the Authorization header",
                'Bearer error="invalid_request"',
            )
        return "Bearer " + str(query["access_token"][0])
    return None


async def reject(ws: WebSocketConnection, refusal: Refusal) -> None:
    """Refuse the handshake with a real HTTP answer."""
    body = orjson.dumps({"error": refusal.error, "error_description": refusal.description})
    headers = [(k.lower().encode(), v.encode()) for k, v in refusal.headers().items()]
    await ws.reject(refusal.status, body, headers)


async def open_session_socket(gateway: Gateway, ws: WebSocketConnection) -> None:
    """Run the checks above, then hand the socket to the session engine."""
    try:
        await ws.wait_connect()
    except ConnectionClosed:
        return
    scope = ws.scope
    session_id = scope["path"][len(WS_PATH) + 1 :]  # WS_PATH/{session_id}
    sessions, security = gateway.sessions, gateway.security
    try:
        if not valid_session_id(session_id):
            raise Refusal(400, "invalid_session_id", "Malformed session id")
        if sessions is None:
            raise Refusal(503, "unavailable", "Gateway is not ready", retry_after=5)
        capacity = sessions.refusal(session_id)
        if capacity is not None:
            raise Refusal(capacity[0], "unavailable", capacity[1], retry_after=5)
        if not security.origins.allows(_header(scope, b"origin")):
            gateway.metrics.limit_hits.labels("origin").inc()
            raise Refusal(403, "forbidden_origin", "This origin may not open WebSockets")
        offered = handshake_token(scope, gateway.settings.allow_query_token)
        identity = None
        address = ""
        if offered is not None or not security.enabled:
            identity = await security.identify_header(offered)
            await _authorize(gateway, identity, session_id)
        else:
            if gateway.settings.ws_auth_mode == "session-id":
                identity = await _session_owner(gateway, session_id)
            if identity is None:
                address = client_address(scope, gateway.settings.trusted_proxy_networks)
                _admit_pending(gateway, address)  # paired with the release in the finally below
    except Refusal as refusal:
        gateway.metrics.handshakes_refused.labels(str(refusal.status)).inc()
        logger.info(
            "websocket refused: %s",
            refusal.error,
            extra={"event": "ws_refused", "status": refusal.status, "reason": refusal.error},
        )
        await reject(ws, refusal)
        return

    assert sessions is not None
    if identity is not None:
        await _serve(gateway, ws, session_id, identity, accepted=False)
        return

    # No token with the handshake (browsers cannot set headers): accept, then the first
    # frame must be {"type":"auth","token":...} within ws_auth_timeout. Nothing else is read:
    # one message of at most AUTH_FRAME_MAX_BYTES, then hypercorn stops reading the socket
    # until the auth is decided (see transport.FirstMessageLimit).
    v2 = SUBPROTOCOL_V2 in ws.requested_subprotocols
    authenticated = False
    try:
        ws.limit_first_message(AUTH_FRAME_MAX_BYTES)
        await ws.accept(SUBPROTOCOL_V2 if v2 else None)
        identity = await _first_frame_identity(gateway, ws)
        await _authorize(gateway, identity, session_id)
        authenticated = True
    except Refusal as refusal:
        ws.release_first_message_limit(restore=False)
        code = _CLOSE_FOR_STATUS.get(refusal.status, CloseCode.POLICY_VIOLATION)
        logger.info(
            "websocket closed before auth completed: %s",
            refusal.error,
            extra={"event": "ws_refused", "close_code": int(code), "reason": refusal.error},
        )
        await ws.finish(code, gateway.settings.ws_close_timeout, refusal.description)
        return
    except ConnectionClosed:
        return
    finally:
        # Also on cancellation: a socket must never stay paused (hypercorn would keep its
        # connection task waiting) nor keep its pending slot.
        ws.release_first_message_limit(restore=authenticated)
        gateway.pending_auth.release(address)
    await _serve(gateway, ws, session_id, identity, accepted=True)


async def _session_owner(gateway: Gateway, session_id: str) -> Identity | None:
    """``WS_AUTH_MODE=session-id``: the identity a tokenless socket acts as, or None.

    A session that already has an owner (created or opened by an authenticated user) admits a
    socket that presents no token, as that owner, for that session only: the session id is the
    credential, exactly the old gateway's exposure. The socket's messages then count against
    the owner's caps and rates, and an ``auth`` frame it may still send is an in-band refresh
    (a token of another user closes it with 4401). An unowned or unknown session gets None:
    the socket must authenticate with its first frame as in ``token`` mode (4401 otherwise).
    """
    security = gateway.security
    try:
        owner = await security.ownership.owner(session_id)
    except StateUnavailable:
        gateway.metrics.state_backend_failures.labels("owner").inc()
        raise Refusal(503, "state_unavailable", STATE_UNAVAILABLE, retry_after=5) from None
    if owner is None:
        return None
    gateway.metrics.session_id_admissions.inc()
    logger.info(
        "websocket admitted by its session id (WS_AUTH_MODE=session-id)",
        extra={"event": "ws_session_id_admission", "owner": owner},
    )
    settings = gateway.settings
    # Write scope only: what the socket may do. Sessions are owned only through callers with
    # the write scope (REST claims need it, the WebSocket door requires it), so the owner had
    # it; the runtime is told no more than that.
    return Identity(
        sub=owner,
        scopes=frozenset({settings.write_scope}),
        expires_at=math.inf,  # no token to expire; an in-band auth frame sets a real expiry
        client_id=SESSION_ID_CLIENT,
    )


def _admit_pending(gateway: Gateway, address: str) -> None:
    """Take a pending-auth slot for ``address`` or raise :class:`Refusal`: 429 when this
    address holds MAX_PENDING_AUTH_PER_ADDRESS, 503 when the process holds MAX_PENDING_AUTH."""
    refused = gateway.pending_auth.try_acquire(address)
    if refused is None:
        return
    if refused == "per_user":
        gateway.metrics.limit_hits.labels("pending_auth_per_address").inc()
        raise Refusal(
            429,
            "too_many_pending_auth",
            "Too many sockets from this address are waiting for their auth frame",
            retry_after=gateway.settings.ws_auth_timeout,
        )
    gateway.metrics.limit_hits.labels("pending_auth").inc()
    raise Refusal(
        503,
        "too_many_pending_auth",
        "Too many sockets are waiting for their auth frame; send the token with the handshake",
        retry_after=gateway.settings.ws_auth_timeout,
    )


async def _first_frame_identity(gateway: Gateway, ws: WebSocketConnection) -> Identity:
    settings = gateway.settings
    timeout = settings.ws_auth_timeout
    # Pinged while it waits, as every accepted socket is: no writer serves it yet.
    data = await ws.receive_pinging(timeout, settings.ws_heartbeat_interval)
    if data is None:
        raise Refusal(401, "unauthorized", f"No auth frame within {timeout:g} s")
    if isinstance(data, str):
        try:
            frame = parse_client_frame(data)
        except FrameError:
            frame = {}
        if frame.get("type") == "auth":
            return await gateway.security.identify_token(frame["token"])
    raise Refusal(401, "unauthorized", "The first frame must be an auth frame")


async def _authorize(gateway: Gateway, identity: Identity, session_id: str) -> None:
    # Check only: the session is claimed once the connection caps have admitted the socket,
    # so refused handshakes cannot squat session ids.
    security = gateway.security
    security.require_scope(identity, gateway.settings.write_scope)
    await security.check_owner(session_id, identity)


async def _serve(
    gateway: Gateway,
    ws: WebSocketConnection,
    session_id: str,
    identity: Identity,
    *,
    accepted: bool,
) -> None:
    security, sessions = gateway.security, gateway.sessions
    assert sessions is not None
    # Per-user limits count under the user, or the client's address when JWT auth is off.
    key = security.limit_key(identity, ws.scope)
    # Rate and live-session cap first, then count the connection, claim last: a handshake
    # refused by any of them never claims (squats) the session id.
    try:
        await security.check_handshake_rate(key)
        refused = sessions.live_session_refusal(session_id, key)
        if refused is not None:
            raise refused
        await security.acquire_connection(identity, key)
    except Refusal as refusal:
        await _refuse(gateway, ws, refusal, accepted=accepted)
        return
    try:
        try:
            await security.claim_session(session_id, identity)
            # Checks the live-session cap again, atomically with creating the session (the
            # claim may have awaited Redis meanwhile).
            await sessions.serve_connection(
                ws, session_id, identity, accepted=accepted, limit_key=key
            )
        except Refusal as refusal:
            await _refuse(gateway, ws, refusal, accepted=accepted)
            return
    finally:
        # Also when the claim (a Redis call) or the session is cancelled: the release is
        # shielded and bounded inside.
        await security.release_connection(identity, key)


async def _refuse(
    gateway: Gateway, ws: WebSocketConnection, refusal: Refusal, *, accepted: bool
) -> None:
    """Refuse after authentication: an HTTP answer before the accept, a close code after."""
    if accepted:
        code = _CLOSE_FOR_STATUS.get(refusal.status, CloseCode.POLICY_VIOLATION)
        await ws.finish(code, gateway.settings.ws_close_timeout, refusal.description)
    else:
        gateway.metrics.handshakes_refused.labels(str(refusal.status)).inc()
        await reject(ws, refusal)
