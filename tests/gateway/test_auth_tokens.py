"""JWT verification (docs/compatibility.md §3), as a specification: what :func:`verify_token`
accepts and refuses (algorithms and header attacks, malformed tokens, claims), the key set built
from a JWKS, and the HTTP helpers (bearer token, ``WWW-Authenticate``, ``Cache-Control`` TTL),
with fixed times and no I/O.
"""

# The key fixtures are auth_support's, imported by name (pytest finds fixtures in a module's
# namespace); parameters of the same names are what ruff's F811 sees.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest

from trio_gateway.security.auth import (
    AUTH_REASONS,
    AuthError,
    Identity,
    KeySet,
    TokenPolicy,
    bearer_token,
    ttl_from_cache_control,
    verify_token,
    www_authenticate,
)
from trio_gateway.tools.dev_auth import DevIssuer

from .auth_support import (  # noqa: F401 - fixtures (issuer, keys)
    NOW,
    POLICY,
    b64url,
    forge,
    good_claims,
    issuer,
    keys,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def hs256_forgery(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token "signed" with ``secret`` (here: the issuer's *public* key)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def refused(token: str, keys: KeySet, *, policy: TokenPolicy = POLICY, now: float = NOW) -> str:
    """The reason ``token`` is refused (fails the test when it is accepted)."""
    with pytest.raises(AuthError) as caught:
        verify_token(token, keys, policy, now)
    assert caught.value.reason in AUTH_REASONS
    return caught.value.reason


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
