"""The session engine: one WebSocket session, its turns, its connection, and their lifetimes.

Structure (each box is a nursery; cancelling a box tears down everything inside it)::

    SessionManager nursery (app lifetime)
      └─ Session nursery ........ turn runner, grace timer    (lives through reconnects)
    ASGI connection task
      └─ Connection nursery ..... reader, writer, heartbeat   (one per WebSocket)

A session outlives its connection for ``session_grace_seconds`` so that a turn running when the
client dropped can finish (the runtime persists the answer) and a client reconnecting within the
grace period re-attaches to the live turn. Cancelling a session's nursery cancels its turn (the
runtime HTTP request is closed) and closes its attached connection.

Backpressure: the turn runner relays runtime chunks into the session's bounded
:class:`~trio_gateway.outbound.OutboundQueue`; only the connection's writer task touches the
socket. hypercorn sends inside a shielded scope, so a client that stops reading blocks the writer
where no timeout can reach it: the heartbeat task watches ``send_started_at`` from outside and
aborts the transport after ``ws_slow_client_timeout``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import orjson
import trio

from .auth import Identity
from .observability import Metrics, frame_type_label, session_id_var, user_var
from .outbound import Frame, OutboundQueue
from .protocol import (
    RUNTIME_BOUND_TYPES,
    SUBPROTOCOL_V2,
    V2_ONLY_TYPES,
    CloseCode,
    ErrorCode,
    FrameError,
    TurnStatus,
    error_frame,
    parse_client_frame,
)
from .runtime_client import RuntimeClient, RuntimeFailure
from .security import Refusal, Security
from .settings import Settings
from .transport import ConnectionClosed, WebSocketConnection
from .turn_queue import TurnQueue

logger = logging.getLogger("trio_gateway.session")


class Connection:
    """One attached WebSocket and its three tasks (reader, writer, heartbeat)."""

    def __init__(self, ws: WebSocketConnection, v2: bool, identity: Identity) -> None:
        self.ws = ws
        self.v2 = v2
        self.identity = identity
        self.rate_refusals = 0  # consecutive messages refused by the rate limit
        self.scope = trio.CancelScope()
        self.close_code: int = CloseCode.NORMAL
        self.close_reason = ""
        self.closing = False
        self.flush_then_close = False
        self.replaced = False
        self.shut_requested = trio.Event()
        self.wake_writer: Callable[[], object] = lambda: None
        # Writers take turns: a replacement's writer starts only once the previous writer of
        # the session has stopped, so frames and seq numbers never interleave between them.
        self.writer_done = trio.Event()
        self.previous_writer_done: trio.Event | None = None

    def shut(self, code: int, reason: str = "", *, flush: bool = False) -> None:
        """Ask the connection to close with ``code``; the connection task does the closing.

        ``flush=True`` lets the writer send every frame already queued first (a drain closes a
        session *after* its turn's last frames). The first code wins: a session ending after a
        drain must not turn 1012 into 1001; a later hard shut only stops the flush.
        """
        if not self.closing:
            self.closing = True
            self.close_code = code
            self.close_reason = reason
            if flush:
                self.flush_then_close = True
                self.wake_writer()
                return
        elif flush:
            return
        self.shut_requested.set()
        self.scope.cancel()


class Session:
    """State and turn runner of one ``session_id``; see the module docstring for lifetimes."""

    def __init__(self, session_id: str, manager: SessionManager) -> None:
        self.id = session_id
        self.manager = manager
        settings = manager.settings
        self.settings = settings
        self.queue = TurnQueue(settings.max_queued_messages)
        self.outbound = OutboundQueue(
            settings.outbound_queue_max_bytes, settings.max_pending_control_frames
        )
        self.seq = 0
        self.turn_count = 0
        self.connection: Connection | None = None
        self.scope = trio.CancelScope()
        self.turn_scope: trio.CancelScope | None = None
        self.lost_frames = 0
        self.pending_attach = 0  # connections accepted but not attached yet
        self.close_after_turn: int | None = None
        self._turn_started_at = 0.0
        self._first_chunk_seen = False
        self.finished = trio.Event()
        # Wake-ups. ParkingLots rather than Events: no object churn on the hot path.
        self._frames_ready = trio.lowlevel.ParkingLot()
        self._space_ready = trio.lowlevel.ParkingLot()
        self._messages_ready = trio.lowlevel.ParkingLot()
        self._attachment_changed = trio.lowlevel.ParkingLot()

    # --- state ---------------------------------------------------------------------------

    @property
    def turn_running(self) -> bool:
        """Whether a turn is being relayed right now."""
        return self.turn_scope is not None

    @property
    def busy(self) -> bool:
        """A turn runs or messages wait."""
        return self.turn_running or len(self.queue) > 0

    def next_seq(self) -> int:
        """Allocate the next per-session frame sequence number."""
        self.seq += 1
        return self.seq

    # --- lifetime --------------------------------------------------------------------------

    async def run(self) -> None:
        """Body of the session's nursery; returns when the session ends."""
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._turn_runner)
                    nursery.start_soon(self._grace_timer)
        except* Exception:
            # A bug in one session must not take the manager's nursery (every session) down.
            logger.exception("session %s failed", self.id)
            if self.connection is not None:
                self.connection.shut(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self.outbound.drop_all()
            dropped = self.queue.clear()
            if dropped:
                logger.info("session ended with %d queued message(s) dropped", dropped)
            if self.connection is not None:
                self.connection.shut(CloseCode.GOING_AWAY, "session ended")
            self.manager._forget(self)
            self.finished.set()
            logger.debug("session %s ended", self.id)

    def end(self) -> None:
        """Cancel the session: its turn, its queue and its connection."""
        self.scope.cancel()

    async def _grace_timer(self) -> None:
        # Ends the session once it has been without a connection for the grace period. A
        # connection between accept and attach counts as present (no race at the deadline).
        def unattended() -> bool:
            return self.connection is None and not self.pending_attach

        while True:
            while not unattended():
                await self._attachment_changed.park()
            if self.settings.session_grace_seconds <= 0:
                self.end()
                return
            with trio.move_on_after(self.settings.session_grace_seconds) as waited:
                while unattended():
                    await self._attachment_changed.park()
            if waited.cancelled_caught:
                if self.turn_running:
                    logger.info("grace period over; cancelling the detached turn")
                self.end()
                return

    def release_pending(self) -> None:
        """A connection counted in ``pending_attach`` attached or gave up."""
        self.pending_attach -= 1
        self._attachment_changed.unpark_all()

    def attach(self, connection: Connection, greeting: Frame | None = None) -> None:
        """Make ``connection`` the session's live socket, replacing any previous one.

        ``greeting`` (v2 ``session_ready``) goes out before anything already queued.
        """
        previous = self.connection
        if previous is not None:
            previous.replaced = True
            previous.shut(CloseCode.SESSION_REPLACED, "replaced by a newer connection")
            connection.previous_writer_done = previous.writer_done
        self.connection = connection
        connection.wake_writer = self._frames_ready.unpark_all
        self._attachment_changed.unpark_all()
        if self.lost_frames:
            logger.warning(
                "%d frame(s) of a detached turn did not fit the buffer", self.lost_frames
            )
            if connection.v2:  # v1 clients reload history on reconnect anyway
                self.outbound.put_control_front(
                    {"type": "resync_required", "reason": "frames_dropped_while_detached"}
                )
            self.lost_frames = 0
        if greeting is not None:
            self.outbound.put_control_front(greeting)
        self._frames_ready.unpark_all()

    def detach(self, connection: Connection) -> None:
        """Forget ``connection`` (if it is still the live one); queued messages are dropped."""
        if self.connection is not connection:
            return
        self.connection = None
        dropped = self.queue.clear()
        if dropped:
            logger.info("client gone; dropped %d queued message(s)", dropped)
        self._attachment_changed.unpark_all()
        self._space_ready.unpark_all()
        if self.close_after_turn is not None and not self.turn_running:
            self.end()  # drained: nothing left to wait for

    # --- inbound ---------------------------------------------------------------------------

    def send_control(self, frame: Frame) -> None:
        """Queue a gateway-made frame for the client; never blocks."""
        self.outbound.put_control(frame)
        self._frames_ready.unpark_all()

    def submit(self, message: dict[str, Any]) -> bool:
        """Queue a runtime-bound message; False when the FIFO is full (caller answers busy)
        or the session is closing for a drain (no new turn may start)."""
        if self.close_after_turn is not None or not self.queue.offer(message):
            return False
        self._messages_ready.unpark_all()
        return True

    def cancel_turn(self) -> tuple[bool, int]:
        """Cancel the running turn (closing the runtime stream) and drop queued messages."""
        dropped = self.queue.clear()
        running = self.turn_scope is not None
        if self.turn_scope is not None:
            self.turn_scope.cancel()
        return running, dropped

    # --- turn runner -----------------------------------------------------------------------

    async def _turn_runner(self) -> None:
        runtime = self.manager.runtime
        while True:
            message = self.queue.pop()
            while message is None:
                await self._messages_ready.park()
                message = self.queue.pop()
            await self._run_turn(runtime, message)
            if self.close_after_turn is not None:
                self._close_for_drain()
                return

    async def _run_turn(self, runtime: RuntimeClient, message: dict[str, Any]) -> None:
        self.turn_count += 1
        turn_id = self.turn_count
        self._send_v2({"type": "turn_started", "turn_id": turn_id, "message_type": message["type"]})
        status = TurnStatus.COMPLETED
        started = trio.current_time()
        self._turn_started_at = started
        self._first_chunk_seen = False
        metrics = self.manager.metrics
        with trio.CancelScope() as turn_scope:
            self.turn_scope = turn_scope
            try:
                await runtime.stream_turn(self.id, message, self._relay)
            except RuntimeFailure as failure:
                status = TurnStatus.FAILED
                extra: dict[str, Any] = {}
                if failure.status is not None:
                    extra["status"] = failure.status
                if failure.detail is not None:
                    extra["detail"] = failure.detail
                logger.warning(
                    "turn %d failed: %s",
                    turn_id,
                    failure.code.value,
                    extra={"event": "turn_failed", "code": failure.code.value},
                )
                metrics.runtime_stream_errors.labels(failure.code.value).inc()
                self.send_control(
                    error_frame(failure.code, failure.message, is_final=True, **extra)
                )
            except Exception:
                status = TurnStatus.FAILED
                logger.exception("turn %d failed inside the gateway", turn_id)
                self.send_control(
                    error_frame(ErrorCode.INTERNAL_ERROR, "Internal gateway error", is_final=True)
                )
            finally:
                self.turn_scope = None
        if turn_scope.cancelled_caught:
            status = TurnStatus.CANCELLED
            self.send_control(error_frame(ErrorCode.CANCELLED, "Turn cancelled", is_final=True))
        duration = trio.current_time() - started
        metrics.turns.labels(status.value).inc()
        metrics.turn_duration.observe(duration)
        logger.info(
            "turn %d %s in %.3f s",
            turn_id,
            status.value,
            duration,
            extra={"event": "turn_finished", "status": status.value, "duration_s": duration},
        )
        self._send_v2({"type": "turn_finished", "turn_id": turn_id, "status": status.value})

    async def _relay(self, chunks: list[dict[str, Any]], size: int) -> None:
        # Backpressure: wait for room only while a client is attached. A detached turn keeps
        # reading so the runtime can finish and persist the answer; what no longer fits is
        # counted as lost (v2 clients are told to resync when they come back).
        while not self.outbound.has_space() and self.connection is not None:
            await self._space_ready.park()
        if not self.outbound.has_space():
            # Keep what ends the turn (small, and a client that never sees it spins forever).
            finals = [chunk for chunk in chunks if chunk.get("is_final") is not False]
            self.lost_frames += len(chunks) - len(finals)
            if not finals:
                return
            chunks = finals
        if not self._first_chunk_seen:
            self._first_chunk_seen = True
            self.manager.metrics.time_to_first_token.observe(
                trio.current_time() - self._turn_started_at
            )
        per_chunk = size // len(chunks) + 1
        outbound = self.outbound
        merged_before = outbound.merged_chunks
        for chunk in chunks:
            outbound.put_chunk(chunk, per_chunk)
        metrics = self.manager.metrics
        metrics.chunks_relayed.inc(len(chunks))
        if outbound.merged_chunks != merged_before:
            metrics.coalesced_chunks.inc(outbound.merged_chunks - merged_before)
        self._frames_ready.unpark_all()

    def _send_to(self, connection: Connection, frame: Frame) -> None:
        """Queue a v2-only frame if ``connection`` speaks v2."""
        if connection.v2:
            self.send_control(frame)

    def _send_v2(self, frame: Frame) -> None:
        # Queued while detached too: a v2 client that re-attaches learns how the turn ended.
        # The writer drops v2-only frames for v1 connections.
        if self.connection is None or self.connection.v2:
            self.send_control(frame)

    def _close_for_drain(self, *, hard: bool = False) -> None:
        # Soft: flush what is queued, then close with 1012; the session ends when the
        # connection detaches. Hard (drain timeout): close now and end the session.
        if self.connection is not None:
            code = self.close_after_turn or CloseCode.SERVICE_RESTART
            self.connection.shut(code, "server restarting", flush=not hard)
            if not hard:
                return
        self.end()

    # --- writer side -----------------------------------------------------------------------

    async def wait_frames(self, connection: Connection) -> list[Frame]:
        """Block until frames are waiting, take them all, and wake a blocked producer.

        Returns an empty list when ``connection`` was asked to close after a flush and
        everything has been taken.
        """
        while not len(self.outbound):
            if connection.flush_then_close:
                return []
            await self._frames_ready.park()
        frames = self.outbound.take_all()
        self._space_ready.unpark_all()
        return frames


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
        self.connection_count = 0
        self.pending_auth = 0  # accepted sockets still waiting for their auth frame
        self.draining = False
        self._nursery: trio.Nursery | None = None
        self._idle = trio.lowlevel.ParkingLot()
        # Gauges read at scrape time: nothing to maintain on the hot path.
        metrics.active_websockets.set_function(lambda: self.connection_count)
        metrics.active_sessions.set_function(lambda: len(self.sessions))
        metrics.outbound_queue_bytes.set_function(
            lambda: sum(s.outbound.pending_bytes for s in self.sessions.values())
        )
        # Pre-bound label children: a labels() lookup per frame would cost a lock and a dict.
        self._frames_out: dict[str, Any] = {}
        self._frames_in: dict[str, Any] = {}

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
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _forget(self, session: Session) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        self._idle.unpark_all()

    def _session_for(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            assert self._nursery is not None, "SessionManager.run() is not running"
            session = Session(session_id, self)
            self.sessions[session_id] = session
            self._nursery.start_soon(session.run)
        return session

    def refusal(self, session_id: str) -> tuple[int, str] | None:
        """Why a new connection to ``session_id`` must be refused, as (HTTP status, reason)."""
        if self.draining or self._nursery is None:
            return 503, "gateway is shutting down"
        if self.connection_count + self.pending_auth >= self.settings.max_connections:
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
    ) -> None:
        """Run a WebSocket of an authorized ``identity`` until it closes (accepting it first
        unless ``accepted``); never raises for the session's errors."""
        v2 = SUBPROTOCOL_V2 in ws.requested_subprotocols
        user_var.set(identity.sub)
        # Bound before the session's and the connection's tasks start: they inherit it.
        session_id_var.set(session_id)
        session = self._session_for(session_id)
        connection = Connection(ws, v2, identity)
        self.connection_count += 1
        try:
            # accept() yields to other tasks: the session must not end by grace meanwhile.
            session.pending_attach += 1
            try:
                if not accepted:
                    await ws.accept(SUBPROTOCOL_V2 if v2 else None)
            finally:
                session.release_pending()
            if session.scope.cancel_called or self.sessions.get(session_id) is not session:
                # It ended anyway (drain, operator): never attach to a session without a
                # turn runner. No await between here and attach.
                if self.draining:
                    connection.close_code = CloseCode.SERVICE_RESTART
                    connection.close_reason = "server restarting"
                    return
                session = self._session_for(session_id)
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
            session.attach(connection, greeting)
            self.metrics.connections_opened.inc()
            logger.info(
                "websocket connected (v2=%s, reattached=%s)",
                v2,
                reattached,
                extra={"event": "ws_connected", "protocol": "v2" if v2 else "v1"},
            )
            await self._run_connection(session, connection)
        finally:
            connection.writer_done.set()
            self.connection_count -= 1
            session.detach(connection)
            await self._finish_connection(connection)
            self._idle.unpark_all()

    async def _run_connection(self, session: Session, connection: Connection) -> None:
        try:
            async with trio.open_nursery() as guard_nursery:
                guard_nursery.start_soon(self._abort_if_stuck, connection)
                try:
                    with connection.scope:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(
                                self._reader, session, connection, nursery.cancel_scope
                            )
                            nursery.start_soon(self._writer, session, connection)
                            nursery.start_soon(self._heartbeat, session, connection)
                finally:
                    guard_nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass
        except* Exception:
            # Anything else is a bug: log it with its traceback and close with 1011 rather than
            # the normal 1000 Quart/hypercorn would send. Other sessions are unaffected.
            logger.exception("session connection failed")
            connection.close_code = CloseCode.INTERNAL_ERROR
            connection.close_reason = "internal error"

    async def _abort_if_stuck(self, connection: Connection) -> None:
        # Cancelling the connection's nursery cannot interrupt a writer blocked in hypercorn's
        # shielded send, so the nursery would never exit. This guard sits outside it: once a
        # close is requested (or the whole connection task is cancelled by the server), it
        # gives the in-flight send ws_close_timeout to finish, then aborts the transport.
        try:
            await connection.shut_requested.wait()
        finally:
            with trio.CancelScope(shield=True):
                ws = connection.ws
                with trio.move_on_after(self.settings.ws_close_timeout):
                    while ws.send_started_at is not None:
                        await ws.wait_send_finished()
                if ws.send_started_at is not None:
                    logger.warning("send still blocked after close was requested; aborting")
                    ws.abort()

    async def _finish_connection(self, connection: Connection) -> None:
        ws = connection.ws
        peer_closed = ws.closed and not ws.aborted
        # Runs while the connection task may be cancelled (server shutdown): finish() is
        # shielded and bounded, so the client still gets a proper close code.
        await ws.finish(
            connection.close_code, self.settings.ws_close_timeout, connection.close_reason
        )
        if ws.aborted:
            code = "aborted"
        elif peer_closed:
            code = str(ws.peer_closed_code or 1005)
        else:
            code = str(int(connection.close_code))
        self.metrics.connections_closed.labels(code).inc()
        logger.info(
            "websocket closed (%s by %s)",
            code,
            "client" if peer_closed else "gateway",
            extra={
                "event": "ws_closed",
                "close_code": code,
                "by": "client" if peer_closed else "gateway",
            },
        )

    async def _reader(
        self, session: Session, connection: Connection, nursery_scope: trio.CancelScope
    ) -> None:
        ws = connection.ws
        max_bytes = self.settings.ws_max_message_bytes
        try:
            while True:
                data = await ws.receive()
                if not await self._within_rate(session, connection):
                    if connection.closing:
                        return
                    continue
                if isinstance(data, bytes):
                    self.count_frame_in("binary")
                    session.send_control(
                        error_frame(
                            ErrorCode.BINARY_NOT_SUPPORTED,
                            "Binary frames are not supported; send JSON text frames",
                            is_final=False,
                        )
                    )
                elif len(data) > max_bytes and len(data.encode()) > max_bytes:
                    self.metrics.limit_hits.labels("message_size").inc()
                    connection.shut(CloseCode.MESSAGE_TOO_BIG, "message too big")
                    return
                else:
                    await self._handle_text(session, connection, data)
                if session.outbound.control_overflow():
                    self.metrics.limit_hits.labels("unread_control_frames").inc()
                    logger.warning(
                        "client leaves too many gateway frames unread; closing",
                        extra={"event": "limit_hit", "limit": "unread_control_frames"},
                    )
                    connection.shut(CloseCode.POLICY_VIOLATION, "too many unread frames")
                    return
        except ConnectionClosed:
            # shut() rather than a bare cancel: it also arms the guard, which aborts a writer
            # still blocked in a shielded send to this (half-)closed peer.
            connection.shut(connection.close_code)
            nursery_scope.cancel()

    async def _within_rate(self, session: Session, connection: Connection) -> bool:
        # Per-user token bucket on inbound messages: a refused message gets a rate_limited
        # frame; a client that keeps going past a burst's worth of refusals is closed (4429).
        if await self.security.check_message_rate(connection.identity):
            connection.rate_refusals = 0
            return True
        connection.rate_refusals += 1
        if connection.rate_refusals > self.settings.ws_message_burst:
            logger.warning(
                "client ignores the message rate limit; closing",
                extra={"event": "limit_hit", "limit": "ws_message_rate"},
            )
            connection.shut(CloseCode.RATE_LIMITED, "rate limit exceeded", flush=True)
            return False
        session.send_control(
            error_frame(
                ErrorCode.RATE_LIMITED,
                "Too many messages; this one was dropped, slow down",
                is_final=False,
            )
        )
        return False

    async def _refresh_identity(self, session: Session, connection: Connection, token: str) -> None:
        # In-band token refresh: a fresh token of the same user extends the socket's life.
        try:
            identity = await self.security.identify_token(token)
        except Refusal as refused:
            session.send_control(
                error_frame(ErrorCode.INVALID_TOKEN, refused.description, is_final=False)
            )
            return
        try:
            self.security.require_scope(identity, self.settings.write_scope)
        except Refusal as refused:
            session.send_control(
                error_frame(ErrorCode.INVALID_TOKEN, refused.description, is_final=False)
            )
            connection.shut(CloseCode.FORBIDDEN, "token lacks the write scope", flush=True)
            return
        if identity.sub != connection.identity.sub:
            session.send_control(
                error_frame(
                    ErrorCode.INVALID_TOKEN,
                    "The new token belongs to another user",
                    is_final=False,
                )
            )
            connection.shut(CloseCode.UNAUTHORIZED, "token of another user", flush=True)
            return
        connection.identity = identity
        logger.info("token refreshed in band", extra={"event": "auth_refreshed"})
        session._send_to(connection, {"type": "auth_ok", "expires_at": identity.expires_at})

    async def _handle_text(self, session: Session, connection: Connection, text: str) -> None:
        try:
            message = parse_client_frame(text)
        except FrameError as refused:
            self.count_frame_in("invalid")
            logger.info(
                "refused a client frame: %s",
                refused.code.value,
                extra={"event": "frame_refused", "code": refused.code.value},
            )
            session.send_control(error_frame(refused.code, refused.message, is_final=False))
            return
        kind = message["type"]
        self.count_frame_in(kind)
        if connection.closing and kind != "cancel":
            return  # closing (e.g. token expired): nothing new starts on this socket
        if kind in RUNTIME_BOUND_TYPES:
            if not session.submit(message):
                if session.close_after_turn is not None:
                    text = "The gateway is restarting; reconnect and send the message again"
                else:
                    self.metrics.limit_hits.labels("queued_messages").inc()
                    text = (
                        f"Too many messages waiting ({self.settings.max_queued_messages}); "
                        "wait for the current turn to finish"
                    )
                session.send_control(error_frame(ErrorCode.BUSY, text, is_final=False))
        elif kind == "cancel":
            running, dropped = session.cancel_turn()
            logger.info("client cancel (turn running=%s, dropped=%d)", running, dropped)
            if connection.v2:
                session.send_control(
                    {"type": "cancel_ack", "turn_cancelled": running, "dropped_messages": dropped}
                )
        elif kind == "auth":
            await self._refresh_identity(session, connection, message["token"])
        elif kind == "ping" and connection.v2:
            pong: Frame = {"type": "pong"}
            if "id" in message:
                pong["id"] = message["id"]
            session.send_control(pong)

    async def _writer(self, session: Session, connection: Connection) -> None:
        ws = connection.ws
        if connection.previous_writer_done is not None:
            # Bounded: the replaced connection's guard aborts a stuck send within
            # ws_close_timeout, after which its writer ends.
            await connection.previous_writer_done.wait()
        while True:
            frames = await session.wait_frames(connection)
            if not frames:
                connection.shut(connection.close_code)  # flushed: close now
                return
            if not connection.v2:
                frames = [f for f in frames if f.get("type") not in V2_ONLY_TYPES]
            for index, frame in enumerate(frames):
                frame["seq"] = session.next_seq()
                try:
                    await ws.send_text(orjson.dumps(frame).decode())
                    self.count_frame_out(frame.get("type"))
                except BaseException:
                    # Not written (cancelled at the checkpoint or the peer is gone): give the
                    # sequence number back and keep the frames for a re-attaching client.
                    session.seq -= 1
                    del frame["seq"]
                    session.outbound.requeue_front(frames[index:])
                    session._frames_ready.unpark_all()
                    raise

    async def _heartbeat(self, session: Session, connection: Connection) -> None:
        # Watches the writer from outside (its sends are shielded) and, for v2 clients, sends
        # an application heartbeat after a quiet interval. WebSocket protocol pings and
        # dead-peer detection are hypercorn's (ping interval + read timeout, see server.py).
        ws = connection.ws
        settings = self.settings
        tick = max(0.01, min(settings.ws_heartbeat_interval, settings.ws_slow_client_timeout) / 4)
        check_expiry = self.security.enabled
        while True:
            wait = tick
            if check_expiry:
                # Tokens expire on live sockets too (plus the leeway); an in-band refresh
                # moves expires_at, which this loop re-reads every round.
                remaining = connection.identity.expires_at + settings.jwt_leeway - time.time()
                if remaining <= 0:
                    logger.info("token expired on a live socket", extra={"event": "auth_expired"})
                    connection.shut(CloseCode.UNAUTHORIZED, "token expired", flush=True)
                    check_expiry = False  # keep watching the writer while it flushes
                else:
                    wait = min(wait, remaining)
            await trio.sleep(wait)
            now = trio.current_time()
            started = ws.send_started_at
            if started is not None and now - started >= settings.ws_slow_client_timeout:
                self.metrics.limit_hits.labels("slow_client").inc()
                logger.warning(
                    "client stopped reading for %.1f s; closing",
                    now - started,
                    extra={"event": "limit_hit", "limit": "slow_client"},
                )
                session.cancel_turn()
                if not ws.abort():
                    logger.error("cannot abort this transport; the slow client stays attached")
                connection.shut(CloseCode.POLICY_VIOLATION, "client too slow")
                return
            quiet = now - ws.last_send_at >= settings.ws_heartbeat_interval
            if connection.v2 and quiet and started is None and not len(session.outbound):
                session.send_control({"type": "heartbeat"})

    # --- drain -------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Refuse new sessions, close each live one with 1012 once its turn ends, and after
        ``timeout`` cancel whatever is still running. Returns when no session is left."""
        self.draining = True
        logger.info("draining %d session(s), timeout %.1f s", len(self.sessions), timeout)
        for session in list(self.sessions.values()):
            session.close_after_turn = CloseCode.SERVICE_RESTART
            session.queue.clear()
            if not session.turn_running:
                session._close_for_drain()
        with trio.move_on_after(timeout):
            while self.sessions or self.connection_count:
                await self._idle.park()
        for session in list(self.sessions.values()):
            session._close_for_drain(hard=True)
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
