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

Several replicas (``STATE_BACKEND=redis``): the session's lease, following another replica's
stream and the hand-off are in :mod:`trio_gateway.session_replicas`, tasks of the same nursery.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import trio

from .detached import DetachedBudget
from .observability import Metrics, frame_type_label, session_id_var, user_var
from .outbound import Frame, NumberedFrame, OutboundQueue, Outgoing
from .protocol import (
    ANSWER_TYPES,
    CONNECTION_FRAME_TYPES,
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
from .replay import ReplayBuffer, ReplayGap
from .runtime_client import RuntimeClient, RuntimeFailure
from .security.auth import Identity
from .security.security import Refusal, Security, user_headers
from .session_replicas import keep_lease, let_go, pump_handed_off
from .settings import Settings
from .state.state import StateUnavailable
from .transport import ConnectionClosed, WebSocketConnection
from .turn_queue import TurnQueue

if TYPE_CHECKING:  # the Redis client is imported only when STATE_BACKEND=redis
    from .state.cluster import Cluster

logger = logging.getLogger("trio_gateway.session")

# Per session: unanswered approval requests kept for a client that resyncs, and answered
# call ids remembered to refuse a second answer. Old entries go first.
MAX_PENDING_APPROVALS = 64
MAX_REMEMBERED_ANSWERS = 1024
# v1 sockets of one user on one session (the IDE's windows): the live one plus viewers. A
# socket beyond this closes the oldest viewer (4409), as a second socket did before viewers.
MAX_SOCKETS_PER_SESSION = 8


class Connection:
    """One attached WebSocket and its tasks (reader, writer, heartbeat + close guard)."""

    # Slots: thousands of these live at once (docs/performance.md, "Idle memory").
    __slots__ = (
        "backlog",
        "backlog_bytes",
        "caught_up",
        "close_code",
        "close_reason",
        "closing",
        "first_frame_seen",
        "flush_then_close",
        "greeting",
        "identity",
        "limit_key",
        "previous_writer_done",
        "rate_refusals",
        "replaced",
        "resume_decided",
        "resume_from",
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
        self, ws: WebSocketConnection, v2: bool, identity: Identity, limit_key: str | None = None
    ) -> None:
        self.ws = ws
        self.v2 = v2
        self.identity = identity
        # What per-user limits count this socket under (Security.limit_key).
        self.limit_key = identity.sub if limit_key is None else limit_key
        self.rate_refusals = 0  # consecutive messages refused by the rate limit
        # Who the runtime is told sent this socket's messages (the verified identity).
        self.sender_headers = user_headers(identity)
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
        # Resume (v2): the greeting goes out first; then, on a session with history, the writer
        # waits (bounded) for the client's first frame, which may be {"type":"resume"}.
        self.greeting: Frame | None = None
        self.first_frame_seen = False
        self.resume_from: int | None = None
        self.resume_decided = trio.Event()
        self.caught_up = False  # the writer has replayed and now sends live frames
        # Cross-replica resume on a follower: frames up to this seq reach the client through
        # the shared stream but were already delivered by the other replica.
        self.skip_through = 0
        # A v1 viewer (another window on the session): the frames the session's live socket
        # numbered, encoded, waiting for this socket's writer. Bounded in bytes.
        self.viewer = False  # attached as a viewer (see Session.attach)
        # A list, not a deque: it is only appended to and emptied whole, and an empty list
        # costs 56 bytes where an empty deque costs ~600 (every idle socket has one).
        self.backlog: list[str] = []
        self.backlog_bytes = 0

    def shut(self, code: int, reason: str = "", *, flush: bool = False) -> None:
        """Ask the connection to close with ``code``; the connection task does the closing.

        ``flush=True`` lets the writer send every frame already queued first (a drain closes a
        session *after* its turn's last frames). The first code wins: a session ending after a
        drain must not turn 1012 into 1001; a later hard shut only stops the flush.
        """
        self.resume_decided.set()  # a closing socket waits for nothing
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

    # Slots: thousands of these live at once (docs/performance.md, "Idle memory").
    __slots__ = (
        "_attachment_changed",
        "_final_seen",
        "_first_chunk_seen",
        "_messages_ready",
        "_nursery",
        "_turn_runner_started",
        "_turn_started_at",
        "answered",
        "close_after_turn",
        "cluster",
        "cluster_failed",
        "cluster_ready",
        "connection",
        "detached_charge",
        "finished",
        "following",
        "frames_ready",
        "handoff",
        "holds_lease",
        "id",
        "lease_ready",
        "limit_key",
        "lost_frames",
        "manager",
        "outbound",
        "pending_approvals",
        "pending_attach",
        "queue",
        "replay",
        "scope",
        "seq",
        "settings",
        "space_ready",
        "turn_count",
        "turn_scope",
        "viewers",
    )

    def __init__(self, session_id: str, manager: SessionManager, limit_key: str = "") -> None:
        self.id = session_id
        self.manager = manager
        # The per-user limit key of the connection that opened the session: its live-session
        # slot and its detached bytes are counted there for the session's whole life.
        self.limit_key = limit_key
        # Relayed bytes of the outbound queue charged to the user's detached budget (only
        # while no client is attached; see hold_detached).
        self.detached_charge = 0
        settings = manager.settings
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
        # call_id -> the tool_call frame, while an approval request waits for its answer
        self.pending_approvals: dict[str, Frame] = {}
        self.answered: dict[tuple[str, str], None] = {}  # (frame type, call_id), oldest first
        self.turn_count = 0
        # --- several replicas (STATE_BACKEND=redis); see cluster.py -----------------------
        self.cluster: Cluster | None = manager.cluster
        self.holds_lease = self.cluster is None
        # lease_ready: turns may run; cluster_ready: first lease attempt done, seq base known.
        # Without a cluster there is nothing to wait for: both are the manager's one pre-set
        # Event (shared: trio Events are never reset), not two Events per session.
        if self.cluster is None:
            self.lease_ready = self.cluster_ready = manager.already_set
        else:
            self.lease_ready = trio.Event()
            self.cluster_ready = trio.Event()
        self.cluster_failed = False
        self.following = False  # another replica runs the session; we relay its stream
        self.handoff = False  # our client moved to another replica: finish, then let go
        self.connection: Connection | None = None
        self.viewers: list[Connection] = []  # v1 windows beside the live socket; see attach
        self.scope = trio.CancelScope()
        self.turn_scope: trio.CancelScope | None = None
        self.lost_frames = 0
        self.pending_attach = 0  # connections accepted but not attached yet
        self.close_after_turn: int | None = None
        self._turn_started_at = 0.0
        self._first_chunk_seen = False
        self._final_seen = False
        self.finished = trio.Event()
        self._nursery: trio.Nursery | None = None  # the session's, while it takes new tasks
        self._turn_runner_started = False
        # Wake-ups. ParkingLots rather than Events: no object churn on the hot path.
        # frames_ready: frames were queued or the attachment changed (the writer, or the
        # hand-off pump, looks again); space_ready: the queue was emptied or the client left
        # (a producer over the byte budget looks again). Public: session_replicas.py relays
        # and pumps frames with them too.
        self.frames_ready = trio.lowlevel.ParkingLot()
        self.space_ready = trio.lowlevel.ParkingLot()
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
        if self.cluster is not None:
            self.cluster.publish(self.id, seq, text)
        return seq, text

    # --- lifetime --------------------------------------------------------------------------

    async def run(self) -> None:
        """Body of the session's nursery; returns when the session ends."""
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    # Memory: an idle session is one task, not three (each trio task costs a
                    # few KiB). The grace timer runs as the nursery's body, and the turn runner
                    # starts with the first message (see _start_turn_runner). Either way the
                    # nursery ends when the grace timer ends the session, and an error in
                    # either cancels the other, as sibling tasks did.
                    self._nursery = nursery
                    if len(self.queue):  # submitted before this task first ran
                        self._start_turn_runner()
                    if self.cluster is not None:
                        nursery.start_soon(keep_lease, self, self.cluster)
                        nursery.start_soon(pump_handed_off, self)
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
            if self.cluster is not None:
                await let_go(self, self.cluster)
            self.outbound.drop_all()
            self.release_detached()
            dropped = self.queue.clear()
            if dropped:
                logger.info("session ended with %d queued message(s) dropped", dropped)
            for connection in self.sockets():
                connection.shut(CloseCode.GOING_AWAY, "session ended")
            self.manager._forget(self)
            self.finished.set()
            logger.debug("session %s ended", self.id)

    def end(self) -> None:
        """Cancel the session: its turn, its queue and its connection."""
        self.scope.cancel()

    def sockets(self) -> list[Connection]:
        """The live socket (if any) and its viewers."""
        live = [] if self.connection is None else [self.connection]
        return live + self.viewers

    # --- several replicas (lease, follow, hand-off: session_replicas.py) ---------------------

    def maybe_hand_off(self) -> None:
        """End a handed-off session once it is idle (its lease goes to the new replica)."""
        if self.handoff and self.connection is None and not self.busy and not len(self.outbound):
            self.end()

    async def _grace_timer(self) -> None:
        # Ends the session once it has been without a connection for the grace period. A
        # connection between accept and attach counts as present (no race at the deadline).
        def unattended() -> bool:
            return self.connection is None and not self.pending_attach

        while True:
            while not unattended():
                await self._attachment_changed.park()
            if self.settings.session_grace_seconds <= 0 or self._nothing_to_resume():
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
            and not self.following
            and (self.cluster is None or self.seq == 0)
        )

    def release_pending(self) -> None:
        """A connection counted in ``pending_attach`` attached or gave up."""
        self.pending_attach -= 1
        self._attachment_changed.unpark_all()

    def attach(self, connection: Connection, greeting: Frame | None = None) -> bool:
        """Make ``connection`` the session's live socket, replacing any previous one, or add
        it as a viewer; returns True for a viewer.

        A v1 socket of the same user as a live v1 socket becomes a viewer (the IDE opens one
        session in two windows): it gets every numbered frame the live socket gets, in the
        same order with the same ``seq``, and its messages join the session's one queue. Any
        other newcomer replaces the live socket and its viewers (4409): a v2 client resuming
        takes the session over.

        ``greeting`` (v2 ``session_ready``) goes out before anything else; the connection's
        writer then replays what the client missed (see ``SessionManager._catch_up``).
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
                oldest = self.viewers.pop(0)
                oldest.replaced = True
                oldest.shut(CloseCode.SESSION_REPLACED, "replaced by a newer window")
            self.viewers.append(connection)
            connection.wake_writer = self.frames_ready.unpark_all
            connection.caught_up = True  # a viewer sees the session from now on
            connection.viewer = True  # decided here: it may be promoted before its writer runs
            self._attachment_changed.unpark_all()
            return True
        if previous is not None:
            previous.replaced = True
            previous.shut(CloseCode.SESSION_REPLACED, "replaced by a newer connection")
            connection.previous_writer_done = previous.writer_done
        for viewer in self.viewers:
            viewer.replaced = True
            viewer.shut(CloseCode.SESSION_REPLACED, "replaced by a newer connection")
        self.viewers.clear()
        self.connection = connection
        self.handoff = False  # the client came back here
        # A client reads the queue again: the per-session budget and backpressure bound it.
        self.release_detached()
        connection.wake_writer = self.frames_ready.unpark_all
        connection.greeting = greeting
        self._attachment_changed.unpark_all()
        self.frames_ready.unpark_all()
        return False

    def detach(self, connection: Connection) -> None:
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
            promoted.previous_writer_done = connection.writer_done
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
        self.space_ready.unpark_all()
        self.frames_ready.unpark_all()  # the pump takes over when handed off
        if self.close_after_turn is not None and not self.turn_running:
            self.end()  # drained: nothing left to wait for
        self.maybe_hand_off()

    # --- detached bytes (a per-user budget; see detached.py) ------------------------------------

    def hold_detached(self, size: int) -> bool:
        """Whether ``size`` more relayed bytes may wait in the queue of this detached session
        within the user's detached budget (charged if so). The caller checks the per-session
        budget first where it applies."""
        manager = self.manager
        if not manager.detached.try_charge(self.limit_key, size):
            manager.metrics.limit_hits.labels("detached_bytes_per_user").inc()
            return False
        self.detached_charge += size
        return True

    def release_detached(self) -> None:
        """Give the user's detached budget back what this session holds (a client attached,
        the queue was handed on, or the session ended)."""
        if self.detached_charge:
            self.manager.detached.release(self.limit_key, self.detached_charge)
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
        self.space_ready.unpark_all()

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
        if self._turn_runner_started:
            self._messages_ready.unpark_all()
        else:
            self._start_turn_runner()
        return True

    def _start_turn_runner(self) -> None:
        # Lazily, at the first message: a session that never runs a turn (most idle IDE
        # sessions) holds no turn-runner task. Once started it runs for the session's life.
        # Before run() has opened the nursery, run() starts it; after the nursery closed (the
        # session is ending) the message is dropped with the queue, as it was before.
        if self._turn_runner_started or self._nursery is None:
            return
        self._turn_runner_started = True
        self._nursery.start_soon(self._turn_runner)

    def already_answered(self, kind: str, call_id: str) -> bool:
        """Whether a ``kind`` answer for ``call_id`` already went to the runtime."""
        return (kind, call_id) in self.answered

    def record_answer(self, kind: str, call_id: str) -> None:
        """Remember that a ``kind`` answer for ``call_id`` was forwarded (bounded memory)."""
        self.answered[(kind, call_id)] = None
        if len(self.answered) > MAX_REMEMBERED_ANSWERS:
            del self.answered[next(iter(self.answered))]
        self.pending_approvals.pop(call_id, None)

    def _note_approval_request(self, chunk: Frame) -> None:
        call_id = chunk.get("call_id")
        if isinstance(call_id, str) and call_id:
            self.pending_approvals[call_id] = dict(chunk)  # a copy: the writer adds seq
            if len(self.pending_approvals) > MAX_PENDING_APPROVALS:
                del self.pending_approvals[next(iter(self.pending_approvals))]

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
        await self.lease_ready.wait()  # another replica may still be running this session
        while True:
            queued = self.queue.pop()
            while queued is None:
                await self._messages_ready.park()
                queued = self.queue.pop()
            await self._run_turn(runtime, *queued)
            if self.close_after_turn is not None:
                self._close_for_drain()
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
        metrics = self.manager.metrics
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
            await self.space_ready.park()
        detached = self.connection is None
        if not self._first_chunk_seen:
            self._first_chunk_seen = True
            self.manager.metrics.time_to_first_token.observe(
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
                self._note_approval_request(chunk)
        metrics = self.manager.metrics
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
            # Soft: the viewers follow once the live socket has flushed (see the writer).
            for connection in self.sockets() if hard else [self.connection]:
                connection.shut(code, "server restarting", flush=not hard)
            if not hard:
                return
        self.end()

    # --- writer side -----------------------------------------------------------------------

    async def wait_frames(self, connection: Connection) -> list[Outgoing]:
        """Block until frames are waiting, take them all, and wake a blocked producer.

        Returns an empty list when ``connection`` was asked to close after a flush and
        everything has been taken.
        """
        while not len(self.outbound):
            if connection.flush_then_close:
                return []
            await self.frames_ready.park()
        frames = self.outbound.take_all()
        self.space_ready.unpark_all()
        return frames

    def to_viewers(self, text: str) -> None:
        """Hand a numbered frame to every viewer's backlog (the live socket's writer calls
        this as it numbers); a viewer too far behind is closed rather than let grow."""
        limit = self.settings.outbound_queue_max_bytes
        for viewer in self.viewers:
            if viewer.closing:
                continue
            viewer.backlog.append(text)
            # Bytes, as documented: a frame of non-ASCII text is up to 4x its length.
            viewer.backlog_bytes += len(text) if text.isascii() else len(text.encode())
            if viewer.backlog_bytes > limit:
                self.manager.metrics.limit_hits.labels("slow_viewer").inc()
                viewer.shut(CloseCode.POLICY_VIOLATION, "client too slow")

    async def wait_backlog(self, connection: Connection) -> list[str] | None:
        """A viewer's next frames (everything in its backlog), or None once it is no longer a
        viewer (promoted: it then numbers frames itself) and its backlog is empty, or when it
        should close after a flush."""
        while not connection.backlog:
            if connection.flush_then_close or connection is self.connection:
                return None
            await self.frames_ready.park()
        texts = list(connection.backlog)
        connection.backlog.clear()
        connection.backlog_bytes = 0
        return texts


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
        self.cluster: Cluster | None = None  # set by the app when STATE_BACKEND=redis
        self._nursery: trio.Nursery | None = None
        self._idle = trio.lowlevel.ParkingLot()
        self.already_set = trio.Event()  # see Session.lease_ready
        self.already_set.set()
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
            connection.replaced = True
            connection.shut(
                CloseCode.SESSION_REPLACED, "replaced by a connection on another gateway replica"
            )
        if session.holds_lease:
            session.handoff = True
            session.frames_ready.unpark_all()
            session.maybe_hand_off()
        else:
            session.end()  # a follower whose client left has nothing to relay

    def _forget(self, session: Session) -> None:
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
        connection = Connection(ws, v2, identity, key)
        self.connection_count += 1
        try:
            # accept() yields to other tasks: the session must not end by grace meanwhile.
            session.pending_attach += 1
            try:
                if not accepted:
                    await ws.accept(SUBPROTOCOL_V2 if v2 else None)
                if self.cluster is not None and not await self._join_cluster(session):
                    connection.close_code = CloseCode.TRY_AGAIN_LATER
                    connection.close_reason = "shared state (Redis) unavailable"
                    self.metrics.limit_hits.labels("state_unavailable").inc()
                    return
            finally:
                session.release_pending()
            if session.scope.cancel_called or self.sessions.get(session_id) is not session:
                # It ended anyway (drain, operator): never attach to a session without a
                # turn runner. No await between here and attach.
                if self.draining:
                    connection.close_code = CloseCode.SERVICE_RESTART
                    connection.close_reason = "server restarting"
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
            await self._run_connection(session, connection)
        finally:
            connection.writer_done.set()
            self.connection_count -= 1
            session.detach(connection)
            await self._finish_connection(connection)
            self._idle.unpark_all()

    async def _join_cluster(self, session: Session) -> bool:
        # Several replicas: wait (bounded) until the session knows whether it runs here or
        # follows another replica, then tell the other replicas to let this client's session
        # go. Without Redis we cannot keep the guarantees: refuse (1013) rather than guess.
        assert self.cluster is not None
        with trio.move_on_after(self.cluster.timeout * 3):
            await session.cluster_ready.wait()
        if not session.cluster_ready.is_set() or session.cluster_failed:
            return False
        try:
            await self.cluster.announce_connection(session.id)
        except StateUnavailable as error:
            logger.warning("cannot announce a connection: %s", error)
            return False
        return True

    async def _run_connection(self, session: Session, connection: Connection) -> None:
        try:
            async with trio.open_nursery() as guard_nursery:
                guard_nursery.start_soon(self._abort_if_stuck, session, connection)
                try:
                    with connection.scope:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._writer, session, connection)
                            # The reader is the nursery's body rather than a task of its own
                            # (one task less per idle socket); it ends, fails and is
                            # cancelled exactly as a sibling of the writer would be.
                            await self._reader(session, connection, nursery.cancel_scope)
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

    async def _abort_if_stuck(self, session: Session, connection: Connection) -> None:
        # Cancelling the connection's nursery cannot interrupt a writer blocked in hypercorn's
        # shielded send, so the nursery would never exit. This guard sits outside it: once a
        # close is requested (or the whole connection task is cancelled by the server), it
        # gives the in-flight send ws_close_timeout to finish, then aborts the transport.
        # Until then the same task is the connection's heartbeat (one task less per idle
        # socket): the heartbeat stops where it stopped as a task of the connection's nursery,
        # at the close request that cancels that nursery.
        try:
            await self._heartbeat(session, connection)
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
                if not connection.first_frame_seen and self._first_frame_resumes(
                    session, connection, data
                ):
                    continue
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
        if await self.security.check_message_rate(connection.identity, connection.limit_key):
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
        connection.sender_headers = user_headers(identity)
        logger.info("token refreshed in band", extra={"event": "auth_refreshed"})
        session._send_to(connection, {"type": "auth_ok", "expires_at": identity.expires_at})

    def _first_frame_resumes(
        self, session: Session, connection: Connection, data: str | bytes
    ) -> bool:
        # The first frame decides whether the writer replays. A resume is handled here, before
        # the message rate limit: it costs no runtime call, there is one per connection, and a
        # client reconnecting through a flaky network must not lose its replay to the limiter.
        # Any other first frame ends the writer's wait and takes the normal path.
        connection.first_frame_seen = True
        if isinstance(data, str) and len(data) <= 1024 and "resume" in data:
            try:
                message = parse_client_frame(data)
            except FrameError:
                message = {}
            if message.get("type") == "resume":
                self.count_frame_in("resume")
                self._handle_resume(session, connection, message["last_seq"], first=True)
                return True
        connection.resume_decided.set()
        return False

    def _handle_resume(
        self, session: Session, connection: Connection, last_seq: int, *, first: bool
    ) -> None:
        if not connection.v2:
            text = "resume needs protocol v2 (subprotocol codelab.v2)"
        elif not first:
            text = "resume is accepted only as the first frame of a connection"
        else:
            connection.resume_from = last_seq
            connection.resume_decided.set()
            if connection.caught_up:
                self._late_resume(session, connection, last_seq)
            return
        connection.resume_decided.set()
        session.send_control(error_frame(ErrorCode.INVALID_MESSAGE, text, is_final=False))

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
        if kind == "resume":
            self._handle_resume(session, connection, message["last_seq"], first=False)
            return
        if connection.closing and kind != "cancel":
            return  # closing (e.g. token expired): nothing new starts on this socket
        if kind in RUNTIME_BOUND_TYPES:
            call_id = message.get("call_id") if kind in ANSWER_TYPES else None
            if call_id is not None and session.already_answered(kind, call_id):
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
            if session.submit(message, connection.sender_headers):
                if call_id is not None:
                    session.record_answer(kind, call_id)
            else:
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
        was_viewer = connection.viewer
        if was_viewer:
            # A viewer: send what the live socket numbers until this one takes over.
            while (texts := await session.wait_backlog(connection)) is not None:
                await connection.ws.send_texts(texts, self._count_viewed)
            if connection is not session.connection:  # closing as a viewer
                connection.shut(connection.close_code)
                return
        if connection.previous_writer_done is not None:
            # Bounded: the replaced connection's guard aborts a stuck send within
            # ws_close_timeout, after which its writer ends.
            await connection.previous_writer_done.wait()
        if was_viewer:
            # Promoted: the old live socket's last batch is in the backlog too (frames reach
            # viewers as they are numbered), so nothing numbered is missing or sent twice.
            if connection.backlog:
                texts = list(connection.backlog)
                connection.backlog.clear()
                await connection.ws.send_texts(texts, self._count_viewed)
            session.replay.delivered(session.seq)
        else:
            await self._catch_up(session, connection)
        while True:
            frames = await session.wait_frames(connection)
            if not frames:
                if session.close_after_turn is not None:
                    # A drain: the viewers close once they have what this socket had.
                    for viewer in session.viewers:
                        viewer.shut(connection.close_code, connection.close_reason, flush=True)
                    session.frames_ready.unpark_all()
                connection.shut(connection.close_code)  # flushed: close now
                return
            await self._send_frames(session, connection, frames)

    def _count_viewed(self, _index: int) -> None:
        self.count_frame_out("viewed")

    async def _send_frames(
        self, session: Session, connection: Connection, frames: list[Outgoing]
    ) -> None:
        # Number, encode and record every frame of the batch *before* the first write: if the
        # socket fails half-way (or this task is cancelled at a checkpoint), the rest are in
        # the replay buffer as undelivered and the next connection of the session gets them.
        replay = session.replay
        now = trio.current_time()
        v2 = connection.v2
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
                if session.lost_frames:
                    # The shared stream jumped (a failed append): say so before the next
                    # frame, never a silent gap. v1 clients cannot resync; they reload
                    # history anyway.
                    session.lost_frames = 0
                    if v2:
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
            if seq <= connection.skip_through:
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
            self.count_frame_out(kind)

        await connection.ws.send_texts([text for _, text, _ in batch], sent)

    async def _send_direct(self, connection: Connection, frame: Frame) -> None:
        """Send a connection frame (no seq, never replayed) ahead of the session's frames."""
        await connection.ws.send_text(orjson.dumps(frame).decode())
        self.count_frame_out(frame.get("type"))

    async def _catch_up(self, session: Session, connection: Connection) -> None:
        # Runs once per connection, before live frames: greeting, then what the client missed.
        # Exact replay or an explicit resync, never a silent gap (docs/protocol.md "Resume").
        ws = connection.ws
        if connection.greeting is not None:
            connection.greeting["last_seq"] = session.seq
            await self._send_direct(connection, connection.greeting)
            if session.seq or len(session.outbound) or session.busy:
                # A session with history: let the client say where it stopped first. Any
                # first frame, a close, or resume_wait_seconds end the wait.
                with trio.move_on_after(self.settings.resume_wait_seconds):
                    await connection.resume_decided.wait()
        now = trio.current_time()
        resume_from = connection.resume_from
        replay = (
            session.replay.undelivered(now)
            if resume_from is None
            else session.replay.since(resume_from, now)
        )
        if isinstance(replay, ReplayGap) and resume_from is not None and session.cluster:
            replay = await self._replay_from_stream(session, connection, resume_from, replay)
        gap: str | None = replay.value if isinstance(replay, ReplayGap) else None
        frames = [] if isinstance(replay, ReplayGap) else replay
        if session.lost_frames:
            logger.warning(
                "%d frame(s) of a detached turn did not fit the buffer", session.lost_frames
            )
            gap = "frames_dropped_while_detached"  # the numbered frames before it still count
            session.lost_frames = 0
        for seq, text in frames:
            await ws.send_text(text)
            session.replay.delivered(seq)
            self.count_frame_out("replayed")
        connection.caught_up = True
        if not connection.v2:
            return  # v1 clients reload history on reconnect (no resync frame for them)
        if gap is not None:
            logger.info("client must resync: %s", gap, extra={"event": "resync", "reason": gap})
            self.metrics.resumes.labels("resync").inc()
            await self._send_direct(connection, {"type": "resync_required", "reason": gap})
            # What a client reloading history may still have to answer comes first.
            for request in reversed(session.pending_approvals.values()):
                session.outbound.put_control_front(dict(request))
        elif resume_from is not None:
            self.metrics.resumes.labels("exact").inc()
            logger.info(
                "resumed after seq %d (%d frame(s) replayed)",
                resume_from,
                len(frames),
                extra={"event": "resumed", "replayed": len(frames)},
            )
            resumed = {"type": "resumed", "from_seq": resume_from + 1, "replayed": len(frames)}
            await self._send_direct(connection, resumed)

    async def _replay_from_stream(
        self, session: Session, connection: Connection, last_seq: int, gap: ReplayGap
    ) -> list[tuple[int, str]] | ReplayGap:
        # Frames this replica does not hold may be in the shared stream: those numbered by
        # the replica that ran the session before (or runs it now, when we follow it).
        assert session.cluster is not None
        local = session.replay
        try:
            if gap is ReplayGap.UNKNOWN_SEQ:
                # Following another replica: the client may have seen frames that reached
                # the stream after this session started; they arrive here through the follower
                # and are skipped, not sent twice.
                if session.following and last_seq <= await session.cluster.last_seq(session.id):
                    connection.skip_through = last_seq
                    return []
                return gap
            need = local.first_seq - 1  # what the local buffer cannot give
            older = await session.cluster.read_after(session.id, last_seq, need - last_seq)
        except StateUnavailable:
            return gap
        if [seq for seq, _ in older] != list(range(last_seq + 1, need + 1)):
            return gap  # trimmed or expired there too: never a partial replay
        newer = local.since(need, trio.current_time())
        return gap if isinstance(newer, ReplayGap) else older + newer

    def _late_resume(self, session: Session, connection: Connection, last_seq: int) -> None:
        # The writer did not wait (the session had no history when the socket attached), so
        # nothing numbered has been sent on this socket: only "nothing to replay" is exact.
        if last_seq == session.seq and not len(session.outbound):
            self.metrics.resumes.labels("exact").inc()
            session.send_control({"type": "resumed", "from_seq": last_seq + 1, "replayed": 0})
        else:
            self.metrics.resumes.labels("resync").inc()
            session.send_control({"type": "resync_required", "reason": ReplayGap.UNKNOWN_SEQ})

    async def _heartbeat(self, session: Session, connection: Connection) -> None:
        # Watches the writer from outside (its sends are shielded) and, for v2 clients, sends
        # an application heartbeat after a quiet interval. WebSocket protocol pings and
        # dead-peer detection are hypercorn's (ping interval + read timeout, see server.py).
        # Returns once the connection is asked to close (runs in the guard task, which
        # outlives the connection's nursery: see _abort_if_stuck).
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
            with trio.move_on_after(wait):
                await connection.shut_requested.wait()
            if connection.shut_requested.is_set():
                return
            now = trio.current_time()
            started = ws.send_started_at
            if started is not None and now - started >= settings.ws_slow_client_timeout:
                self.metrics.limit_hits.labels("slow_client").inc()
                logger.warning(
                    "client stopped reading for %.1f s; closing",
                    now - started,
                    extra={"event": "limit_hit", "limit": "slow_client"},
                )
                if connection is session.connection:  # a stalled viewer holds nobody up
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
