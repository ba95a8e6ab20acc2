"""The app's connection to the shared Redis (``STATE_BACKEND=redis``) and its health.

One :class:`RedisState` per app: the coredis client, this replica's id, the key prefix, and
an ``available`` flag that a background task keeps up to date (a PING every second). Every
Redis call goes through :meth:`RedisState.guard`, which bounds it with ``REDIS_TIMEOUT`` and
turns any Redis error or timeout into :class:`~trio_gateway.state.state.StateUnavailable`, so that a
Redis that is down, or that silently drops packets, can never wedge a handshake.

While Redis is unavailable, :meth:`~RedisState.guard` fails at once without trying: a
blackholed Redis would otherwise cost every caller the full timeout. The health task notices
the recovery within about a second and calls go through again; nothing else needs restarting.

The stores built on top live in ``redis_stores.py``; the session engine (leases, streams) uses
:attr:`RedisState.client`, :meth:`RedisState.key` and :meth:`RedisState.guard` directly.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import coredis
import trio
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError

from ..settings import Settings
from .state import STATE_UNAVAILABLE, StateUnavailable

__all__ = ["HEALTH_INTERVAL", "RedisState"]

logger = logging.getLogger("trio_gateway.redis")

#: Seconds between health PINGs, up or down (how fast an outage and a recovery are noticed).
HEALTH_INTERVAL = 1.0


class RedisState:
    """The coredis client of one app, its replica id and whether Redis currently answers.

    Start :meth:`run` in the app's nursery (it owns the client's task group) before any call;
    until its first PING succeeds, :attr:`available` is False and every call fails fast.
    """

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.redis_key_prefix
        self.timeout = settings.redis_timeout
        #: Unique per process start: names this replica's entries in shared keys.
        self.replica_id = uuid.uuid4().hex
        # Lazy: nothing connects until the first command, inside run()'s `async with`.
        self.client: coredis.Redis[str] = coredis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            decode_responses=True,
            client_name=f"trio-gateway-{self.replica_id}",
            connect_timeout=settings.redis_timeout,
        )
        self.available = False
        #: Calls that failed (errors and timeouts) since start, for metrics and tests.
        self.failures = 0
        self._running = False

    def key(self, *parts: str) -> str:
        """The full Redis key for ``parts``: ``{prefix}part1:part2...``."""
        return self.prefix + ":".join(parts)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Bound the Redis calls in the block by ``REDIS_TIMEOUT`` and map failures.

        Raises :class:`StateUnavailable` at once when Redis is known to be down (or
        :meth:`run` has not started), and for any error or timeout inside the block. Lost
        connections and timeouts also mark Redis unavailable until the next successful PING;
        a command error (such as OOM) does not, since Redis itself still answers.

        A command cut short by the timeout may still have been executed by Redis: callers
        must only write what is safe to leave behind (expiring entries, idempotent sets).
        """
        if not self.available:
            raise StateUnavailable(STATE_UNAVAILABLE)
        try:
            with trio.fail_after(self.timeout):
                yield
        except trio.TooSlowError:
            self.failures += 1
            self._mark_down(f"no answer within {self.timeout:g} s")
            raise StateUnavailable(STATE_UNAVAILABLE) from None
        except (RedisConnectionError, OSError) as error:
            self.failures += 1
            self._mark_down(type(error).__name__)
            raise StateUnavailable(STATE_UNAVAILABLE) from error
        except RedisError as error:
            self.failures += 1
            logger.warning(
                "redis command failed: %s",
                type(error).__name__,
                extra={"event": "state_error", "reason": type(error).__name__},
            )
            raise StateUnavailable(STATE_UNAVAILABLE) from error

    def _mark_down(self, reason: str) -> None:
        # Log the transition only: during an outage every request would log otherwise.
        if self.available:
            self.available = False
            logger.error(
                "shared state (Redis) unavailable: %s; refusing new sessions until it answers",
                reason,
                extra={"event": "state_down", "reason": reason},
            )

    async def ping(self) -> bool:
        """One health probe (bounded by ``REDIS_TIMEOUT``); updates and returns
        :attr:`available`."""
        reason = ""
        with trio.move_on_after(self.timeout):
            try:
                await self.client.ping()
            except (RedisError, OSError) as error:
                reason = type(error).__name__
            else:
                if not self.available:
                    logger.info("shared state (Redis) available", extra={"event": "state_up"})
                self.available = True
                return True
        self._mark_down(reason or f"no answer within {self.timeout:g} s")
        return False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the client and probe Redis every :data:`HEALTH_INTERVAL` until cancelled.

        Reports started after the first probe, whatever its outcome: a gateway whose Redis is
        down still starts (not ready, refusing new sessions) and recovers by itself.
        """
        if self._running:
            raise RuntimeError("RedisState.run() is already running")
        self._running = True
        try:
            async with self.client:
                await self.ping()
                task_status.started()
                while True:
                    await trio.sleep(HEALTH_INTERVAL)
                    await self.ping()
        finally:
            self.available = False
