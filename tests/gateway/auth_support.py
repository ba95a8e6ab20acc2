"""What the JWT and JWKS test modules share: the fixed time and policy, the Auth Service's RSA key
(module-scoped fixtures), and the builders of valid claims and of forged compact tokens.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from trio_gateway.security.auth import (
    KeySet,
    TokenPolicy,
)
from trio_gateway.tools.dev_auth import DevIssuer

NOW = 1_750_000_000.0
POLICY = TokenPolicy()


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
