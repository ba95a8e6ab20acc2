"""Shared state in Redis (STATE_BACKEND=redis): several replicas, one set of rules.

Against a real ``redis-server`` on loopback: the session's own (or $GATEWAY_TEST_REDIS_URL),
and a private one per test for the tests that crash, pause or restart it. Every test uses its
own key prefix, so tests never see each other's keys. Gateways are real hypercorn servers
with JWT on, two of them on the same Redis standing for two replicas.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import httpx
import pytest
import trio
import trio_websocket

from trio_gateway.limits import RateLimiter
from trio_gateway.observability import Metrics
from trio_gateway.security.auth import Identity
from trio_gateway.security.security import Refusal, Security
from trio_gateway.settings import Settings
from trio_gateway.state.ownership import OwnershipRefused, OwnershipStore
from trio_gateway.state.redis_state import RedisState
from trio_gateway.state.redis_stores import (
    RedisConnectionLimiter,
    RedisOwnershipStore,
    RedisRateLimiter,
)
from trio_gateway.state.state import (
    STATE_UNAVAILABLE,
    ConnectionLimiter,
    MemoryConnectionLimiter,
    MemoryRateLimiter,
    RateLimit,
    StateUnavailable,
)
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import RunningGateway, WsClient, close_code, gateway_settings, run_gateway
from ..support.ports import free_port
from ..support.processes import clean_env, run_python
from ..support.redis_server import REDIS_SERVER, RedisServer

# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """$GATEWAY_TEST_REDIS_URL, else a redis-server of this test session."""
    configured = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    if REDIS_SERVER is None:
        pytest.skip("no redis-server installed and GATEWAY_TEST_REDIS_URL not set")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url()
    finally:
        server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server this test may kill, pause and restart."""
    if REDIS_SERVER is None:
        pytest.skip("no redis-server installed")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards (shared Redis)."""
    mine = f"test-{uuid.uuid4().hex[:12]}:"
    yield mine
    client = coredis.Redis.from_url(redis_url, decode_responses=True)
    async with client:
        with trio.fail_after(10):
            keys = [key async for key in client.scan_iter(match=mine + "*")]
            if keys:
                await client.delete(keys)


def state_settings(
    url: str, prefix: str, agent_url: str = "http://127.0.0.1:9", **more: Any
) -> Settings:
    # A generous Redis timeout: on a loaded 2-core CI machine forty racing scripts may take
    # longer than the production default, and these tests are about answers, not speed. The
    # blackhole test sets its own short one.
    values: dict[str, Any] = {"redis_timeout": 5.0, **more}
    return gateway_settings(
        agent_url, state_backend="redis", redis_url=url, redis_key_prefix=prefix, **values
    )


@asynccontextmanager
async def running_state(settings: Settings) -> AsyncIterator[RedisState]:
    """A RedisState whose client and health task run until the block ends."""
    state = RedisState(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        yield state
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool], timeout: float = 15) -> None:
    """Poll ``predicate`` until it holds, or fail (bounded; the health probe ticks each 1 s)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


# --- ownership -------------------------------------------------------------------------------


async def test_the_redis_store_implements_the_protocols(redis_url: str, prefix: str) -> None:
    async with running_state(state_settings(redis_url, prefix)) as state:
        assert isinstance(RedisOwnershipStore(state), OwnershipStore)
        assert isinstance(RedisConnectionLimiter(state, 1, 1, 1.0), ConnectionLimiter)
        assert isinstance(RedisRateLimiter(state, "ws", 1, 1), RateLimit)
        assert state.key("owner", "s1") == f"{prefix}owner:s1"
    # The memory backend offers the same async interfaces.
    assert isinstance(MemoryConnectionLimiter(1, 1), ConnectionLimiter)
    assert isinstance(MemoryRateLimiter(1, 1), RateLimit)


def test_the_memory_backend_never_loads_the_redis_client() -> None:
    code = (
        "import sys; from trio_gateway.app import create_app; "
        "from trio_gateway.settings import Settings; "
        "create_app(Settings(_env_file=None, insecure_dev=True)); "
        "assert 'coredis' not in sys.modules"
    )
    result = run_python("-c", code, env=clean_env())
    assert result.returncode == 0, result.stderr


async def test_claims_racing_on_two_replicas_have_exactly_one_winner(
    redis_url: str, prefix: str
) -> None:
    settings = state_settings(redis_url, prefix)
    async with running_state(settings) as one, running_state(settings) as two:
        assert one.replica_id != two.replica_id
        stores = [RedisOwnershipStore(one), RedisOwnershipStore(two)]
        answers: dict[str, str] = {}

        async def claim(n: int) -> None:
            answers[f"user{n}"] = await stores[n % 2].claim("s-race", f"user{n}")

        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(claim, n)
        winner = await stores[0].owner("s-race")
        assert winner is not None and winner in answers
        assert set(answers.values()) == {winner}
        assert await stores[1].sessions_of(winner) == frozenset({"s-race"})
        losers = [user for user in answers if user != winner]
        assert all([await stores[0].sessions_of(user) == frozenset() for user in losers])


async def test_the_per_user_cap_holds_under_a_race_and_forget_frees_a_slot(
    redis_url: str, prefix: str
) -> None:
    async with running_state(state_settings(redis_url, prefix)) as state:
        store = RedisOwnershipStore(state, max_per_user=3)
        granted: list[str] = []
        refused: list[str] = []

        async def claim(session_id: str) -> None:
            try:
                granted.append(await store.claim(session_id, "alice"))
            except OwnershipRefused as error:
                assert error.reason == "user_limit"
                refused.append(session_id)

        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(claim, f"s{n}")
        assert len(granted) == 3 and len(refused) == 7
        mine = await store.sessions_of("alice")
        assert len(mine) == 3
        owned = sorted(mine)[0]
        # At the cap, an already owned session still answers with its owner; never evicts.
        assert await store.claim(owned, "alice") == "alice"
        assert await store.claim(owned, "bob") == "alice"
        with pytest.raises(OwnershipRefused):
            await store.claim("s-new", "alice")
        await store.forget(owned)
        await store.forget("never-claimed")  # no-op
        assert await store.owner(owned) is None
        assert await store.claim("s-new", "alice") == "alice"
        assert await store.claim(owned, "bob") == "bob"
        assert owned not in await store.sessions_of("alice")
        for bad in (("", "alice"), ("s1", "")):
            with pytest.raises(ValueError):
                await store.claim(*bad)


async def test_without_an_idle_ttl_ownership_records_do_not_expire(
    redis_url: str, prefix: str
) -> None:
    async with running_state(state_settings(redis_url, prefix)) as state:
        store = RedisOwnershipStore(state, idle_ttl=0)
        await store.claim("s1", "alice")
        assert await state.client.pttl(state.key("owner", "s1")) == -1  # no expiry
        assert await state.client.pttl(state.key("user-sessions", "alice")) == -1


async def test_idle_ownership_records_expire_in_redis_and_use_keeps_them(
    redis_url: str, prefix: str
) -> None:
    async with running_state(state_settings(redis_url, prefix)) as state:
        store = RedisOwnershipStore(state, max_per_user=2, idle_ttl=0.6)
        await store.claim("busy", "alice")
        await store.claim("quiet", "alice")
        with pytest.raises(OwnershipRefused):
            await store.claim("third", "alice")
        for _ in range(4):
            await trio.sleep(0.25)
            assert await store.claim("busy", "bob") == "alice"  # use by anyone refreshes
        assert await store.owner("busy") == "alice"
        assert await store.owner("quiet") is None
        assert await store.sessions_of("alice") == frozenset({"busy"})
        # the expired id left the user's share: a new session fits again
        assert await store.claim("third", "alice") == "alice"
        assert await store.sessions_of("alice") == frozenset({"busy", "third"})
        # the user's set lives as long as its newest record
        ttl = await state.client.pttl(state.key("user-sessions", "alice"))
        assert 0 < ttl <= 600
        await trio.sleep(0.7)
        assert await store.sessions_of("alice") == frozenset()
        assert await state.client.exists([state.key("user-sessions", "alice")]) == 0


# --- connections -----------------------------------------------------------------------------


async def test_two_replicas_share_the_per_user_cap_and_keep_their_own_total(
    redis_url: str, prefix: str
) -> None:
    settings = state_settings(redis_url, prefix)
    async with running_state(settings) as one, running_state(settings) as two:
        first = RedisConnectionLimiter(one, per_user_limit=3, total_limit=100, lease=30)
        second = RedisConnectionLimiter(two, per_user_limit=3, total_limit=1, lease=30)
        assert await first.try_acquire("alice") is None
        assert await first.try_acquire("alice") is None
        assert await second.try_acquire("alice") is None
        assert await first.try_acquire("alice") == "per_user"
        assert await second.try_acquire("alice") == "per_user"
        # The total limit is this process' own: `second` is full, `first` is not.
        assert await second.try_acquire("bob") == "total"
        assert await first.try_acquire("bob") is None
        await first.release("alice")
        assert await second.try_acquire("alice") == "total"  # shared slot free, process full
        await second.release("alice")
        assert await second.try_acquire("alice") is None
        assert await state_count(one, "alice") == 2  # one on each replica
        # The refused "total" attempts left nothing behind in the shared count.
        assert await state_count(one, "bob") == 1
        with pytest.raises(ValueError):
            await first.release("carol")


async def state_count(state: RedisState, user: str) -> int:
    return await state.client.zcard(state.key("conns", user))


async def test_a_crashed_replicas_connections_lapse_and_a_live_ones_are_renewed(
    redis_url: str, prefix: str
) -> None:
    lease = 1.5
    settings = state_settings(redis_url, prefix)
    async with running_state(settings) as live, running_state(settings) as other:
        # A replica that renews its entries (its run() is going) keeps them past many leases.
        renewing = RedisConnectionLimiter(live, 2, 100, lease)
        probe = RedisConnectionLimiter(other, 2, 100, lease)
        async with trio.open_nursery() as nursery:
            await nursery.start(renewing.run)
            assert await renewing.try_acquire("alice") is None
            assert await renewing.try_acquire("alice") is None
            await trio.sleep(lease * 2)  # renewed every lease/3 meanwhile
            assert await probe.try_acquire("alice") == "per_user"
            # A clean stop hands the slots back at once.
            nursery.cancel_scope.cancel()
        assert await state_count(other, "alice") == 0
        assert await probe.try_acquire("alice") is None
        await probe.release("alice")

        # A crashed replica (nothing renews, nothing cleans up) loses its entries after the
        # lease: the user gets the share back from the other replica.
        crashed = RedisConnectionLimiter(live, 2, 100, lease)
        assert await crashed.try_acquire("bob") is None
        assert await crashed.try_acquire("bob") is None
        assert await probe.try_acquire("bob") == "per_user"
        with trio.fail_after(10):
            while await probe.try_acquire("bob") is not None:
                await trio.sleep(0.05)
        assert await probe.try_acquire("bob") is None


async def test_a_stopping_security_hands_its_connections_back_before_closing_the_client(
    redis_url: str, prefix: str
) -> None:
    # JWT on (the JWKS is never fetched here): without it nobody owns anything.
    settings = state_settings(
        redis_url,
        prefix,
        session_lease_seconds=60,
        use_jwt_auth=True,
        jwks_url="http://127.0.0.1:9/jwks.json",
    )
    one, two = Security(settings, Metrics()), Security(settings, Metrics())
    alice = Identity(sub="alice", scopes=frozenset({"*"}), expires_at=math.inf)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run_one(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await one.run_state(task_status=task_status)

        await nursery.start(run_one)
        await nursery.start(two.run_state)
        assert one.state_available and two.state_available
        await one.acquire_connection(alice)
        await one.claim_session("sec-1", alice)
        assert two.redis is not None
        assert await state_count(two.redis, "alice") == 1
        scope.cancel()  # a clean stop of replica one, its connection still open
        with trio.fail_after(10):
            while not scope.cancelled_caught:
                await trio.sleep(0.01)
        assert not one.state_available
        assert await state_count(two.redis, "alice") == 0  # removed, not left to lapse
        with pytest.raises(Refusal) as refused:
            await two.check_owner("sec-1", Identity("bob", frozenset({"*"}), math.inf))
        assert refused.value.status == 403  # ownership outlives the replica that claimed it
        nursery.cancel_scope.cancel()


# --- rates -----------------------------------------------------------------------------------


async def test_a_rate_is_one_bucket_for_every_replica(redis_url: str, prefix: str) -> None:
    settings = state_settings(redis_url, prefix)
    async with running_state(settings) as one, running_state(settings) as two:
        buckets = [RedisRateLimiter(one, "ws", 0.01, 3), RedisRateLimiter(two, "ws", 0.01, 3)]
        answers = [await buckets[n % 2].check("alice") for n in range(4)]
        assert [allowed for allowed, _ in answers] == [True, True, True, False]
        # The same answer the in-process limiter gives: the exact wait for one token.
        assert answers[-1][1] == pytest.approx(100, abs=5)
        assert answers[0][1] == 0.0
        assert await buckets[1].check("bob") == (True, 0.0)  # users are independent
        assert await buckets[0].check("alice", cost=5) == (False, math.inf)
        assert await buckets[0].check("alice", cost=0) == (True, 0.0)
        assert RateLimiter(0.01, 3).check("x", 0.0, cost=5) == (False, math.inf)
        # The other kind of rate is another bucket.
        assert (await RedisRateLimiter(one, "rest", 0.01, 3).check("alice"))[0]
        # An idle bucket expires (an absent bucket is a full one).
        ttl = await one.client.pttl(one.key("rate", "ws", "alice"))
        assert 0 < ttl <= 600_000


# --- Redis unavailable -----------------------------------------------------------------------


async def test_a_redis_that_is_not_there_fails_fast_with_state_unavailable() -> None:
    settings = state_settings(f"redis://127.0.0.1:{free_port()}/0", "t:")
    with trio.fail_after(10):
        async with running_state(settings) as state:
            assert not state.available
            store = RedisOwnershipStore(state)
            with pytest.raises(StateUnavailable, match="Redis"):
                await store.claim("s1", "alice")
            with pytest.raises(StateUnavailable):
                await RedisRateLimiter(state, "ws", 1, 1).check("alice")
            limiter = RedisConnectionLimiter(state, 1, 1, 1.0)
            with pytest.raises(StateUnavailable):
                await limiter.try_acquire("alice")
            assert limiter.local.total == 0  # nothing granted


async def test_a_blackholed_redis_times_out_and_recovery_is_automatic(
    own_redis: RedisServer, prefix: str
) -> None:
    settings = state_settings(own_redis.url(), prefix, redis_timeout=0.3)
    with trio.fail_after(30):
        async with running_state(settings) as state:
            store = RedisOwnershipStore(state)
            assert await store.claim("s1", "alice") == "alice"
            own_redis.pause()
            try:
                with pytest.raises(StateUnavailable):
                    await store.owner("s1")  # bounded by REDIS_TIMEOUT, not wedged
                assert not state.available
                with pytest.raises(StateUnavailable):
                    await store.owner("s1")  # fails fast while down
            finally:
                own_redis.resume()
            await wait_until(lambda: state.available)
            assert await store.owner("s1") == "alice"

            await trio.to_thread.run_sync(own_redis.kill)
            with pytest.raises(StateUnavailable):
                await store.owner("s1")
            await trio.to_thread.run_sync(own_redis.start)
            await wait_until(lambda: state.available)
            assert await store.owner("s1") is None  # no persistence: the data went with it
            assert await store.claim("s1", "bob") == "bob"


# --- two gateways on one Redis ---------------------------------------------------------------


Replicas = Callable[..., Any]


@pytest.fixture
def replicas(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    issuer: tuple[DevIssuer, str],
    prefix: str,
    redis_url: str,
) -> Callable[..., Any]:
    """``async with replicas(n, **overrides) as gateways``: n gateways sharing one Redis."""

    @asynccontextmanager
    async def start(
        count: int = 2, url: str | None = None, **overrides: Any
    ) -> AsyncIterator[list[RunningGateway]]:
        settings = state_settings(
            url or redis_url,
            prefix,
            demo_runtime[1],
            use_jwt_auth=True,
            jwks_url=issuer[1],
            ws_auth_timeout=2.0,
            **overrides,
        )
        async with run_gateway(nursery, settings) as one:
            if count == 1:
                yield [one]
                return
            async with run_gateway(nursery, settings) as two:
                yield [one, two]

    return start


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {token}".encode())]


async def chat(client: WsClient, content: str = "bench 2") -> list[dict[str, Any]]:
    await client.send({"type": "user_message", "content": content})
    return await client.turn()


async def test_a_session_claimed_on_one_replica_is_refused_to_others_on_the_next(
    replicas: Replicas, issuer: tuple[DevIssuer, str]
) -> None:
    alice, bob = issuer[0].mint("alice"), issuer[0].mint("bob")
    async with replicas() as (one, two):
        async with trio_websocket.open_websocket_url(
            one.ws_url("shared-1"), extra_headers=bearer(alice)
        ) as ws:
            assert len(await chat(WsClient(ws))) == 3
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with trio_websocket.open_websocket_url(
                two.ws_url("shared-1"), extra_headers=bearer(bob)
            ):
                pass
        assert rejected.value.status_code == 403
        async with httpx.AsyncClient(base_url=two.base_url) as http:
            answer = await http.get("/api/v1/sessions/shared-1", headers=auth(bob))
            assert answer.status_code == 403
        async with trio_websocket.open_websocket_url(
            two.ws_url("shared-1"), extra_headers=bearer(alice)
        ) as ws:
            assert len(await chat(WsClient(ws))) == 3  # the owner may use either replica


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_per_user_connection_cap_spans_replicas(
    replicas: Replicas, issuer: tuple[DevIssuer, str]
) -> None:
    alice, bob = issuer[0].mint("alice"), issuer[0].mint("bob")
    async with replicas(max_connections_per_user=2) as (one, two):
        async with trio_websocket.open_websocket_url(one.ws_url("c1"), extra_headers=bearer(alice)):
            async with trio_websocket.open_websocket_url(
                two.ws_url("c2"), extra_headers=bearer(alice)
            ):
                for gateway in (one, two):
                    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                        async with trio_websocket.open_websocket_url(
                            gateway.ws_url("c3"), extra_headers=bearer(alice)
                        ):
                            pass
                    assert rejected.value.status_code == 429
                async with trio_websocket.open_websocket_url(
                    two.ws_url("c4"), extra_headers=bearer(bob)
                ):
                    pass  # other users are unaffected
        # Closing gives the slots back (the server notices the closes a moment later).
        state = one.app.gateway.security.redis
        assert state is not None
        with trio.fail_after(10):
            while await state_count(state, "alice"):
                await trio.sleep(0.05)
        async with trio_websocket.open_websocket_url(two.ws_url("c5"), extra_headers=bearer(alice)):
            async with trio_websocket.open_websocket_url(
                one.ws_url("c6"), extra_headers=bearer(alice)
            ):
                pass


async def test_the_rest_rate_spans_replicas(
    replicas: Replicas, issuer: tuple[DevIssuer, str]
) -> None:
    alice = issuer[0].mint("alice")
    async with replicas(rest_requests_per_second=0.01, rest_request_burst=3) as (one, two):
        statuses = []
        for gateway in (one, one, two, two, one):
            async with httpx.AsyncClient(base_url=gateway.base_url) as http:
                answer = await http.get("/api/v1/agents", headers=auth(alice))
                statuses.append(answer.status_code)
        assert statuses == [200, 200, 200, 429, 429]
        assert int(answer.headers["retry-after"]) > 10  # ~100 s for one token at 0.01/s


async def test_the_handshake_rate_spans_replicas(
    replicas: Replicas, issuer: tuple[DevIssuer, str]
) -> None:
    alice, bob = issuer[0].mint("alice"), issuer[0].mint("bob")
    async with replicas(ws_handshakes_per_second=0.01, ws_handshake_burst=3) as (one, two):
        statuses = []
        for n, gateway in enumerate((one, two, one, two)):
            try:
                async with trio_websocket.open_websocket_url(
                    gateway.ws_url(f"h{n}"), extra_headers=bearer(alice)
                ):
                    statuses.append(101)
            except trio_websocket.ConnectionRejected as rejected:
                statuses.append(rejected.status_code)
        assert statuses == [101, 101, 101, 429]
        async with trio_websocket.open_websocket_url(
            one.ws_url("h-bob"), extra_headers=bearer(bob)
        ):
            pass  # other users are unaffected


async def test_the_message_rate_spans_replicas(
    replicas: Replicas, issuer: tuple[DevIssuer, str]
) -> None:
    alice = issuer[0].mint("alice")
    async with replicas(ws_messages_per_second=0.01, ws_message_burst=2) as (one, two):
        async with trio_websocket.open_websocket_url(
            one.ws_url("m1"), extra_headers=bearer(alice)
        ) as first:
            async with trio_websocket.open_websocket_url(
                two.ws_url("m2"), extra_headers=bearer(alice)
            ) as second:
                await WsClient(first).send({"type": "cancel"})
                await WsClient(second).send({"type": "cancel"})
                await WsClient(second).send({"type": "cancel"})  # the third of a burst of 2
                assert (await WsClient(second).recv())["code"] == "rate_limited"


async def test_redis_down_refuses_new_sessions_keeps_live_ones_and_recovers(
    replicas: Replicas, issuer: tuple[DevIssuer, str], own_redis: RedisServer
) -> None:
    alice = issuer[0].mint("alice")
    async with replicas(1, url=own_redis.url()) as (gateway,):
        security = gateway.app.gateway.security
        registry = gateway.app.gateway.metrics.registry
        assert registry.get_sample_value("gateway_state_backend_up") == 1
        async with (
            httpx.AsyncClient(base_url=gateway.base_url) as http,
            trio_websocket.open_websocket_url(
                gateway.ws_url("live"), extra_headers=bearer(alice)
            ) as ws,
        ):
            live = WsClient(ws)
            assert len(await chat(live)) == 3
            # A turn in flight (40 tokens paced over 2 s) when Redis crashes.
            await live.send({"type": "user_message", "content": "bench 40 20"})
            first = await live.recv()
            await trio.to_thread.run_sync(own_redis.kill)

            # New handshakes: 503 before the accept, 1013 after it (first-frame auth).
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket.open_websocket_url(
                    gateway.ws_url("new"), extra_headers=bearer(alice)
                ):
                    pass
            assert rejected.value.status_code == 503
            assert rejected.value.body is not None
            assert STATE_UNAVAILABLE.encode() in rejected.value.body
            async with trio_websocket.open_websocket_url(gateway.ws_url("new")) as late:
                await WsClient(late).send({"type": "auth", "token": alice})
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await WsClient(late).recv()
            assert close_code(closed.value) == 1013
            assert closed.value.reason is not None
            assert closed.value.reason.reason == STATE_UNAVAILABLE

            # REST: routes that need ownership are 503; the others go on (rate fails open).
            answer = await http.get("/api/v1/sessions/live", headers=auth(alice))
            assert answer.status_code == 503
            assert answer.json()["error_description"] == STATE_UNAVAILABLE
            await wait_until(lambda: not security.state_available)
            for method in ("GET", "POST"):  # list (filtered by owner) and create (claims)
                answer = await http.request(
                    method,
                    "/api/v1/sessions",
                    headers=auth(alice),
                    json={} if method == "POST" else None,
                )
                assert answer.status_code == 503
            assert (await http.get("/api/v1/agents", headers=auth(alice))).status_code == 200

            # The live session finishes its turn, and takes another one (rate fails open).
            rest = await live.turn()
            assert first.get("is_final") is not True and rest[-1]["is_final"] is True
            assert len(await chat(live)) == 3

            assert registry.get_sample_value("gateway_state_backend_up") == 0
            with trio.fail_after(10):
                while (ready := await http.get("/api/v1/health")).status_code != 503:
                    await trio.sleep(0.1)
            assert ready.json()["checks"]["state_backend"] == "redis unavailable"

            # Redis comes back on the same address: the gateway recovers by itself.
            await trio.to_thread.run_sync(own_redis.start)
            await wait_until(lambda: security.state_available)
            assert registry.get_sample_value("gateway_state_backend_up") == 1
            async with trio_websocket.open_websocket_url(
                gateway.ws_url("after"), extra_headers=bearer(alice)
            ) as again:
                assert len(await chat(WsClient(again))) == 3
            with trio.fail_after(10):
                while (await http.get("/api/v1/health")).status_code != 200:
                    await trio.sleep(0.1)
