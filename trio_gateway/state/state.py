"""Backend-neutral shared state: the interfaces the doors use, and their in-process versions.

The gateway keeps three kinds of per-user state that must be shared once several replicas
serve the same users: session ownership (``ownership.py``), concurrent connections per user,
and per-user rates. This module defines the async interfaces for the last two, the single
exception every shared backend raises when it cannot answer (:class:`StateUnavailable`), and
the memory implementations over the sans-IO classes of ``limits.py``. It never imports a Redis
client, so a memory-only deployment does not need one.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from ..limits import ConnectionCounter, ConnectionRefusal, RateLimiter

__all__ = [
    "STATE_UNAVAILABLE",
    "ConnectionLimiter",
    "MemoryConnectionLimiter",
    "MemoryRateLimiter",
    "RateLimit",
    "StateUnavailable",
]

#: The description clients get (503 body, 1013 close reason) when the shared state is down.
STATE_UNAVAILABLE = "the state backend (Redis or SQLite) is unavailable"


class StateUnavailable(Exception):
    """The shared-state backend did not answer (down, too slow, or refused the command).

    Callers turn it into a refusal of *new* work (HTTP 503, close 1013) or, for rate checks of
    already admitted traffic, into "allowed" (fail open); see ``Security``.
    """


@runtime_checkable
class ConnectionLimiter(Protocol):
    """Concurrent connections per user (possibly across replicas) and per process.

    Same semantics as :class:`~trio_gateway.limits.ConnectionCounter`, but async, because a
    shared implementation has to ask another server.
    """

    async def try_acquire(self, user: str) -> ConnectionRefusal | None:
        """Count one more connection of ``user``: None when granted, else why not.

        ``"per_user"`` is checked before ``"total"``. A refusal changes nothing. Raises
        :class:`StateUnavailable` when the backend cannot answer (nothing is granted then).
        """
        ...

    async def release(self, user: str) -> None:
        """Give back one connection granted to ``user``.

        Never raises :class:`StateUnavailable`: a shared backend that cannot be reached lets
        the record expire on its own. Raises ValueError for a release without a grant.
        """
        ...


@runtime_checkable
class RateLimit(Protocol):
    """Per-key token buckets (possibly shared across replicas)."""

    async def check(self, key: str, cost: float = 1.0) -> tuple[bool, float]:
        """Charge ``cost`` to ``key``: ``(allowed, retry_after_seconds)`` like
        :meth:`~trio_gateway.limits.RateLimiter.check`.

        Raises :class:`StateUnavailable`."""
        ...


class MemoryConnectionLimiter:
    """:class:`ConnectionLimiter` of one process: a :class:`ConnectionCounter` behind the async
    interface. The methods never yield, so acquire and release stay atomic between tasks."""

    def __init__(self, per_user_limit: int, total_limit: int) -> None:
        self.counter = ConnectionCounter(per_user_limit, total_limit)

    async def try_acquire(self, user: str) -> ConnectionRefusal | None:
        """See :meth:`ConnectionLimiter.try_acquire`."""
        return self.counter.try_acquire(user)

    async def release(self, user: str) -> None:
        """See :meth:`ConnectionLimiter.release`."""
        self.counter.release(user)


class MemoryRateLimiter:
    """:class:`RateLimit` of one process: a :class:`RateLimiter` read with ``time.monotonic``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.limiter = RateLimiter(rate, burst)

    async def check(self, key: str, cost: float = 1.0) -> tuple[bool, float]:
        """See :meth:`RateLimit.check`."""
        return self.limiter.check(key, time.monotonic(), cost)
