"""The session manager: every session of one app, the door sockets come in by, and drain.

The manager keeps the registry of sessions (and their per-user counts), refuses what would go
over the limits, hosts every session's nursery for the app's lifetime, turns an accepted
WebSocket into a :class:`~trio_gateway.session.connection.Connection` attached to its session,
and drains: new sessions are refused, live ones close with 1012 once their turn has ended.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from ..observability import Metrics, frame_type_label, session_id_var, user_var
from ..protocol import SUBPROTOCOL_V2, CloseCode
from ..security.auth import Identity
from ..security.security import Refusal, Security
from ..settings import Settings
from ..upstream.runtime_client import RuntimeClient
from .connection import Connection
from .detached import DetachedBudget
from .replicas import Lease, SessionLease, SoloLease
from .session import Session
from .transport import WebSocketConnection

if TYPE_CHECKING:  # the Redis client is imported only when STATE_BACKEND=redis
    from ..state.cluster import Cluster

logger = logging.getLogger("trio_gateway.session")


class SessionManager:
    """All sessions of one app, the connection entry point, limits and drain."""

    def __init__(
        self, settings: Settings, runtime: RuntimeClient, metrics: Metrics, security: Security
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.security = security
        self.sessions: dict[str, Session] = {}
        # Live sessions per limit key (user, or anonymous client address), and the bytes
        # detached sessions hold per key: both per process, like the memory they protect.
        self.live_sessions: dict[str, int] = {}
        self.detached = DetachedBudget(settings.detached_bytes_per_user)
        self.connection_count = 0
        self.draining = False
        self.cluster: Cluster | None = None  # see share_state
        self._nursery: trio.Nursery | None = None
        self._idle = trio.lowlevel.ParkingLot()
        self.already_set = trio.Event()  # see SoloLease
        self.already_set.set()
        self._solo_lease = SoloLease(self.already_set)
        # Gauges read at scrape time: nothing to maintain on the hot path.
        metrics.active_websockets.set_function(lambda: self.connection_count)
        metrics.active_sessions.set_function(lambda: len(self.sessions))
        metrics.outbound_queue_bytes.set_function(
            lambda: sum(s.outbound.pending_bytes for s in self.sessions.values())
        )
        metrics.detached_bytes.set_function(lambda: self.detached.total)
        # Pre-bound label children: a labels() lookup per frame would cost a lock and a dict.
        self._frames_out: dict[str, Any] = {}
        self._frames_in: dict[str, Any] = {}

    def share_state(self, cluster: Cluster) -> None:
        """Run sessions across replicas through ``cluster`` (``STATE_BACKEND=redis``); called
        by the app before :meth:`run`."""
        self.cluster = cluster

    def lease_for(self, session: Session) -> Lease:
        """The lease of a new session: its own when replicas share state, else the shared
        one that does nothing."""
        if self.cluster is None:
            return self._solo_lease
        return SessionLease(session, self.cluster, self.settings.session_lease_seconds)

    def count_frame_out(self, frame_type: object) -> None:
        """Count one frame sent to a client."""
        label = frame_type_label(frame_type)
        child = self._frames_out.get(label)
        if child is None:
            child = self._frames_out[label] = self.metrics.frames_out.labels(label)
        child.inc()

    def count_frame_in(self, frame_type: object) -> None:
        """Count one frame received from a client."""
        label = frame_type_label(frame_type)
        child = self._frames_in.get(label)
        if child is None:
            child = self._frames_in[label] = self.metrics.frames_in.labels(label)
        child.inc()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host every session's nursery; runs for the app's lifetime."""
        async with trio.open_nursery() as nursery:
            if self.cluster is not None:
                failures = self.metrics.state_backend_failures.labels("stream_append")
                self.cluster.on_append_failure = failures.inc
                await nursery.start(self.cluster.listen, self.on_takeover)
                nursery.start_soon(self.cluster.run_publisher)
            self._nursery = nursery
            nursery.start_soon(self._expire_replays)
            task_status.started()
            await trio.sleep_forever()

    async def _expire_replays(self) -> None:
        # Replay buffers are trimmed when a frame is appended; a session that went quiet
        # would keep its last burst forever. The age bound is the grace period, so a sweep
        # every few seconds keeps idle sessions' memory at what they hold live.
        interval = min(5.0, max(0.5, self.settings.session_grace_seconds / 4))
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for session in list(self.sessions.values()):
                session.replay.trim(now)

    def on_takeover(self, session_id: str) -> None:
        """Another replica now serves this session's client: close ours with 4409 and, if we
        run the session, finish its turn there (frames go to the shared stream) and let go."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        logger.info("session %s moved to another replica", session_id)
        for connection in session.sockets():
            connection.replace("replaced by a connection on another gateway replica")
        session.moved_away()

    def session_ended(self, session: Session) -> None:
        """Forget a session that ended (its last step; see Session.run)."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            key = session.limit_key
            left = self.live_sessions[key] - 1
            if left:
                self.live_sessions[key] = left
            else:
                del self.live_sessions[key]
        self._idle.unpark_all()

    def _session_for(self, session_id: str, limit_key: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            assert self._nursery is not None, "SessionManager.run() is not running"
            session = Session(session_id, self, limit_key)
            self.sessions[session_id] = session
            self.live_sessions[limit_key] = self.live_sessions.get(limit_key, 0) + 1
            self._nursery.start_soon(session.run)
        return session

    def live_session_refusal(self, session_id: str, limit_key: str) -> Refusal | None:
        """429 when a connection to ``session_id`` would open one more live session for
        ``limit_key`` beyond ``MAX_LIVE_SESSIONS_PER_USER``; re-attaching to a live session
        is always allowed. Counted in this process (the sessions live here)."""
        if session_id in self.sessions:
            return None
        limit = self.settings.max_live_sessions_per_user
        if self.live_sessions.get(limit_key, 0) < limit:
            return None
        self.metrics.limit_hits.labels("live_sessions_per_user").inc()
        grace = self.settings.session_grace_seconds
        return Refusal(
            429,
            "too_many_sessions",
            # Short: it is also a close reason (at most 123 bytes).
            f"Too many live sessions for this user ({limit}); close one or retry later",
            retry_after=max(1.0, grace),
        )

    def refusal(self, session_id: str) -> tuple[int, str] | None:
        """Why a new connection to ``session_id`` must be refused, as (HTTP status, reason)."""
        if self.draining or self._nursery is None:
            return 503, "gateway is shutting down"
        if self.connection_count >= self.settings.max_connections:
            return 503, "too many open connections"
        if session_id not in self.sessions and len(self.sessions) >= self.settings.max_sessions:
            return 503, "too many live sessions"
        return None

    # --- one connection ----------------------------------------------------------------------

    async def serve_connection(
        self,
        ws: WebSocketConnection,
        session_id: str,
        identity: Identity,
        *,
        accepted: bool = False,
        limit_key: str | None = None,
    ) -> None:
        """Run a WebSocket of an authorized ``identity`` until it closes (accepting it first
        unless ``accepted``); never raises for the session's errors.

        Raises :class:`Refusal` before anything else happens when the socket would open a
        live session beyond the per-user cap of ``limit_key`` (default the user's id): the
        caller answers it (HTTP 429 before the accept, close 4429 after).
        """
        key = identity.sub if limit_key is None else limit_key
        # The authoritative check: nothing awaits between it and the session's creation.
        refused = self.live_session_refusal(session_id, key)
        if refused is not None:
            raise refused
        v2 = SUBPROTOCOL_V2 in ws.requested_subprotocols
        user_var.set(identity.sub)
        # Bound before the session's and the connection's tasks start: they inherit it.
        session_id_var.set(session_id)
        session = self._session_for(session_id, key)
        connection = Connection(self, ws, v2, identity, key)
        self.connection_count += 1
        try:
            # accept() yields to other tasks: the session must not end by grace meanwhile.
            session.expect_attach()
            try:
                if not accepted:
                    await ws.accept(SUBPROTOCOL_V2 if v2 else None)
                if not await session.lease.join():
                    connection.set_close(
                        CloseCode.TRY_AGAIN_LATER, "shared state (Redis) unavailable"
                    )
                    self.metrics.limit_hits.labels("state_unavailable").inc()
                    return
            finally:
                session.release_pending()
            if session.ending or self.sessions.get(session_id) is not session:
                # It ended anyway (drain, operator): never attach to a session without a
                # turn runner. No await between here and attach.
                if self.draining:
                    connection.set_close(CloseCode.SERVICE_RESTART, "server restarting")
                    return
                # Not checked against the live-session cap again: the session this socket
                # was admitted for held the slot until a moment ago.
                session = self._session_for(session_id, key)
            reattached = session.busy
            greeting = None
            if v2:
                greeting = {
                    "type": "session_ready",
                    "session_id": session_id,
                    "protocol": SUBPROTOCOL_V2,
                    "turn_running": session.turn_running,
                    "reattached": reattached,
                    "heartbeat_interval": self.settings.ws_heartbeat_interval,
                    "max_message_bytes": self.settings.ws_max_message_bytes,
                }
            viewer = session.attach(connection, greeting)
            self.metrics.connections_opened.inc()
            logger.info(
                "websocket connected (v2=%s, reattached=%s, viewer=%s)",
                v2,
                reattached,
                viewer,
                extra={
                    "event": "ws_connected",
                    "protocol": "v2" if v2 else "v1",
                    "viewer": viewer,
                },
            )
            await connection.run(session)
        finally:
            connection.writer_done.set()
            self.connection_count -= 1
            session.detach(connection)
            await connection.finish()
            self._idle.unpark_all()

    async def drain(self, timeout: float) -> None:
        """Refuse new sessions, close each live one with 1012 once its turn ends, and after
        ``timeout`` cancel whatever is still running. Returns when no session is left."""
        self.draining = True
        logger.info("draining %d session(s), timeout %.1f s", len(self.sessions), timeout)
        for session in list(self.sessions.values()):
            session.begin_drain()
        with trio.move_on_after(timeout):
            while self.sessions or self.connection_count:
                await self._idle.park()
        for session in list(self.sessions.values()):
            session.close_for_drain(hard=True)
        with trio.move_on_after(self.settings.ws_close_timeout + 1):
            while self.sessions or self.connection_count:
                await self._idle.park()
        if self.sessions or self.connection_count:
            logger.error(
                "drain left %d session(s), %d connection(s)",
                len(self.sessions),
                self.connection_count,
            )

    def stop(self) -> None:
        """Cancel every session at once (app shutdown after drain)."""
        for session in list(self.sessions.values()):
            session.end()


def retry_after_seconds(value: float) -> str:
    """Format a Retry-After header value."""
    return str(max(1, math.ceil(value)))
