"""One session: its turns, their numbering, approvals, and its attached sockets.

Structure (each box is a nursery; cancelling a box tears down everything inside it)::

    SessionManager nursery (app lifetime)                         manager.py
      └─ Session nursery ........ grace timer, turn runner,       here
                                  lease tasks (replicas.py)       (lives through reconnects)
    ASGI connection task
      └─ Connection nursery ..... reader, writer, guard           connection.py (one per socket)

A session outlives its connection for ``session_grace_seconds`` so that a turn running when the
client dropped can finish (the runtime persists the answer) and a client reconnecting within the
grace period re-attaches to the live turn. Cancelling a session's nursery cancels its turn (the
runtime HTTP request is closed) and closes its attached connection.

The turn runner relays runtime chunks into the session's bounded
:class:`~trio_gateway.session.outbound.OutboundQueue`; only a connection's writer touches the
socket. With several replicas the session's lease (replicas.py) follows, takes over and hands
off; with one, the lease is a shared one that does nothing. A session works against
:class:`~.interfaces.Socket` and :class:`SessionHost`, so it imports neither connection.py nor
manager.py.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import orjson
import trio

from ..observability import Metrics
from ..protocol import CloseCode, ErrorCode, TurnStatus, error_frame
from ..settings import Settings
from ..upstream.runtime_client import RuntimeClient, RuntimeFailure
from .approvals import ApprovalBook
from .detached import DetachedBudget
from .interfaces import Socket
from .outbound import Frame, NumberedFrame, OutboundQueue, Outgoing
from .replay import ReplayBuffer
from .replicas import Lease
from .turn_queue import TurnQueue

logger = logging.getLogger("trio_gateway.session")

# v1 sockets of one user on one session (the IDE's windows): the live one plus viewers. A
# socket beyond this closes the oldest viewer (4409), as a second socket did before viewers.
MAX_SOCKETS_PER_SESSION = 8


class SessionHost(Protocol):
    """What a session needs of the app (``manager.SessionManager`` is one)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def runtime(self) -> RuntimeClient: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def detached(self) -> DetachedBudget: ...

    def lease_for(self, session: Session) -> Lease: ...
    def session_ended(self, session: Session) -> None: ...


class Session:
    """State and turn runner of one ``session_id``; see the module docstring for lifetimes."""

    # Slots: thousands of these live at once (docs/performance.md, "Idle memory").
    __slots__ = (
        "_attachment_changed",
        "_final_seen",
        "_first_chunk_seen",
        "_messages_ready",
        "_nursery",
        "_space_ready",
        "_turn_started_at",
        "approvals",
        "close_after_turn",
        "connection",
        "detached_charge",
        "ending",
        "finished",
        "frames_ready",
        "host",
        "id",
        "lease",
        "limit_key",
        "lost_frames",
        "outbound",
        "pending_attach",
        "queue",
        "replay",
        "scope",
        "seq",
        "settings",
        "turn_count",
        "turn_scope",
        "viewers",
    )

    def __init__(self, session_id: str, host: SessionHost, limit_key: str = "") -> None:
        self.id = session_id
        self.host = host
        # The per-user limit key of the connection that opened the session: its live-session
        # slot and its detached bytes are counted there for the session's whole life.
        self.limit_key = limit_key
        # Relayed bytes of the outbound queue charged to the user's detached budget (only
        # while no client is attached; see hold_detached).
        self.detached_charge = 0
        settings = host.settings
        self.settings = settings
        # Each message with the identity headers of the socket that sent it (X-User-ID and
        # X-User-Scopes go to the runtime with its turn, as the REST proxy sends them).
        self.queue: TurnQueue[tuple[dict[str, Any], dict[str, str]]] = TurnQueue(
            settings.max_queued_messages
        )
        self.outbound = OutboundQueue(
            settings.outbound_queue_max_bytes, settings.max_pending_control_frames
        )
        self.seq = 0
        self.replay = ReplayBuffer(
            settings.replay_max_frames,
            settings.replay_max_bytes,
            max(settings.session_grace_seconds, settings.resume_wait_seconds),
        )
        self.approvals = ApprovalBook()  # pending requests, forwarded answers
        self.turn_count = 0
        # Where the session runs when replicas share state (replicas.py); with one replica
        # the manager's one do-nothing lease, shared by every session.
        self.lease: Lease = host.lease_for(self)
        self.connection: Socket | None = None
        self.viewers: list[Socket] = []  # v1 windows beside the live socket; see attach
        # The session nursery's own cancel scope once run() opened it (one scope, not two, per
        # idle session); ``ending`` records an end() that came before that.
        self.scope: trio.CancelScope | None = None
        self.ending = False
        self.turn_scope: trio.CancelScope | None = None
        self.lost_frames = 0
        self.pending_attach = 0  # connections accepted but not attached yet
        self.close_after_turn: int | None = None
        self._turn_started_at = 0.0
        self._first_chunk_seen = False
        self._final_seen = False
        self.finished = trio.Event()
        self._nursery: trio.Nursery | None = None  # the session's, while it takes new tasks
        # Wake-ups. ParkingLots rather than Events: no object churn on the hot path.
        # frames_ready: frames were queued or the attachment changed (the writer, or the
        # hand-off pump, looks again; public: the lease in replicas.py pumps frames with it);
        # space_ready: the queue was emptied or the client left (a producer over the byte
        # budget looks again: wait_for_space / space_freed), created by the first producer
        # that waits, as most sessions never fill their queue.
        self.frames_ready = trio.lowlevel.ParkingLot()
        self._space_ready: trio.lowlevel.ParkingLot | None = None
        # Created with the turn runner (its only waiter): a session without turns has none.
        self._messages_ready: trio.lowlevel.ParkingLot | None = None
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

    @property
    def attached(self) -> bool:
        """Whether a client's socket is attached here."""
        return self.connection is not None

    def continue_after(self, seq: int) -> None:
        """Number the next frame after ``seq`` (earlier frames of this session were numbered
        by another replica); nothing happens when numbering is already past it."""
        if seq > self.seq:
            self.seq = seq
            self.replay.restart_at(seq)

    def next_seq(self) -> int:
        """Allocate the next per-session frame sequence number."""
        self.seq += 1
        return self.seq

    def number(self, frame: Outgoing, now: float) -> tuple[int, str]:
        """Give ``frame`` the next seq, encode it, record it for replay (and for the other
        replicas); returns (seq, text). A :class:`NumberedFrame` relayed from another
        replica's stream keeps the seq it already has."""
        if isinstance(frame, NumberedFrame):
            seq, text = frame.seq, frame.text
            if seq != self.seq + 1:
                # A gap in the shared stream (trimmed, or a publish failed): never hide it.
                logger.warning("shared stream jumped from seq %d to %d", self.seq, seq)
                self.replay.restart_at(seq - 1)
                self.lost_frames += 1
            self.seq = seq
            self.replay.append(seq, text, now)
            return seq, text
        seq = self.next_seq()
        frame["seq"] = seq
        text = orjson.dumps(frame).decode()
        self.replay.append(seq, text, now)
        self.lease.publish(seq, text)
        return seq, text

    # --- lifetime --------------------------------------------------------------------------

    async def run(self) -> None:
        """Body of the session's nursery; returns when the session ends."""
        try:
            async with trio.open_nursery() as nursery:
                # Memory: an idle session is one task, not three (each trio task costs a few
                # KiB). The grace timer runs as the nursery's body, and the turn runner starts
                # with the first message (see _start_turn_runner). Either way the nursery ends
                # when the grace timer ends the session, and an error in either cancels the
                # other, as sibling tasks did. end() cancels the nursery's own scope.
                self.scope = nursery.cancel_scope
                if self.ending:  # ended before this task first ran
                    nursery.cancel_scope.cancel()
                self._nursery = nursery
                if len(self.queue):  # submitted before this task first ran
                    self._start_turn_runner()
                self.lease.start(nursery)
                try:
                    await self._grace_timer()
                finally:
                    self._nursery = None  # closed to new tasks from here on
        except* Exception:
            # A bug in one session must not take the manager's nursery (every session) down.
            logger.exception("session %s failed", self.id)
            for connection in self.sockets():
                connection.shut(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            await self.lease.let_go()
            self.outbound.drop_all()
            self.release_detached()
            dropped = self.queue.clear()
            if dropped:
                logger.info("session ended with %d queued message(s) dropped", dropped)
            for connection in self.sockets():
                connection.shut(CloseCode.GOING_AWAY, "session ended")
            self.host.session_ended(self)
            self.finished.set()
            logger.debug("session %s ended", self.id)

    def end(self) -> None:
        """Cancel the session: its turn, its queue and its connection."""
        self.ending = True
        if self.scope is not None:
            self.scope.cancel()

    def sockets(self) -> list[Socket]:
        """The live socket (if any) and its viewers."""
        live = [] if self.connection is None else [self.connection]
        return live + self.viewers

    # --- several replicas (lease, follow, hand-off: replicas.py) ----------------------------

    def maybe_hand_off(self) -> None:
        """End a handed-off session once it is idle (its lease goes to the new replica)."""
        if (
            self.lease.handoff
            and self.connection is None
            and not self.busy
            and not len(self.outbound)
        ):
            self.end()

    def moved_away(self) -> None:
        """Another replica now serves this session's client (its sockets here are closed).
        If we run the session, finish its turn there (frames go to the shared stream) and
        let go; a follower has nothing to relay and ends."""
        if self.lease.hand_off():
            self.frames_ready.unpark_all()
            self.maybe_hand_off()
        else:
            self.end()

    async def _grace_timer(self) -> None:
        # Ends the session once it has been without a connection for the grace period.
        while True:
            while not self._unattended():
                await self._attachment_changed.park()
            if self.settings.session_grace_seconds <= 0 or self._nothing_to_resume():
                self.end()
                return
            with trio.move_on_after(self.settings.session_grace_seconds) as waited:
                while self._unattended():
                    await self._attachment_changed.park()
            if waited.cancelled_caught:
                if self.turn_running:
                    logger.info("grace period over; cancelling the detached turn")
                self.end()
                return

    def _unattended(self) -> bool:
        # A connection between accept and attach counts as present (no race at the deadline).
        # A method rather than a closure in the timer: no function object per idle session.
        return self.connection is None and not self.pending_attach

    def _nothing_to_resume(self) -> bool:
        # A session that never ran a turn holds nothing a returning client could want (its
        # queued messages were dropped when the client left): it ends with its connection
        # instead of holding a live-session slot for the grace period. Otherwise opening
        # and closing sockets fills MAX_SESSIONS with empty sessions. A follower relays
        # another replica's turns (its turn_count stays 0), and with replicas a session may
        # have history in the shared stream (its seq starts there): those keep their grace.
        return (
            self.turn_count == 0
            and not self.turn_running
            and not self.lease.following
            and (not self.lease.shared or self.seq == 0)
        )

    def expect_attach(self) -> None:
        """A connection was accepted for this session and will attach (or give up: then
        :meth:`release_pending`); meanwhile the session does not end by grace."""
        self.pending_attach += 1

    def release_pending(self) -> None:
        """A connection counted in ``pending_attach`` attached or gave up."""
        self.pending_attach -= 1
        self._attachment_changed.unpark_all()

    def attach(self, connection: Socket, greeting: Frame | None = None) -> bool:
        """Make ``connection`` the session's live socket, replacing any previous one, or add
        it as a viewer; returns True for a viewer.

        A v1 socket of the same user as a live v1 socket becomes a viewer (the IDE opens one
        session in two windows): it gets every numbered frame the live socket gets, in the
        same order with the same ``seq``, and its messages join the session's one queue. Any
        other newcomer replaces the live socket and its viewers (4409): a v2 client resuming
        takes the session over.

        ``greeting`` (v2 ``session_ready``) goes out before anything else; the connection's
        writer then replays what the client missed (see ``Connection._catch_up``).
        """
        previous = self.connection
        if (
            previous is not None
            and not previous.v2
            and not connection.v2
            and not previous.closing
            and previous.identity.sub == connection.identity.sub
        ):
            if len(self.viewers) + 1 >= MAX_SOCKETS_PER_SESSION:
                self.viewers.pop(0).replace("replaced by a newer window")
            self.viewers.append(connection)
            connection.become_viewer(self.frames_ready.unpark_all)
            self._attachment_changed.unpark_all()
            return True
        if previous is not None:
            previous.replace("replaced by a newer connection")
        for viewer in self.viewers:
            viewer.replace("replaced by a newer connection")
        self.viewers.clear()
        self.connection = connection
        self.lease.came_back()  # the client came back here
        # A client reads the queue again: the per-session budget and backpressure bound it.
        self.release_detached()
        # Writers take turns: this one starts once the replaced socket's writer stopped.
        connection.become_live(
            self.frames_ready.unpark_all,
            greeting,
            None if previous is None else previous.writer_done,
        )
        self._attachment_changed.unpark_all()
        self.frames_ready.unpark_all()
        return False

    def detach(self, connection: Socket) -> None:
        """Forget ``connection``. When the live socket leaves, its oldest viewer takes over
        (nothing is dropped); when the last one leaves, queued messages are dropped."""
        if connection in self.viewers:
            self.viewers.remove(connection)
            self._attachment_changed.unpark_all()
            return
        if self.connection is not connection:
            return
        if self.viewers:
            promoted = self.viewers.pop(0)
            # Its writer sends its backlog, waits for this writer to stop (it may be numbering
            # a last batch, which it also hands to the viewers), then numbers frames itself.
            promoted.promote(connection.writer_done)
            self.connection = promoted
            if self.close_after_turn is not None and not self.turn_running:
                promoted.shut(self.close_after_turn, "server restarting", flush=True)
            self._attachment_changed.unpark_all()
            self.frames_ready.unpark_all()
            return
        self.connection = None
        dropped = self.queue.clear()
        if dropped:
            logger.info("client gone; dropped %d queued message(s)", dropped)
        self._charge_queue_on_detach()
        self._attachment_changed.unpark_all()
        self.space_freed()
        self.frames_ready.unpark_all()  # the pump takes over when handed off
        if self.close_after_turn is not None and not self.turn_running:
            self.end()  # drained: nothing left to wait for
        self.maybe_hand_off()

    # --- detached bytes (a per-user budget; see detached.py) ------------------------------------

    def hold_detached(self, size: int) -> bool:
        """Whether ``size`` more relayed bytes may wait in the queue of this detached session
        within the user's detached budget (charged if so). The caller checks the per-session
        budget first where it applies."""
        host = self.host
        if not host.detached.try_charge(self.limit_key, size):
            host.metrics.limit_hits.labels("detached_bytes_per_user").inc()
            return False
        self.detached_charge += size
        return True

    def release_detached(self) -> None:
        """Give the user's detached budget back what this session holds (a client attached,
        the queue was handed on, or the session ended)."""
        if self.detached_charge:
            self.host.detached.release(self.limit_key, self.detached_charge)
            self.detached_charge = 0

    def _charge_queue_on_detach(self) -> None:
        # What the client left unread now waits for a reconnect: it counts against the
        # user's detached budget like frames relayed later. If it does not fit, all of it
        # goes (a partial replay is no use: the client must resync either way).
        pending = self.outbound.pending_bytes
        if not pending or self.hold_detached(pending):
            return
        dropped, final = self.outbound.drop_relayed()
        self.lost_frames += dropped
        if final:
            self._stand_in_final()
        self.space_freed()

    def take_lost_frames(self) -> int:
        """How many frames were lost since the last call (the caller tells the client)."""
        lost, self.lost_frames = self.lost_frames, 0
        return lost

    def _stand_in_final(self) -> None:
        # The turn's last frame did not fit: the client still has to learn that the turn
        # ended (a v1 client that re-attached waits for is_final), so a small error frame
        # takes its place. The v2 resync tells where to find the full answer.
        self.lost_frames += 1
        self.send_control(
            error_frame(
                ErrorCode.OUTPUT_DROPPED,
                "The end of this answer did not fit the gateway's buffer while the client was "
                "away; reload the session history",
                is_final=True,
            )
        )

    # --- inbound ---------------------------------------------------------------------------

    def send_control(self, frame: Frame) -> None:
        """Queue a gateway-made frame for the client; never blocks."""
        self.outbound.put_control(frame)
        self.frames_ready.unpark_all()

    def submit(self, message: dict[str, Any], sender: dict[str, str] | None = None) -> bool:
        """Queue a runtime-bound message; False when the FIFO is full (caller answers busy)
        or the session is closing for a drain (no new turn may start)."""
        if self.close_after_turn is not None or not self.queue.offer((message, sender or {})):
            return False
        if self._messages_ready is not None:  # the turn runner runs
            self._messages_ready.unpark_all()
        else:
            self._start_turn_runner()
        return True

    def _start_turn_runner(self) -> None:
        # Lazily, at the first message: a session that never runs a turn (most idle IDE
        # sessions) holds no turn-runner task. Once started it runs for the session's life.
        # Before run() has opened the nursery, run() starts it; after the nursery closed (the
        # session is ending) the message is dropped with the queue, as it was before.
        if self._messages_ready is not None or self._nursery is None:
            return
        self._messages_ready = trio.lowlevel.ParkingLot()
        self._nursery.start_soon(self._turn_runner, self._messages_ready)

    def requeue_pending_approvals(self) -> None:
        """Queue the unanswered approval requests again, ahead of everything else (oldest
        first): a client reloading history after a resync may still have to answer them."""
        for request in reversed(self.approvals.pending()):
            self.outbound.put_control_front(request)

    def cancel_turn(self) -> tuple[bool, int]:
        """Cancel the running turn (closing the runtime stream) and drop queued messages."""
        dropped = self.queue.clear()
        running = self.turn_scope is not None
        if self.turn_scope is not None:
            self.turn_scope.cancel()
        return running, dropped

    # --- turn runner -----------------------------------------------------------------------

    async def _turn_runner(self, messages_ready: trio.lowlevel.ParkingLot) -> None:
        runtime = self.host.runtime
        await self.lease.lease_ready.wait()  # another replica may still be running this session
        while True:
            queued = self.queue.pop()
            while queued is None:
                await messages_ready.park()
                queued = self.queue.pop()
            await self._run_turn(runtime, *queued)
            if self.close_after_turn is not None:
                self.close_for_drain()
                return
            self.maybe_hand_off()

    async def _run_turn(
        self, runtime: RuntimeClient, message: dict[str, Any], sender: dict[str, str]
    ) -> None:
        self.turn_count += 1
        turn_id = self.turn_count
        self._send_v2({"type": "turn_started", "turn_id": turn_id, "message_type": message["type"]})
        status = TurnStatus.COMPLETED
        started = trio.current_time()
        self._turn_started_at = started
        self._first_chunk_seen = False
        self._final_seen = False
        metrics = self.host.metrics
        with trio.CancelScope() as turn_scope:
            self.turn_scope = turn_scope
            try:
                await runtime.stream_turn(self.id, message, self._relay, sender)
                if not self._final_seen:
                    # Clients wait for a final chunk (a missing is_final counts as final for
                    # the IDE); a stream that ended cleanly without one would leave v1
                    # clients waiting forever.
                    raise RuntimeFailure(
                        ErrorCode.RUNTIME_STREAM_BROKEN,
                        "The agent runtime ended the turn without a final message",
                    )
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

    async def _relay(self, chunks: list[dict[str, Any]], sizes: list[int]) -> None:
        # Backpressure: wait for room only while a client is attached. Every chunk counts
        # with its own size, so one chunk larger than the whole budget waits for an empty
        # queue and is counted in full. A detached turn keeps reading so the runtime can
        # finish and persist the answer; only what fits the session's and the user's
        # detached budgets is kept, the rest is counted as lost (v2 clients are told to
        # resync when they come back).
        outbound = self.outbound
        batch_size = sum(sizes)
        while self.connection is not None and not outbound.fits(batch_size):
            await self.wait_for_space()
        detached = self.connection is None
        if not self._first_chunk_seen:
            self._first_chunk_seen = True
            self.host.metrics.time_to_first_token.observe(
                trio.current_time() - self._turn_started_at
            )
        merged_before = outbound.merged_chunks
        for chunk, size in zip(chunks, sizes, strict=True):
            final = chunk.get("is_final") is not False
            if final:
                self._final_seen = True
            if detached and not self._keep_detached(size, final):
                continue
            outbound.put_chunk(chunk, size)
            if chunk.get("requires_approval") is True and chunk.get("type") == "tool_call":
                self.approvals.note_request(chunk)
        metrics = self.host.metrics
        metrics.chunks_relayed.inc(len(chunks))
        if outbound.merged_chunks != merged_before:
            metrics.coalesced_chunks.inc(outbound.merged_chunks - merged_before)
        self.frames_ready.unpark_all()

    def _keep_detached(self, size: int, final: bool) -> bool:
        # After a gap nothing but what ends the turn is worth holding (the client resyncs
        # anyway). What ends the turn may overshoot the session's budget (it is usually small,
        # and a client must see the turn end) but never the user's: if that is full, a small
        # stand-in takes its place.
        if final:
            if self.hold_detached(size):
                return True
            self._stand_in_final()
            return False
        if not self.lost_frames and self.outbound.fits(size) and self.hold_detached(size):
            return True
        self.lost_frames += 1
        return False

    def _send_v2(self, frame: Frame) -> None:
        # Queued while detached too: a v2 client that re-attaches learns how the turn ended.
        # The writer drops v2-only frames for v1 connections.
        if self.connection is None or self.connection.v2:
            self.send_control(frame)

    def begin_drain(self) -> None:
        """The gateway drains: no new turn starts (queued messages are dropped) and the
        session closes with 1012 once its running turn, if any, has ended."""
        self.close_after_turn = CloseCode.SERVICE_RESTART
        self.queue.clear()
        if not self.turn_running:
            self.close_for_drain()

    def close_for_drain(self, *, hard: bool = False) -> None:
        """Soft: flush what is queued, then close with 1012; the session ends when the
        connection detaches. Hard (drain timeout): close now and end the session."""
        if self.connection is not None:
            code = self.close_after_turn or CloseCode.SERVICE_RESTART
            # Soft: the viewers follow once the live socket has flushed (see the writer).
            for connection in self.sockets() if hard else [self.connection]:
                connection.shut(code, "server restarting", flush=not hard)
            if not hard:
                return
        self.end()

    # --- writer side -----------------------------------------------------------------------

    async def wait_frames(self, connection: Socket) -> list[Outgoing]:
        """Block until frames are waiting, take them all, and wake a blocked producer.

        Returns an empty list when ``connection`` was asked to close after a flush and
        everything has been taken, or has a protocol ping to send.
        """
        while not len(self.outbound):
            if connection.flush_then_close or connection.ping_due:
                return []
            await self.frames_ready.park()
        frames = self.outbound.take_all()
        self.space_freed()
        return frames

    async def wait_for_space(self) -> None:
        """Wait (a producer over the outbound byte budget) until :meth:`space_freed`."""
        if self._space_ready is None:
            self._space_ready = trio.lowlevel.ParkingLot()
        await self._space_ready.park()

    def space_freed(self) -> None:
        """The outbound queue was emptied or the client left: waiting producers look again."""
        if self._space_ready is not None:
            self._space_ready.unpark_all()

    def to_viewers(self, text: str) -> None:
        """Hand a numbered frame to every viewer's backlog (the live socket's writer calls
        this as it numbers); a viewer too far behind is closed rather than let grow."""
        limit = self.settings.outbound_queue_max_bytes
        for viewer in self.viewers:
            if viewer.closing:
                continue
            if not viewer.add_to_backlog(text, limit):
                self.host.metrics.limit_hits.labels("slow_viewer").inc()
                viewer.shut(CloseCode.POLICY_VIOLATION, "client too slow")
