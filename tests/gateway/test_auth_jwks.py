"""The JWKS cache (docs/compatibility.md §3), as a specification: :class:`JWKSCache` against a real
HTTP Auth Service stand-in (``jwks_server``) with an injected cache clock, so hours of cache time
pass instantly while the HTTP is real (basics, key rotation, the service down, protecting the
service from floods of unknown kids); then in-memory fetchers on trio's MockClock for
cancellation and unexpected errors.
"""

# The key fixtures are auth_support's, imported by name (pytest finds fixtures in a module's
# namespace); parameters of the same names are what ruff's F811 sees.
# ruff: noqa: F811

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from trio_gateway.security.auth import (
    AuthError,
    JWKSCache,
    JWKSUnavailable,
    httpx_jwks_fetcher,
)
from trio_gateway.tools.dev_auth import DevIssuer

from ..support.jwks_server import JWKSServer
from ..support.ports import free_port
from .auth_support import (  # noqa: F401 - fixtures (issuer, keys)
    NOW,
    POLICY,
    forge,
    good_claims,
    issuer,
    keys,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class FakeClock:
    """The JWKS cache's clock, moved by hand: cache hours pass instantly, HTTP stays real."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --------------------------------------------------------------------------------------------
# Part 2: JWKSCache against a real HTTP Auth Service
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def auth_service(nursery: trio.Nursery, issuer: DevIssuer) -> AsyncIterator[JWKSServer]:
    server = JWKSServer(issuer.jwks())
    await nursery.start(server.serve)
    yield server
    server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@dataclass
class CacheRig:
    """What a JWKS cache test drives: the Auth Service stand-in, the issuer whose keys it
    serves, the cache's hand-moved clock, and caches wired to all three."""

    service: JWKSServer
    issuer: DevIssuer
    clock: FakeClock
    http: httpx.AsyncClient

    def cache(self, url: str | None = None, timeout: float = 5.0, **options: Any) -> JWKSCache:
        """A cold cache fetching from the stand-in (or ``url``) on the rig's clock."""
        fetch = httpx_jwks_fetcher(self.http, url or self.service.url, timeout)
        return JWKSCache(fetch, clock=self.clock, **options)


@pytest.fixture
def rig(http: httpx.AsyncClient, auth_service: JWKSServer, issuer: DevIssuer) -> CacheRig:
    return CacheRig(auth_service, issuer, FakeClock(), http)


async def accepts(cache: JWKSCache, token: str) -> bool:
    """Whether ``cache`` accepts ``token`` now (JWKSUnavailable propagates)."""
    try:
        await cache.verify(token, POLICY)
    except AuthError:
        return False
    return True


async def cache_refusal(cache: JWKSCache, token: str) -> str:
    """The reason ``cache`` refuses ``token`` (fails the test when it is accepted)."""
    with pytest.raises(AuthError) as caught:
        await cache.verify(token, POLICY)
    return caught.value.reason


def random_kid_token(issuer: DevIssuer) -> str:
    """A token naming a kid nobody has published (the flood an attacker would send)."""
    return issuer.mint("u", extra_headers={"kid": secrets.token_hex(8)})


class TestCacheBasics:
    async def test_keys_are_fetched_once_and_reused_while_fresh(self, rig: CacheRig) -> None:
        cache = rig.cache()
        assert not cache.loaded
        for _ in range(5):
            assert (await cache.verify(rig.issuer.mint("u"), POLICY)).sub == "u"
            rig.clock.advance(600)
        assert rig.service.requests == 1
        assert cache.loaded and cache.fetches == 1 and cache.fetch_failures == 0

    async def test_verify_checks_claims_at_the_given_wall_time(self, rig: CacheRig) -> None:
        cache = rig.cache()
        token = rig.issuer.mint("u", now=NOW)
        assert (await cache.verify(token, POLICY, now=NOW)).sub == "u"
        assert await cache_refusal(cache, token) == "expired"  # today, long after NOW + 900

    async def test_refusals_unrelated_to_keys_cause_no_refetch(self, rig: CacheRig) -> None:
        cache = rig.cache()
        await cache.keys()
        rig.clock.advance(1000)
        for token in (
            rig.issuer.mint("u", token_type="refresh"),
            rig.issuer.mint("u", audience="x"),
            "garbage",
            forge({"alg": "none", "kid": "main"}, good_claims()),
        ):
            assert not await accepts(cache, token)
        assert rig.service.requests == 1

    @pytest.mark.parametrize(
        ("cache_control", "fresh_for"),
        [
            ("public, max-age=120", 120),
            ("max-age=5", 60),  # below min_ttl: clamped up
            ("max-age=999999999", 86400),  # above max_ttl: clamped down
            (None, 3600),  # no header: default_ttl
        ],
    )
    async def test_cache_control_max_age_is_honoured_and_clamped(
        self, rig: CacheRig, cache_control: str | None, fresh_for: float
    ) -> None:
        rig.service.cache_control = cache_control
        cache = rig.cache()
        await cache.keys()
        assert cache.expires_at == fresh_for
        rig.clock.advance(fresh_for - 1)
        await cache.keys()
        assert rig.service.requests == 1
        rig.clock.advance(1)
        await cache.keys()
        assert rig.service.requests == 2

    async def test_ttl_bounds_are_configurable(self, rig: CacheRig) -> None:
        rig.service.cache_control = "max-age=5"
        cache = rig.cache(min_ttl=1, max_ttl=10)
        await cache.keys()
        assert cache.expires_at == 5


class TestKeyRotation:
    async def test_a_new_kid_is_accepted_after_the_cooldown_and_old_tokens_keep_working(
        self, rig: CacheRig
    ) -> None:
        cache = rig.cache()
        old_token = rig.issuer.mint("u")
        assert await accepts(cache, old_token)

        successor = DevIssuer(kid="next")
        rig.service.jwks = {"keys": [rig.issuer.jwk(), successor.jwk()]}
        new_token = successor.mint("u")

        rig.clock.advance(10)  # within the cooldown of the first fetch: no refetch yet
        assert not await accepts(cache, new_token)
        assert rig.service.requests == 1

        rig.clock.advance(20)  # 30 s after the last fetch: one refetch, then accepted
        assert await accepts(cache, new_token)
        assert rig.service.requests == 2
        assert cache.refetches == 1
        assert await accepts(cache, old_token)  # the old key is still published
        assert rig.service.requests == 2

        # The old key is retired; once the cache expires it is gone too.
        rig.service.jwks = successor.jwks()
        rig.clock.advance(3600)
        assert await accepts(cache, new_token)
        assert await cache_refusal(cache, old_token) == "unknown_kid"
        assert rig.service.requests == 3

    async def test_a_key_regenerated_under_the_same_kid_is_picked_up_by_one_refetch(
        self, rig: CacheRig
    ) -> None:
        # The Auth Service lost its key file and made a new key, keeping kid "main".
        cache = rig.cache()
        await cache.keys()
        regenerated = DevIssuer(kid="main")
        rig.service.jwks = regenerated.jwks()
        new_token = regenerated.mint("u")

        rig.clock.advance(5)
        assert await cache_refusal(cache, new_token) == "bad_signature"
        assert rig.service.requests == 1  # still in the cooldown

        rig.clock.advance(25)
        assert (await cache.verify(new_token, POLICY)).sub == "u"
        assert rig.service.requests == 2

        # Tokens of the lost key are now the bad ones, and asking again is rate-limited.
        assert await cache_refusal(cache, rig.issuer.mint("u")) == "bad_signature"
        assert rig.service.requests == 2


class TestAuthServiceDown:
    async def test_cached_keys_keep_working_then_stale_keys_for_stale_for(
        self, rig: CacheRig
    ) -> None:
        cache = rig.cache(stale_for=3600, retry_after_failure=5)
        token = rig.issuer.mint("u")
        assert await accepts(cache, token)  # keys fresh until t=3600
        rig.service.go_down()

        rig.clock.advance(3000)
        assert await accepts(cache, token)
        assert rig.service.requests == 1  # fresh keys: the outage goes unnoticed

        rig.clock.advance(600)  # t=3600: expired, the refresh fails, the stale keys are served
        assert await accepts(cache, token)
        assert (rig.service.requests, cache.fetch_failures) == (2, 1)
        assert cache.loaded
        assert cache.last_error is not None and "503" in cache.last_error

        rig.clock.advance(4)  # failures are not retried on every request
        assert await accepts(cache, token)
        assert rig.service.requests == 2
        rig.clock.advance(1)
        assert await accepts(cache, token)
        assert rig.service.requests == 3

        rig.clock.now = 7199  # last second of staleness
        assert await accepts(cache, token)
        rig.clock.now = 7200  # stale_for is over: no keys at all
        with pytest.raises(JWKSUnavailable):
            await cache.verify(token, POLICY)
        assert not cache.loaded

        rig.service.go_up()
        rig.clock.advance(5)
        assert await accepts(cache, token)
        assert cache.loaded and cache.last_error is None

    async def test_no_keys_ever_is_jwks_unavailable_not_an_auth_error(self, rig: CacheRig) -> None:
        rig.service.go_down(500)
        cache = rig.cache()
        with pytest.raises(JWKSUnavailable):
            await cache.verify(rig.issuer.mint("u"), POLICY)
        assert (cache.fetches, cache.fetch_failures, cache.loaded) == (1, 1, False)

    async def test_connection_refused_is_jwks_unavailable(self, rig: CacheRig) -> None:
        # Nothing listens on that port any more.
        cache = rig.cache(url=f"http://127.0.0.1:{free_port()}/.well-known/jwks.json")
        with pytest.raises(JWKSUnavailable):
            await cache.verify(rig.issuer.mint("u"), POLICY)

    @pytest.mark.parametrize(
        "body",
        [b"<html>oops</html>", b"[]", b'{"keys": "none"}', b'{"keys": []}', b"{" * 100_000],
        ids=["html", "array", "keys-not-a-list", "no-keys", "deep-nesting"],
    )
    async def test_a_garbage_answer_is_a_failed_fetch_and_keeps_the_old_keys(
        self, rig: CacheRig, body: bytes
    ) -> None:
        cache = rig.cache()
        token = rig.issuer.mint("u")
        assert await accepts(cache, token)
        rig.service.raw_body = body
        rig.clock.advance(3600)
        assert await accepts(cache, token)
        assert cache.fetch_failures == 1

    async def test_a_slow_auth_service_times_out(self, rig: CacheRig) -> None:
        rig.service.delay = 30
        cache = rig.cache(timeout=0.2)
        with trio.fail_after(5):
            with pytest.raises(JWKSUnavailable):
                await cache.verify(rig.issuer.mint("u"), POLICY)
        assert cache.last_error is not None and "0.2" in cache.last_error

    async def test_an_oversized_jwks_is_refused(self, rig: CacheRig) -> None:
        fetch = httpx_jwks_fetcher(rig.http, rig.service.url, 5, max_bytes=100)
        with pytest.raises(JWKSUnavailable, match="more than 100 bytes"):
            await fetch()

    async def test_the_fetcher_returns_the_document_and_cache_control(self, rig: CacheRig) -> None:
        document, cache_control = await httpx_jwks_fetcher(rig.http, rig.service.url, 5)()
        assert document == rig.issuer.jwks()
        assert cache_control == "public, max-age=3600"


class TestProtectingTheAuthService:
    async def test_a_kid_flood_costs_one_fetch_per_cooldown(self, rig: CacheRig) -> None:
        cache = rig.cache(refetch_cooldown=30)
        await cache.keys()
        rig.clock.advance(30)
        flood = [random_kid_token(rig.issuer) for _ in range(100)]
        for token in flood:
            assert await cache_refusal(cache, token) == "unknown_kid"
        assert rig.service.requests == 2  # the first fetch + one refetch

        rig.clock.advance(29)
        for token in flood:
            assert not await accepts(cache, token)
        assert rig.service.requests == 2
        rig.clock.advance(1)
        for token in flood:
            assert not await accepts(cache, token)
        assert rig.service.requests == 3

    async def test_a_concurrent_kid_flood_costs_one_fetch(self, rig: CacheRig) -> None:
        cache = rig.cache()
        await cache.keys()
        rig.clock.advance(60)
        rig.service.delay = 0.05  # keep the refetch in flight while the flood piles up
        flood = [random_kid_token(rig.issuer) for _ in range(100)]
        reasons: list[str] = []

        async def attempt(token: str) -> None:
            reasons.append(await cache_refusal(cache, token))

        async with trio.open_nursery() as nursery:
            for token in flood:
                nursery.start_soon(attempt, token)
        assert reasons == ["unknown_kid"] * 100
        assert rig.service.requests == 2

    async def test_concurrent_verifications_on_a_cold_cache_share_one_fetch(
        self, rig: CacheRig
    ) -> None:
        cache = rig.cache()
        rig.service.delay = 0.05
        token = rig.issuer.mint("u")
        subjects: list[str] = []

        async def verify() -> None:
            subjects.append((await cache.verify(token, POLICY)).sub)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(verify)
        assert subjects == ["u"] * 50
        assert rig.service.requests == 1

    async def test_concurrent_callers_share_a_failed_fetch_too(self, rig: CacheRig) -> None:
        # No failure backoff: only single flight stands between the waiters and 50 requests.
        cache = rig.cache(retry_after_failure=0)
        rig.service.go_down()
        rig.service.delay = 0.05
        failures: list[str] = []

        async def verify() -> None:
            try:
                await cache.verify(rig.issuer.mint("u"), POLICY)
            except JWKSUnavailable as exc:
                failures.append(str(exc))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(verify)
        assert len(failures) == 50
        assert rig.service.requests == 1


# --------------------------------------------------------------------------------------------
# In-memory fetchers on trio's MockClock: cancellation and unexpected errors
# --------------------------------------------------------------------------------------------


async def test_a_cancelled_fetch_leaves_the_cache_usable(
    autojump_clock: trio.testing.MockClock, issuer: DevIssuer
) -> None:
    calls = 0

    async def slow_fetch() -> tuple[dict[str, Any], str | None]:
        nonlocal calls
        calls += 1
        await trio.sleep(10)
        return issuer.jwks(), "max-age=600"

    cache = JWKSCache(slow_fetch)  # the default clock: trio.current_time (mocked here)
    with trio.move_on_after(1):
        await cache.keys()
    assert not cache.loaded and cache.fetch_failures == 0

    started = trio.current_time()
    assert "main" in await cache.keys()
    assert calls == 2
    assert cache.expires_at == started + 10 + 600


async def test_an_unexpected_fetch_error_counts_as_a_failure(
    autojump_clock: trio.testing.MockClock, issuer: DevIssuer
) -> None:
    async def broken_fetch() -> tuple[dict[str, Any], str | None]:
        raise RuntimeError("bug in the fetcher")

    cache = JWKSCache(broken_fetch)
    with pytest.raises(JWKSUnavailable, match="bug in the fetcher"):
        await cache.verify(issuer.mint("u", now=time.time()), POLICY)
    assert cache.fetch_failures == 1


def test_cache_options_are_validated() -> None:
    async def fetch() -> tuple[dict[str, Any], str | None]:
        raise AssertionError

    with pytest.raises(ValueError):
        JWKSCache(fetch, min_ttl=100, max_ttl=10)
    with pytest.raises(ValueError):
        JWKSCache(fetch, refetch_cooldown=-1)
