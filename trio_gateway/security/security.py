"""Who is calling, what they may do, and how much: the security layer of one app.

Pulls the sans-IO pieces together (``auth`` for tokens, ``limits`` for rates, caps and origins,
``ownership`` for sessions) behind the few calls the REST and WebSocket doors make. Every
refusal is a :class:`Refusal` carrying the HTTP status, a machine code and a safe human text.

Ownership, per-user connection caps and per-user rates live in the state backend chosen by
``STATE_BACKEND``: in this process (``memory``), in this process with ownership kept in a SQLite
file across restarts (``sqlite``, see ``sqlite_store.py``) or in Redis, shared by every replica
(``redis``). When Redis does not answer, the trade-off is: nothing new is admitted that would
need it (handshakes and session routes get 503 / close 1013, "shared state (Redis)
unavailable"), while traffic already admitted keeps flowing and its rate checks fail open, so
an outage of the shared state never breaks a running session.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import trio

from ..client_address import client_address
from ..limits import OriginPolicy, parse_origin_list
from ..observability import Metrics
from ..protocol import CloseCode
from ..settings import Settings
from ..state.ownership import OwnershipRefused, OwnershipStore
from ..state.sqlite_store import SqliteOwnershipStore, ownership_store_for
from ..state.state import (
    STATE_UNAVAILABLE,
    ConnectionLimiter,
    MemoryConnectionLimiter,
    MemoryRateLimiter,
    RateLimit,
    StateUnavailable,
)
from .auth import (
    AuthError,
    Identity,
    JWKSCache,
    JWKSUnavailable,
    TokenPolicy,
    bearer_token,
    httpx_jwks_fetcher,
    www_authenticate,
)

if TYPE_CHECKING:
    from ..state.redis_state import RedisState
    from ..state.redis_stores import RedisConnectionLimiter

logger = logging.getLogger("trio_gateway.security")

VERIFIED_TOKEN_CACHE_SIZE = 10_000
VERIFIED_TOKEN_TTL = 60.0  # seconds
# Bound on giving a connection back to the shared state from a finally block (shielded, so it
# must end on its own when Redis does not answer; the entry then lapses with its lease).
RELEASE_TIMEOUT = 2.0

# Used when GATEWAY__USE_JWT_AUTH=false: everyone is this one user, with every scope.
ANONYMOUS = Identity(sub="anonymous", scopes=frozenset({"*"}), expires_at=float("inf"))
INTERNAL = Identity(sub="internal-service", scopes=frozenset({"*"}), expires_at=float("inf"))


@dataclass(frozen=True)
class Refusal(Exception):
    """A request or handshake the gateway refuses."""

    status: int
    error: str
    description: str
    www_authenticate: str | None = None
    retry_after: float | None = None

    def headers(self) -> dict[str, str]:
        """Response headers that go with the refusal."""
        headers: dict[str, str] = {}
        if self.www_authenticate:
            headers["WWW-Authenticate"] = self.www_authenticate
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(self.retry_after + 0.999)))
        return headers


class RefreshRefused(Exception):
    """An in-band token refresh the gateway refuses: ``description`` for the client's error
    frame, and the close code and reason when the socket must close (None: the socket stays,
    on its current token)."""

    def __init__(self, description: str, close: tuple[int, str] | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.close = close


class Security:
    """Authentication, scopes, ownership and per-user limits of one app."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.enabled = settings.use_jwt_auth
        self.policy = TokenPolicy(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway=settings.jwt_leeway,
            max_lifetime=settings.jwt_max_lifetime,
        )
        self.jwks: JWKSCache | None = None
        self.origins = OriginPolicy(parse_origin_list(settings.allowed_origins))
        #: The shared Redis (STATE_BACKEND=redis), else None. Started by :meth:`run_state`.
        self.redis: RedisState | None = None
        self._redis_connections: RedisConnectionLimiter | None = None
        self.ownership: OwnershipStore
        self.connections: ConnectionLimiter
        self.ws_rate: RateLimit
        self.rest_rate: RateLimit
        self.handshake_rate: RateLimit
        if settings.state_backend == "redis":
            self._use_redis(settings, metrics)
        else:
            self.ownership = ownership_store_for(settings)  # memory or sqlite
            self.connections = MemoryConnectionLimiter(
                settings.max_connections_per_user, settings.max_connections
            )
            self.ws_rate = MemoryRateLimiter(
                settings.ws_messages_per_second, settings.ws_message_burst
            )
            self.rest_rate = MemoryRateLimiter(
                settings.rest_requests_per_second, settings.rest_request_burst
            )
            self.handshake_rate = MemoryRateLimiter(
                settings.ws_handshakes_per_second, settings.ws_handshake_burst
            )
            metrics.state_backend_up.set(1)
        self._internal_key = settings.internal_api_key.get_secret_value().encode()
        self._trusted_proxies = settings.trusted_proxy_networks
        # Recently verified tokens: an IDE sends the same token with every request, and a
        # signature check costs ~0.2 ms. Bounded in size, and in age so that a key withdrawn
        # from the JWKS stops working within VERIFIED_TOKEN_TTL even for cached tokens.
        self._verified: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    def _use_redis(self, settings: Settings, metrics: Metrics) -> None:
        # Imported here so that a memory-only deployment never loads the Redis client.
        from ..state.redis_state import RedisState
        from ..state.redis_stores import (
            RedisConnectionLimiter,
            RedisOwnershipStore,
            RedisRateLimiter,
        )

        redis = self.redis = RedisState(settings)
        self.ownership = RedisOwnershipStore(
            redis, settings.max_sessions_per_user, settings.session_ownership_ttl
        )
        self.connections = self._redis_connections = RedisConnectionLimiter(
            redis,
            settings.max_connections_per_user,
            settings.max_connections,
            settings.session_lease_seconds,
        )
        self.ws_rate = RedisRateLimiter(
            redis, "ws", settings.ws_messages_per_second, settings.ws_message_burst
        )
        self.rest_rate = RedisRateLimiter(
            redis, "rest", settings.rest_requests_per_second, settings.rest_request_burst
        )
        self.handshake_rate = RedisRateLimiter(
            redis, "handshake", settings.ws_handshakes_per_second, settings.ws_handshake_burst
        )
        metrics.state_backend_up.set_function(lambda: 1.0 if redis.available else 0.0)

    async def run_state(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the state backend's background work until cancelled (Redis: the client, its
        health probe, the renewal of this replica's connection entries). Reports started once
        Redis was probed (up or down). SQLite: the file is open (a file that cannot be used
        fails the startup instead); with the memory backend there is nothing to run."""
        if isinstance(self.ownership, SqliteOwnershipStore):
            await self.ownership.run(task_status=task_status)
            return
        if self.redis is None or self._redis_connections is None:
            task_status.started()
            return
        redis, connections = self.redis, self._redis_connections
        # The client must outlive the limiter's cleanup on shutdown (it removes this replica's
        # connection entries): shielded from the cancellation that stops us, and cancelled
        # explicitly once the limiter is done.
        client_scope = trio.CancelScope(shield=True)

        async def run_client(task_status: trio.TaskStatus[None]) -> None:
            with client_scope:
                await redis.run(task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(run_client)
            try:
                await connections.run(task_status=task_status)
            finally:
                client_scope.cancel()

    @property
    def state_available(self) -> bool:
        """The state backend answers (always True for memory)."""
        return self.redis is None or self.redis.available

    def require_state(self) -> None:
        """503 ``state_unavailable`` while the state backend is known to be down (for work
        that will need it later, refused before anything is done)."""
        if not self.state_available:
            raise self._state_refusal("required")

    def _state_refusal(self, operation: str) -> Refusal:
        self.metrics.state_backend_failures.labels(operation).inc()
        return Refusal(503, "state_unavailable", STATE_UNAVAILABLE, retry_after=5)

    def _remember(self, token: str, identity: Identity) -> None:
        self._verified[token] = (identity, time.monotonic())
        if len(self._verified) > VERIFIED_TOKEN_CACHE_SIZE:
            self._verified.popitem(last=False)

    def start(self, http: httpx.AsyncClient) -> None:
        """Create the JWKS cache over the app's shared HTTP client."""
        fetch = httpx_jwks_fetcher(
            http, self.settings.effective_jwks_url, min(10.0, self.settings.request_timeout)
        )
        self.jwks = JWKSCache(
            fetch,
            refetch_cooldown=self.settings.jwks_refetch_cooldown,
            stale_for=self.settings.jwks_stale_seconds,
        )
        jwks = self.jwks
        self.metrics.jwks_fetches.set_function(lambda: jwks.fetches)
        self.metrics.jwks_fetch_failures.set_function(lambda: jwks.fetch_failures)

    @property
    def ready(self) -> bool:
        """Keys are loaded (or authentication is off)."""
        return not self.enabled or (self.jwks is not None and self.jwks.loaded)

    async def keys_available(self) -> bool:
        """Signing keys are (or can now be) loaded; fetches them if needed (readiness)."""
        if not self.enabled:
            return True
        assert self.jwks is not None
        try:
            await self.jwks.keys()
        except JWKSUnavailable:
            return False
        return True

    # --- identities ----------------------------------------------------------------------

    async def identify_token(self, token: str) -> Identity:
        """Verify ``token``; raises :class:`Refusal` (401, or 503 without keys)."""
        if not self.enabled:
            return ANONYMOUS
        assert self.jwks is not None, "Security.start() was not called"
        cached = self._verified.get(token)
        if cached is not None:
            identity, verified_at = cached
            now = time.monotonic()
            if (
                now - verified_at < VERIFIED_TOKEN_TTL
                and identity.expires_at + self.settings.jwt_leeway > time.time()
            ):
                return identity
            del self._verified[token]
        try:
            identity = await self.jwks.verify(token, self.policy)
            self._remember(token, identity)
            return identity
        except AuthError as error:
            self.metrics.auth_failures.labels(error.reason).inc()
            logger.info(
                "token refused: %s",
                error.reason,
                extra={"event": "auth_failed", "reason": error.reason},
            )
            raise Refusal(
                401, "invalid_token", error.description, www_authenticate(error)
            ) from None
        except JWKSUnavailable:
            self.metrics.auth_failures.labels("jwks_unavailable").inc()
            logger.warning(
                "no signing keys available", extra={"event": "auth_failed", "reason": "jwks"}
            )
            raise Refusal(
                503,
                "temporarily_unavailable",
                "The authentication service is unavailable; retry shortly",
                retry_after=5,
            ) from None

    async def identify_header(self, authorization: str | None) -> Identity:
        """The caller behind an ``Authorization`` header; raises :class:`Refusal`."""
        if not self.enabled:
            return ANONYMOUS
        try:
            token = bearer_token(authorization)
        except AuthError as error:
            self.metrics.auth_failures.labels(error.reason).inc()
            raise Refusal(401, "unauthorized", error.description, www_authenticate(error)) from None
        return await self.identify_token(token)

    def internal_caller(self, supplied: str | None) -> bool:
        """``X-Internal-Auth`` matches the internal key and service auth is allowed."""
        if not self.settings.allow_internal_auth or not supplied:
            return False
        return hmac.compare_digest(supplied.encode(), self._internal_key)

    async def refreshed_identity(self, current: Identity, token: str) -> Identity:
        """The identity of ``token`` sent in band on a socket of ``current``: valid, holding
        the write scope and of the same user, or :class:`RefreshRefused`."""
        try:
            identity = await self.identify_token(token)
        except Refusal as refused:
            raise RefreshRefused(refused.description) from None
        try:
            self.require_scope(identity, self.settings.write_scope)
        except Refusal as refused:
            close = (CloseCode.FORBIDDEN, "token lacks the write scope")
            raise RefreshRefused(refused.description, close) from None
        if identity.sub != current.sub:
            close = (CloseCode.UNAUTHORIZED, "token of another user")
            raise RefreshRefused("The new token belongs to another user", close)
        return identity

    def require_scope(self, identity: Identity, scope: str) -> None:
        """Raise 403 ``insufficient_scope`` unless ``identity`` holds ``scope``."""
        if "*" in identity.scopes or scope in identity.scopes:
            return
        self.metrics.auth_failures.labels("insufficient_scope").inc()
        raise Refusal(
            403,
            "insufficient_scope",
            f"This requires the scope '{scope}'",
            f'Bearer error="insufficient_scope", scope="{scope}"',
        )

    # --- sessions --------------------------------------------------------------------------

    async def check_owner(self, session_id: str, identity: Identity) -> bool:
        """403 if another user owns the session; True when it is unowned (claim it later).

        503 when the state backend cannot say (fail closed: ownership guards other users' data).
        Without JWT auth every caller is the one anonymous principal: there is nobody to keep
        apart, so nothing is looked up (the REST proxy skips ownership the same way).
        """
        if not self.enabled:
            return False
        try:
            owner = await self.ownership.owner(session_id)
        except StateUnavailable:
            raise self._state_refusal("owner") from None
        if owner is not None and owner != identity.sub:
            self._refuse_not_owner()
        return owner is None

    async def claim_session(self, session_id: str, identity: Identity) -> None:
        """Record ``identity`` as the owner of an unowned session; 403 if someone else owns it,
        503/429 when the ownership store or the user's share of it is full, 503 when the state
        backend does not answer.

        Without JWT auth nothing is recorded: a record per session of the one anonymous
        principal would protect nothing and only fill its share of the store, after which
        every new session would be refused (429 after ``max_per_user`` sessions).
        """
        if not self.enabled:
            return
        try:
            owner = await self.ownership.claim(session_id, identity.sub)
        except StateUnavailable:
            raise self._state_refusal("claim") from None
        except OwnershipRefused as refused:
            self.metrics.limit_hits.labels(f"ownership_{refused.reason}").inc()
            if refused.reason == "user_limit":
                raise Refusal(
                    429, "too_many_sessions", "Too many sessions for this user", retry_after=60
                ) from None
            raise Refusal(
                503, "unavailable", "The gateway cannot take new sessions now", retry_after=30
            ) from None
        if owner != identity.sub:
            self._refuse_not_owner()

    async def owned_sessions(self, identity: Identity) -> frozenset[str]:
        """The sessions ``identity`` owns; 503 when the state backend cannot say."""
        try:
            return await self.ownership.sessions_of(identity.sub)
        except StateUnavailable:
            raise self._state_refusal("sessions_of") from None

    # --- connections -----------------------------------------------------------------------

    def limit_key(self, identity: Identity, scope: dict[str, Any]) -> str:
        """The key per-user limits of a WebSocket count against: the user, or, with JWT auth
        off (every caller is the one anonymous principal), the client's address.

        Without it one anonymous client would use up a cap or a rate that every other client
        shares, and lock them all out. The address is the TCP peer unless a trusted proxy
        forwarded it (``TRUSTED_PROXIES``). Anonymous keys cannot collide with user ids: they
        exist only while JWT auth is off, when there are no other users.
        """
        if self.enabled:
            return identity.sub
        return f"{identity.sub}@{client_address(scope, self._trusted_proxies)}"

    async def check_handshake_rate(self, key: str) -> None:
        """429 with Retry-After when ``key`` opens WebSockets faster than its handshake rate
        (shared by every replica with Redis).

        Fails closed (503) when the state backend does not answer: a new socket would need it
        for the connection cap anyway, and refusing new work is the outage's documented rule.
        """
        try:
            allowed, retry_after = await self.handshake_rate.check(key)
        except StateUnavailable:
            raise self._state_refusal("handshake_rate") from None
        if not allowed:
            self.metrics.limit_hits.labels("ws_handshake_rate").inc()
            raise Refusal(
                429,
                "rate_limited",
                "Too many WebSocket handshakes for this user; retry later",
                retry_after=retry_after,
            )

    async def acquire_connection(self, identity: Identity, key: str | None = None) -> None:
        """Count one more open WebSocket of ``identity`` (under ``key``, see :meth:`limit_key`;
        default its ``sub``), or raise :class:`Refusal`: 429 at the per-user cap (across
        replicas with Redis), 503 when this process is full or the state backend does not
        answer. Pair every success with :meth:`release_connection` with the same key."""
        try:
            refused = await self.connections.try_acquire(identity.sub if key is None else key)
        except StateUnavailable:
            raise self._state_refusal("connections") from None
        if refused is None:
            return
        self.metrics.limit_hits.labels(f"connections_{refused}").inc()
        if refused == "per_user":
            raise Refusal(
                429,
                "too_many_connections",
                "Too many open connections for this user",
                retry_after=5,
            )
        raise Refusal(503, "unavailable", "too many open connections", retry_after=5)

    async def release_connection(self, identity: Identity, key: str | None = None) -> None:
        """Give back a connection granted by :meth:`acquire_connection`.

        Safe in a ``finally`` of a cancelled task: shielded, and bounded by RELEASE_TIMEOUT
        so that an unresponsive Redis cannot hold the task (the shared entry then lapses with
        its lease; the local count is always given back at once).
        """
        with trio.CancelScope(shield=True):
            with trio.move_on_after(RELEASE_TIMEOUT):
                await self.connections.release(identity.sub if key is None else key)

    def _refuse_not_owner(self) -> None:
        self.metrics.auth_failures.labels("not_owner").inc()
        logger.warning(
            "access to another user's session refused",
            extra={"event": "forbidden", "reason": "not_owner"},
        )
        raise Refusal(403, "forbidden", "This session belongs to another user")

    # --- rates -----------------------------------------------------------------------------

    async def check_rest_rate(self, identity: Identity) -> None:
        """429 with Retry-After when the caller exceeds its REST rate.

        Fails open when the state backend does not answer: the caller is authenticated, and
        refusing every request during a Redis outage would turn it into a full outage. Routes
        that need ownership still answer 503 (see :meth:`check_owner`).
        """
        try:
            allowed, retry_after = await self.rest_rate.check(identity.sub)
        except StateUnavailable:
            self.metrics.state_backend_failures.labels("rest_rate_fail_open").inc()
            return
        if not allowed:
            self.metrics.limit_hits.labels("rest_rate").inc()
            raise Refusal(
                429, "rate_limited", "Too many requests; slow down", retry_after=retry_after
            )

    async def check_message_rate(self, identity: Identity, key: str | None = None) -> bool:
        """Whether one more inbound WebSocket message is within the caller's rate (counted
        under ``key``, see :meth:`limit_key`; default the identity's ``sub``).

        True when the state backend does not answer (fail open): the socket was admitted while
        the state answered, and a Redis outage must not stall sessions that are already live.
        """
        try:
            allowed, _ = await self.ws_rate.check(identity.sub if key is None else key)
        except StateUnavailable:
            self.metrics.state_backend_failures.labels("ws_rate_fail_open").inc()
            return True
        if not allowed:
            self.metrics.limit_hits.labels("ws_message_rate").inc()
        return allowed


def user_headers(identity: Identity) -> dict[str, str]:
    """The verified identity, forwarded to the runtime."""
    scopes = " ".join(sorted(s for s in identity.scopes if s != "*"))
    return {"X-User-ID": identity.sub, "X-User-Scopes": scopes}
