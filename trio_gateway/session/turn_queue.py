"""Sans-IO FIFO of runtime-bound messages waiting behind the running turn of one session."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

Item = TypeVar("Item")


class TurnQueue(Generic[Item]):
    """Bounded FIFO: one turn runs at a time; up to ``limit`` messages wait behind it.

    ``offer`` never blocks: a full queue is the caller's cue to answer ``busy``.
    """

    __slots__ = ("_items", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Created at the first message: an empty deque costs ~600 bytes, and most sessions
        # sit idle (docs/performance.md, "Idle memory").
        self._items: deque[Item] | None = None

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def offer(self, message: Item) -> bool:
        """Append ``message`` unless the queue is full; return whether it was accepted."""
        items = self._items
        if items is None:
            if self.limit <= 0:
                return False
            items = self._items = deque()
        elif len(items) >= self.limit:
            return False
        items.append(message)
        return True

    def pop(self) -> Item | None:
        """The oldest waiting message, or None when empty."""
        return self._items.popleft() if self._items else None

    def clear(self) -> int:
        """Drop every waiting message; return how many were dropped."""
        dropped = len(self)
        if self._items:
            self._items.clear()
        return dropped
