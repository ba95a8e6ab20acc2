"""A session's side of several replicas (``STATE_BACKEND=redis``): lease, follow, hand off.

:mod:`trio_gateway.state.cluster` is the Redis side (leases, frame streams, takeover notices); this
module is what one session does with it (``docs/scaling.md``, "How a session moves between
replicas"). Each session owns one lease object:

* :class:`SessionLease` (several replicas) decides where the session runs. With the lease, the
  session runs its turns here and publishes every numbered frame to its shared stream. Without
  it, the session *follows*: it relays the lease holder's stream to its own client as
  :class:`~trio_gateway.session.outbound.NumberedFrame` entries (they keep the holder's seq)
  until the holder lets go or its lease expires, then takes over. Once the session's client
  moved to another replica, it numbers and publishes what the session still produces (nobody
  here sends it), so that replica's follower gets it; when the session ends it publishes what is
  left and releases the lease.
* :class:`SoloLease` (one replica) always holds the lease and does nothing: one shared instance
  per app, so a session without replicas pays for no lease state and takes no branch.

A lease works against :class:`LeasedSession`, the little it needs of a session, so that this
module does not import the session's (the session imports it).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Protocol

import orjson
import trio

from ..protocol import CONNECTION_FRAME_TYPES, ErrorCode, error_frame
from ..state.state import StateUnavailable
from .outbound import Frame, NumberedFrame, OutboundQueue, Outgoing
from .replay import ReplayBuffer, ReplayGap

if TYPE_CHECKING:  # the Redis client is imported only when STATE_BACKEND=redis
    from ..state.cluster import Cluster

__all__ = ["Lease", "LeasedSession", "SessionLease", "SoloLease"]

# Same logger as the rest of the session engine: log records do not depend on the module split.
logger = logging.getLogger("trio_gateway.session")

FOLLOW_LINGER_SECONDS = 0.01  # batching window for reads of another replica's stream
# A quiet follower tries to take the lease this often: the delay a moved session's next turn
# may wait once the other replica has let go.
FOLLOW_BLOCK_SECONDS = 0.1

# What a replay from the shared stream gives: frames (or why not), and the seq through which
# the client already has the frames that reach it through the follower.
StreamReplay = tuple[list[tuple[int, str]] | ReplayGap, int]


class LeasedSession(Protocol):
    """What a lease needs of its session (``session.Session`` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def attached(self) -> bool: ...
    @property
    def outbound(self) -> OutboundQueue: ...
    @property
    def replay(self) -> ReplayBuffer: ...
    @property
    def frames_ready(self) -> trio.lowlevel.ParkingLot: ...

    def continue_after(self, seq: int) -> None: ...
    def number(self, frame: Outgoing, now: float) -> tuple[int, str]: ...
    def send_control(self, frame: Frame) -> None: ...
    def hold_detached(self, size: int) -> bool: ...
    async def wait_for_space(self) -> None: ...
    def space_freed(self) -> None: ...
    def release_detached(self) -> None: ...
    def maybe_hand_off(self) -> None: ...
    def end(self) -> None: ...


class SoloLease:
    """The lease of every session when this replica is the only one: always held, nothing to
    wait for, publish or hand off. Stateless, so one instance serves all of an app's sessions
    (a session without replicas carries no lease state of its own)."""

    __slots__ = ("cluster_ready", "lease_ready")

    shared = False  # no other replica may hold this session's history
    holds_lease = True
    following = False
    handoff = False
    cluster_failed = False

    def __init__(self, already_set: trio.Event) -> None:
        # lease_ready: turns may run; cluster_ready: first lease attempt done, seq base known.
        # Nothing to wait for: both are the app's one pre-set Event (trio Events are never
        # reset), not two Events per session.
        self.lease_ready = self.cluster_ready = already_set

    def start(self, nursery: trio.Nursery) -> None:
        """Start the lease's tasks in the session's nursery: none."""

    def publish(self, seq: int, text: str) -> None:
        """Publish a numbered frame to the other replicas: there are none."""

    async def join(self) -> bool:
        """Whether a new connection may attach (always: no shared state to wait for)."""
        return True

    def came_back(self) -> None:
        """The session's client attached here: nothing was handed off."""

    def hand_off(self) -> bool:
        """The client moved to another replica: never happens with one replica."""
        return False

    async def replay_after(self, last_seq: int, gap: ReplayGap, wait: float) -> StreamReplay:
        """Frames after ``last_seq`` that this replica's buffer lacks: no other source."""
        return gap, 0

    async def let_go(self) -> None:
        """Last step of an ending session: nothing to flush or release."""


class SessionLease:
    """A session's lease when replicas share state through Redis: run the session here, or
    follow the replica that does, then keep the lease; hand the session off when its client
    moves. Owns the session's replica state and its two replica tasks."""

    __slots__ = (
        "cluster",
        "cluster_failed",
        "cluster_ready",
        "following",
        "handoff",
        "holds_lease",
        "lease_ready",
        "lease_seconds",
        "session",
    )

    shared = True  # the shared stream may hold history of this session

    def __init__(self, session: LeasedSession, cluster: Cluster, lease_seconds: float) -> None:
        self.session = session
        self.cluster = cluster
        self.lease_seconds = lease_seconds
        self.holds_lease = False
        # lease_ready: turns may run; cluster_ready: first lease attempt done, seq base known.
        self.lease_ready = trio.Event()
        self.cluster_ready = trio.Event()
        self.cluster_failed = False
        self.following = False  # another replica runs the session; we relay its stream
        self.handoff = False  # our client moved to another replica: finish, then let go

    def start(self, nursery: trio.Nursery) -> None:
        """Start the lease's tasks in the session's nursery (they end with the session)."""
        nursery.start_soon(self._keep)
        nursery.start_soon(self._pump_handed_off)

    def publish(self, seq: int, text: str) -> None:
        """Publish a frame this replica numbered to the session's shared stream."""
        self.cluster.publish(self.session.id, seq, text)

    async def join(self) -> bool:
        """Wait (bounded) until the session knows whether it runs here or follows another
        replica, then tell the other replicas to let this client's session go. False when
        shared state is unavailable: the caller refuses (1013) rather than guess."""
        with trio.move_on_after(self.cluster.timeout * 3):
            await self.cluster_ready.wait()
        if not self.cluster_ready.is_set() or self.cluster_failed:
            return False
        try:
            await self.cluster.announce_connection(self.session.id)
        except StateUnavailable as error:
            logger.warning("cannot announce a connection: %s", error)
            return False
        return True

    def came_back(self) -> None:
        """The session's client attached here (again): nothing to hand off."""
        self.handoff = False

    def hand_off(self) -> bool:
        """The client moved to another replica. If we run the session, finish its turn
        (frames go to the shared stream) and let go: True. A follower has nothing to relay
        and should end: False."""
        if not self.holds_lease:
            return False
        self.handoff = True
        return True

    async def replay_after(self, last_seq: int, gap: ReplayGap, wait: float) -> StreamReplay:
        """Frames after ``last_seq`` that the local buffer lacks (``gap`` says why) may be in
        the shared stream: those numbered by the replica that ran the session before (or
        runs it now, when we follow it). Exact or the gap, never a partial replay. A client
        ahead of the stream waits up to ``wait`` seconds for it (see _stream_reaches)."""
        session, cluster = self.session, self.cluster
        local = session.replay
        try:
            if gap is ReplayGap.UNKNOWN_SEQ:
                # The client is ahead of this replica: it saw frames the replica running the
                # session numbered after this session started here, some perhaps not yet in
                # the stream (appends are batched: _stream_reaches waits for them). They
                # arrive here through the follower (or are already queued, if it took over
                # since) and are skipped, not sent twice.
                if await self._stream_reaches(last_seq, wait):
                    return [], last_seq
                return gap, 0
            need = local.first_seq - 1  # what the local buffer cannot give
            older = await cluster.read_after(session.id, last_seq, need - last_seq)
        except StateUnavailable:
            return gap, 0
        if [seq for seq, _ in older] != list(range(last_seq + 1, need + 1)):
            return gap, 0  # trimmed or expired there too: never a partial replay
        newer = local.since(need, trio.current_time())
        return (gap, 0) if isinstance(newer, ReplayGap) else (older + newer, 0)

    async def _stream_reaches(self, seq: int, timeout: float) -> bool:
        # Whether frame ``seq`` is in the session's shared stream, waiting up to ``timeout``
        # for it while another replica holds the lease (raises StateUnavailable).
        #
        # A client resuming here may be ahead of the stream: the lease holder writes a frame
        # to its socket as soon as it is numbered, and appends it to the stream in its
        # publisher's next batch (asynchronously, cluster.PUBLISH_LINGER_SECONDS later at the
        # earliest). A client that cuts right after such a frame and reconnects here at once
        # is faster than that batch (bench/resume_bench.py: about one cross-replica resume in
        # several dozen on a loaded machine). The frame is on its way: wait for it instead of
        # answering unknown_seq.
        session, cluster = self.session, self.cluster
        # One look first: enough once no other replica holds the lease, since a holder appends
        # everything it numbered before it lets go (let_go), and this session read its base
        # after taking the lease (_keep): whatever the stream holds beyond that base came
        # through the follower and waits in the outbound queue, where skip_through applies.
        if await cluster.read_after(session.id, seq - 1, 1):
            return True
        if not self.following:
            return False
        with trio.move_on_after(timeout):
            while self.following:
                # XREAD BLOCK: returns as soon as an entry >= seq is appended (no polling).
                if await cluster.wait_after(session.id, seq - 1, FOLLOW_BLOCK_SECONDS):
                    return True
            # The holder let go (it flushed first) while we waited: the stream is final.
            return bool(await cluster.read_after(session.id, seq - 1, 1))
        return False  # a client ahead of every frame ever appended (another session life?)

    async def _keep(self) -> None:
        # One of the session's tasks: run it here or follow the replica that does, then keep
        # the lease (renewed every third of SESSION_LEASE_SECONDS). Sets cluster_ready once
        # the seq base is known, and ends the session when Redis is unavailable at the start
        # or another replica holds the lease.
        session, cluster = self.session, self.cluster
        # Establish where numbering continues (the shared stream may hold earlier frames of
        # this session, from another replica), then either run the session (lease taken) or
        # follow the runner's stream until its lease is ours. The lease first: read before
        # it, the stream's end could still move (a holder flushes its last frames, then lets
        # go), and this replica would number on from a stale base, reusing seqs the client has.
        try:
            got = await cluster.acquire_lease(session.id)
            base = await cluster.last_seq(session.id)
        except StateUnavailable as error:
            logger.warning("shared state unavailable for a new session: %s", error)
            self.cluster_failed = True
            self.cluster_ready.set()
            session.end()
            return
        session.continue_after(base)
        self.following = not got
        self.cluster_ready.set()
        if got:
            await self._took_over(base)
        else:
            await self._follow()
        interval = self.lease_seconds / 3
        while True:
            await trio.sleep(interval)
            try:
                # A lease that vanished (Redis restarted empty) is simply taken again; only
                # one that another replica holds means this one must stop.
                still_ours = await cluster.renew_lease(session.id) or await cluster.acquire_lease(
                    session.id
                )
            except StateUnavailable:
                continue  # Redis down: the running turn finishes (docs/scaling.md)
            if not still_ours:
                logger.error("lost the session lease to another replica; ending the session")
                session.end()
                return

    async def _follow(self) -> None:
        # Relay the lease holder's frames (they carry their seq) until its lease is ours:
        # it lets go once its turn is over, or its lease expires if it died.
        session, cluster = self.session, self.cluster
        cursor = session.seq
        while True:
            try:
                frames = await cluster.wait_after(session.id, cursor, FOLLOW_BLOCK_SECONDS)
                if frames:
                    cursor = await self._relay_stream(frames)
                    # Let the next batch build up: each XREAD costs ~1 ms of CPU in the
                    # client, so reading frame by frame would cap the relay (measured).
                    await trio.sleep(FOLLOW_LINGER_SECONDS)
                    continue
                if await cluster.acquire_lease(session.id):
                    break
            except StateUnavailable:
                await trio.sleep(0.5)
        # The previous holder flushed everything before letting go: take the tail, then run.
        while True:
            try:
                frames = await cluster.read_after(session.id, cursor, 512)
            except StateUnavailable:
                frames = []
            if not frames:
                break
            cursor = await self._relay_stream(frames)
        self.following = False
        await self._took_over(cursor)

    async def _relay_stream(self, frames: list[tuple[int, str]]) -> int:
        # Another replica numbered and encoded these: they go to the writer as NumberedFrames
        # (same byte budget as relayed runtime chunks) and keep their seq.
        session = self.session
        outbound = session.outbound
        for seq, text in frames:
            while not outbound.has_space() and session.attached:
                await session.wait_for_space()
            if not session.attached and not (
                outbound.fits(len(text)) and session.hold_detached(len(text))
            ):
                # No client here and no room in the user's detached budget: the frame stays in
                # the shared stream only; the seq jump is reported as a loss when a client
                # attaches (Session.number).
                continue
            outbound.put_numbered(NumberedFrame(seq, text, _type_of(text)), len(text))
        session.frames_ready.unpark_all()
        return frames[-1][0]

    async def _took_over(self, last_seq: int) -> None:
        # The lease is ours. If the stream's last frame (``last_seq``) is in the middle of a
        # turn, the replica that ran it died: that turn is lost, and the client is told so.
        session = self.session
        tail: list[tuple[int, str]] = []
        if last_seq:
            with contextlib.suppress(StateUnavailable):
                tail = await self.cluster.read_after(session.id, last_seq - 1, 1)
        if tail and tail[0][0] == last_seq and _mid_turn(tail[0][1]):
            logger.warning("the replica running this session's turn is gone; the turn is lost")
            session.send_control(
                error_frame(
                    ErrorCode.RUNTIME_STREAM_BROKEN,
                    "The gateway replica running this turn stopped; the turn was lost",
                    is_final=True,
                )
            )
            session.send_control({"type": "resync_required", "reason": "replica_lost"})
        self.holds_lease = True
        self.lease_ready.set()

    async def _pump_handed_off(self) -> None:
        # One of the session's tasks: while our client is on another replica (handoff),
        # number and publish what the turn produces (nobody here writes it to a socket),
        # then end the session once it is idle.
        session = self.session
        while True:
            while not (self.handoff and not session.attached):
                await session.frames_ready.park()
            frames = session.outbound.take_all()
            session.release_detached()  # the queue is empty: nothing held for a client here
            session.space_freed()
            now = trio.current_time()
            for frame in frames:
                kind = frame.kind if isinstance(frame, NumberedFrame) else frame.get("type")
                if kind not in CONNECTION_FRAME_TYPES:
                    seq, _ = session.number(frame, now)
                    session.replay.delivered(seq)  # published is as far as it goes from here
            session.maybe_hand_off()
            if not len(session.outbound):
                await session.frames_ready.park()

    async def let_go(self) -> None:
        """Last step of an ending session: publish its queued frames and release its lease."""
        # Shielded and bounded: runs while the session is being cancelled. Flush what was
        # numbered, then release the lease so a follower can take over at once.
        cluster = self.cluster
        with trio.CancelScope(shield=True), trio.move_on_after(cluster.timeout * 2):
            await cluster.flush(self.session.id)
            if self.holds_lease:
                with contextlib.suppress(StateUnavailable):  # else it expires by itself
                    await cluster.release_lease(self.session.id)


# A session's lease: the shared do-nothing one, or its own with several replicas.
Lease = SoloLease | SessionLease


def _type_of(text: str) -> object:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value.get("type") if isinstance(value, dict) else None


def _mid_turn(text: str) -> bool:
    """Whether a numbered frame leaves its turn open (a turn ends with a final chunk or an
    error, then turn_finished for v2)."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(frame, dict):
        return False
    return frame.get("type") == "turn_started" or frame.get("is_final") is False
