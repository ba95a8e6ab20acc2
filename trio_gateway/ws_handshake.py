"""The WebSocket door: every check a session socket passes before the session engine runs it.

Order: session id, drain and global caps, Origin, then the caller's identity (from the
``Authorization`` header, a ``bearer.<token>`` subprotocol entry, an opted-in query parameter,
or else a first ``{"type":"auth"}`` frame), the write scope, session ownership, then the
per-user handshake rate, live-session cap and connection cap (per client address with JWT auth
off). Refusals before the accept are real HTTP answers (401 with
``WWW-Authenticate``, 403, 429, 503); refusals after it (first-frame auth) are close codes
(4401, 4403, 4429, 1013).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import trio

from .auth import Identity
from .protocol import SUBPROTOCOL_V2, CloseCode, FrameError, parse_client_frame, valid_session_id
from .security import Refusal
from .transport import ConnectionClosed, WebSocketConnection

if TYPE_CHECKING:
    from .app import Gateway

logger = logging.getLogger("trio_gateway.handshake")

BEARER_SUBPROTOCOL_PREFIX = "bearer."
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
    session_id = scope["path"][len("/api/v1/ws/") :]
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
        if offered is not None or not security.enabled:
            identity = await security.identify_header(offered)
            await _authorize(gateway, identity, session_id)
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
    # frame must be {"type":"auth","token":...} within ws_auth_timeout. Nothing else is read.
    v2 = SUBPROTOCOL_V2 in ws.requested_subprotocols
    # Sockets waiting for their auth frame count against MAX_CONNECTIONS (sessions.refusal).
    sessions.pending_auth += 1
    try:
        await ws.accept(SUBPROTOCOL_V2 if v2 else None)
        identity = await _first_frame_identity(gateway, ws)
        await _authorize(gateway, identity, session_id)
    except Refusal as refusal:
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
        sessions.pending_auth -= 1
    await _serve(gateway, ws, session_id, identity, accepted=True)


async def _first_frame_identity(gateway: Gateway, ws: WebSocketConnection) -> Identity:
    timeout = gateway.settings.ws_auth_timeout
    with trio.move_on_after(timeout):
        data = await ws.receive()
        if isinstance(data, str):
            try:
                frame = parse_client_frame(data)
            except FrameError:
                frame = {}
            if frame.get("type") == "auth":
                return await gateway.security.identify_token(frame["token"])
        raise Refusal(401, "unauthorized", "The first frame must be an auth frame")
    raise Refusal(401, "unauthorized", f"No auth frame within {timeout:g} s")


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
