"""Sans-IO FIFO of runtime-bound messages waiting behind the running turn of one session."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

Item = TypeVar("Item")


class TurnQueue(Generic[Item]):
    """Bounded FIFO: one turn runs at a time; up to ``limit`` messages wait behind it.

    ``offer`` never blocks: a full queue is the caller's cue to answer ``busy``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[Item] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, message: Item) -> bool:
        """Append ``message`` unless the queue is full; return whether it was accepted."""
        if len(self._items) >= self.limit:
            return False
        self._items.append(message)
        return True

    def pop(self) -> Item | None:
        """The oldest waiting message, or None when empty."""
        return self._items.popleft() if self._items else None

    def clear(self) -> int:
        """Drop every waiting message; return how many were dropped."""
        dropped = len(self._items)
        self._items.clear()
        return dropped
