"""One attached WebSocket of a session and its tasks: reader, writer, heartbeat, catch-up.

Structure (each box is a nursery; cancelling a box tears down everything inside it)::

    ASGI connection task
      └─ guard nursery .......... guard (heartbeat, then the close guard)
           └─ Connection nursery  writer; the reader is the nursery's body

Backpressure: the session's turn runner relays runtime chunks into the session's bounded
:class:`~trio_gateway.session.outbound.OutboundQueue`; only the connection's writer task touches
the socket. hypercorn sends inside a shielded scope, so a client that stops reading blocks the
writer where no timeout can reach it: the heartbeat watches ``send_started_at`` from outside
and aborts the transport after ``ws_slow_client_timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson
import trio

from ..protocol import (
    ANSWER_TYPES,
    CONNECTION_FRAME_TYPES,
    RUNTIME_BOUND_TYPES,
    V2_ONLY_TYPES,
    CloseCode,
    ErrorCode,
    FrameError,
    error_frame,
    parse_client_frame,
)
from ..security.auth import Identity
from ..security.security import RefreshRefused, user_headers
from .interfaces import ConnectionHost
from .outbound import Frame, NumberedFrame, Outgoing, ViewerBacklog
from .replay import ReplayGap
from .session import Session
from .transport import ConnectionClosed, WebSocketConnection

# Same logger as the rest of the session engine: log records do not depend on the module split.
logger = logging.getLogger("trio_gateway.session")


def _no_writer_yet() -> None:
    """``wake_writer`` until the session attaches the connection (one shared function rather
    than a lambda per socket)."""


class Connection:
    """One attached WebSocket and its tasks (reader, writer, heartbeat + close guard).

    The connection owns its tasks (:meth:`run`) and its state; its session calls the methods
    below to make it the live socket, a viewer, or replaced (``session.Socket``)."""

    # Slots: thousands of these live at once (docs/performance.md, "Idle memory").
    __slots__ = (
        "caught_up",
        "close_code",
        "close_reason",
        "closing",
        "first_frame_seen",
        "flush_then_close",
        "greeting",
        "host",
        "identity",
        "limit_key",
        "previous_writer_done",
        "rate_refusals",
        "replaced",
        "resume_decided",
        "resume_from",
        "resume_waiter",
        "scope",
        "sender_headers",
        "shut_requested",
        "skip_through",
        "v2",
        "viewer",
        "wake_writer",
        "writer_done",
        "ws",
    )

    def __init__(
        self,
        host: ConnectionHost,
        ws: WebSocketConnection,
        v2: bool,
        identity: Identity,
        limit_key: str | None = None,
    ) -> None:
        self.host = host
        self.ws = ws
        self.v2 = v2
        self.identity = identity
        # What per-user limits count this socket under (Security.limit_key).
        self.limit_key = identity.sub if limit_key is None else limit_key
        self.rate_refusals = 0  # consecutive messages refused by the rate limit
        # Who the runtime is told sent this socket's messages (the verified identity).
        self.sender_headers = user_headers(identity)
        # The connection nursery's own cancel scope once run() opened it; until then shut()
        # only sets shut_requested, which run() checks as it opens the nursery.
        self.scope: trio.CancelScope | None = None
        self.close_code: int = CloseCode.NORMAL
        self.close_reason = ""
        self.closing = False
        self.flush_then_close = False
        self.replaced = False
        self.shut_requested = trio.Event()
        self.wake_writer: Callable[[], object] = _no_writer_yet
        # Writers take turns: a replacement's writer starts only once the previous writer of
        # the session has stopped, so frames and seq numbers never interleave between them.
        self.writer_done = trio.Event()
        self.previous_writer_done: trio.Event | None = None
        # Resume (v2): the greeting goes out first; then, on a session with history, the writer
        # waits (bounded) for the client's first frame, which may be {"type":"resume"}.
        self.greeting: Frame | None = None
        self.first_frame_seen = False
        self.resume_from: int | None = None
        self.resume_decided = False
        self.resume_waiter: trio.Event | None = None  # the writer's, while it waits (rare)
        self.caught_up = False  # the writer has replayed and now sends live frames
        # Cross-replica resume on a follower: frames up to this seq reach the client through
        # the shared stream but were already delivered by the other replica.
        self.skip_through = 0
        # A v1 viewer (another window on the session, see become_viewer): the frames the
        # session's live socket numbered, waiting for this socket's writer. None otherwise.
        self.viewer: ViewerBacklog | None = None

    def shut(self, code: int, reason: str = "", *, flush: bool = False) -> None:
        """Ask the connection to close with ``code``; the connection task does the closing.

        ``flush=True`` lets the writer send every frame already queued first (a drain closes a
        session *after* its turn's last frames). The first code wins: a session ending after a
        drain must not turn 1012 into 1001; a later hard shut only stops the flush.
        """
        self._decide_resume()  # a closing socket waits for nothing
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
        if self.scope is not None:
            self.scope.cancel()

    def _decide_resume(self) -> None:
        # The client's first frame (a resume or not) or a close ends the writer's wait.
        self.resume_decided = True
        if self.resume_waiter is not None:
            self.resume_waiter.set()

    @property
    def ping_due(self) -> bool:
        """The guard asked for a protocol ping that the writer has not sent yet."""
        return self.ws.ping_due

    @property
    def _ping_tick(self) -> float:
        # How soon an owed ping goes out while the writer waits (the guard's own tick).
        return self.host.settings.ws_heartbeat_interval / 4

    def set_close(self, code: int, reason: str) -> None:
        """Decide the close code of a connection that never ran (refused after the accept)."""
        self.close_code = code
        self.close_reason = reason

    def replace(self, reason: str) -> None:
        """Close with 4409: a newer socket (here or on another replica) took the session."""
        self.replaced = True
        self.shut(CloseCode.SESSION_REPLACED, reason)

    # --- what the session makes of this socket (Session.attach / detach) -----------------

    def become_live(
        self,
        wake: Callable[[], object],
        greeting: Frame | None,
        previous_writer_done: trio.Event | None,
    ) -> None:
        """Attached as the session's live socket, replacing the socket whose writer sets
        ``previous_writer_done`` (this writer starts once that one stopped). ``greeting``
        (v2) goes out before anything else."""
        self.previous_writer_done = previous_writer_done
        self.wake_writer = wake
        self.greeting = greeting

    def become_viewer(self, wake: Callable[[], object]) -> None:
        """Attached as a viewer beside the live socket (another IDE window)."""
        self.wake_writer = wake
        self.caught_up = True  # a viewer sees the session from now on
        # Decided here: it may be promoted before its writer runs.
        self.viewer = ViewerBacklog()

    def promote(self, previous_writer_done: trio.Event) -> None:
        """A viewer takes over from the live socket, which left. Its writer sends its
        backlog, waits for the previous writer to stop (``previous_writer_done``: it may be
        numbering a last batch, which it also hands to the viewers), then numbers frames
        itself."""
        self.previous_writer_done = previous_writer_done

    def add_to_backlog(self, text: str, limit: int) -> bool:
        """As a viewer, keep a frame the live socket numbered for this socket's writer;
        False when the backlog went over ``limit`` bytes (the caller closes the viewer)."""
        assert self.viewer is not None, "only viewers get frames numbered elsewhere"
        return self.viewer.add(text, limit)

    async def _wait_backlog(self, session: Session, backlog: ViewerBacklog) -> list[str] | None:
        # A viewer's next frames (everything in its backlog), or None once it is no longer a
        # viewer (promoted: it then numbers frames itself) and its backlog is empty, or when
        # it should close after a flush.
        while True:
            await self.ws.send_ping_if_due()  # also between batches: a busy viewer is pinged
            if not backlog.empty:
                return backlog.take_all()
            if self.flush_then_close or self is session.connection:
                return None
            if not self.ping_due:
                await session.frames_ready.park()

    # --- the connection's tasks ----------------------------------------------------------------

    async def run(self, session: Session) -> None:
        """Run this socket's reader, writer and guard (heartbeat + close guard) against
        ``session`` until the connection closes; never raises for the session's errors."""
        try:
            async with trio.open_nursery() as guard_nursery:
                guard_nursery.start_soon(self._guard, session)
                try:
                    async with trio.open_nursery() as nursery:
                        # shut() cancels the nursery's own scope (one scope less per idle
                        # socket than a scope of its own around the nursery).
                        self.scope = nursery.cancel_scope
                        if self.shut_requested.is_set():
                            nursery.cancel_scope.cancel()
                        nursery.start_soon(self._writer, session)
                        # The reader is the nursery's body rather than a task of its own
                        # (one task less per idle socket); it ends, fails and is
                        # cancelled exactly as a sibling of the writer would be.
                        await self._reader(session, nursery.cancel_scope)
                finally:
                    guard_nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass
        except* Exception:
            # Anything else is a bug: log it with its traceback and close with 1011 rather than
            # the normal 1000 Quart/hypercorn would send. Other sessions are unaffected.
            logger.exception("session connection failed")
            self.close_code = CloseCode.INTERNAL_ERROR
            self.close_reason = "internal error"

    async def _guard(self, session: Session) -> None:
        # The connection's heartbeat, then its close guard: one task (and one coroutine frame)
        # per socket.
        # Heartbeat: watches the writer from outside (its sends are shielded), asks it for a
        # protocol ping every interval and, for v2 clients, sends an application heartbeat
        # after a quiet interval. Dead-peer detection is hypercorn's read timeout (see
        # server.py): the peer's pongs keep a quiet live socket open. It stops at the close
        # request that cancels the connection's nursery.
        # Close guard: cancelling the connection's nursery cannot interrupt a writer blocked in
        # hypercorn's shielded send, so the nursery would never exit. This task sits outside
        # it: once a close is requested (or the whole connection task is cancelled by the
        # server), it gives the in-flight send ws_close_timeout to finish, then aborts the
        # transport.
        ws = self.ws
        settings = self.host.settings
        tick = max(0.01, min(settings.ws_heartbeat_interval, settings.ws_slow_client_timeout) / 4)
        check_expiry = self.host.security.enabled
        pinged_at = trio.current_time()
        try:
            while True:
                wait = tick
                if check_expiry:
                    # Tokens expire on live sockets too (plus the leeway); an in-band refresh
                    # moves expires_at, which this loop re-reads every round.
                    remaining = self.identity.expires_at + settings.jwt_leeway - time.time()
                    if remaining <= 0:
                        logger.info(
                            "token expired on a live socket", extra={"event": "auth_expired"}
                        )
                        self.shut(CloseCode.UNAUTHORIZED, "token expired", flush=True)
                        check_expiry = False  # keep watching the writer while it flushes
                    else:
                        wait = min(wait, remaining)
                with trio.move_on_after(wait):
                    await self.shut_requested.wait()
                now = trio.current_time()
                if self.shut_requested.is_set() or self._stopped_reading(session, now):
                    break
                if now - pinged_at >= settings.ws_heartbeat_interval:
                    pinged_at = now
                    self.ws.ask_ping()
                    self.wake_writer()
                quiet = now - ws.last_send_at >= settings.ws_heartbeat_interval
                if self.v2 and quiet and ws.send_started_at is None and not len(session.outbound):
                    session.send_control({"type": "heartbeat"})
            await self.shut_requested.wait()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(settings.ws_close_timeout):
                    while ws.send_started_at is not None:
                        await ws.wait_send_finished()
                if ws.send_started_at is not None:
                    logger.warning("send still blocked after close was requested; aborting")
                    ws.abort()

    def _stopped_reading(self, session: Session, now: float) -> bool:
        # The slow-client watchdog: one send blocked for ws_slow_client_timeout closes the
        # socket (aborting the transport, which is what ends hypercorn's shielded send).
        started = self.ws.send_started_at
        if started is None or now - started < self.host.settings.ws_slow_client_timeout:
            return False
        self.host.metrics.limit_hits.labels("slow_client").inc()
        logger.warning(
            "client stopped reading for %.1f s; closing",
            now - started,
            extra={"event": "limit_hit", "limit": "slow_client"},
        )
        if self is session.connection:  # a stalled viewer holds nobody up
            session.cancel_turn()
        if not self.ws.abort():
            logger.error("cannot abort this transport; the slow client stays attached")
        self.shut(CloseCode.POLICY_VIOLATION, "client too slow")
        return True

    async def finish(self) -> None:
        """Close the socket with the code decided (shielded and bounded) and log it."""
        ws = self.ws
        peer_closed = ws.closed and not ws.aborted
        # Runs while the connection task may be cancelled (server shutdown): finish() is
        # shielded and bounded, so the client still gets a proper close code.
        await ws.finish(self.close_code, self.host.settings.ws_close_timeout, self.close_reason)
        if ws.aborted:
            code = "aborted"
        elif peer_closed:
            code = str(ws.peer_closed_code or 1005)
        else:
            code = str(int(self.close_code))
        self.host.metrics.connections_closed.labels(code).inc()
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

    async def _reader(self, session: Session, nursery_scope: trio.CancelScope) -> None:
        ws = self.ws
        max_bytes = self.host.settings.ws_max_message_bytes
        try:
            while True:
                data = await ws.receive()
                if not self.first_frame_seen and self._first_frame_resumes(session, data):
                    continue
                if not await self._within_rate(session):
                    if self.closing:
                        return
                    continue
                if isinstance(data, bytes):
                    self.host.count_frame_in("binary")
                    session.send_control(
                        error_frame(
                            ErrorCode.BINARY_NOT_SUPPORTED,
                            "Binary frames are not supported; send JSON text frames",
                            is_final=False,
                        )
                    )
                elif len(data) > max_bytes and len(data.encode()) > max_bytes:
                    self.host.metrics.limit_hits.labels("message_size").inc()
                    self.shut(CloseCode.MESSAGE_TOO_BIG, "message too big")
                    return
                else:
                    await self._handle_text(session, data)
                if session.outbound.control_overflow():
                    self.host.metrics.limit_hits.labels("unread_control_frames").inc()
                    logger.warning(
                        "client leaves too many gateway frames unread; closing",
                        extra={"event": "limit_hit", "limit": "unread_control_frames"},
                    )
                    self.shut(CloseCode.POLICY_VIOLATION, "too many unread frames")
                    return
        except ConnectionClosed:
            # shut() rather than a bare cancel: it also arms the guard, which aborts a writer
            # still blocked in a shielded send to this (half-)closed peer.
            self.shut(self.close_code)
            nursery_scope.cancel()

    async def _within_rate(self, session: Session) -> bool:
        # Per-user token bucket on inbound messages: a refused message gets a rate_limited
        # frame; a client that keeps going past a burst's worth of refusals is closed (4429).
        if await self.host.security.check_message_rate(self.identity, self.limit_key):
            self.rate_refusals = 0
            return True
        self.rate_refusals += 1
        if self.rate_refusals > self.host.settings.ws_message_burst:
            logger.warning(
                "client ignores the message rate limit; closing",
                extra={"event": "limit_hit", "limit": "ws_message_rate"},
            )
            self.shut(CloseCode.RATE_LIMITED, "rate limit exceeded", flush=True)
            return False
        session.send_control(
            error_frame(
                ErrorCode.RATE_LIMITED,
                "Too many messages; this one was dropped, slow down",
                is_final=False,
            )
        )
        return False

    async def _refresh_identity(self, session: Session, token: str) -> None:
        # In-band token refresh: a fresh token of the same user extends the socket's life.
        try:
            identity = await self.host.security.refreshed_identity(self.identity, token)
        except RefreshRefused as refused:
            session.send_control(
                error_frame(ErrorCode.INVALID_TOKEN, refused.description, is_final=False)
            )
            if refused.close is not None:
                self.shut(*refused.close, flush=True)
            return
        self.identity = identity
        self.sender_headers = user_headers(identity)
        logger.info("token refreshed in band", extra={"event": "auth_refreshed"})
        if self.v2:
            session.send_control({"type": "auth_ok", "expires_at": identity.expires_at})

    def _first_frame_resumes(self, session: Session, data: str | bytes) -> bool:
        # The first frame decides whether the writer replays. A resume is handled here, before
        # the message rate limit: it costs no runtime call, there is one per self, and a
        # client reconnecting through a flaky network must not lose its replay to the limiter.
        # Any other first frame ends the writer's wait and takes the normal path.
        self.first_frame_seen = True
        if isinstance(data, str) and len(data) <= 1024 and "resume" in data:
            try:
                message = parse_client_frame(data)
            except FrameError:
                message = {}
            if message.get("type") == "resume":
                self.host.count_frame_in("resume")
                self._handle_resume(session, message["last_seq"], first=True)
                return True
        self._decide_resume()
        return False

    def _handle_resume(self, session: Session, last_seq: int, *, first: bool) -> None:
        if not self.v2:
            text = "resume needs protocol v2 (subprotocol codelab.v2)"
        elif not first:
            text = "resume is accepted only as the first frame of a connection"
        else:
            self.resume_from = last_seq
            self._decide_resume()
            if self.caught_up:
                self._late_resume(session, last_seq)
            return
        self._decide_resume()
        session.send_control(error_frame(ErrorCode.INVALID_MESSAGE, text, is_final=False))

    async def _handle_text(self, session: Session, text: str) -> None:
        try:
            message = parse_client_frame(text)
        except FrameError as refused:
            self.host.count_frame_in("invalid")
            logger.info(
                "refused a client frame: %s",
                refused.code.value,
                extra={"event": "frame_refused", "code": refused.code.value},
            )
            session.send_control(error_frame(refused.code, refused.message, is_final=False))
            return
        kind = message["type"]
        self.host.count_frame_in(kind)
        if kind == "resume":
            self._handle_resume(session, message["last_seq"], first=False)
            return
        if self.closing and kind != "cancel":
            return  # closing (e.g. token expired): nothing new starts on this socket
        if kind in RUNTIME_BOUND_TYPES:
            call_id = message.get("call_id") if kind in ANSWER_TYPES else None
            if call_id is not None and session.approvals.already_answered(kind, call_id):
                session.send_control(
                    error_frame(
                        ErrorCode.ALREADY_ANSWERED,
                        f"Tool call '{call_id[:64]}' was already answered; this "
                        f"{kind} was not forwarded",
                        is_final=False,
                        call_id=call_id,
                    )
                )
                return
            if session.submit(message, self.sender_headers):
                if call_id is not None:
                    session.approvals.record_answer(kind, call_id)
            else:
                if session.close_after_turn is not None:
                    text = "The gateway is restarting; reconnect and send the message again"
                else:
                    self.host.metrics.limit_hits.labels("queued_messages").inc()
                    text = (
                        f"Too many messages waiting ({self.host.settings.max_queued_messages}); "
                        "wait for the current turn to finish"
                    )
                session.send_control(error_frame(ErrorCode.BUSY, text, is_final=False))
        elif kind == "cancel":
            running, dropped = session.cancel_turn()
            logger.info("client cancel (turn running=%s, dropped=%d)", running, dropped)
            if self.v2:
                session.send_control(
                    {"type": "cancel_ack", "turn_cancelled": running, "dropped_messages": dropped}
                )
        elif kind == "auth":
            await self._refresh_identity(session, message["token"])
        elif kind == "ping" and self.v2:
            pong: Frame = {"type": "pong"}
            if "id" in message:
                pong["id"] = message["id"]
            session.send_control(pong)

    async def _writer(self, session: Session) -> None:
        viewed = self.viewer
        if viewed is not None:
            # A viewer: send what the live socket numbers until this one takes over.
            while (texts := await self._wait_backlog(session, viewed)) is not None:
                await self.ws.send_texts(texts, self._count_viewed)
            if self is not session.connection:  # closing as a viewer
                self.shut(self.close_code)
                return
        if self.previous_writer_done is not None:
            # Bounded: the replaced connection's guard aborts a stuck send within
            # ws_close_timeout, after which its writer ends.
            await self.ws.pinging_while(self.previous_writer_done.wait, self._ping_tick)
        if viewed is not None:
            # Promoted: the old live socket's last batch is in the backlog too (frames reach
            # viewers as they are numbered), so nothing numbered is missing or sent twice.
            if not viewed.empty:
                await self.ws.send_texts(viewed.take_all(), self._count_viewed)
            session.replay.delivered(session.seq)
        else:
            await self._catch_up(session)
        while True:
            frames = await session.wait_frames(self)
            if frames:
                # No ping here: frames taken but not yet numbered would be lost if the ping's
                # checkpoint were cancelled. send_texts pings before their first write, when
                # they are already in the replay buffer.
                await self._send_frames(session, frames)
                continue
            await self.ws.send_ping_if_due()
            if not self.flush_then_close or len(session.outbound):
                continue  # a ping only, or frames queued while it was sent
            if session.close_after_turn is not None:
                # A drain: the viewers close once they have what this socket had.
                for viewer in session.viewers:
                    viewer.shut(self.close_code, self.close_reason, flush=True)
                session.frames_ready.unpark_all()
            self.shut(self.close_code)  # flushed: close now
            return

    def _count_viewed(self, _index: int) -> None:
        self.host.count_frame_out("viewed")

    async def _send_frames(self, session: Session, frames: list[Outgoing]) -> None:
        # Number, encode and record every frame of the batch *before* the first write: if the
        # socket fails half-way (or this task is cancelled at a checkpoint), the rest are in
        # the replay buffer as undelivered and the next connection of the session gets them.
        replay = session.replay
        now = trio.current_time()
        v2 = self.v2
        batch: list[tuple[int, str, object]] = []
        for frame in frames:
            if isinstance(frame, NumberedFrame):
                # Another replica numbered it (we follow its shared stream): it keeps its seq.
                kind = frame.kind
                if not v2 and kind in V2_ONLY_TYPES:
                    # Numbered elsewhere: keep the seq line unbroken.
                    replay.delivered(session.number(frame, now)[0])
                    continue
                seq, text = session.number(frame, now)
                # The shared stream jumped (a failed append): say so before the next frame,
                # never a silent gap. v1 clients cannot resync; they reload history anyway
                # (the loss is taken, and forgotten, for them too).
                if session.take_lost_frames() and v2:
                    resync = {"type": "resync_required", "reason": "frames_lost"}
                    batch.append((0, orjson.dumps(resync).decode(), "resync_required"))
            else:
                kind = frame.get("type")
                if not v2 and kind in V2_ONLY_TYPES:
                    continue
                if kind in CONNECTION_FRAME_TYPES:
                    batch.append((0, orjson.dumps(frame).decode(), kind))
                    continue
                seq, text = session.number(frame, now)
            if seq <= self.skip_through:
                replay.delivered(seq)  # the client has it from the other replica
                continue
            if session.viewers:
                session.to_viewers(text)
            batch.append((seq, text, kind))
        if session.viewers:
            session.frames_ready.unpark_all()
        if not batch:
            return

        def sent(index: int) -> None:
            # Marked one by one: a socket failing half-way leaves the rest undelivered (and
            # replayed on resume), never a frame both sent and replayed.
            seq, _, kind = batch[index]
            if seq:
                replay.delivered(seq)
            self.host.count_frame_out(kind)

        await self.ws.send_texts([text for _, text, _ in batch], sent)

    async def _send_direct(self, frame: Frame) -> None:
        """Send a connection frame (no seq, never replayed) ahead of the session's frames."""
        await self.ws.send_text(orjson.dumps(frame).decode())
        self.host.count_frame_out(frame.get("type"))

    async def _catch_up(self, session: Session) -> None:
        # Runs once per self, before live frames: greeting, then what the client missed.
        # Exact replay or an explicit resync, never a silent gap (docs/protocol.md "Resume").
        ws = self.ws
        if self.greeting is not None:
            self.greeting["last_seq"] = session.seq
            await self._send_direct(self.greeting)
            # A session with history: let the client say where it stopped first. Any first
            # frame, a close, or resume_wait_seconds end the wait. A follower has history even
            # at seq 0: the replica running the session may have sent frames that are not in
            # the shared stream yet.
            history = session.seq or len(session.outbound) or session.busy
            if (history or session.lease.following) and not self.resume_decided:
                self.resume_waiter = trio.Event()
                with trio.move_on_after(self.host.settings.resume_wait_seconds):
                    await self.ws.pinging_while(self.resume_waiter.wait, self._ping_tick)
        now = trio.current_time()
        resume_from = self.resume_from
        replay = (
            session.replay.undelivered(now)
            if resume_from is None
            else session.replay.since(resume_from, now)
        )
        if isinstance(replay, ReplayGap) and resume_from is not None:
            # Frames this replica does not hold may be in the shared stream (replicas.py).
            wait = self.host.settings.resume_wait_seconds
            replay, self.skip_through = await self.ws.pinging_while(
                lambda: session.lease.replay_after(resume_from, replay, wait), self._ping_tick
            )
        gap: str | None = replay.value if isinstance(replay, ReplayGap) else None
        frames = [] if isinstance(replay, ReplayGap) else replay
        lost = session.take_lost_frames()
        if lost:
            logger.warning("%d frame(s) of a detached turn did not fit the buffer", lost)
            gap = "frames_dropped_while_detached"  # the numbered frames before it still count
        for seq, text in frames:
            await ws.send_text(text)
            session.replay.delivered(seq)
            self.host.count_frame_out("replayed")
        self.caught_up = True
        if not self.v2:
            return  # v1 clients reload history on reconnect (no resync frame for them)
        if gap is not None:
            logger.info("client must resync: %s", gap, extra={"event": "resync", "reason": gap})
            self.host.metrics.resumes.labels("resync").inc()
            await self._send_direct({"type": "resync_required", "reason": gap})
            # What a client reloading history may still have to answer comes first.
            session.requeue_pending_approvals()
        elif resume_from is not None:
            self.host.metrics.resumes.labels("exact").inc()
            logger.info(
                "resumed after seq %d (%d frame(s) replayed)",
                resume_from,
                len(frames),
                extra={"event": "resumed", "replayed": len(frames)},
            )
            resumed = {"type": "resumed", "from_seq": resume_from + 1, "replayed": len(frames)}
            await self._send_direct(resumed)

    def _late_resume(self, session: Session, last_seq: int) -> None:
        # The writer did not wait (the session had no history when the socket attached), so
        # nothing numbered has been sent on this socket: only "nothing to replay" is exact.
        if last_seq == session.seq and not len(session.outbound):
            self.host.metrics.resumes.labels("exact").inc()
            session.send_control({"type": "resumed", "from_seq": last_seq + 1, "replayed": 0})
        else:
            self.host.metrics.resumes.labels("resync").inc()
            session.send_control({"type": "resync_required", "reason": ReplayGap.UNKNOWN_SEQ})
