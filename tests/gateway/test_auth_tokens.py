"""JWT verification and the JWKS cache (docs/compatibility.md §3), as a specification.

Part 1 pins down what :func:`verify_token` accepts and refuses, with fixed times and no I/O.
Part 2 runs :class:`JWKSCache` against a real HTTP Auth Service stand-in (``jwks_server``) with
an injected cache clock, so hours of cache time pass instantly while the HTTP is real.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import trio

from trio_gateway.security.auth import (
    AUTH_REASONS,
    AuthError,
    Identity,
    JWKSCache,
    JWKSUnavailable,
    KeySet,
    TokenPolicy,
    bearer_token,
    httpx_jwks_fetcher,
    ttl_from_cache_control,
    verify_token,
    www_authenticate,
)
from trio_gateway.tools.dev_auth import DevIssuer

from ..support.jwks_server import JWKSServer
from ..support.ports import free_port

NOW = 1_750_000_000.0
POLICY = TokenPolicy()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    """The Auth Service's current RSA key (generating one takes a moment: share it)."""
    return DevIssuer(kid="main")


@pytest.fixture(scope="module")
def keys(issuer: DevIssuer) -> KeySet:
    return KeySet.from_jwks(issuer.jwks())


def b64url(data: bytes) -> str:
    """Unpadded base64url, as in a compact JWS."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS with whatever header, claims and signature an attacker likes."""
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(claims).encode()),
            b64url(signature),
        ]
    )


def hs256_forgery(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token "signed" with ``secret`` (here: the issuer's *public* key)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def good_claims(**overrides: Any) -> dict[str, Any]:
    """The claims of a valid access token issued at NOW, with ``overrides`` applied."""
    claims: dict[str, Any] = {
        "iss": POLICY.issuer,
        "aud": POLICY.audience,
        "sub": "user-1",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 900,
        "type": "access",
        "scope": "api:read api:write",
    }
    claims.update(overrides)
    return claims


def refused(token: str, keys: KeySet, *, policy: TokenPolicy = POLICY, now: float = NOW) -> str:
    """The reason ``token`` is refused (fails the test when it is accepted)."""
    with pytest.raises(AuthError) as caught:
        verify_token(token, keys, policy, now)
    assert caught.value.reason in AUTH_REASONS
    return caught.value.reason


class FakeClock:
    """The JWKS cache's clock, moved by hand: cache hours pass instantly, HTTP stays real."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --------------------------------------------------------------------------------------------
# Part 1: verify_token (sans-IO)
# --------------------------------------------------------------------------------------------


class TestAcceptedTokens:
    def test_a_valid_access_token_yields_the_identity(
        self, issuer: DevIssuer, keys: KeySet
    ) -> None:
        token = issuer.mint("user-42", scopes=("api:read", "admin"), now=NOW)
        identity = verify_token(token, keys, POLICY, NOW + 10)
        assert identity.sub == "user-42"
        assert identity.scopes == frozenset({"api:read", "admin"})
        assert identity.expires_at == NOW + 900
        assert identity.client_id == "codelab-dev"
        assert identity.token_id is not None and len(identity.token_id) == 32
        assert identity.has_scopes("api:read") and not identity.has_scopes("api:write")

    def test_no_scope_claim_means_no_scopes(self, issuer: DevIssuer, keys: KeySet) -> None:
        token = issuer.mint("u", now=NOW, extra_claims={"scope": None, "client_id": None})
        identity = verify_token(token, keys, POLICY, NOW)
        assert identity == Identity(
            sub="u",
            scopes=frozenset(),
            expires_at=NOW + 900,
            client_id=None,
            token_id=identity.token_id,
        )

    def test_nbf_is_optional(self, issuer: DevIssuer, keys: KeySet) -> None:
        token = issuer.mint("u", now=NOW, extra_claims={"nbf": None})
        assert verify_token(token, keys, POLICY, NOW).sub == "u"

    def test_an_audience_list_containing_ours_is_accepted(
        self, issuer: DevIssuer, keys: KeySet
    ) -> None:
        # RFC 7519 allows an array; the Auth Service sends a string, other issuers may not.
        token = issuer.mint("u", now=NOW, audience=["other-api", POLICY.audience])  # type: ignore[arg-type]
        assert verify_token(token, keys, POLICY, NOW).sub == "u"

    @pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
    def test_es256_and_eddsa_keys_are_accepted_when_the_jwks_says_so(self, algorithm: str) -> None:
        other = DevIssuer(kid=f"{algorithm}-key", algorithm=algorithm)  # type: ignore[arg-type]
        keyset = KeySet.from_jwks(other.jwks())
        assert keyset[other.kid].algorithm_name == algorithm
        assert verify_token(other.mint("u", now=NOW), keyset, POLICY, NOW).sub == "u"

    def test_an_rsa_jwk_without_alg_is_pinned_to_rs256(self, issuer: DevIssuer) -> None:
        jwk = issuer.jwk()
        del jwk["alg"]
        keyset = KeySet.from_jwks({"keys": [jwk]})
        assert keyset[issuer.kid].algorithm_name == "RS256"
        assert verify_token(issuer.mint("u", now=NOW), keyset, POLICY, NOW).sub == "u"


class TestAlgorithmAndHeaderAttacks:
    @pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", " none "])
    @pytest.mark.parametrize("signature", [b"", b"anything"])
    def test_alg_none_is_refused_in_any_spelling(
        self, keys: KeySet, alg: str, signature: bytes
    ) -> None:
        token = forge({"alg": alg, "kid": "main", "typ": "JWT"}, good_claims(), signature)
        assert refused(token, keys) == "unsupported_alg"

    def test_hs256_signed_with_the_public_key_pem_is_refused(
        self, issuer: DevIssuer, keys: KeySet
    ) -> None:
        # The classic key-confusion attack: the verifier must never let the token pick HMAC.
        header = {"alg": "HS256", "kid": "main", "typ": "JWT"}
        assert refused(hs256_forgery(header, good_claims(), issuer.public_pem()), keys) == (
            "unsupported_alg"
        )
        jwk_json = json.dumps(issuer.jwk()).encode()
        assert refused(hs256_forgery(header, good_claims(), jwk_json), keys) == "unsupported_alg"

    def test_the_key_pins_the_algorithm(self, keys: KeySet) -> None:
        # A real ES256 signature under the RSA key's kid: the alg is allowed by the policy but
        # not by the key, so the token is refused before any verification.
        impostor = DevIssuer(kid="main", algorithm="ES256")
        assert refused(impostor.mint("u", now=NOW), keys) == "unsupported_alg"

    def test_algorithms_outside_the_policy_are_refused(self, keys: KeySet) -> None:
        token = forge({"alg": "RS384", "kid": "main"}, good_claims(), b"sig")
        assert refused(token, keys) == "unsupported_alg"

    def test_a_policy_cannot_allow_symmetric_or_unsigned_algorithms(self) -> None:
        for algorithms in ({"HS256"}, {"RS256", "none"}, set()):
            with pytest.raises(ValueError):
                TokenPolicy(algorithms=frozenset(algorithms))

    @pytest.mark.parametrize("name", ["jwk", "jku", "x5u", "x5c"])
    def test_keys_embedded_in_or_referenced_by_the_header_are_refused(
        self, issuer: DevIssuer, keys: KeySet, name: str
    ) -> None:
        value: Any = {
            "jwk": issuer.jwk(),
            "jku": "https://evil.example/jwks.json",
            "x5u": "https://evil.example/cert.pem",
            "x5c": ["MIIB..."],
        }[name]
        # Correctly signed by the real key, and still refused: the header must not carry keys.
        token = issuer.mint("u", now=NOW, extra_headers={name: value})
        assert refused(token, keys) == "embedded_key"

    def test_a_self_signed_token_with_its_own_embedded_jwk_is_refused(self, keys: KeySet) -> None:
        attacker = DevIssuer(kid="main")
        token = attacker.mint("admin", now=NOW, extra_headers={"jwk": attacker.jwk()})
        assert refused(token, keys) == "embedded_key"

    def test_kid_is_required(self, keys: KeySet) -> None:
        token = forge({"alg": "RS256"}, good_claims(), b"sig")
        assert refused(token, keys) == "malformed"

    def test_an_unknown_kid_is_refused(self, issuer: DevIssuer, keys: KeySet) -> None:
        token = issuer.mint("u", now=NOW, extra_headers={"kid": "no-such-key"})
        assert refused(token, keys) == "unknown_kid"

    def test_a_signature_by_another_key_under_our_kid_is_refused(self, keys: KeySet) -> None:
        attacker = DevIssuer(kid="main")
        assert refused(attacker.mint("admin", now=NOW), keys) == "bad_signature"

    def test_a_tampered_payload_is_refused(self, issuer: DevIssuer, keys: KeySet) -> None:
        header, _, signature = issuer.mint("user-1", now=NOW).split(".")
        payload = b64url(json.dumps(good_claims(sub="admin")).encode())
        assert refused(f"{header}.{payload}.{signature}", keys) == "bad_signature"


class TestMalformedTokens:
    @pytest.mark.parametrize(
        "token",
        [
            "",
            "garbage",
            "a.b",
            "a.b.c",
            "....",
            "ü.ü.ü",
            "eyJhbGciOiJSUzI1NiJ9",  # a header alone
            f"{b64url(b'[]')}.{b64url(b'{}')}.",  # header is not an object
            f"{b64url(b'not json')}.{b64url(b'{}')}.",
        ],
    )
    def test_garbage_is_malformed(self, keys: KeySet, token: str) -> None:
        assert refused(token, keys) == "malformed"

    def test_a_payload_that_is_not_json_is_malformed(self, issuer: DevIssuer, keys: KeySet) -> None:
        # Correctly signed by the real key, so only the payload itself can be at fault.
        token = jwt.PyJWS().encode(
            b"not json", issuer._private_key, algorithm="RS256", headers={"kid": "main"}
        )
        assert refused(token, keys) == "malformed"

    def test_a_100_kb_token_is_refused_before_parsing(
        self, issuer: DevIssuer, keys: KeySet
    ) -> None:
        big = issuer.mint("u", now=NOW, extra_claims={"pad": "x" * 100_000})
        assert refused(big, keys) == "token_too_large"
        # Not even looked at: garbage of that size is "too large", not "malformed".
        assert refused("x" * 100_000, keys) == "token_too_large"

    def test_the_size_limit_is_configurable(self, issuer: DevIssuer, keys: KeySet) -> None:
        token = issuer.mint("u", now=NOW)
        small = TokenPolicy(max_token_bytes=len(token) - 1)
        assert refused(token, keys, policy=small) == "token_too_large"
        assert verify_token(token, keys, TokenPolicy(max_token_bytes=len(token)), NOW).sub == "u"

    @pytest.mark.parametrize("claim", ["sub", "exp", "iat", "type", "aud", "iss"])
    def test_required_claims_must_be_present(
        self, issuer: DevIssuer, keys: KeySet, claim: str
    ) -> None:
        token = issuer.mint("u", now=NOW, extra_claims={claim: None})
        assert refused(token, keys) == "missing_claim"

    @pytest.mark.parametrize(
        "claims",
        [
            {"exp": "tomorrow"},
            {"exp": True},
            {"iat": [1]},
            {"nbf": "now"},
            {"sub": 42},
            {"sub": ""},
            {"scope": ["api:read"]},
            {"client_id": 7},
            {"jti": 7},
            {"exp": NOW - 10},  # exp before iat
        ],
        ids=repr,
    )
    def test_claims_of_the_wrong_type_are_malformed(
        self, issuer: DevIssuer, keys: KeySet, claims: dict[str, Any]
    ) -> None:
        token = issuer.mint("u", now=NOW, extra_claims=claims)
        assert refused(token, keys, now=NOW - 20) == "malformed"


class TestClaims:
    def test_refresh_tokens_are_refused(self, issuer: DevIssuer, keys: KeySet) -> None:
        token = issuer.mint("u", now=NOW, token_type="refresh")
        assert refused(token, keys) == "wrong_type"

    def test_the_wrong_audience_is_refused(self, issuer: DevIssuer, keys: KeySet) -> None:
        assert refused(issuer.mint("u", now=NOW, audience="other-api"), keys) == "wrong_audience"

    def test_the_wrong_issuer_is_refused(self, issuer: DevIssuer, keys: KeySet) -> None:
        token = issuer.mint("u", now=NOW, issuer="https://evil.example")
        assert refused(token, keys) == "wrong_issuer"

    def test_expiry_is_enforced_with_leeway(self, issuer: DevIssuer, keys: KeySet) -> None:
        token = issuer.mint("u", now=NOW, lifetime=900)
        exp = NOW + 900
        assert verify_token(token, keys, POLICY, exp + POLICY.leeway - 1).sub == "u"
        assert refused(token, keys, now=exp + POLICY.leeway) == "expired"
        assert refused(token, keys, policy=TokenPolicy(leeway=0), now=exp) == "expired"

    def test_nbf_in_the_future_is_refused_beyond_leeway(
        self, issuer: DevIssuer, keys: KeySet
    ) -> None:
        token = issuer.mint("u", now=NOW, extra_claims={"nbf": int(NOW) + 60})
        assert refused(token, keys, now=NOW) == "not_yet_valid"
        assert verify_token(token, keys, POLICY, NOW + 60 - POLICY.leeway).sub == "u"

    def test_iat_in_the_future_is_refused_beyond_leeway(
        self, issuer: DevIssuer, keys: KeySet
    ) -> None:
        # A clock 20 s ahead at the Auth Service is tolerated; a token from next minute is not.
        ahead = issuer.mint("u", now=NOW + 20, extra_claims={"nbf": None})
        assert verify_token(ahead, keys, POLICY, NOW).sub == "u"
        future = issuer.mint("u", now=NOW + 60, extra_claims={"nbf": None})
        assert refused(future, keys, now=NOW) == "issued_in_future"

    def test_lifetimes_over_the_maximum_are_refused(self, issuer: DevIssuer, keys: KeySet) -> None:
        longest = issuer.mint("u", now=NOW, lifetime=86400)
        assert verify_token(longest, keys, POLICY, NOW).sub == "u"
        too_long = issuer.mint("u", now=NOW, lifetime=86401)
        assert refused(too_long, keys) == "lifetime_too_long"
        assert refused(longest, keys, policy=TokenPolicy(max_lifetime=900)) == "lifetime_too_long"

    def test_bad_claims_are_only_judged_after_the_signature(self, keys: KeySet) -> None:
        # A forged token learns "bad_signature", never which of its claims would have failed.
        attacker = DevIssuer(kid="main")
        token = attacker.mint("u", now=NOW - 100_000, token_type="refresh", audience="x")
        assert refused(token, keys) == "bad_signature"


class TestKeySet:
    def test_unusable_keys_are_skipped_and_counted(self, issuer: DevIssuer) -> None:
        good = issuer.jwk()
        weak = DevIssuer(kid="x").jwk()
        weak.update(kid="short", n=b64url((2**1023 + 1).to_bytes(128, "big")))
        document = {
            "keys": [
                good,
                {**good, "kid": "enc", "use": "enc"},
                {**good, "kid": "ops", "key_ops": ["encrypt"]},
                {k: v for k, v in good.items() if k != "kid"},
                {"kty": "oct", "kid": "hmac", "k": b64url(b"secret"), "alg": "HS256"},
                {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
                {"kty": "XYZ", "kid": "alien"},
                {**good, "kid": "private", "d": "AAAA"},
                {**good, "alg": "RS256"},  # duplicate kid "main"
                weak,
                "not an object",
            ]
        }
        keyset = KeySet.from_jwks(document)
        assert list(keyset) == ["main"]
        assert keyset.skipped == 10

    def test_a_key_set_is_an_immutable_mapping(self, keys: KeySet) -> None:
        assert "main" in keys and len(keys) == 1
        with pytest.raises(TypeError):
            keys["other"] = keys["main"]  # type: ignore[index]
        assert "main" in repr(keys) and "n=" not in repr(keys)

    @pytest.mark.parametrize("document", [[], {"keys": "x"}, {}, "jwks", None])
    def test_a_document_that_is_not_a_jwks_is_an_error(self, document: Any) -> None:
        with pytest.raises(ValueError):
            KeySet.from_jwks(document)


class TestHttpHelpers:
    def test_bearer_token_extraction(self) -> None:
        assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
        assert bearer_token("bearer   abc ") == "abc"
        for value in (None, "", "Bearer", "Bearer  ", "Basic abc", "abc"):
            with pytest.raises(AuthError) as caught:
                bearer_token(value)
            assert caught.value.reason == "missing_token"

    def test_www_authenticate_follows_rfc_6750(self) -> None:
        assert www_authenticate() == 'Bearer realm="codelab"'
        assert www_authenticate(AuthError("missing_token", "x")) == 'Bearer realm="codelab"'
        value = www_authenticate(AuthError("expired", 'the "token" has expired'))
        assert value == (
            'Bearer realm="codelab", error="invalid_token", '
            "error_description=\"the 'token' has expired\""
        )


@pytest.mark.parametrize(
    ("header", "ttl"),
    [
        ("public, max-age=3600", 3600),
        ("max-age=120", 120),
        ('max-age="300", public', 300),
        ("MAX-AGE=600", 600),
        ("max-age=5", 60),  # clamped up to min_ttl
        ("max-age=999999999", 86400),  # clamped down to max_ttl
        ("no-store", 60),
        ("no-cache, max-age=900", 60),
        ("max-age=soon", 3600),
        ("public", 3600),
        (None, 3600),
        ("", 3600),
    ],
)
def test_ttl_from_cache_control(header: str | None, ttl: float) -> None:
    assert ttl_from_cache_control(header, default=3600, minimum=60, maximum=86400) == ttl


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
