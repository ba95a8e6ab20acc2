"""Which user owns which session.

The first authenticated user to touch a session claims it; afterwards only that user may use
it. Storage sits behind the small :class:`OwnershipStore` protocol so that a shared store
(Redis, for several gateway replicas) can replace :class:`MemoryOwnershipStore` later.
There is no module-level state: each app creates its own store.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["MemoryOwnershipStore", "OwnershipStore", "check_access"]


@runtime_checkable
class OwnershipStore(Protocol):
    """Session → owner records. Implementations must make :meth:`claim` atomic.

    (For Redis that means ``SET session:<id> <user> NX`` followed by ``GET``, or a script.)
    """

    async def claim(self, session_id: str, user: str) -> str:
        """Record ``user`` as owner of ``session_id`` if unowned; return the owner.

        The returned owner is the existing one if the session was already claimed (possibly
        by someone else: compare it with ``user``), else ``user``.
        """
        ...

    async def owner(self, session_id: str) -> str | None:
        """The owner of ``session_id``, or None if nobody has claimed it."""
        ...

    async def sessions_of(self, user: str) -> frozenset[str]:
        """The sessions ``user`` owns (empty if none)."""
        ...

    async def forget(self, session_id: str) -> None:
        """Drop the ownership record of ``session_id`` (no-op if there is none)."""
        ...


def check_access(owner: str | None, user: str) -> bool:
    """Whether ``user`` may use a session whose recorded owner is ``owner``.

    None means unowned: access is allowed and the caller then claims the session for ``user``
    (and must re-check the owner :meth:`OwnershipStore.claim` returns, in case of a race).
    """
    return owner is None or owner == user


class OwnershipRefused(Exception):
    """A claim that would exceed a bound: ``reason`` is ``store_full`` or ``user_limit``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MemoryOwnershipStore:
    """In-process :class:`OwnershipStore`, bounded in total and per user.

    The methods are ``async`` to match the protocol but never block or yield, so each call,
    including the check-and-set in :meth:`claim`, is atomic with respect to other tasks.

    A full store refuses new claims (:class:`OwnershipRefused`) instead of evicting records
    still in use: an evicted record would make a session unowned again, and whoever learnt its
    id could then claim it (a takeover). The per-user bound keeps one user from filling the
    store. Records leave through :meth:`forget` (the session was deleted) or, when ``idle_ttl``
    is positive, once their session has not been claimed or used for ``idle_ttl`` seconds:
    without that a long-lived process would refuse every new session of a user after
    ``max_per_user`` of them, and everybody's after ``max_sessions``. ``idle_ttl=0`` keeps
    records for ever.
    """

    def __init__(
        self,
        max_sessions: int = 1_000_000,
        max_per_user: int = 10_000,
        idle_ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1 or max_per_user < 1:
            raise ValueError("max_sessions and max_per_user must be >= 1")
        if idle_ttl < 0:
            raise ValueError("idle_ttl must be >= 0")
        self.max_sessions = max_sessions
        self.max_per_user = max_per_user
        self.idle_ttl = idle_ttl
        self._clock = clock
        # session -> (owner, last used); ordered by last use, oldest first, so expiry only
        # ever looks at the front (amortised O(1) per call).
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._by_user: dict[str, set[str]] = {}

    def __len__(self) -> int:
        """How many sessions have an owner on record."""
        self._expire()
        return len(self._owners)

    async def claim(self, session_id: str, user: str) -> str:
        """Record ``user`` as owner of ``session_id`` if unowned; return the owner.

        Claiming an owned session (by anyone) counts as using it: its record lives another
        ``idle_ttl``. Raises ValueError for an empty ``session_id`` or ``user`` (an
        unauthenticated caller must never own anything) and :class:`OwnershipRefused` when a
        bound is reached.
        """
        if not session_id:
            raise ValueError("session_id must be a non-empty string")
        if not user:
            raise ValueError("user must be a non-empty string")
        self._expire()
        now = self._clock()
        existing = self._owners.get(session_id)
        if existing is not None:
            owner = existing[0]
            self._owners[session_id] = (owner, now)
            self._owners.move_to_end(session_id)
            return owner
        if len(self._owners) >= self.max_sessions:
            raise OwnershipRefused("store_full")
        mine = self._by_user.get(user, set())
        if len(mine) >= self.max_per_user:
            raise OwnershipRefused("user_limit")
        self._owners[session_id] = (user, now)
        self._by_user[user] = mine
        mine.add(session_id)
        return user

    async def owner(self, session_id: str) -> str | None:
        """The owner of ``session_id``, or None if nobody has claimed it (or it expired)."""
        self._expire()
        record = self._owners.get(session_id)
        return None if record is None else record[0]

    async def sessions_of(self, user: str) -> frozenset[str]:
        """The sessions ``user`` owns (empty if none)."""
        self._expire()
        return frozenset(self._by_user.get(user, ()))

    async def forget(self, session_id: str) -> None:
        """Drop the ownership record of ``session_id`` (no-op if there is none)."""
        record = self._owners.pop(session_id, None)
        if record is not None:
            self._unlink(session_id, record[0])

    def _expire(self) -> None:
        """Drop the records unused for ``idle_ttl`` (the oldest sit at the front)."""
        if not self.idle_ttl:
            return
        deadline = self._clock() - self.idle_ttl
        while self._owners:
            session_id, (owner, used) = next(iter(self._owners.items()))
            if used > deadline:
                return
            del self._owners[session_id]
            self._unlink(session_id, owner)

    def _unlink(self, session_id: str, owner: str) -> None:
        """Remove ``session_id`` from ``owner``'s set, dropping the set when it empties."""
        sessions = self._by_user.get(owner)
        if sessions is not None:
            sessions.discard(session_id)
            if not sessions:
                del self._by_user[owner]
