"""The demo's own Auth Service: :class:`DevIssuer`, a token minter, and its JWKS endpoint.

:class:`DevIssuer` mints tokens the way the Auth Service does, for the demo and tests (the
gateway only verifies tokens: ``auth.py``).
``trio-gateway demo`` verifies tokens exactly like production does (JWKS over HTTP, see
``auth.py``), so it needs someone to publish keys: :func:`serve_dev_jwks` serves the issuer's
public key set on loopback. The issuer is also saved to a private file
(:func:`save_dev_issuer`) so that ``trio-gateway token``, a separate process, can mint more
tokens the running demo accepts (:func:`load_dev_issuer`). ``trio-gateway dev-issuer`` serves
the same JWKS as a process of its own (the compose file's Auth Service stand-in) and keeps its key
in that file across restarts (:func:`load_or_create_dev_issuer`).

Development only. The file holds an unencrypted private key: it is written with mode 0600 in a
0700 directory, and it is only good for the demo that wrote it (every demo run makes a new key
and overwrites the file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, get_args

import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from quart import Response
from quart_trio import QuartTrio

from ..security.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER, MIN_RSA_BITS

logger = logging.getLogger("trio_gateway.dev_auth")

__all__ = [
    "DEMO_RECORD_FIELDS",
    "DEV_ISSUER_FILE",
    "DEV_ISSUER_FILE_ENV",
    "JWKS_PATH",
    "DevAlgorithm",
    "DevIssuer",
    "dev_issuer_file",
    "load_demo_record",
    "load_dev_issuer",
    "load_or_create_dev_issuer",
    "save_dev_issuer",
    "serve_dev_jwks",
]

JWKS_PATH: Final = "/.well-known/jwks.json"
#: Environment variable that overrides where the demo issuer is kept (tests point it at a
#: temporary directory).
DEV_ISSUER_FILE_ENV: Final = "TRIO_GATEWAY_DEV_ISSUER_FILE"
_FIELDS: Final = ("kid", "algorithm", "issuer", "audience", "private_key_pem")
#: What ``trio-gateway demo`` records about itself in the issuer file, for ``check --demo``:
#: its pid, the gateway's URL and the settings it overrides (its runtime's address and key, and
#: the JWKS it trusts; the issuer and audience are the issuer's own).
DEMO_RECORD_FIELDS: Final = ("pid", "gateway", "agent_url", "internal_api_key", "jwks_url")


# --------------------------------------------------------------------------------------------
# dev issuer
# --------------------------------------------------------------------------------------------

DevAlgorithm: TypeAlias = Literal["RS256", "ES256", "EdDSA"]
_PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(eq=False)
class DevIssuer:
    """A stand-in for the Auth Service: one fresh key pair, its JWKS, and a token minter.

    Tokens look like the Auth Service's (docs/compatibility.md §3). For the demo and tests only:
    the private key lives in memory unless saved with :meth:`private_pem` (``trio-gateway
    demo`` saves it for ``trio-gateway token``; see below).
    """

    kid: str = field(default_factory=lambda: f"dev-{uuid.uuid4().hex[:12]}")
    algorithm: DevAlgorithm = "RS256"
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    client_id: str = "codelab-dev"
    _private_key: _PrivateKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Generate the key pair (RSA 2048, P-256 or Ed25519, per ``algorithm``)."""
        if self.algorithm == "RS256":
            self._private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif self.algorithm == "ES256":
            self._private_key = ec.generate_private_key(ec.SECP256R1())
        elif self.algorithm == "EdDSA":
            self._private_key = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unsupported algorithm {self.algorithm!r}")

    def jwk(self) -> dict[str, Any]:
        """The public key as one JWK with ``kid``, ``use`` and ``alg``."""
        public = self._private_key.public_key()
        jwk: dict[str, Any]
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def jwks(self) -> dict[str, Any]:
        """The JWKS document the Auth Service would serve for this key."""
        return {"keys": [self.jwk()]}

    def public_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo)."""
        return self._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        """The private key as unencrypted PEM (PKCS#8). Whoever holds it can mint tokens."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_private_pem(
        cls,
        pem: bytes,
        *,
        kid: str,
        algorithm: DevAlgorithm = "RS256",
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        client_id: str = "codelab-dev",
    ) -> DevIssuer:
        """An issuer around an existing private key (from :meth:`private_pem`).

        No key is generated. Raises :class:`ValueError` when the PEM cannot be loaded, is
        encrypted, or holds a key that does not fit ``algorithm`` (RS256: RSA of at least 2048
        bits; ES256: P-256; EdDSA: Ed25519), or when ``kid`` is empty.
        """
        if not kid:
            raise ValueError("kid must not be empty")
        from cryptography.exceptions import UnsupportedAlgorithm

        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits is too short")
        fits = {
            "RS256": isinstance(key, rsa.RSAPrivateKey),
            "ES256": isinstance(key, ec.EllipticCurvePrivateKey)
            and isinstance(key.curve, ec.SECP256R1),
            "EdDSA": isinstance(key, ed25519.Ed25519PrivateKey),
        }
        if not fits.get(algorithm) or not isinstance(
            key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise ValueError(f"the key does not fit algorithm {algorithm!r}")
        # __init__ would run __post_init__ and generate a fresh key: set every field here
        # instead (a field added to the class must be added here too).
        instance = cls.__new__(cls)
        instance.kid = kid
        instance.algorithm = algorithm
        instance.issuer = issuer
        instance.audience = audience
        instance.client_id = client_id
        instance._private_key = key
        return instance

    def mint(
        self,
        sub: str,
        *,
        scopes: Iterable[str] = ("api:read", "api:write"),
        lifetime: float = 900,
        token_type: str = "access",
        issuer: str | None = None,
        audience: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        """A signed token for ``sub`` valid ``lifetime`` seconds from ``now`` (epoch seconds).

        ``extra_claims`` are applied last; a ``None`` value removes that claim (handy for
        tests of missing claims). ``extra_headers`` are merged into the JOSE header.
        """
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer if issuer is None else issuer,
            "aud": self.audience if audience is None else audience,
            "sub": sub,
            "iat": issued,
            "nbf": issued,
            "exp": issued + int(lifetime),
            "jti": uuid.uuid4().hex,
            "type": token_type,
            "client_id": self.client_id,
            "scope": " ".join(scopes),
        }
        for name, value in (extra_claims or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return jwt.encode(
            claims,
            self._private_key,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **(extra_headers or {})},
        )


# --------------------------------------------------------------------------------------------
# the issuer's key file and JWKS server
# --------------------------------------------------------------------------------------------


def dev_issuer_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where the demo issuer is kept, resolved now.

    ``$TRIO_GATEWAY_DEV_ISSUER_FILE`` when set, else
    ``$XDG_STATE_HOME/trio-gateway/demo-issuer.json`` (``~/.local/state`` when
    ``XDG_STATE_HOME`` is unset, empty or relative, as the XDG spec asks).
    """
    env = os.environ if environ is None else environ
    override = env.get(DEV_ISSUER_FILE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    state = env.get("XDG_STATE_HOME", "").strip()
    base = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local" / "state"
    return base / "trio-gateway" / "demo-issuer.json"


#: The demo issuer file as resolved at import time. The helpers below resolve it again at each
#: call (:func:`dev_issuer_file`), so a changed environment is honoured.
DEV_ISSUER_FILE: Final[Path] = dev_issuer_file()


def save_dev_issuer(
    issuer: DevIssuer, path: Path | None = None, *, demo: Mapping[str, Any] | None = None
) -> Path:
    """Write ``issuer`` (private key included) to ``path``; returns the path written.

    The file gets mode 0600 and is replaced atomically (a reader never sees half a file); a
    missing directory is created with mode 0700. Default path: :func:`dev_issuer_file`.
    ``demo`` is what a running ``trio-gateway demo`` records about itself
    (:data:`DEMO_RECORD_FIELDS`; read back by :func:`load_demo_record`); it holds the demo
    runtime's key, which is as private as the signing key next to it.
    """
    target = dev_issuer_file() if path is None else path
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "kid": issuer.kid,
        "algorithm": issuer.algorithm,
        "issuer": issuer.issuer,
        "audience": issuer.audience,
        "private_key_pem": issuer.private_pem().decode("ascii"),
    }
    if demo is not None:
        document["demo"] = dict(demo)
    # mkstemp creates the file with mode 0600 in the target's directory (same file system, so
    # the rename below is atomic).
    fd, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", text=False
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)
            json.dump(document, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    return target


def load_dev_issuer(path: Path | None = None) -> DevIssuer:
    """The issuer saved by :func:`save_dev_issuer` (default path: :func:`dev_issuer_file`).

    Raises :class:`FileNotFoundError` (telling the user to run ``trio-gateway demo`` first)
    when there is no file, and :class:`ValueError` when the file is not a demo issuer.
    """
    source = dev_issuer_file() if path is None else path
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no demo issuer at {source}: run `trio-gateway demo` first (it creates one)"
        ) from None
    try:
        document: Any = json.loads(text)
    except ValueError:
        raise ValueError(f"{source} is not JSON; run `trio-gateway demo` to rewrite it") from None
    if not isinstance(document, dict) or not all(
        isinstance(document.get(name), str) and document[name] for name in _FIELDS
    ):
        raise ValueError(
            f"{source} is not a demo issuer file (it needs the string fields "
            f"{', '.join(_FIELDS)}); run `trio-gateway demo` to rewrite it"
        )
    algorithm = document["algorithm"]
    if algorithm not in get_args(DevAlgorithm):
        raise ValueError(f"{source}: unsupported algorithm {algorithm!r}")
    try:
        return DevIssuer.from_private_pem(
            document["private_key_pem"].encode("ascii"),
            kid=document["kid"],
            algorithm=algorithm,
            issuer=document["issuer"],
            audience=document["audience"],
        )
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"{source}: unusable private key: {exc}") from None


def load_demo_record(path: Path | None = None) -> dict[str, Any] | None:
    """What the most recent ``trio-gateway demo`` recorded in the issuer file, or None.

    None when there is no file, the file is not readable JSON, or it was written by
    ``trio-gateway dev-issuer`` (no demo record). The demo may have stopped since: the record
    holds its ``pid``.
    """
    source = dev_issuer_file() if path is None else path
    try:
        document: Any = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = document.get("demo") if isinstance(document, dict) else None
    if not isinstance(record, dict) or not all(name in record for name in DEMO_RECORD_FIELDS):
        return None
    return record


def load_or_create_dev_issuer(
    path: Path | None = None,
    *,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
) -> tuple[DevIssuer, bool]:
    """The issuer saved at ``path``, or a new one saved there; ``(issuer, created)``.

    ``trio-gateway dev-issuer`` keeps its key across restarts this way, so tokens minted from the
    file stay valid when the issuer (or its container) restarts. A file that cannot be used
    (damaged, or made for another ``iss``/``aud``) is replaced by a new key with a warning:
    this is a development issuer, and a fresh key is always a valid answer.
    """
    target = dev_issuer_file() if path is None else path
    try:
        existing = load_dev_issuer(target)
    except FileNotFoundError:
        existing = None
    except ValueError as error:
        logger.warning("replacing the unusable dev issuer file: %s", error)
        existing = None
    if existing is not None and (existing.issuer, existing.audience) == (issuer, audience):
        return existing, False
    if existing is not None:
        logger.warning(
            "%s was made for iss %s / aud %s: replacing it with a new key for %s / %s",
            target,
            existing.issuer,
            existing.audience,
            issuer,
            audience,
        )
    created = DevIssuer(issuer=issuer, audience=audience)
    save_dev_issuer(created, target)
    return created, True


async def serve_dev_jwks(
    issuer: DevIssuer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /.well-known/jwks.json`` with ``issuer``'s public keys until the trigger fires.

    ``task_status.started(url)`` reports the JWKS URL, e.g.
    ``http://127.0.0.1:43211/.well-known/jwks.json`` (port 0 lets the OS choose).
    """
    body = json.dumps(issuer.jwks()).encode()
    # The name is the app's logger name, kept stable wherever this module lives; the root path
    # is given so that Quart does not look for it (nor for a static folder) in the cwd.
    app = QuartTrio("trio_gateway.dev_auth", root_path=os.path.dirname(__file__))

    async def jwks() -> Response:
        return Response(
            body,
            status=200,
            headers={
                "Content-Type": "application/json",
                "Cache-Control": "public, max-age=3600",
            },
        )

    app.add_url_rule(JWKS_PATH, "jwks", jwks, methods=["GET"])

    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # A logger object of our own, not "-" (which would install hypercorn's own stderr handler)
    # nor the shared "hypercorn.error": in `trio-gateway demo` this server runs next to the
    # gateway, and its lines must not pass for the gateway's.
    config.errorlog = logging.getLogger("trio_gateway.dev_auth.hypercorn")
    # Only the gateway's pooled keep-alive connection can be open at shutdown: don't wait on it.
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, app, config, shutdown_trigger=shutdown_trigger)
        )
        task_status.started(binds[0] + JWKS_PATH)
