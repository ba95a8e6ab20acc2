"""The access log's lean atoms read what hypercorn's own atoms read, for every key the gateway
uses, and copy neither the environment nor headers nobody logs."""

from __future__ import annotations

from typing import Any

import pytest
from hypercorn.logging import AccessLogAtoms

from trio_gateway.server import AccessAtoms

# Every atom the gateway reads: the access format, observability's fields, the probe filter.
USED = ("h", "r", "m", "U", "s", "D", "{user-agent}i", "{x-request-id}o")


def http_scope(**extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/v1/agents",
        "query_string": b"token=secret",
        "client": ("127.0.0.1", 50123),
        "headers": [(b"host", b"gw"), (b"User-Agent", b"ide/1.0")],
    }
    scope.update(extra)
    return scope


RESPONSE = {"status": 200, "headers": [(b"X-Request-ID", b"req-1"), (b"content-length", b"2")]}


@pytest.mark.parametrize(
    ("scope", "response"),
    [
        pytest.param(http_scope(), RESPONSE, id="answered"),
        pytest.param(http_scope(), None, id="no-response"),
        pytest.param(http_scope(method="POST", path="/api/v1/a b"), RESPONSE, id="post-space"),
        pytest.param(http_scope(client=None, headers=[]), RESPONSE, id="no-client-no-headers"),
        pytest.param(
            {**http_scope(), "type": "websocket", "path": "/api/v1/ws/s1"},
            {"status": 101, "headers": []},
            id="websocket",
        ),
    ],
)
def test_the_atoms_the_gateway_reads_match_hypercorns(
    scope: dict[str, Any], response: dict[str, Any] | None
) -> None:
    ours = AccessAtoms(scope, response, 0.0123)  # type: ignore[arg-type]
    theirs = AccessLogAtoms(scope, response, 0.0123)  # type: ignore[arg-type]
    for key in USED:
        assert str(ours[key]) == str(theirs[key]), key


def test_no_environment_variable_or_unread_header_is_copied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY__INTERNAL_API_KEY", "do-not-copy")
    atoms = AccessAtoms(http_scope(), RESPONSE, 0.001)  # type: ignore[arg-type]
    assert "do-not-copy" not in atoms.values()
    assert set(atoms) <= set(USED)
    assert atoms["{gateway__internal_api_key}e"] == "-"
