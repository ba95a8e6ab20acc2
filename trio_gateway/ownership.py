"""Which user owns which session.

The first authenticated user to touch a session claims it; afterwards only that user may use
it. Storage sits behind the small :class:`OwnershipStore` protocol so that a shared store
(Redis, for several gateway replicas) can replace :class:`MemoryOwnershipStore` later.
There is no module-level state: each app creates its own store.
"""

from __future__ import annotations

from collections import OrderedDict
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


class MemoryOwnershipStore:
    """In-process :class:`OwnershipStore`, bounded to ``max_sessions`` records.

    The methods are ``async`` to match the protocol but never block or yield, so each call,
    including the check-and-set in :meth:`claim`, is atomic with respect to other tasks.

    Records are kept in claim order; every :meth:`claim` call on a session (also the
    owner re-claiming it) moves it to the young end. When a new claim would exceed
    ``max_sessions``, the least recently claimed record is evicted. **Consequence: an evicted
    session is unowned again, and whoever touches it next claims it**, possibly a different
    user who learnt its id. Set ``max_sessions`` well above the number of live sessions, and
    :meth:`forget` sessions when they end, so that only long-dead records are ever evicted.
    """

    def __init__(self, max_sessions: int = 1_000_000) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions!r}")
        self.max_sessions = max_sessions
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._by_user: dict[str, set[str]] = {}

    def __len__(self) -> int:
        """How many sessions have an owner on record."""
        return len(self._owners)

    async def claim(self, session_id: str, user: str) -> str:
        """Record ``user`` as owner of ``session_id`` if unowned; return the owner.

        Raises ValueError for an empty ``session_id`` or ``user`` (an unauthenticated caller
        must never own anything).
        """
        if not session_id:
            raise ValueError("session_id must be a non-empty string")
        if not user:
            raise ValueError("user must be a non-empty string")
        existing = self._owners.get(session_id)
        if existing is not None:
            self._owners.move_to_end(session_id)
            return existing
        self._owners[session_id] = user
        self._by_user.setdefault(user, set()).add(session_id)
        while len(self._owners) > self.max_sessions:
            evicted, evicted_owner = self._owners.popitem(last=False)
            self._unlink(evicted, evicted_owner)
        return user

    async def owner(self, session_id: str) -> str | None:
        """The owner of ``session_id``, or None if nobody has claimed it (or it was evicted)."""
        return self._owners.get(session_id)

    async def sessions_of(self, user: str) -> frozenset[str]:
        """The sessions ``user`` owns (empty if none)."""
        return frozenset(self._by_user.get(user, ()))

    async def forget(self, session_id: str) -> None:
        """Drop the ownership record of ``session_id`` (no-op if there is none)."""
        owner = self._owners.pop(session_id, None)
        if owner is not None:
            self._unlink(session_id, owner)

    def _unlink(self, session_id: str, owner: str) -> None:
        """Remove ``session_id`` from ``owner``'s set, dropping the set when it empties."""
        sessions = self._by_user.get(owner)
        if sessions is not None:
            sessions.discard(session_id)
            if not sessions:
                del self._by_user[owner]
