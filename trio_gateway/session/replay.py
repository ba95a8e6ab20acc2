"""Sans-IO replay buffer: the recent frames of one session, by ``seq``, for lossless resume.

The session's writer appends every frame it numbers (already encoded, so a replay sends the
exact bytes the first attempt sent) before it writes it to the socket. A v2 client that
reconnects says which ``seq`` it saw last; :meth:`ReplayBuffer.since` answers with every later
frame, or ``None`` when that cannot be done exactly. There is no partial answer: a gap would be
a silent loss, and the caller turns ``None`` into ``resync_required``.

Bounds: frame count, encoded size and age (the session grace period: nobody can come back for
an older frame). One exception keeps the engine lossless on plain re-attach: frames numbered
after ``delivered_seq`` (taken by a writer whose socket failed before they went out) are never
evicted; there are at most one writer batch of them, itself bounded by the outbound budget.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum

__all__ = ["ReplayBuffer", "ReplayGap"]


class ReplayGap(StrEnum):
    """Why :meth:`ReplayBuffer.since` cannot replay exactly (the ``reason`` of resync)."""

    EXPIRED = "frames_expired"  # the frames after last_seq were evicted (count, bytes, age)
    UNKNOWN_SEQ = "unknown_seq"  # the client is ahead of this session (another session life)


class ReplayBuffer:
    """The last frames of a session, in ``seq`` order, bounded by count, bytes and age."""

    __slots__ = (
        "_entries",
        "delivered_seq",
        "last_seq",
        "max_age",
        "max_bytes",
        "max_frames",
        "size",
    )

    def __init__(self, max_frames: int, max_bytes: int, max_age: float) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.max_age = max_age
        # (seq, encoded frame, time appended); seqs are consecutive. () until the first
        # frame: an empty deque costs ~600 bytes and most sessions sit idle.
        self._entries: deque[tuple[int, str, float]] | tuple[()] = ()
        self.size = 0  # sum of len(text): characters, a cheap stand-in for bytes
        self.last_seq = 0  # highest seq ever appended
        self.delivered_seq = 0  # highest seq a socket accepted

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (``last_seq + 1`` when empty)."""
        return self._entries[0][0] if self._entries else self.last_seq + 1

    def append(self, seq: int, text: str, now: float) -> None:
        """Record frame ``seq`` (which must be ``last_seq + 1``) and evict what is out of bounds."""
        if seq != self.last_seq + 1:
            raise ValueError(f"seq {seq} does not follow {self.last_seq}")
        entries = self._entries
        if not isinstance(entries, deque):
            entries = self._entries = deque()
        entries.append((seq, text, now))
        self.size += len(text)
        self.last_seq = seq
        self.trim(now)

    def delivered(self, seq: int) -> None:
        """A socket accepted every frame up to ``seq``."""
        if seq > self.delivered_seq:
            self.delivered_seq = seq

    def trim(self, now: float) -> None:
        """Evict the oldest frames beyond the bounds, but never an undelivered one."""
        entries = self._entries
        if not isinstance(entries, deque):
            return
        oldest_allowed = now - self.max_age
        while entries:
            seq, text, at = entries[0]
            if seq > self.delivered_seq:
                break
            if (
                len(entries) <= self.max_frames
                and self.size <= self.max_bytes
                and at >= oldest_allowed
            ):
                break
            entries.popleft()
            self.size -= len(text)

    def since(self, last_seq: int, now: float) -> list[tuple[int, str]] | ReplayGap:
        """Every frame after ``last_seq``, in order, or why that cannot be answered exactly."""
        self.trim(now)
        if last_seq > self.last_seq:
            return ReplayGap.UNKNOWN_SEQ
        if last_seq + 1 < self.first_seq:
            return ReplayGap.EXPIRED
        skip = last_seq + 1 - self.first_seq
        return [(seq, text) for seq, text, _ in list(self._entries)[skip:]]

    def undelivered(self, now: float) -> list[tuple[int, str]]:
        """Frames numbered but never accepted by a socket (always held, see the module doc)."""
        replay = self.since(self.delivered_seq, now)
        assert not isinstance(replay, ReplayGap), "undelivered frames are never evicted"
        return replay

    def restart_at(self, seq: int) -> None:
        """Forget every frame and continue numbering after ``seq`` (a session whose earlier
        frames live in the shared stream of another replica)."""
        self.clear()
        self.last_seq = seq
        self.delivered_seq = seq

    def clear(self) -> None:
        """Forget every frame (the session ended)."""
        self._entries = ()
        self.size = 0
