"""Sans-IO outbound frame queue with token coalescing and byte accounting.

The turn runner puts relayed runtime chunks in, the connection's single writer takes everything
that is waiting. When the writer keeps up, each chunk is taken on its own and goes out at once
(latency first). When the writer falls behind, consecutive non-final ``assistant_message``
chunks are merged *as they arrive* (``token`` and ``content`` concatenated), so a slow link gets
fewer, larger frames and the per-token cost stays a list append. Nothing is ever dropped: only
chunks whose other fields are identical are merged.

Two budgets: relayed runtime data is bounded in bytes (when full, the turn runner stops reading
the runtime: backpressure), and gateway-made control frames (errors, pongs) are bounded in
count (a client that provokes errors without reading them is cut off by the session).

A frame another replica already numbered and encoded (read from the session's shared stream
for cross-replica resume, ``docs/scaling.md``) rides the same queue as a :class:`NumberedFrame`:
it counts against the byte budget like a relayed chunk but is never merged, and the writer
sends its text as is under its own seq.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

Frame = dict[str, Any]

_TEXT_KEYS = ("token", "content")


@dataclass(frozen=True, slots=True)
class NumberedFrame:
    """A frame already numbered and encoded elsewhere: another replica's frame ``seq``,
    exactly as it appended ``text`` to the session's shared stream.

    ``kind`` is the frame's ``type`` (read once from ``text``), for the writer's v1 filter
    and its metrics.
    """

    seq: int
    text: str
    kind: object


# What the queue hands to the writer: a frame to number and encode, or one that already is.
Outgoing = Frame | NumberedFrame


class _Entry:
    __slots__ = ("control", "frame", "parts", "size")

    def __init__(self, frame: Outgoing, size: int, control: bool) -> None:
        self.frame = frame
        self.size = size
        self.control = control
        # (tokens, contents) while this entry is an open merge target, else None
        self.parts: tuple[list[str], list[str]] | None = None

    def materialize(self) -> Outgoing:
        frame = self.frame
        if self.parts is not None and not isinstance(frame, NumberedFrame):
            tokens, contents = self.parts
            frame["token"] = "".join(tokens)
            frame["content"] = "".join(contents)
            self.parts = None
        return frame


def is_mergeable(frame: Frame) -> bool:
    """A streamed, explicitly non-final assistant token whose text fields are strings.

    ``is_final`` must be present and false: the IDE treats a missing ``is_final`` as true.
    """
    return (
        frame.get("type") == "assistant_message"
        and frame.get("is_final") is False
        and isinstance(frame.get("token", ""), str)
        and isinstance(frame.get("content", ""), str)
    )


def _same_fields_except_text(a: Frame, b: Frame) -> bool:
    if len(a) - sum(k in a for k in _TEXT_KEYS) != len(b) - sum(k in b for k in _TEXT_KEYS):
        return False
    return all(k in _TEXT_KEYS or (k in b and b[k] == v) for k, v in a.items())


class OutboundQueue:
    """FIFO of frames waiting for the socket. Not thread- or task-aware: callers coordinate."""

    def __init__(self, max_bytes: int, max_control: int) -> None:
        self.max_bytes = max_bytes
        self.max_control = max_control
        # () while nothing waits: an empty deque costs ~600 bytes and most sessions sit idle
        # (docs/performance.md, "Idle memory"); _queue() makes the deque on the first put.
        self._entries: deque[_Entry] | tuple[()] = ()
        self.pending_bytes = 0
        self.pending_control = 0
        self.merged_chunks = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _queue(self) -> deque[_Entry]:
        entries = self._entries
        if isinstance(entries, deque):
            return entries
        queue: deque[_Entry] = deque()
        self._entries = queue
        return queue

    def has_space(self) -> bool:
        """True while relayed data stays under the byte budget."""
        return self.pending_bytes < self.max_bytes

    def fits(self, size: int) -> bool:
        """Whether ``size`` more relayed bytes stay within the byte budget.

        A chunk larger than the whole budget fits only into an empty queue: it is then
        deliverable, and the overshoot is that one chunk on its own, counted in full.
        """
        return self.pending_bytes == 0 or self.pending_bytes + size <= self.max_bytes

    def drop_relayed(self) -> tuple[int, bool]:
        """Discard every relayed entry, keeping the gateway-made ones in order.

        Returns how many entries were dropped and whether one of them ended its turn (a frame
        whose ``is_final`` is not explicitly false): the caller owes the client a stand-in.
        """
        kept: deque[_Entry] = deque()
        dropped = 0
        final = False
        for entry in self._entries:
            if entry.control:
                kept.append(entry)
                continue
            dropped += 1
            frame = entry.frame
            if not isinstance(frame, NumberedFrame) and frame.get("is_final") is not False:
                final = True
        self._entries = kept if kept else ()
        self.pending_bytes = 0
        return dropped, final

    def control_overflow(self) -> bool:
        """True when more control frames wait than a well-behaved client would leave unread."""
        return self.pending_control > self.max_control

    def put_chunk(self, frame: Frame, size: int) -> None:
        """Queue a relayed runtime chunk of ``size`` bytes, merging it into the tail if possible.

        The caller enforces the byte budget (it waits until :meth:`fits` first), so ``size``
        must be the chunk's real size: a chunk larger than the whole budget then goes into an
        empty queue only, counted in full, which keeps it deliverable.
        """
        self.pending_bytes += size
        entries = self._queue()
        if entries and is_mergeable(frame):
            tail = entries[-1]
            target = tail.frame
            if (
                not tail.control
                and not isinstance(target, NumberedFrame)
                and is_mergeable(target)
                and _same_fields_except_text(target, frame)
            ):
                if tail.parts is None:
                    tail.parts = (
                        [target.get("token", "")],
                        [target.get("content", "")],
                    )
                tail.parts[0].append(frame.get("token", ""))
                tail.parts[1].append(frame.get("content", ""))
                tail.size += size
                self.merged_chunks += 1
                return
        entries.append(_Entry(frame, size, control=False))

    def put_numbered(self, frame: NumberedFrame, size: int) -> None:
        """Queue a frame numbered elsewhere, ``size`` bytes against the budget like a chunk.

        Never merged, and nothing merges into it; the caller enforces the budget as for
        :meth:`put_chunk`.
        """
        self.pending_bytes += size
        self._queue().append(_Entry(frame, size, control=False))

    def put_control(self, frame: Frame) -> None:
        """Queue a gateway-made frame; never blocks, never merges."""
        self.pending_control += 1
        self._queue().append(_Entry(frame, 0, control=True))

    def put_control_front(self, frame: Frame) -> None:
        """Queue a gateway-made frame ahead of everything waiting (greetings on attach)."""
        self.pending_control += 1
        self._queue().appendleft(_Entry(frame, 0, control=True))

    def take_all(self) -> list[Outgoing]:
        """Remove and return every waiting frame, merged text materialized, budgets released."""
        entries = self._entries
        self._entries = ()
        self.pending_bytes = 0
        self.pending_control = 0
        return [entry.materialize() for entry in entries]

    def drop_all(self) -> int:
        """Discard everything waiting (used when a session ends); returns how many frames."""
        count = len(self._entries)
        self.take_all()
        return count


class ViewerBacklog:
    """What a viewer socket (another IDE window on the session) has yet to send: the frames
    the live socket numbered and encoded, in order, bounded in bytes. Made only when a socket
    becomes a viewer: most sockets never are."""

    __slots__ = ("_bytes", "_texts")

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._bytes = 0

    @property
    def empty(self) -> bool:
        """Nothing waits."""
        return not self._texts

    def add(self, text: str, limit: int) -> bool:
        """Keep ``text``; False when the backlog went over ``limit`` bytes (the caller closes
        the viewer rather than let it grow)."""
        self._texts.append(text)
        # Bytes, as documented: a frame of non-ASCII text is up to 4x its length.
        self._bytes += len(text) if text.isascii() else len(text.encode())
        return self._bytes <= limit

    def take_all(self) -> list[str]:
        """Remove and return everything waiting, oldest first."""
        texts = self._texts
        self._texts = []
        self._bytes = 0
        return texts
