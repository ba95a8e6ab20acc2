"""The per-app state of a gateway: :class:`Gateway` (settings, metrics, security, the runtime
client and its pool, the REST proxy, the sessions), its start and stop, and its readiness.

The app (``app.py``) builds one per :class:`~trio_gateway.settings.Settings`; the doors
(``edge/``) receive it and take what they use from it. Nothing here imports a door.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import trio

from ._version import __version__
from .edge.rest_door import RestDoor
from .edge.rest_proxy import RestProxy
from .limits import ConnectionCounter
from .observability import Metrics
from .security.security import Security
from .session.manager import SessionManager
from .settings import Settings
from .upstream.http_stream import ConnectionPool
from .upstream.runtime_client import RuntimeClient, make_runtime_pool

logger = logging.getLogger("trio_gateway.app")

READINESS_CACHE_SECONDS = 1.0


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The app's httpx client, for what is not hot: JWKS fetches and the readiness probe (turns
    and proxied REST go over the runtime pool)."""
    return httpx.AsyncClient(
        base_url=settings.agent_url,
        timeout=httpx.Timeout(settings.request_timeout),
        limits=httpx.Limits(max_connections=10, max_keepalive_connections=2),
        # No default X-Internal-Auth: this client also fetches the JWKS from the Auth
        # Service, which must never see the runtime's key. Callers add it per request.
        follow_redirects=False,
        trust_env=False,
    )


class Gateway:
    """The per-app state: settings, the runtime pool (turns and REST), the httpx client (JWKS,
    readiness), the runtime client, the REST proxy and its door, the sessions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.security = Security(settings, self.metrics)
        self.proxy = RestProxy(settings, self.metrics, self.security)
        self.rest_door = RestDoor(self.proxy)
        self.pool: ConnectionPool | None = None
        self.http: httpx.AsyncClient | None = None
        self.runtime: RuntimeClient | None = None
        self.sessions: SessionManager | None = None
        # Sockets waiting for their first-frame auth, per client address and in total: their
        # own caps, so anonymous sockets cannot take the connection slots of users.
        self.pending_auth = ConnectionCounter(
            settings.max_pending_auth_per_address, settings.max_pending_auth
        )
        self.metrics.pending_auth_websockets.set_function(lambda: self.pending_auth.total)
        self._manager_scope: trio.CancelScope | None = None
        self._state_scope: trio.CancelScope | None = None
        self._readiness_lock = trio.Lock()
        self._readiness: tuple[float, dict[str, Any]] | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the state backend (Redis client and health), open the HTTP pool and start the
        session manager inside ``nursery``."""
        warn_about_exposure(self.settings)
        # The state first: the first handshakes already need it. It reports started after one
        # probe, up or down, so a gateway whose Redis is down still starts (not ready).
        self._state_scope = trio.CancelScope()

        async def run_state(task_status: trio.TaskStatus[None]) -> None:
            assert self._state_scope is not None
            with self._state_scope:
                await self.security.run_state(task_status=task_status)

        await nursery.start(run_state)
        self.http = make_http_client(self.settings)
        self.security.start(self.http)
        # One pool for turns and proxied REST: one connection cap, and REST reuses connections
        # turns left idle (and the other way round).
        self.pool = make_runtime_pool(self.settings)
        nursery.start_soon(self.pool.run)  # ends with pool.aclose() in stop()
        self.proxy.pool = self.pool
        self.runtime = RuntimeClient(self.settings, self.pool)
        self.sessions = SessionManager(self.settings, self.runtime, self.metrics, self.security)
        self._manager_scope = trio.CancelScope()

        async def run_manager(task_status: trio.TaskStatus[None]) -> None:
            assert self.sessions is not None and self._manager_scope is not None
            with self._manager_scope:
                if self.security.redis is not None:
                    from .state.cluster import (
                        Cluster,  # imports coredis: only for the redis backend
                    )

                    cluster = Cluster.for_settings(self.security.redis, self.settings)
                    self.sessions.share_state(cluster)
                await self.sessions.run(task_status=task_status)

        await nursery.start(run_manager)

    async def stop(self) -> None:
        """Cancel every session and close the HTTP pool."""
        if self.sessions is not None:
            self.sessions.stop()
        if self._manager_scope is not None:
            self._manager_scope.cancel()
        if self.http is not None:
            with trio.CancelScope(shield=True):
                await self.http.aclose()
        if self.pool is not None:
            await self.pool.aclose()  # idle pooled runtime connections
        # Last: sessions ending above still give their connections back to Redis.
        if self._state_scope is not None:
            self._state_scope.cancel()

    async def readiness(self) -> dict[str, Any]:
        """The readiness report, probed at most once per READINESS_CACHE_SECONDS.

        Anyone may call the readiness route: without the cache (and the lock that makes
        concurrent callers share one probe) each call would cost a runtime request from the
        pool the REST proxy depends on.
        """
        async with self._readiness_lock:
            cached = self._readiness
            if cached is not None and trio.current_time() - cached[0] < READINESS_CACHE_SECONDS:
                report = dict(cached[1])
            else:
                report = await self._probe_readiness()
                self._readiness = (trio.current_time(), report)
        if self.draining:  # never served stale once a drain has begun
            report = {
                **report,
                "status": "not_ready",
                "checks": {**report["checks"], "draining": True},
            }
        return report

    async def _probe_readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {"draining": self.draining}
        ready = not self.draining and self.http is not None
        if self.http is not None:
            try:
                answer = await self.http.get(
                    "/health", timeout=min(5.0, self.settings.request_timeout)
                )
                checks["runtime"] = (
                    "ok" if answer.status_code == 200 else f"http {answer.status_code}"
                )
            except httpx.HTTPError as error:
                checks["runtime"] = f"unreachable ({type(error).__name__})"
            ready = ready and checks["runtime"] == "ok"
        if self.security.redis is not None:
            # Without the shared state this replica refuses every new session: take it out
            # of the load balancer until the health probe sees Redis again.
            up = self.security.state_available
            checks["state_backend"] = "ok" if up else "redis unavailable"
            ready = ready and up
        if self.security.enabled:
            checks["jwks"] = "ok" if await self.security.keys_available() else "unavailable"
            ready = ready and checks["jwks"] == "ok"
        return {
            "status": "ready" if ready else "not_ready",
            "version": __version__,
            "checks": checks,
        }

    @property
    def draining(self) -> bool:
        """True once a drain has started."""
        return self.sessions is not None and self.sessions.draining

    async def drain(self, timeout: float) -> None:
        """Graceful drain: see :meth:`SessionManager.drain`."""
        if self.sessions is not None:
            await self.sessions.drain(timeout)


def warn_about_exposure(settings: Settings) -> None:
    """Say at startup, as a warning, what an operator must not run by accident."""
    if not settings.use_jwt_auth:
        logger.warning(
            "JWT AUTHENTICATION IS OFF (GATEWAY__USE_JWT_AUTH=false): anyone who can reach "
            "this gateway can use every session and the whole REST API; per-user limits apply "
            "per client address. Development and tests only.",
            extra={"event": "auth_disabled"},
        )
    elif settings.ws_auth_mode == "session-id":
        logger.warning(
            "GATEWAY__WS_AUTH_MODE=session-id: a WebSocket without a token is admitted to any "
            "session that has an owner, as that owner; whoever knows a session id can use that "
            "session (as with the old gateway). REST still requires tokens. Switch to "
            "WS_AUTH_MODE=token once clients send a token on their WebSocket.",
            extra={"event": "session_id_auth"},
        )
