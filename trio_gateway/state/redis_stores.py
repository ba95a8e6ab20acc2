"""Shared ownership, connection caps and rate limits in Redis, for several gateway replicas.

Each store keeps the semantics of its in-process counterpart (``ownership.py``, ``state.py``)
and makes every check-and-update one Lua script, so two replicas racing for the same key see
the same answer one replica alone would give. Scripts read the clock with Redis ``TIME``:
replicas' clocks may disagree, Redis' is the only one they share.

Keys (``P`` is ``REDIS_KEY_PREFIX``; ``docs/scaling.md`` has the full table):

* ``P owner:<session>`` (string, user id) and ``P user-sessions:<user>`` (set of session ids):
  ownership. They expire ``SESSION_OWNERSHIP_TTL`` after the session was last claimed or
  used (never with 0), and leave at once through ``forget`` (the session was deleted). Not
  earlier: a record that disappears makes its session unowned, and whoever knows the id may
  then claim it (a takeover); the TTL bounds how long an abandoned user's records are kept.
* ``P conns:<user>`` (sorted set): the user's open WebSockets on every replica, one member
  ``<replica id>:<n>`` per connection, scored by its expiry (ms, Redis time). Each replica
  pushes its members' expiry forward every lease/3; a crashed replica's members lapse after
  ``SESSION_LEASE_SECONDS``. The key itself expires with its last member.
* ``P rate:<kind>:<user>`` (hash ``tokens``, ``ts``): a token bucket (``kind`` is ``ws``,
  ``rest`` or ``handshake``; with JWT auth off ``<user>`` is ``anonymous@<client address>``),
  expiring once it would have refilled, since an absent bucket is a full one.

Every call raises :class:`~trio_gateway.state.state.StateUnavailable` when Redis does not answer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from typing import cast

import trio
from coredis.typing import ResponseType

from ..limits import ConnectionCounter, ConnectionRefusal, TokenBucket
from .ownership import OwnershipRefused
from .redis_state import RedisState
from .state import StateUnavailable

__all__ = ["RedisConnectionLimiter", "RedisOwnershipStore", "RedisRateLimiter"]

logger = logging.getLogger("trio_gateway.redis")

# --- ownership -------------------------------------------------------------------------------

# KEYS: owner key, the claimant's session set. ARGV: user, session id, per-user cap, idle TTL
# (ms, 0 = none), owner key prefix, session set prefix. Returns the owner (existing or new), or
# nil when the user is at the cap. Claiming an owned session refreshes its record (and the
# owner's set, which must outlive its members). At the cap, members whose record expired or
# changed hands are dropped before the count is trusted. (Keys built from ARGV are fine on a
# single Redis; Redis Cluster is not supported.)
_CLAIM = """
local ttl = tonumber(ARGV[4])
local owner = redis.call('GET', KEYS[1])
if owner then
  if ttl > 0 then
    local owner_set = ARGV[6] .. owner
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('SADD', owner_set, ARGV[2])
    redis.call('PEXPIRE', owner_set, ttl)
  end
  return owner
end
local cap = tonumber(ARGV[3])
if redis.call('SCARD', KEYS[2]) >= cap then
  for _, sid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if redis.call('GET', ARGV[5] .. sid) ~= ARGV[1] then redis.call('SREM', KEYS[2], sid) end
  end
  if redis.call('SCARD', KEYS[2]) >= cap then return false end
end
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
end
return ARGV[1]
"""

# KEYS: the user's session set. ARGV: user, owner key prefix. The members whose record still
# names the user (expired records leave their ids behind in the set until the next prune).
_SESSIONS_OF = """
local mine = {}
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('GET', ARGV[2] .. sid) == ARGV[1] then mine[#mine + 1] = sid end
end
return mine
"""

# KEYS: owner key, the owner's session set. ARGV: the owner read before, session id.
# Deletes only if the owner is still the one read (a forget racing a claim stays consistent).
_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 0
"""


class RedisOwnershipStore:
    """:class:`~trio_gateway.state.ownership.OwnershipStore` shared by every replica on one Redis.

    Same rules as :class:`~trio_gateway.state.ownership.MemoryOwnershipStore`: the first claim wins
    atomically, a user at ``max_per_user`` sessions is refused (``user_limit``), and records
    leave when their session is deleted or, with a positive ``idle_ttl`` (seconds), once it
    has not been claimed or used for that long (Redis expires the keys). Nothing is evicted
    early: there is no ``store_full``, the total is bounded by Redis' memory (run it with
    ``maxmemory-policy noeviction``: an evicted record is a takeover; a full Redis then
    refuses writes, which callers see as :class:`StateUnavailable`).
    """

    def __init__(
        self, state: RedisState, max_per_user: int = 10_000, idle_ttl: float = 0.0
    ) -> None:
        if max_per_user < 1:
            raise ValueError("max_per_user must be >= 1")
        if idle_ttl < 0:
            raise ValueError("idle_ttl must be >= 0")
        self.state = state
        self.max_per_user = max_per_user
        # Whole milliseconds, at least 1 when positive (PX 0 is an error in Redis).
        self._ttl_ms = max(1, math.ceil(idle_ttl * 1000)) if idle_ttl else 0
        self._claim = state.client.register_script(_CLAIM)
        self._sessions_of = state.client.register_script(_SESSIONS_OF)
        self._forget = state.client.register_script(_FORGET)

    def _owner_key(self, session_id: str) -> str:
        return self.state.key("owner", session_id)

    def _user_key(self, user: str) -> str:
        return self.state.key("user-sessions", user)

    async def claim(self, session_id: str, user: str) -> str:
        """Record ``user`` as owner of ``session_id`` if unowned; return the owner.

        ValueError for an empty id or user; :class:`OwnershipRefused` (``user_limit``).
        """
        if not session_id:
            raise ValueError("session_id must be a non-empty string")
        if not user:
            raise ValueError("user must be a non-empty string")
        with self.state.guard():
            owner: ResponseType = await self._claim(
                keys=[self._owner_key(session_id), self._user_key(user)],
                args=[
                    user,
                    session_id,
                    self.max_per_user,
                    self._ttl_ms,
                    self._owner_key(""),
                    self._user_key(""),
                ],
            )
        if owner is None:
            raise OwnershipRefused("user_limit")
        return str(owner)

    async def owner(self, session_id: str) -> str | None:
        """The owner of ``session_id``, or None if nobody has claimed it (or it expired)."""
        with self.state.guard():
            return await self.state.client.get(self._owner_key(session_id))

    async def sessions_of(self, user: str) -> frozenset[str]:
        """The sessions ``user`` owns (empty if none)."""
        with self.state.guard():
            members: ResponseType = await self._sessions_of(
                keys=[self._user_key(user)], args=[user, self._owner_key("")]
            )
        return frozenset(str(member) for member in cast(list[str], members))

    async def forget(self, session_id: str) -> None:
        """Drop the ownership record of ``session_id`` (no-op if there is none)."""
        with self.state.guard():
            owner = await self.state.client.get(self._owner_key(session_id))
            if owner is not None:
                await self._forget(
                    keys=[self._owner_key(session_id), self._user_key(owner)],
                    args=[owner, session_id],
                )


# --- connections per user --------------------------------------------------------------------

# Redis time in milliseconds; shared by the scripts below.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the user's connection set. ARGV: member, per-user limit, lease (ms).
# Drops lapsed members, then adds this one unless the user is at the limit. 1 granted, 0 not.
_ACQUIRE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
)

# KEYS: connection sets. ARGV: lease (ms), then per key: a count n and n members.
# (Re-)adds every member with a fresh expiry: members that lapsed while Redis was unreachable
# (or lost with a restarted Redis) come back, since their connections are still open.
_REFRESH = (
    _NOW_MS
    + """
local lease = tonumber(ARGV[1])
local at = 2
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  at = at + 1
  for _ = 1, n do
    redis.call('ZADD', key, now + lease, ARGV[at])
    at = at + 1
  end
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
"""
)

# Users per refresh script call: keeps each call short (Redis runs scripts one at a time).
_REFRESH_BATCH = 200


class RedisConnectionLimiter:
    """:class:`~trio_gateway.state.state.ConnectionLimiter` whose per-user limit spans replicas.

    The per-user count lives in Redis (``conns:<user>``, see the module docstring); the
    total limit stays per process (``MAX_CONNECTIONS`` protects this process' memory and file
    descriptors, not a shared resource). Start :meth:`run` in the app's nursery: it renews this
    replica's entries every lease/3 and removes them on a clean shutdown. A replica that
    crashes leaves entries that lapse after ``lease`` seconds, so its users get their share
    back without anyone cleaning up.
    """

    def __init__(
        self, state: RedisState, per_user_limit: int, total_limit: int, lease: float
    ) -> None:
        if per_user_limit < 0:
            raise ValueError(f"per_user_limit must be >= 0, got {per_user_limit!r}")
        if not lease > 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        self.state = state
        self.per_user_limit = per_user_limit
        self.lease = lease
        self._lease_ms = max(1, math.ceil(lease * 1000))
        # Local mirror: the total limit, and a per-user pre-check that saves a round trip
        # when this replica alone already holds the user's whole share.
        self.local = ConnectionCounter(per_user_limit, total_limit)
        self._held: dict[str, list[str]] = {}  # user -> this replica's members in Redis
        self._sequence = itertools.count()
        self._acquire = state.client.register_script(_ACQUIRE)
        self._refresh = state.client.register_script(_REFRESH)

    def _key(self, user: str) -> str:
        return self.state.key("conns", user)

    async def try_acquire(self, user: str) -> ConnectionRefusal | None:
        """See :meth:`~trio_gateway.state.state.ConnectionLimiter.try_acquire`.

        If the call is cut short (timeout, cancellation) after Redis added the entry, the
        entry is never renewed and lapses after the lease: the user loses one slot for at most
        that long.
        """
        if self.local.count(user) >= self.per_user_limit:
            return "per_user"
        member = f"{self.state.replica_id}:{next(self._sequence)}"
        with self.state.guard():
            granted: ResponseType = await self._acquire(
                keys=[self._key(user)], args=[member, self.per_user_limit, self._lease_ms]
            )
        if not granted:
            return "per_user"
        refused = self.local.try_acquire(user)
        if refused is not None:  # this process is full: give the shared slot back
            await self._remove(user, [member])
            return refused
        self._held.setdefault(user, []).append(member)
        return None

    async def release(self, user: str) -> None:
        """See :meth:`~trio_gateway.state.state.ConnectionLimiter.release`.

        The local count drops at once; if Redis cannot be told, the entry lapses after the
        lease (it is no longer renewed).
        """
        members = self._held.get(user)
        if not members:
            raise ValueError(f"release({user!r}) without a matching try_acquire")
        member = members.pop()
        if not members:
            del self._held[user]
        self.local.release(user)
        await self._remove(user, [member])

    async def _remove(self, user: str, members: list[str]) -> None:
        try:
            with self.state.guard():
                await self.state.client.zrem(self._key(user), list(members))
        except StateUnavailable:
            logger.debug("connection entry left to lapse", extra={"event": "state_error"})

    async def refresh(self) -> None:
        """Renew the expiry of every entry this replica holds (re-adding lapsed ones)."""
        users = list(self._held.items())
        for start in range(0, len(users), _REFRESH_BATCH):
            batch = users[start : start + _REFRESH_BATCH]
            args: list[str | int] = [self._lease_ms]
            for _, members in batch:
                args.append(len(members))
                args.extend(members)
            with self.state.guard():
                await self._refresh(keys=[self._key(user) for user, _ in batch], args=args)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew this replica's entries every lease/3 until cancelled, then remove them."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.lease / 3)
                # RedisState logs an outage; the next round re-adds whatever lapsed meanwhile.
                with contextlib.suppress(StateUnavailable):
                    await self.refresh()
        finally:
            # Clean shutdown: hand the slots back now rather than after the lease. Shielded
            # (we are being cancelled) and bounded (Redis may be the reason we stop).
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.state.timeout * 2):
                    for user, members in list(self._held.items()):
                        await self._remove(user, members)


# --- rates -----------------------------------------------------------------------------------

# KEYS: the bucket. ARGV: rate (tokens/s), burst, cost, longest idle life (ms).
# The same arithmetic as limits.TokenBucket, on Redis' clock. Returns {allowed, retry_after};
# retry_after is a string because Redis truncates Lua numbers to integers.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local slack = 1e-9 * (burst + rate)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil or ts == nil then
  tokens, ts = burst, now
elseif now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local allowed, retry = 0, '0'
if cost - tokens <= slack then
  tokens = tokens - cost
  allowed = 1
elseif cost > burst + slack or rate == 0 then
  retry = 'inf'
else
  retry = tostring((cost - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
local life = tonumber(ARGV[4])
if rate > 0 then life = math.min(life, math.ceil((burst - tokens) / rate * 1000) + 1) end
redis.call('PEXPIRE', KEYS[1], math.max(1, life))
return {allowed, retry}
"""

# An idle bucket is dropped after this long at most, like limits.RateLimiter's idle_ttl.
_RATE_IDLE_MS = 600_000


class RedisRateLimiter:
    """:class:`~trio_gateway.state.state.RateLimit`: one token bucket per user shared by every
    replica, in ``rate:<kind>:<user>``. Same answers as
    :meth:`~trio_gateway.limits.RateLimiter.check` (a refused take consumes nothing)."""

    def __init__(self, state: RedisState, kind: str, rate: float, burst: float) -> None:
        TokenBucket(rate, burst)  # the same validation as the in-process limiter
        self.state = state
        self.kind = kind
        self.rate = float(rate)
        self.burst = float(burst)
        self._take = state.client.register_script(_TAKE)

    async def check(self, key: str, cost: float = 1.0) -> tuple[bool, float]:
        """See :meth:`~trio_gateway.state.state.RateLimit.check`."""
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        with self.state.guard():
            answer: ResponseType = await self._take(
                keys=[self.state.key("rate", self.kind, key)],
                args=[repr(self.rate), repr(self.burst), repr(float(cost)), _RATE_IDLE_MS],
            )
        allowed, retry_after = cast(list[object], answer)
        return allowed == 1, float(str(retry_after))
