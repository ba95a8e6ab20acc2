"""Sessions across gateway replicas (``STATE_BACKEND=redis``): leases, frame streams, takeovers.

Three Redis structures per session, all under ``REDIS_KEY_PREFIX`` (details and lifetimes in
``docs/scaling.md``):

``lease:<session>``
    The replica that runs the session's turns (``SET NX PX``, renewed every third of
    ``SESSION_LEASE_SECONDS``, released with a compare-and-delete). One runner at a time keeps
    the runtime's "one turn per session" contract across replicas.
``frames:<session>``
    A Redis Stream of the session's numbered frames, entry id ``<seq>-1``, capped at
    ``REPLAY_MAX_FRAMES`` and expiring ``SESSION_GRACE_SECONDS`` after the last append. Redis
    refuses an id that does not grow, which also fences a replica that lost its lease.
``takeover`` (a pub/sub channel)
    ``<replica> <session>``: a client connected to that session on that replica, so every
    other replica closes its own connection to it (4409) and hands the session over.

Everything here goes through :meth:`RedisState.guard` and raises
:class:`~trio_gateway.state.state.StateUnavailable` for any Redis failure or timeout, so the callers
decide: refuse new sessions (503 / 1013), let running turns finish.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import coredis
import trio

from ..settings import Settings
from .redis_state import RedisState
from .state import STATE_UNAVAILABLE, StateUnavailable

logger = logging.getLogger("trio_gateway.cluster")

__all__ = ["Cluster"]

T = TypeVar("T")

PUBLISH_LINGER_SECONDS = 0.005  # batching window for appends to the shared streams

# Compare-and-set scripts: only the holder may renew or release (a replica that paused past
# its lease must not delete the new holder's lease).
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


class Cluster:
    """The Redis side of sessions shared by replicas; one per app, sessions call into it."""

    def __init__(
        self,
        state: RedisState,
        *,
        lease_seconds: float,
        stream_max_frames: int,
        stream_ttl_seconds: float,
    ) -> None:
        self.state = state
        self.client = state.client
        self.prefix = state.prefix
        self.replica_id = state.replica_id
        self.timeout = state.timeout
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.stream_max_frames = max(1, stream_max_frames)
        self.stream_ttl_ms = max(1000, int(stream_ttl_seconds * 1000))
        self.channel = state.key("takeover")
        # Frames waiting to be appended, by session: one publisher task per replica sends them
        # all in one pipeline per PUBLISH_LINGER_SECONDS. One pipeline per session instead
        # exhausted the client's pool under load (50 streaming sessions: 5 s waits, Redis
        # marked down), and each coredis call costs ~1 ms of CPU.
        self._pending: dict[str, list[tuple[int, str]]] = {}
        self._in_flight: frozenset[str] = frozenset()
        self._pending_ready = trio.lowlevel.ParkingLot()
        self._batch_done = trio.lowlevel.ParkingLot()
        self.append_failures = 0
        self.on_append_failure: Callable[[], object] | None = None  # e.g. a metric
        self._failing = False
        self._acquire = self.client.register_script(_ACQUIRE)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    @classmethod
    def for_settings(cls, state: RedisState, settings: Settings) -> Cluster:
        """The app's cluster over its :class:`RedisState`, bounded by ``settings``."""
        return cls(
            state,
            lease_seconds=settings.session_lease_seconds,
            stream_max_frames=settings.replay_max_frames,
            stream_ttl_seconds=settings.session_grace_seconds + settings.session_lease_seconds,
        )

    def lease_key(self, session_id: str) -> str:
        """The Redis key of a session's lease."""
        return self.state.key("lease", session_id)

    def stream_key(self, session_id: str) -> str:
        """The Redis key of a session's frame stream."""
        return self.state.key("frames", session_id)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        # Bounded by REDIS_TIMEOUT and mapped to StateUnavailable (fails at once while Redis
        # is known to be down): a Redis that blackholes packets must not wedge a session.
        with self.state.guard():
            return await call()

    # --- leases ------------------------------------------------------------------------------

    async def acquire_lease(self, session_id: str) -> bool:
        """Take (or keep) the session's lease; False when another replica holds it."""
        key, me, ms = self.lease_key(session_id), self.replica_id, self.lease_ms
        got: object = await self._call(lambda: self._acquire(keys=[key], args=[me, ms]))
        return bool(got)

    async def renew_lease(self, session_id: str) -> bool:
        """Extend the lease; False when it is no longer ours (expired and taken)."""
        key, me, ms = self.lease_key(session_id), self.replica_id, self.lease_ms
        return bool(await self._call(lambda: self._renew(keys=[key], args=[me, ms])))

    async def release_lease(self, session_id: str) -> None:
        """Give the lease up if it is ours."""
        key, me = self.lease_key(session_id), self.replica_id
        await self._call(lambda: self._release(keys=[key], args=[me]))

    # --- frame streams -------------------------------------------------------------------------

    def publish(self, session_id: str, seq: int, text: str) -> None:
        """Queue frame ``seq`` of a session for its stream; never blocks (see run_publisher)."""
        frames = self._pending.get(session_id)
        if frames is None:
            frames = self._pending[session_id] = []
            if len(self._pending) == 1:
                self._pending_ready.unpark_all()
        frames.append((seq, text))

    async def run_publisher(self) -> None:
        """Append what sessions queued, every session's frames in one pipeline, forever."""
        while True:
            while not self._pending:
                await self._pending_ready.park()
            await trio.sleep(PUBLISH_LINGER_SECONDS)  # a burst becomes one pipeline
            await self._append_pending(None)

    async def flush(self, session_id: str) -> None:
        """Append a session's queued frames now (it is ending), after any batch in flight
        that holds some of them; bounded by REDIS_TIMEOUT per wait."""
        with trio.move_on_after(self.timeout * 2):
            while session_id in self._in_flight:
                await self._batch_done.park()
        if session_id in self._pending:
            await self._append_pending(session_id)

    async def _append_pending(self, only: str | None) -> None:
        if only is None:
            batch, self._pending = self._pending, {}
        else:
            batch = {only: self._pending.pop(only)}
        self._in_flight = self._in_flight | batch.keys()

        async def run() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for session_id, frames in batch.items():
                    key = self.stream_key(session_id)
                    for seq, text in frames:
                        pipe.xadd(
                            key,
                            {"f": text},
                            identifier=f"{seq}-1",
                            trim_strategy=coredis.PureToken.MAXLEN,
                            threshold=self.stream_max_frames,
                            trim_operator=coredis.PureToken.APPROXIMATELY,
                        )
                    pipe.pexpire(key, self.stream_ttl_ms)

        try:
            # Shielded (and bounded by guard()): a batch taken out of _pending must reach
            # Redis or fail; dropped half-way by a cancellation it would leave a hole that
            # later appends of the same session jump over (found by bench/resume_bench.py).
            with trio.CancelScope(shield=True):
                await self._call(run)
        except StateUnavailable as error:
            # Followers see the seq jump and tell their clients (resync_required).
            self.append_failures += 1
            if self.on_append_failure is not None:
                self.on_append_failure()
            if not self._failing:  # once per outage, not once per batch
                self._failing = True
                logger.warning("frames not appended to the shared streams: %s", error)
        else:
            self._failing = False
        finally:
            self._in_flight = self._in_flight - batch.keys()
            self._batch_done.unpark_all()

    async def last_seq(self, session_id: str) -> int:
        """The highest seq in the session's stream (0 when there is none)."""
        key = self.stream_key(session_id)
        entries = await self._call(lambda: self.client.xrevrange(key, "+", "-", count=1))
        return _seq_of(entries[0].identifier) if entries else 0

    async def read_after(self, session_id: str, last_seq: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` frames with seq > ``last_seq``, oldest first."""
        key = self.stream_key(session_id)
        entries = await self._call(
            lambda: self.client.xrange(key, f"{last_seq + 1}-0", "+", count=limit)
        )
        return [(_seq_of(e.identifier), str(e.field_values["f"])) for e in entries]

    async def wait_after(
        self, session_id: str, last_seq: int, block_seconds: float
    ) -> list[tuple[int, str]]:
        """Frames with seq > ``last_seq``, waiting up to ``block_seconds`` for the first one."""
        key = self.stream_key(session_id)
        block_ms = max(1, int(block_seconds * 1000))
        # Not through guard(): its timeout is shorter than the block, and a quiet stream is
        # not a Redis outage. Errors still become StateUnavailable.
        if not self.state.available:
            raise StateUnavailable(STATE_UNAVAILABLE)
        try:
            with trio.fail_after(block_seconds + self.timeout):
                answer = await self.client.xread({key: f"{last_seq}-1"}, count=512, block=block_ms)
        except (trio.TooSlowError, coredis.exceptions.RedisError, OSError) as error:
            raise StateUnavailable(STATE_UNAVAILABLE) from error
        if not answer:
            return []
        entries = next(iter(answer.values()))
        return [(_seq_of(e.identifier), str(e.field_values["f"])) for e in entries]

    # --- takeover notices ------------------------------------------------------------------------

    async def announce_connection(self, session_id: str) -> None:
        """Tell every other replica that this one now serves ``session_id``'s client."""
        message = f"{self.replica_id} {session_id}"
        await self._call(lambda: self.client.publish(self.channel, message))

    async def listen(
        self,
        on_takeover: Callable[[str], Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``on_takeover(session_id)`` for every other replica's announcement, forever.

        coredis's pub/sub reconnects by itself; while Redis is down no notice arrives, which
        is the documented trade-off (a duplicate connection is closed once Redis is back, or
        when it sends its next message through the runner).
        """
        started = False
        while True:
            try:
                async with self.client.pubsub(channels=[self.channel]) as pubsub:
                    if not started:
                        started = True
                        task_status.started()
                    async for message in pubsub:
                        if message.get("type") != "message":
                            continue
                        sender, _, session_id = str(message.get("data", "")).partition(" ")
                        if sender != self.replica_id and session_id:
                            on_takeover(session_id)
            except (coredis.exceptions.RedisError, OSError) as error:
                logger.warning("takeover listener lost Redis (%s); retrying", error)
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(1)


def _seq_of(identifier: object) -> int:
    return int(str(identifier).partition("-")[0])
