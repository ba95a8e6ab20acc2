"""The session's side of several replicas (``STATE_BACKEND=redis``): lease, follow, hand off.

:mod:`trio_gateway.state.cluster` is the Redis side (leases, frame streams, takeover notices); this
module is what one :class:`~trio_gateway.session.Session` does with it (``docs/scaling.md``,
"How a session moves between replicas"):

* :func:`keep_lease` decides where the session runs. With the lease, the session runs its
  turns here and publishes every numbered frame to its shared stream. Without it, the session
  *follows*: it relays the lease holder's stream to its own client as
  :class:`~trio_gateway.outbound.NumberedFrame` entries (they keep the holder's seq) until the
  holder lets go or its lease expires, then takes over.
* :func:`pump_handed_off` numbers and publishes the frames of a session whose client moved to
  another replica (nobody here sends them), so that replica's follower gets them.
* :func:`let_go` publishes what is left and releases the lease when the session ends.

These run as tasks of the session's nursery (see ``session.py`` for the lifetimes); they keep
no state of their own.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import orjson
import trio

from .outbound import NumberedFrame
from .protocol import CONNECTION_FRAME_TYPES, ErrorCode, error_frame
from .state.state import StateUnavailable

if TYPE_CHECKING:  # the Redis client is imported only when STATE_BACKEND=redis
    from .session import Session
    from .state.cluster import Cluster

__all__ = ["keep_lease", "let_go", "pump_handed_off"]

# Same logger as the rest of the session engine: log records do not depend on the module split.
logger = logging.getLogger("trio_gateway.session")

FOLLOW_LINGER_SECONDS = 0.01  # batching window for reads of another replica's stream
# A quiet follower tries to take the lease this often: the delay a moved session's next turn
# may wait once the other replica has let go.
FOLLOW_BLOCK_SECONDS = 0.1


async def keep_lease(session: Session, cluster: Cluster) -> None:
    """One of ``session``'s tasks when replicas share state: run it here or follow the replica
    that does, then keep the lease (renewed every third of ``SESSION_LEASE_SECONDS``).

    Sets ``session.cluster_ready`` once the seq base is known, and ends the session when
    Redis is unavailable at the start or another replica holds the lease.
    """
    # Establish where numbering continues (the shared stream may hold earlier frames of
    # this session, from another replica), then either run the session (lease taken) or
    # follow the runner's stream until its lease is ours.
    try:
        base = await cluster.last_seq(session.id)
        got = await cluster.acquire_lease(session.id)
    except StateUnavailable as error:
        logger.warning("shared state unavailable for a new session: %s", error)
        session.cluster_failed = True
        session.cluster_ready.set()
        session.end()
        return
    if base > session.seq:
        session.seq = base
        session.replay.restart_at(base)
    session.following = not got
    session.cluster_ready.set()
    if got:
        await _took_over(session, cluster, base)
    else:
        await _follow(session, cluster)
    interval = session.settings.session_lease_seconds / 3
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


async def _follow(session: Session, cluster: Cluster) -> None:
    # Relay the lease holder's frames (they carry their seq) until its lease is ours:
    # it lets go once its turn is over, or its lease expires if it died.
    cursor = session.seq
    while True:
        try:
            frames = await cluster.wait_after(session.id, cursor, FOLLOW_BLOCK_SECONDS)
            if frames:
                cursor = await _relay_stream(session, frames)
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
        cursor = await _relay_stream(session, frames)
    session.following = False
    await _took_over(session, cluster, cursor)


async def _relay_stream(session: Session, frames: list[tuple[int, str]]) -> int:
    # Another replica numbered and encoded these: they go to the writer as NumberedFrames
    # (same byte budget as relayed runtime chunks) and keep their seq.
    for seq, text in frames:
        while not session.outbound.has_space() and session.connection is not None:
            await session.space_ready.park()
        if session.connection is None and not (
            session.outbound.fits(len(text)) and session.hold_detached(len(text))
        ):
            # No client here and no room in the user's detached budget: the frame stays in
            # the shared stream only; the seq jump is reported as a loss when a client
            # attaches (Session.number).
            continue
        session.outbound.put_numbered(NumberedFrame(seq, text, _type_of(text)), len(text))
    session.frames_ready.unpark_all()
    return frames[-1][0]


async def _took_over(session: Session, cluster: Cluster, last_seq: int) -> None:
    # The lease is ours. If the stream's last frame (``last_seq``) is in the middle of a
    # turn, the replica that ran it died: that turn is lost, and the client is told so.
    tail: list[tuple[int, str]] = []
    if last_seq:
        with contextlib.suppress(StateUnavailable):
            tail = await cluster.read_after(session.id, last_seq - 1, 1)
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
    session.holds_lease = True
    session.lease_ready.set()


async def pump_handed_off(session: Session) -> None:
    """One of ``session``'s tasks when replicas share state: once its client moved to another
    replica (``session.handoff``), number and publish what is queued, and end the session
    when it is idle."""
    # While our client is on another replica, number and publish what the turn produces
    # (nobody here writes it to a socket), then end once the session is idle.
    while True:
        while not (session.handoff and session.connection is None):
            await session.frames_ready.park()
        frames = session.outbound.take_all()
        session.release_detached()  # the queue is empty: nothing held for a client here
        session.space_ready.unpark_all()
        now = trio.current_time()
        for frame in frames:
            kind = frame.kind if isinstance(frame, NumberedFrame) else frame.get("type")
            if kind not in CONNECTION_FRAME_TYPES:
                seq, _ = session.number(frame, now)
                session.replay.delivered(seq)  # published is as far as it goes from here
        session.maybe_hand_off()
        if not len(session.outbound):
            await session.frames_ready.park()


async def let_go(session: Session, cluster: Cluster) -> None:
    """Last step of an ending session: publish its queued frames and release its lease."""
    # Shielded and bounded: runs while the session is being cancelled. Flush what was
    # numbered, then release the lease so a follower can take over at once.
    with trio.CancelScope(shield=True), trio.move_on_after(cluster.timeout * 2):
        await cluster.flush(session.id)
        if session.holds_lease:
            with contextlib.suppress(StateUnavailable):  # else it expires by itself
                await cluster.release_lease(session.id)


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
