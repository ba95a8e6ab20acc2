"""Requests the runtime must never see: smuggled headers and bodies the gateway cannot check.

A real gateway on loopback in front of the scripted runtime, which records every header line
and body byte it receives. Requests go over raw TCP where a client library would tidy them up
(header case, underscores, repeats, ``Connection`` lists).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
import trio

from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import INTERNAL_KEY, RunningGateway, gateway_settings, port_of, run_gateway
from ..support.fuzzing_exchange import raw_request
from ..support.jwks_server import JWKSServer
from ..support.scripted_runtime import Script, ScriptedRuntime

# What the gateway itself puts on a proxied request (httpx adds Host and Content-Length).
GATEWAY_SET = frozenset(
    {
        "host", "content-length", "x-internal-auth", "x-user-id", "x-user-scopes",
        "x-request-id", "x-forwarded-for", "x-forwarded-proto",
    }
)  # fmt: skip
# The documented allow-list of client headers (docs/security.md).
ALLOWED = frozenset(
    {
        "accept", "accept-language", "cache-control", "content-type", "if-match",
        "if-modified-since", "if-none-match", "if-unmodified-since", "user-agent",
    }
)  # fmt: skip
RUNTIME_MAY_SEE = GATEWAY_SET | ALLOWED

# Every family the attack run found reaching the runtime, in the spellings it used.
SMUGGLED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("Forwarded", "for=6.6.6.6;proto=https;host=evil.example"),
    ("X-Real-IP", "6.6.6.6"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-Original-URL", "/events/metrics/sessions"),
    ("X-Rewrite-URL", "/events/metrics/sessions"),
    ("Remote-User", "admin"),
    ("X-Remote-User", "admin"),
    ("X-Auth-User", "admin"),
    ("x_user_id", "admin"),
    ("X_User_Scopes", "admin"),
    ("x-user-id", "admin"),
    ("X-USER-SCOPES", "admin"),
    ("X_Internal_Auth", "forged"),
    ("x-internal-auth", "forged"),
    ("X-Request_ID", "forged"),
    ("Remote-Addr", "6.6.6.6"),
    ("Remote_Addr", "6.6.6.6"),
    ("Authorization", "Bearer secret"),
    ("Cookie", "a=b"),
    ("Proxy-Authorization", "Basic eDp5"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Upgrade", "websocket"),
    ("Accept-Encoding", "gzip"),
    ("X-Custom", "not on the list"),
    ("Accept-Language", "de"),  # allow-listed, but named in Connection below: hop-by-hop
    ("Connection", "keep-alive, Accept-Language, X-Custom"),
]


@dataclass
class Proxy:
    runtime: ScriptedRuntime
    gateway: RunningGateway

    @property
    def port(self) -> int:
        return port_of(self.gateway.base_url)

    def last_lines(self) -> list[tuple[str, str]]:
        return self.runtime.rest_header_lines[-1]

    def last_headers(self) -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for name, value in self.last_lines():
            seen.setdefault(name.lower(), []).append(value)
        return seen


def request_bytes(
    method: str, path: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    if body or method in ("POST", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture
async def proxy(nursery: trio.Nursery, scripted_runtime: ScriptedRuntime) -> AsyncIterator[Proxy]:
    async with run_gateway(nursery, gateway_settings(scripted_runtime.url)) as gw:
        yield Proxy(scripted_runtime, gw)


@pytest.fixture
async def trusting_proxy(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> AsyncIterator[Proxy]:
    settings = gateway_settings(scripted_runtime.url, trusted_proxies="127.0.0.0/8")
    async with run_gateway(nursery, settings) as gw:
        yield Proxy(scripted_runtime, gw)


# --- headers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/api/v1/agents"), ("PATCH", "/api/v1/sessions/s1")]
)
async def test_smuggled_headers_never_reach_the_runtime(
    proxy: Proxy, method: str, path: str
) -> None:
    headers = [*SMUGGLED, ("Accept", "application/json"), ("User-Agent", "ide/1.0")]
    body = b'{"title": "t"}' if method == "PATCH" else b""
    if body:
        headers.append(("Content-Type", "application/json"))
    answer = await raw_request(proxy.port, request_bytes(method, path, headers, body))
    assert answer.status == 200, answer.head
    seen = proxy.last_headers()
    assert set(seen) <= RUNTIME_MAY_SEE, set(seen) - RUNTIME_MAY_SEE
    assert "accept-language" not in seen  # named in Connection
    # The gateway's own headers, each exactly once and with the gateway's value.
    assert seen["x-internal-auth"] == [INTERNAL_KEY]
    assert seen["x-user-id"] == ["anonymous"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert len(seen["x-request-id"]) == 1 and seen["x-request-id"] != ["forged"]
    assert seen["accept"] == ["application/json"] and seen["user-agent"] == ["ide/1.0"]
    # Nothing was renamed on the way: no underscore spelling survives in any case.
    assert not [name for name, _ in proxy.last_lines() if "_" in name]
    assert proxy.runtime.rest_requests[-1][2] == body


async def test_a_clients_remote_addr_cannot_replace_the_peer(proxy: Proxy) -> None:
    """Quart puts the peer into its header map as Remote-Addr and a client's own line came
    after it: the proxy forwarded both and the runtime read the client's."""
    request = request_bytes("GET", "/api/v1/agents", [("Remote-Addr", "6.6.6.6")])
    assert (await raw_request(proxy.port, request)).status == 200
    seen = proxy.last_headers()
    assert "remote-addr" not in seen
    assert seen["x-forwarded-for"] == ["127.0.0.1"]


async def test_without_trusted_proxies_x_forwarded_for_is_the_peer(proxy: Proxy) -> None:
    request = request_bytes(
        "GET",
        "/api/v1/agents",
        [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "7.7.7.7"),
         ("X-Forwarded-Proto", "https")],
    )  # fmt: skip
    assert (await raw_request(proxy.port, request)).status == 200
    seen = proxy.last_headers()
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]


@pytest.mark.parametrize(
    ("given", "forwarded"),
    [
        ([], "127.0.0.1"),
        (["203.0.113.7"], "203.0.113.7, 127.0.0.1"),
        # A client's own left end, in front of what the proxy appended, is dropped.
        (["6.6.6.6, 203.0.113.7"], "203.0.113.7, 127.0.0.1"),
        (["junk, 203.0.113.7"], "203.0.113.7, 127.0.0.1"),
        (["6.6.6.6", "203.0.113.7, 127.0.0.9"], "203.0.113.7, 127.0.0.9, 127.0.0.1"),
    ],
)
async def test_behind_a_trusted_proxy_the_peer_is_appended_to_its_x_forwarded_for(
    trusting_proxy: Proxy, given: list[str], forwarded: str
) -> None:
    headers = [("X-Forwarded-For", value) for value in given] + [("X-Forwarded-Proto", "https")]
    request = request_bytes("GET", "/api/v1/agents", [*headers, ("Remote-Addr", "6.6.6.6")])
    assert (await raw_request(trusting_proxy.port, request)).status == 200
    seen = trusting_proxy.last_headers()
    assert seen["x-forwarded-for"] == [forwarded]
    assert seen["x-forwarded-proto"] == ["https"]  # the proxy terminated TLS
    assert "remote-addr" not in seen


async def test_a_repeated_content_type_is_400_and_a_content_encoding_415(proxy: Proxy) -> None:
    before = len(proxy.runtime.rest_requests)
    twice = request_bytes(
        "PATCH",
        "/api/v1/sessions/s1",
        [("Content-Type", "application/json"), ("content-type", "text/plain")],
        b"{}",
    )
    answer = await raw_request(proxy.port, twice)
    assert answer.status == 400, answer.head
    gzip = request_bytes(
        "PATCH",
        "/api/v1/sessions/s1",
        [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
        b"\x1f\x8b\x08\x00",
    )
    assert (await raw_request(proxy.port, gzip)).status == 415
    assert len(proxy.runtime.rest_requests) == before


async def test_turn_requests_carry_nothing_from_the_handshake(proxy: Proxy) -> None:
    """The streaming client sends a fixed set of headers; the socket's handshake headers
    (whatever the client smuggles in them) never reach a turn request."""
    extra = [(name.encode(), value.encode()) for name, value in SMUGGLED[:25]]
    async with proxy.gateway.connect("turn-headers", extra_headers=extra) as client:
        await client.send({"type": "user_message", "content": "hello"})
        await client.turn()
    seen = proxy.runtime.request_headers[-1]
    names = {name for name in seen if not name.startswith(":")}
    # Keep-alive (the runtime pool): no Connection header.
    assert names == {
        "host", "content-length", "x-internal-auth", "content-type", "accept",
        "x-user-id", "x-user-scopes",
    }  # fmt: skip
    assert seen["x-internal-auth"] == INTERNAL_KEY
    # The verified identity (JWT off here: the anonymous principal), never a smuggled one.
    assert seen["x-user-id"] == "anonymous"


# --- bodies the gateway reads: POST /sessions -----------------------------------------------


@dataclass
class Users:
    proxy: Proxy
    alice: dict[str, str]
    mallory: dict[str, str]


@pytest.fixture
async def users(nursery: trio.Nursery, scripted_runtime: ScriptedRuntime) -> AsyncIterator[Users]:
    issuer = DevIssuer()
    jwks = JWKSServer(issuer.jwks())
    jwks_url = await nursery.start(jwks.serve)
    settings = gateway_settings(scripted_runtime.url, use_jwt_auth=True, jwks_url=jwks_url)
    async with run_gateway(nursery, settings) as gw:
        alice = {"Authorization": f"Bearer {issuer.mint('alice')}"}
        mallory = {"Authorization": f"Bearer {issuer.mint('mallory')}"}
        yield Users(Proxy(scripted_runtime, gw), alice, mallory)
    jwks.stop()


def created(session_id: str) -> Script:
    return Script(
        status=201, content_type="application/json", body=[orjson.dumps({"id": session_id})]
    )


async def post(users: Users, body: bytes, who: dict[str, str], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=users.proxy.gateway.base_url) as http:
        return await http.post(
            "/api/v1/sessions",
            content=body,
            headers={"Content-Type": "application/json", **headers, **who},
        )


FOREIGN = '{"session_id": "alices"}'


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (FOREIGN.encode("utf-16"), None),  # with a BOM, as Python writes it
        (FOREIGN.encode("utf-16-le"), None),
        (FOREIGN.encode("utf-32"), None),
        (b"\xef\xbb\xbf" + FOREIGN.encode(), None),  # UTF-8 with a BOM
        (b'{"session_id": "alices", "x": NaN}', None),
        (b'{"session_id": "alices", "x": Infinity}', None),
        (b'{"session_id": "mine", "session_id": "alices"}', None),
        (b'{"session_id": "alices", "session_id": "mine"}', None),
        (b'{"session_id": "alices\\ud800"}', None),
        (b'{"session_id": "alices"', None),
        (b'["alices"]', None),
        (b'{"session_id": ["alices"]}', None),
        (b'{"session_id": 7}', None),
        (b'{"session_id": "a/../alices"}', None),
        (FOREIGN.encode(), "application/json; charset=utf-16"),
        (b'{"session_id": "mine"}', "application/json; charset=latin-1"),
    ],
    ids=[
        "utf-16", "utf-16-le", "utf-32", "utf-8-bom", "nan", "infinity", "duplicate-last",
        "duplicate-first", "lone-surrogate", "truncated", "array", "id-array", "id-number",
        "id-malformed", "charset-utf-16", "charset-latin-1",
    ],
)  # fmt: skip
async def test_a_body_the_gateway_cannot_check_is_400_and_never_sent(
    users: Users, body: bytes, content_type: str | None
) -> None:
    runtime = users.proxy.runtime
    runtime.rest_scripts["POST /sessions"] = created("alices")
    assert (await post(users, FOREIGN.encode(), users.alice)).status_code == 201
    before = len(runtime.rest_requests)
    extra = {"Content-Type": content_type} if content_type else {}
    answer = await post(users, body, users.mallory, **extra)
    assert answer.status_code == 400, (answer.status_code, answer.text)
    assert answer.json()["error"] in ("invalid_request", "invalid_session_id")
    assert set(answer.json()) == {"error", "error_description"}
    assert len(runtime.rest_requests) == before


async def test_the_checked_body_goes_on_byte_for_byte_and_the_created_id_is_owned(
    users: Users,
) -> None:
    runtime = users.proxy.runtime
    runtime.rest_scripts["POST /sessions"] = created("alices")
    assert (await post(users, FOREIGN.encode(), users.alice)).status_code == 201
    # Plain JSON naming alice's session: 403 as before.
    assert (await post(users, FOREIGN.encode(), users.mallory)).status_code == 403
    # Honest bodies pass unchanged (spacing, key order, unicode escapes, no body, null id).
    for body in (b' {"title":"\\u00e9t\\u00e9" ,"session_id" : "m1"}\n', b"", b"{}",
                 b'{"session_id": null}'):  # fmt: skip
        runtime.rest_scripts["POST /sessions"] = created("made-by-runtime")
        answer = await post(users, body, users.mallory)
        assert answer.status_code == 201, (body, answer.text)
        assert runtime.rest_requests[-1][2] == body
    # The owner recorded is the id the runtime created (its 201), whatever the body asked.
    async with httpx.AsyncClient(base_url=users.proxy.gateway.base_url) as http:
        mine = await http.get("/api/v1/sessions/made-by-runtime", headers=users.mallory)
        theirs = await http.get("/api/v1/sessions/made-by-runtime", headers=users.alice)
    assert mine.status_code == 200 and theirs.status_code == 403


async def test_a_bad_body_is_400_with_auth_off_too(proxy: Proxy) -> None:
    before = len(proxy.runtime.rest_requests)
    async with httpx.AsyncClient(base_url=proxy.gateway.base_url) as http:
        answer = await http.post(
            "/api/v1/sessions",
            content=FOREIGN.encode("utf-16"),
            headers={"Content-Type": "application/json"},
        )
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
    assert len(proxy.runtime.rest_requests) == before


def test_the_allow_list_is_the_documented_one() -> None:
    from pathlib import Path

    from trio_gateway.edge.rest_proxy import FORWARDED_REQUEST_HEADERS

    assert FORWARDED_REQUEST_HEADERS == ALLOWED
    security = (Path(__file__).parents[2] / "docs" / "security.md").read_text()
    section = security.split("### Requests the runtime never sees", 1)[1].split("\n##", 1)[0]
    for name in ALLOWED:
        assert f"`{name.title()}`" in section, name
