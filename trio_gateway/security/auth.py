"""JWT verification against the Auth Service's JWKS (docs/compatibility.md §3).

Two layers:

* A sans-IO core. :func:`verify_token` checks one token against a :class:`KeySet` and a
  :class:`TokenPolicy` at an explicit ``now``: no clock, no network, no global state, so every
  rule is testable with fixed inputs. It raises :class:`AuthError` whose ``reason`` is a short
  machine code (see :data:`AUTH_REASONS`) that the app can log, count and map to a 401.
* A thin trio adapter. :class:`JWKSCache` owns the current key set and decides when to fetch:
  TTL from ``Cache-Control``, single-flight refresh, a cooldown on refetches caused by unknown
  ``kid`` or failed signatures (a flood of random ``kid`` values costs the Auth Service one
  request per cooldown), and the last good keys served for a bounded time while the Auth Service
  is down. When no key set can be had at all it raises :class:`JWKSUnavailable` (a 503, not a
  401: the client's token may be perfectly fine).

Why not ``jwt.PyJWKClient``: it fetches with blocking urllib (freezing the event loop) and
refetches on every unknown ``kid`` (docs/compatibility.md §6).

Two clocks are involved and must not be mixed: token claims (``exp``, ``iat``, ``nbf``) are
wall-clock epoch seconds (``time.time()``), while cache ages are measured on the cache's
monotonic ``clock`` (``trio.current_time`` by default).

The demo's stand-in for the Auth Service (a token minter) is ``tools/dev_auth.py``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, get_args

import httpx
import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = [
    "AUTH_REASONS",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "MIN_RSA_BITS",
    "AuthError",
    "AuthReason",
    "Identity",
    "JWKSCache",
    "JWKSFetcher",
    "JWKSUnavailable",
    "KeySet",
    "TokenPolicy",
    "bearer_token",
    "httpx_jwks_fetcher",
    "ttl_from_cache_control",
    "verify_token",
    "www_authenticate",
]

logger = logging.getLogger("trio_gateway.auth")

DEFAULT_ISSUER: Final = "https://auth.codelab.local"
DEFAULT_AUDIENCE: Final = "codelab-api"
#: Asymmetric algorithms only: a symmetric algorithm would let anyone holding the (public) JWKS
#: mint tokens.
DEFAULT_ALGORITHMS: Final = frozenset({"RS256", "ES256", "EdDSA"})
#: Algorithms a policy or key set may be widened to. HMAC and ``none`` are deliberately absent.
_ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: The shortest RSA key accepted, in a JWKS and for the dev issuer.
MIN_RSA_BITS: Final = 2048
#: Header parameters that carry (or point at) a key. Trusting them lets the token choose the key
#: that verifies it, so their mere presence is refused, even on an otherwise valid token.
_EMBEDDED_KEY_HEADERS: Final = frozenset({"jwk", "jku", "x5u", "x5c"})
#: A real JWKS is a few KiB; anything far larger is a misconfiguration or an attack.
MAX_JWKS_BYTES: Final = 1 << 20

AuthReason: TypeAlias = Literal[
    "missing_token",
    "malformed",
    "token_too_large",
    "unsupported_alg",
    "embedded_key",
    "unknown_kid",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "issued_in_future",
    "lifetime_too_long",
    "wrong_issuer",
    "wrong_audience",
    "wrong_type",
    "missing_claim",
]
#: Every reason :class:`AuthError` can carry (useful to pre-create metric label values).
AUTH_REASONS: Final[frozenset[str]] = frozenset(get_args(AuthReason))

#: Reasons that may mean "our key set is out of date" rather than "the token is bad".
_REFETCH_REASONS: Final = frozenset({"unknown_kid", "bad_signature"})


# --------------------------------------------------------------------------------------------
# errors and value types
# --------------------------------------------------------------------------------------------


class AuthError(Exception):
    """A token was refused. Maps to HTTP 401 / WebSocket handshake denial.

    ``reason`` is one of :data:`AUTH_REASONS`. ``description`` is a short human text that never
    contains data taken from the token, so it is safe to log and to put in a
    ``WWW-Authenticate`` header.
    """

    def __init__(self, reason: AuthReason, description: str) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason: AuthReason = reason
        self.description = description


class JWKSUnavailable(Exception):
    """No usable key set could be obtained from the Auth Service. Maps to HTTP 503."""


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a token must satisfy besides a valid signature."""

    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    #: Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
    leeway: float = 30.0
    #: ``exp - iat`` above this is refused: a stolen long-lived token is worse than a refused one.
    max_lifetime: float = 86400.0
    #: Checked before any decoding, so a huge header cannot cost base64/JSON work.
    max_token_bytes: int = 8192
    algorithms: frozenset[str] = DEFAULT_ALGORITHMS

    def __post_init__(self) -> None:
        """Refuse configurations that would make verification unsafe."""
        unsafe = set(self.algorithms) - _ASYMMETRIC_ALGORITHMS
        if unsafe or not self.algorithms:
            raise ValueError(
                f"algorithms must be a non-empty subset of {sorted(_ASYMMETRIC_ALGORITHMS)}, "
                f"not {sorted(self.algorithms)}"
            )
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience must not be empty")
        if self.leeway < 0 or self.max_lifetime <= 0 or self.max_token_bytes <= 0:
            raise ValueError("leeway must be >= 0; max_lifetime and max_token_bytes > 0")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified access token speaks for."""

    sub: str
    scopes: frozenset[str]
    #: Epoch seconds (the token's ``exp``).
    expires_at: float
    client_id: str | None = None
    #: The token's ``jti``.
    token_id: str | None = None

    def has_scopes(self, *required: str) -> bool:
        """True when every scope in ``required`` was granted."""
        return self.scopes.issuperset(required)


# --------------------------------------------------------------------------------------------
# key set
# --------------------------------------------------------------------------------------------


class KeySet(Mapping[str, jwt.PyJWK]):
    """An immutable ``kid -> PyJWK`` mapping of signature keys.

    Build it with :meth:`from_jwks`; unusable keys are skipped (and counted in ``skipped``)
    rather than failing the whole set, because one odd key published next to the real one must
    not lock every user out.
    """

    __slots__ = ("_keys", "skipped")

    def __init__(self, keys: Mapping[str, jwt.PyJWK] | None = None, skipped: int = 0) -> None:
        """Wrap ``keys`` (copied). Prefer :meth:`from_jwks`."""
        self._keys: dict[str, jwt.PyJWK] = dict(keys or {})
        self.skipped = skipped

    @classmethod
    def from_jwks(cls, document: Any, *, algorithms: Iterable[str] = DEFAULT_ALGORITHMS) -> KeySet:
        """Build a key set from a JWKS document (``{"keys": [...]}``).

        A key is skipped when it has no ``kid``, a ``use`` other than ``sig``, ``key_ops``
        without ``verify``, private key material, an algorithm outside ``algorithms``
        (which also excludes symmetric ``oct`` keys), an RSA modulus under 2048 bits, a ``kid``
        already taken by an earlier key, or parameters PyJWT cannot load.

        Raises :class:`ValueError` when ``document`` is not a JWKS at all. A JWKS whose keys
        were all skipped gives an empty set (the cache treats that as a failed fetch).
        """
        allowed = frozenset(algorithms)
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            raise ValueError('a JWKS must be a JSON object with a "keys" array')
        keys: dict[str, jwt.PyJWK] = {}
        skipped = 0
        for index, entry in enumerate(document["keys"]):
            problem, key = _load_jwk(entry, allowed)
            if key is not None and key.key_id in keys:
                problem, key = "duplicate kid (the first key with it wins)", None
            if key is None:
                skipped += 1
                logger.warning("JWKS key #%d skipped: %s", index, problem)
                continue
            assert key.key_id is not None  # _load_jwk only returns keys that have a kid
            keys[key.key_id] = key
        return cls(keys, skipped)

    def __getitem__(self, kid: str) -> jwt.PyJWK:
        """The key with this ``kid`` (``KeyError`` when absent)."""
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        """The ``kid`` values."""
        return iter(self._keys)

    def __len__(self) -> int:
        """Number of usable keys."""
        return len(self._keys)

    def __repr__(self) -> str:
        """Kids and skip count, never key material."""
        return f"KeySet(kids={sorted(self._keys)!r}, skipped={self.skipped})"


def _load_jwk(entry: Any, allowed: frozenset[str]) -> tuple[str, jwt.PyJWK | None]:
    """Load one JWKS member, or say why it is unusable."""
    if not isinstance(entry, dict):
        return "not a JSON object", None
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        return "no kid (tokens select keys by kid)", None
    use = entry.get("use")
    if use is not None and use != "sig":
        return f"kid {kid!r}: use is {use!r}, not 'sig'", None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return f"kid {kid!r}: key_ops does not include 'verify'", None
    if "d" in entry or "k" in entry:
        # A private (or symmetric) key in a public JWKS is a leak on the Auth Service's side;
        # using it would also mean verifying with a secret half the world may now hold.
        return f"kid {kid!r}: contains private or symmetric key material", None
    try:
        key = jwt.PyJWK(entry)
    except Exception as exc:  # PyJWT raises assorted types on odd parameters; skip, not fail
        return f"kid {kid!r}: unusable ({type(exc).__name__})", None
    if key.algorithm_name not in allowed:
        return f"kid {kid!r}: algorithm {key.algorithm_name!r} not allowed", None
    if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
        return f"kid {kid!r}: RSA key of {key.key.key_size} bits is too short", None
    if not isinstance(
        key.key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    ):
        return f"kid {kid!r}: not a public signature key", None
    return "", key


# --------------------------------------------------------------------------------------------
# sans-IO verification
# --------------------------------------------------------------------------------------------


def verify_token(token: str, keys: KeySet, policy: TokenPolicy, now: float) -> Identity:
    """Verify ``token`` against ``keys`` and ``policy`` at wall-clock time ``now`` (epoch s).

    Pure: no I/O and no clock reads. Raises :class:`AuthError`; the order of checks is
    size, header (alg, embedded keys, kid), signature + ``iss``/``aud`` (by PyJWT with the
    algorithm pinned by the key), then the remaining claims. Claims are only looked at once
    the signature is known to be good, so an attacker learns nothing from forged payloads.
    """
    if not isinstance(token, str) or not token:
        raise AuthError("malformed", "the token must be a non-empty string")
    # len() counts characters; a JWT is ASCII, so after the isascii() check it counts bytes.
    if len(token) > policy.max_token_bytes:
        raise AuthError("token_too_large", f"tokens are limited to {policy.max_token_bytes} bytes")
    if not token.isascii():
        raise AuthError("malformed", "a JWT is ASCII")

    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError("malformed", "not a compact JWS") from None

    alg = header.get("alg")
    if not isinstance(alg, str):
        raise AuthError("malformed", "the header has no alg")
    if alg.strip().lower() == "none":
        raise AuthError("unsupported_alg", "unsigned tokens are refused")
    if alg not in policy.algorithms:
        raise AuthError(
            "unsupported_alg", f"alg must be one of {', '.join(sorted(policy.algorithms))}"
        )
    if _EMBEDDED_KEY_HEADERS & header.keys():
        raise AuthError("embedded_key", "keys embedded in or referenced by the header are refused")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthError("malformed", "the header has no kid")
    key = keys.get(kid)
    if key is None:
        raise AuthError("unknown_kid", "no key with this kid in the key set")
    # The key, not the token, decides the algorithm (RFC 8725 section 2.1): an HS256 token
    # "signed" with the public key as HMAC secret, or an RS256 key asked to check ES256, fails.
    if key.algorithm_name not in policy.algorithms or alg != key.algorithm_name:
        raise AuthError("unsupported_alg", "alg does not match the key's algorithm")

    try:
        claims = jwt.decode(
            token,
            key=key,
            algorithms=[key.algorithm_name],
            audience=policy.audience,
            issuer=policy.issuer,
            options={
                # PyJWT reads the wall clock itself; time checks are done below against `now`.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": True,
                "verify_iss": True,
                "enforce_minimum_key_length": True,
            },
        )
    except jwt.InvalidSignatureError:
        raise AuthError("bad_signature", "signature verification failed") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError("unsupported_alg", "alg does not match the key's algorithm") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError("missing_claim", f"the {exc.claim} claim is required") from None
    except jwt.InvalidIssuerError:
        raise AuthError("wrong_issuer", f"iss must be {policy.issuer}") from None
    except jwt.InvalidAudienceError:
        raise AuthError("wrong_audience", f"aud must be {policy.audience}") from None
    except jwt.PyJWTError:
        raise AuthError("malformed", "the token could not be decoded") from None

    return _check_claims(claims, policy, now)


def _check_claims(claims: dict[str, Any], policy: TokenPolicy, now: float) -> Identity:
    """Claim checks PyJWT does not do (or does against its own clock)."""
    for name in ("sub", "exp", "iat", "type"):
        if claims.get(name) is None:
            raise AuthError("missing_claim", f"the {name} claim is required")
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise AuthError("malformed", "sub must be a non-empty string")
    exp = _numeric_date(claims, "exp")
    iat = _numeric_date(claims, "iat")
    nbf = _numeric_date(claims, "nbf") if claims.get("nbf") is not None else None

    if now >= exp + policy.leeway:
        raise AuthError("expired", "the token has expired")
    if nbf is not None and nbf > now + policy.leeway:
        raise AuthError("not_yet_valid", "the token is not valid yet (nbf)")
    if iat > now + policy.leeway:
        raise AuthError("issued_in_future", "the token was issued in the future (iat)")
    if exp <= iat:
        raise AuthError("malformed", "exp must be after iat")
    if exp - iat > policy.max_lifetime:
        raise AuthError(
            "lifetime_too_long", f"token lifetime is limited to {policy.max_lifetime:g} s"
        )
    if claims["type"] != "access":
        # Refresh tokens are for the Auth Service only; accepting them would turn a long-lived
        # credential into API access.
        raise AuthError("wrong_type", "only access tokens are accepted")

    scope = claims.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise AuthError("malformed", "scope must be a space-separated string")
    client_id = claims.get("client_id")
    token_id = claims.get("jti")
    if not isinstance(client_id, str | None) or not isinstance(token_id, str | None):
        raise AuthError("malformed", "client_id and jti must be strings")
    return Identity(
        sub=sub,
        scopes=frozenset(scope.split()) if scope else frozenset(),
        expires_at=exp,
        client_id=client_id,
        token_id=token_id,
    )


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    """A finite JSON number (RFC 7519 NumericDate); ``bool`` is not a number here."""
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("malformed", f"{name} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise AuthError("malformed", f"{name} must be finite")
    return number


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value.

    Raises :class:`AuthError` (``missing_token``) when there is none; the scheme is
    case-insensitive (RFC 7235).
    """
    if not authorization:
        raise AuthError("missing_token", "a bearer token is required")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing_token", "a bearer token is required")
    return token


def www_authenticate(error: AuthError | None = None, *, realm: str = "codelab") -> str:
    """A ``WWW-Authenticate`` value for a 401 (RFC 6750 section 3).

    A missing token gets no error code, as RFC 6750 asks; any other refusal is
    ``invalid_token``. Descriptions never contain token data, so quoting them is safe.
    """
    if error is None or error.reason == "missing_token":
        return f'Bearer realm="{realm}"'
    description = error.description.replace("\\", "").replace('"', "'")
    return f'Bearer realm="{realm}", error="invalid_token", error_description="{description}"'


# --------------------------------------------------------------------------------------------
# async cache
# --------------------------------------------------------------------------------------------

#: ``async () -> (jwks_document, cache_control_header)``; raises on failure.
JWKSFetcher: TypeAlias = Callable[[], Awaitable[tuple[dict[str, Any], str | None]]]


def ttl_from_cache_control(
    header: str | None, *, default: float, minimum: float, maximum: float
) -> float:
    """Seconds to keep a JWKS, from its ``Cache-Control`` header, clamped to [minimum, maximum].

    ``max-age`` decides; ``no-store``/``no-cache`` mean "as short as allowed" (never 0: the
    floor is what stops a misconfigured Auth Service from being fetched on every request);
    no header or an unparseable one gives ``default``.
    """
    ttl = default
    if header:
        directives: dict[str, str] = {}
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            directives[name.strip().lower()] = value.strip().strip('"')
        if "no-store" in directives or "no-cache" in directives:
            ttl = minimum
        elif "max-age" in directives:
            try:
                ttl = float(int(directives["max-age"]))
            except ValueError:
                ttl = default
    return min(max(ttl, minimum), maximum)


class JWKSCache:
    """The Auth Service's current key set, fetched lazily and shared by all requests of an app.

    * Fresh keys are used as they are; expired keys trigger one fetch. The TTL comes from
      ``Cache-Control: max-age`` clamped to ``[min_ttl, max_ttl]`` (``default_ttl`` without one).
    * Single flight: concurrent callers wait on one ``trio.Lock`` and share the result of the
      fetch that ran while they waited, success or failure (so a down Auth Service sees one
      request, not one per waiting caller).
    * :meth:`verify` refetches once when a token's ``kid`` is unknown or its signature fails
      (the Auth Service may have rotated or regenerated its key, even under the same ``kid``),
      but only when the last fetch attempt is ``refetch_cooldown`` seconds old: a flood of
      random ``kid`` values costs one request per cooldown.
    * After a failed fetch no new attempt is made for ``retry_after_failure`` seconds. Meanwhile,
      and until ``stale_for`` seconds past their expiry, the last good keys keep being served.
      With no usable keys at all, :class:`JWKSUnavailable` is raised.

    ``clock`` is monotonic seconds (``trio.current_time`` by default); tests inject their own.
    Counters ``fetches``, ``fetch_failures`` and ``refetches`` (fetches caused by an unknown
    ``kid`` or a bad signature) are for metrics.
    """

    def __init__(
        self,
        fetch: JWKSFetcher,
        *,
        min_ttl: float = 60,
        max_ttl: float = 86400,
        default_ttl: float = 3600,
        refetch_cooldown: float = 30,
        stale_for: float = 3600,
        retry_after_failure: float = 5,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """Create an empty cache; nothing is fetched until keys are first needed."""
        if not 0 < min_ttl <= max_ttl:
            raise ValueError("need 0 < min_ttl <= max_ttl")
        if min(refetch_cooldown, stale_for, retry_after_failure) < 0:
            raise ValueError("refetch_cooldown, stale_for and retry_after_failure must be >= 0")
        self._fetch = fetch
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._default_ttl = default_ttl
        self._refetch_cooldown = refetch_cooldown
        self._stale_for = stale_for
        self._retry_after_failure = retry_after_failure
        self._clock = clock
        self._lock = trio.Lock()
        self._keys: KeySet | None = None
        self._expires_at = -math.inf
        self._last_attempt_at = -math.inf
        self._next_attempt_at = -math.inf
        # Bumped when a fetch attempt completes (not when it is cancelled): a caller that saw
        # a different value before waiting for the lock knows someone fetched for it.
        self._attempts = 0
        self.last_error: str | None = None
        self.fetches = 0
        self.fetch_failures = 0
        self.refetches = 0

    @property
    def loaded(self) -> bool:
        """A usable key set is held right now (fresh, or stale within ``stale_for``)."""
        return self._keys is not None and self._clock() < self._expires_at + self._stale_for

    @property
    def expires_at(self) -> float:
        """When the current keys stop being fresh, on the cache's clock (-inf before loading)."""
        return self._expires_at

    async def keys(self) -> KeySet:
        """The current key set, fetching it when missing or expired.

        Raises :class:`JWKSUnavailable` when there is no usable key set.
        """
        if self._keys is not None and self._clock() < self._expires_at:
            return self._keys
        seen = self._attempts
        async with self._lock:
            now = self._clock()
            if (
                self._attempts == seen
                and (self._keys is None or now >= self._expires_at)
                and now >= self._next_attempt_at
            ):
                await self._fetch_locked()
            return self._usable_keys()

    async def verify(self, token: str, policy: TokenPolicy, now: float | None = None) -> Identity:
        """Verify ``token`` (see :func:`verify_token`) with the current keys.

        ``now`` is wall-clock epoch seconds for the claim checks (``time.time()`` when omitted).
        On ``unknown_kid`` or ``bad_signature`` the key set is refetched (rate-limited, see the
        class docs) and the token checked once more. Raises :class:`AuthError` or
        :class:`JWKSUnavailable`.

        A token refused with keys in hand stays an :class:`AuthError` even when the refetch
        could not happen (cooldown, or the Auth Service is down): ``JWKSUnavailable`` means
        "no keys at all", never "these keys did not fit".
        """
        wall = time.time() if now is None else now
        keys = await self.keys()
        try:
            return verify_token(token, keys, policy, wall)
        except AuthError as error:
            if error.reason not in _REFETCH_REASONS:
                raise
            newer = await self._refetch(keys)
            if newer is None:
                raise
        return verify_token(token, newer, policy, wall)

    async def _refetch(self, current: KeySet) -> KeySet | None:
        """A key set newer than ``current`` to retry with, or None (cooldown, or no news)."""
        if self._clock() < self._last_attempt_at + self._refetch_cooldown:
            return None
        seen = self._attempts
        async with self._lock:
            now = self._clock()
            if (
                self._attempts == seen
                and now >= self._last_attempt_at + self._refetch_cooldown
                and now >= self._next_attempt_at
            ):
                self.refetches += 1
                await self._fetch_locked()
            newer = self._keys
        # A failed fetch leaves the same object in place: nothing new to try.
        return newer if newer is not None and newer is not current else None

    def _usable_keys(self) -> KeySet:
        """The held keys if fresh or stale within ``stale_for``; else JWKSUnavailable."""
        if self._keys is not None and self._clock() < self._expires_at + self._stale_for:
            return self._keys
        raise JWKSUnavailable(self.last_error or "no JWKS has been loaded")

    async def _fetch_locked(self) -> None:
        """One fetch attempt; the caller holds the lock. Never raises except cancellation."""
        self.fetches += 1
        self._last_attempt_at = self._clock()
        try:
            document, cache_control = await self._fetch()
            keys = KeySet.from_jwks(document)
            if not keys:
                raise ValueError(f"the JWKS has no usable keys ({keys.skipped} skipped)")
        except Exception as exc:  # any failure of the fetch keeps the old keys (if any)
            self.fetch_failures += 1
            self.last_error = f"JWKS fetch failed: {exc}"
            self._next_attempt_at = self._clock() + self._retry_after_failure
            self._attempts += 1
            logger.warning(
                "%s; %s",
                self.last_error,
                "serving the previous keys" if self._keys is not None else "no keys held",
            )
            return
        ttl = ttl_from_cache_control(
            cache_control, default=self._default_ttl, minimum=self._min_ttl, maximum=self._max_ttl
        )
        self._keys = keys
        self._expires_at = self._clock() + ttl
        self._next_attempt_at = -math.inf
        self.last_error = None
        self._attempts += 1
        logger.info("JWKS loaded: kids %s, valid for %g s", sorted(keys), ttl)


def httpx_jwks_fetcher(
    client: httpx.AsyncClient, url: str, timeout: float, *, max_bytes: int = MAX_JWKS_BYTES
) -> JWKSFetcher:
    """A :data:`JWKSFetcher` that GETs ``url`` with the app's shared ``client``.

    ``timeout`` bounds the whole request (a server dripping bytes cannot hold the cache's lock
    forever). Redirects are not followed. Raises :class:`JWKSUnavailable` on transport errors,
    timeouts, a status other than 200, a body over ``max_bytes`` or a body that is not a JSON
    object.
    """

    async def fetch() -> tuple[dict[str, Any], str | None]:
        body = bytearray()
        try:
            with trio.fail_after(timeout):
                async with client.stream(
                    "GET",
                    url,
                    headers={"Accept": "application/json"},
                    timeout=timeout,
                    follow_redirects=False,
                ) as response:
                    if response.status_code != 200:
                        raise JWKSUnavailable(f"{url} answered HTTP {response.status_code}")
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise JWKSUnavailable(f"{url} sent more than {max_bytes} bytes")
                    cache_control = response.headers.get("cache-control")
        except trio.TooSlowError:
            raise JWKSUnavailable(f"{url} did not answer within {timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise JWKSUnavailable(f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise JWKSUnavailable(f"{url} did not send JSON") from None
        if not isinstance(document, dict):
            raise JWKSUnavailable(f"{url} did not send a JSON object")
        return document, cache_control

    return fetch
