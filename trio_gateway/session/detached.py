"""Sans-IO per-user byte budget for what detached sessions hold.

A session whose client left keeps running its turn for the grace period (the runtime finishes
and persists the answer) and keeps the turn's frames in its outbound queue for a client that
comes back. Each queue is bounded per session (``OUTBOUND_QUEUE_MAX_BYTES``), but one user may
hold many live sessions: without a bound per user, a user who opens sessions, asks for long
answers and leaves pins memory for the whole grace period of every one of them.

:class:`DetachedBudget` is the ledger: the session engine charges every relayed byte a detached
session keeps and gives it back when a client re-attaches (the per-session budget and the
client's reading take over) or the session ends. What does not fit is not kept; the engine
counts it as lost and tells the returning client to resync. Nothing here does I/O or reads a
clock; keys are the same per-user limit keys as the other per-user caps.
"""

from __future__ import annotations

__all__ = ["DetachedBudget"]


class DetachedBudget:
    """Bytes held per key (user) against one per-key limit, and their total.

    :meth:`try_charge` admits a charge only if the key stays within ``per_key_limit`` with it,
    so a single charge larger than the limit is never admitted (an oversized chunk is refused,
    not slipped in). Every admitted charge must be given back with :meth:`release`; keys whose
    balance drops to zero are forgotten, so memory follows the number of users holding bytes.
    """

    __slots__ = ("_held", "_total", "per_key_limit")

    def __init__(self, per_key_limit: int) -> None:
        if per_key_limit < 0:
            raise ValueError(f"per_key_limit must be >= 0 bytes, got {per_key_limit!r}")
        self.per_key_limit = per_key_limit
        self._held: dict[str, int] = {}
        self._total = 0

    def __len__(self) -> int:
        """How many keys hold bytes."""
        return len(self._held)

    @property
    def total(self) -> int:
        """Bytes held across every key."""
        return self._total

    def held(self, key: str) -> int:
        """Bytes ``key`` holds."""
        return self._held.get(key, 0)

    def room(self, key: str) -> int:
        """Bytes ``key`` may still charge."""
        return max(0, self.per_key_limit - self._held.get(key, 0))

    def try_charge(self, key: str, size: int) -> bool:
        """Charge ``size`` bytes to ``key`` if it stays within the limit; return whether it did.

        A refused charge changes nothing. A zero-byte charge always succeeds.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0 bytes, got {size!r}")
        if size == 0:
            return True
        held = self._held.get(key, 0)
        if held + size > self.per_key_limit:
            return False
        self._held[key] = held + size
        self._total += size
        return True

    def release(self, key: str, size: int) -> None:
        """Give back ``size`` bytes charged to ``key``.

        Raises ValueError when ``key`` holds less than ``size``: giving back more than was
        charged is a bug in the caller, and hiding it would let the ledger drift.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0 bytes, got {size!r}")
        if size == 0:
            return
        held = self._held.get(key, 0)
        if size > held:
            raise ValueError(f"release({key!r}, {size}) exceeds the {held} bytes it holds")
        if held == size:
            del self._held[key]
        else:
            self._held[key] = held - size
        self._total -= size
