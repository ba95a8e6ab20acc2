"""The security suite: JWT on every door, sessions that belong to users, limits on everything.

Real servers on loopback: a gateway with JWT on, a JWKS server playing the Auth Service, the
demo runtime. Every log line each test produces is checked for token material at its teardown.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import trio
import trio_websocket

from trio_gateway.observability import JsonFormatter, _ContextFilter
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import (
    INTERNAL_KEY,
    GatewayWith,
    RunningGateway,
    WsClient,
    close_code,
    gateway_settings,
    run_gateway,
    wait_for,
)
from ..support.jwks_server import JWKSServer

MINTED: set[str] = set()  # every token this module minted, for the log check of every test


def token_material_in(logged: str, minted: set[str]) -> list[str]:
    """What of the ``minted`` tokens (their payload and signature), the internal key or a
    bearer header appears in ``logged``."""
    found = [
        f"part of a token: {part[:12]}..."
        for token in minted
        for part in token.split(".")[1:]  # payload and signature are token material
        if len(part) > 16 and part in logged
    ]
    if INTERNAL_KEY in logged:
        found.append("the internal key")
    if "Bearer ey" in logged:
        found.append("a bearer header")
    return found


@pytest.fixture(autouse=True)
def no_token_material_in_the_logs() -> Iterator[io.StringIO]:
    """Every log line a test produces (DEBUG and up, formatted as the gateway formats them) is
    checked at the test's teardown for the tokens minted so far, the internal key and bearer
    headers: each test is checked on its own, whatever order the tests run in."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
    leaks = token_material_in(captured.getvalue(), MINTED)
    assert not leaks, f"token material reached the logs: {leaks}"


@dataclass
class Secure:
    gateway: RunningGateway
    issuer: DevIssuer
    jwks: JWKSServer
    runtime: DemoRuntime
    extra: dict[str, object] = field(default_factory=dict)

    def token(self, sub: str = "alice", **kwargs: object) -> str:
        token = self.issuer.mint(sub, **kwargs)  # type: ignore[arg-type]
        MINTED.add(token)
        return token

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.gateway.base_url)

    def ws(self, session_id: str, token: str | None = None, **kwargs: object):  # type: ignore[no-untyped-def]
        headers = bearer(token) if token else None
        return trio_websocket.open_websocket_url(
            self.gateway.ws_url(session_id),
            extra_headers=headers,
            **kwargs,  # type: ignore[arg-type]
        )


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {token}".encode())]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def secure_settings(runtime_url: str, jwks_url: str, **overrides: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {
        "use_jwt_auth": True,
        "jwks_url": jwks_url,
        "jwks_refetch_cooldown": 0.5,
        "ws_auth_timeout": 1.0,
        "log_level": "DEBUG",
    }
    values.update(overrides)
    return gateway_settings(runtime_url, **values)


SecureFactory = Callable[..., AbstractAsyncContextManager[Secure]]


@pytest.fixture
def secure_with(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    jwks_server: tuple[JWKSServer, DevIssuer],
) -> SecureFactory:
    """Start a JWT-protected gateway with settings ``overrides``, for one ``async with``."""
    server, issuer = jwks_server

    @asynccontextmanager
    async def start(**overrides: object) -> AsyncIterator[Secure]:
        settings = secure_settings(demo_runtime[1], server.url, **overrides)
        async with run_gateway(nursery, settings) as gw:
            yield Secure(gw, issuer, server, demo_runtime[0])

    return start


@pytest.fixture
async def secure(secure_with: SecureFactory) -> AsyncIterator[Secure]:
    async with secure_with() as running:
        yield running


async def chat(client: WsClient) -> list[dict[str, object]]:
    await client.send({"type": "user_message", "content": "bench 2"})
    return await client.turn()


async def refusal(
    opening: AbstractAsyncContextManager[object],
) -> trio_websocket.ConnectionRejected:
    """How the gateway refuses the handshake of ``opening`` (the test fails if it accepts)."""
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with opening:
            pass
    return rejected.value


# --- the WebSocket door -------------------------------------------------------------------


async def test_a_valid_token_in_the_authorization_header_opens_a_session(secure: Secure) -> None:
    async with secure.ws("s-header", secure.token()) as ws:
        assert len(await chat(WsClient(ws))) == 3


async def test_the_bearer_scheme_is_case_insensitive(secure: Secure) -> None:
    token = secure.token()
    async with trio_websocket.open_websocket_url(
        secure.gateway.ws_url("s-case"),
        extra_headers=[(b"Authorization", f"bEaReR {token}".encode())],
    ) as ws:
        assert len(await chat(WsClient(ws))) == 3


async def test_a_bearer_subprotocol_works_and_the_token_is_never_echoed(secure: Secure) -> None:
    token = secure.token()
    async with trio_websocket.open_websocket_url(
        secure.gateway.ws_url("s-subproto"), subprotocols=["codelab.v2", f"bearer.{token}"]
    ) as ws:
        assert ws.subprotocol == "codelab.v2"
        client = WsClient(ws)
        assert (await client.recv())["type"] == "session_ready"


async def test_a_first_auth_frame_works_for_clients_without_headers(secure: Secure) -> None:
    async with secure.ws("s-frame") as ws:
        client = WsClient(ws)
        await client.send({"type": "auth", "token": secure.token()})
        assert len(await chat(client)) == 3


@pytest.mark.parametrize(
    "first", [{"type": "user_message", "content": "hi"}, {"type": "auth", "token": "garbage"}]
)
async def test_without_a_valid_first_auth_frame_the_socket_closes_4401(
    secure: Secure, first: dict[str, object]
) -> None:
    async with secure.ws("s-noauth") as ws:
        client = WsClient(ws)
        await client.send(first)
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await client.recv()
    assert close_code(closed.value) == 4401
    assert secure.runtime.stream_requests == []  # nothing was processed before auth


async def test_silence_after_the_handshake_closes_4401_after_the_auth_timeout(
    secure: Secure,
) -> None:
    async with secure.ws("s-silent") as ws:
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await WsClient(ws).recv(timeout=5)
    assert close_code(closed.value) == 4401


@pytest.mark.parametrize(
    "case",
    ["garbage", "refresh", "expired", "wrong_audience", "wrong_issuer", "alg_none", "huge"],
)
async def test_bad_tokens_are_refused_at_the_handshake_with_401(secure: Secure, case: str) -> None:
    now = time.time()
    tokens = {
        "garbage": "not.a.token",
        "refresh": secure.token(token_type="refresh"),
        "expired": secure.token(now=now - 3600, lifetime=60),
        "wrong_audience": secure.token(audience="someone-else"),
        "wrong_issuer": secure.token(issuer="https://evil.example"),
        "alg_none": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSJ9.",
        "huge": "a" * 10_000,  # over our 8 KiB cap, under hypercorn's header limit
    }
    refused = await refusal(secure.ws("s-bad", tokens[case]))
    assert refused.status_code == 401
    headers = dict(refused.headers or [])
    assert headers[b"www-authenticate"].startswith(b"Bearer")


async def test_a_100_kb_token_is_refused_before_it_costs_anything(secure: Secure) -> None:
    refused = await refusal(secure.ws("s-huge", "a" * 100_000))
    assert refused.status_code == 431  # hypercorn: request header fields too large


async def test_a_query_string_token_is_refused_unless_opted_in(secure: Secure) -> None:
    token = secure.token()
    url = secure.gateway.ws_url("s-query") + f"?access_token={token}"
    assert (await refusal(trio_websocket.open_websocket_url(url))).status_code == 401


async def test_a_token_without_the_write_scope_gets_403(secure: Secure) -> None:
    refused = await refusal(secure.ws("s-scope", secure.token(scopes=["api:read"])))
    assert refused.status_code == 403


async def test_another_users_session_is_refused_on_the_socket(secure: Secure) -> None:
    async with secure.ws("alices-session", secure.token("alice")) as ws:
        await chat(WsClient(ws))
    refused = await refusal(secure.ws("alices-session", secure.token("mallory")))
    assert refused.status_code == 403


async def test_only_the_owner_can_resume_a_session(secure: Secure) -> None:
    async with secure.ws("alices-resume", secure.token("alice"), subprotocols=["codelab.v2"]) as ws:
        alice = WsClient(ws)
        await alice.recv()  # session_ready
        await alice.send({"type": "user_message", "content": "bench 3"})
        await alice.recv_until(lambda f: f["type"] == "turn_finished")
    # Mallory, knowing the id and a seq, tries both doors: the header and the auth frame.
    mallory_token = secure.token("mallory")
    refused = await refusal(secure.ws("alices-resume", mallory_token, subprotocols=["codelab.v2"]))
    assert refused.status_code == 403
    async with secure.ws("alices-resume", subprotocols=["codelab.v2"]) as ws:
        mallory = WsClient(ws)
        await mallory.send({"type": "auth", "token": mallory_token})
        await mallory.send({"type": "resume", "last_seq": 0})
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await mallory.recv()
    assert close_code(closed.value) == 4403


async def test_a_token_expiring_on_a_live_socket_closes_it_4401(secure_with: SecureFactory) -> None:
    async with secure_with(jwt_leeway=0) as running:
        async with running.ws("expiring", running.token("alice", lifetime=2)) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await WsClient(ws).recv(timeout=6)
        assert close_code(closed.value) == 4401


async def test_an_in_band_refresh_keeps_the_socket_and_another_users_token_closes_it(
    secure_with: SecureFactory,
) -> None:
    async with secure_with(jwt_leeway=0) as running:
        short = running.token("alice", lifetime=2)
        fresh = running.token("alice", lifetime=600)
        foreign = running.token("mallory", lifetime=600)
        async with running.ws("refreshed", short, subprotocols=["codelab.v2"]) as ws:
            client = WsClient(ws)
            await client.recv()  # session_ready
            await client.send({"type": "auth", "token": fresh})
            assert (await client.recv())["type"] == "auth_ok"
            await trio.sleep(2.5)  # past the first token's expiry
            await client.send({"type": "ping", "id": 1})
            assert (await client.recv())["type"] == "pong"
            await client.send({"type": "auth", "token": foreign})
            error = await client.recv()
            assert error["code"] == "invalid_token"
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await client.recv()
            assert close_code(closed.value) == 4401


# --- the REST door -------------------------------------------------------------------------


async def test_rest_without_a_token_is_401_with_www_authenticate(secure: Secure) -> None:
    async with secure.http() as http:
        answer = await http.get("/api/v1/agents")
        bad = await http.get("/api/v1/agents", headers=secure.headers("nope"))
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.json()["error"] == "unauthorized"
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]


async def test_health_and_docs_are_public(secure: Secure) -> None:
    async with secure.http() as http:
        for path in ("/health", "/api/v1/health", "/openapi.json", "/docs"):
            assert (await http.get(path)).status_code == 200, path


async def test_scopes_read_for_get_write_for_the_rest(secure: Secure) -> None:
    reader = secure.headers(secure.token("reader", scopes=["api:read"]))
    async with secure.http() as http:
        assert (await http.get("/api/v1/agents", headers=reader)).status_code == 200
        refused = await http.post("/api/v1/sessions", json={}, headers=reader)
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"


async def test_sessions_belong_to_their_creator_on_every_route(secure: Secure) -> None:
    alice = secure.headers(secure.token("alice"))
    mallory = secure.headers(secure.token("mallory"))
    async with secure.http() as http:
        created = await http.post("/api/v1/sessions", json={"session_id": "a1"}, headers=alice)
        assert created.status_code == 201
        for method, path in [
            ("GET", "/api/v1/sessions/a1"),
            ("PATCH", "/api/v1/sessions/a1"),
            ("DELETE", "/api/v1/sessions/a1"),
            ("GET", "/api/v1/sessions/a1/history"),
            ("GET", "/api/v1/sessions/a1/pending-approvals"),
            ("GET", "/api/v1/agents/a1/current"),
            ("POST", "/api/v1/agents/a1/switch"),
            ("GET", "/api/v1/events/metrics/session/a1"),
            ("GET", "/api/v1/events/audit-log?session_id=a1"),
        ]:
            answer = await http.request(method, path, headers=mallory, json={})
            assert answer.status_code == 403, (method, path)
        # mallory cannot create it either, and alice still can read it
        again = await http.post("/api/v1/sessions", json={"session_id": "a1"}, headers=mallory)
        assert again.status_code == 403
        assert (await http.get("/api/v1/sessions/a1", headers=alice)).status_code == 200
        # listing shows each caller only their own sessions
        await http.post("/api/v1/sessions", json={"session_id": "m1"}, headers=mallory)
        mine = (await http.get("/api/v1/sessions", headers=alice)).json()
        assert [s["id"] for s in mine["sessions"]] == ["a1"] and mine["total"] == 1
        # cross-session data shows each caller their own sessions only
        metrics = await http.get("/api/v1/events/metrics/sessions", headers=alice)
        assert metrics.status_code == 200
        assert [s["session_id"] for s in metrics.json()["sessions"]] == ["a1"]
        assert metrics.json()["total"] == 1
        for query in ("", "?session_id="):  # an empty filter is no filter
            events = await http.get(f"/api/v1/events/audit-log{query}", headers=mallory)
            assert events.status_code == 200, query
            assert {e["session_id"] for e in events.json()["events"]} == {"m1"}
        events = await http.get("/api/v1/events/audit-log", headers=alice)
        assert {e["session_id"] for e in events.json()["events"]} == {"a1"}


async def test_the_verified_identity_is_forwarded_to_the_runtime(
    nursery: trio.Nursery, jwks_server: tuple[JWKSServer, DevIssuer], scripted_runtime: object
) -> None:
    from ..support.scripted_runtime import ScriptedRuntime

    assert isinstance(scripted_runtime, ScriptedRuntime)
    server, issuer = jwks_server
    async with run_gateway(nursery, secure_settings(scripted_runtime.url, server.url)) as gw:
        token = issuer.mint("alice", scopes=["api:read", "api:write"])
        MINTED.add(token)
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            await http.get("/api/v1/agents", headers=auth(token))
    _, headers, _ = scripted_runtime.rest_requests[-1]
    assert headers["x-user-id"] == "alice" and headers["x-user-scopes"] == "api:read api:write"
    assert "authorization" not in headers


async def test_the_internal_key_works_only_when_allowed(secure_with: SecureFactory) -> None:
    key = {"X-Internal-Auth": INTERNAL_KEY}
    for allowed, expected in ((False, 401), (True, 200)):
        async with secure_with(allow_internal_auth=allowed) as running:
            async with running.http() as http:
                answer = await http.get("/api/v1/events/metrics/sessions", headers=key)
                wrong = await http.get("/api/v1/agents", headers={"X-Internal-Auth": "guess"})
        assert answer.status_code == expected
        assert wrong.status_code == 401


async def test_a_verified_token_is_not_trusted_past_its_expiry(secure_with: SecureFactory) -> None:
    async with secure_with(jwt_leeway=0) as running:
        token = running.token("alice", lifetime=2)
        async with running.http() as http:
            assert (await http.get("/api/v1/agents", headers=auth(token))).status_code == 200
            assert (await http.get("/api/v1/agents", headers=auth(token))).status_code == 200
            await trio.sleep(2.2)
            assert (await http.get("/api/v1/agents", headers=auth(token))).status_code == 401


# --- the Auth Service misbehaving --------------------------------------------------------------


async def test_cached_keys_survive_an_auth_service_outage_and_no_keys_means_503(
    secure_with: SecureFactory,
) -> None:
    async with secure_with() as running:
        token = running.token("alice")
        authed = auth(token)
        async with running.http() as http:
            assert (await http.get("/api/v1/agents", headers=authed)).status_code == 200
            running.jwks.go_down()
            assert (await http.get("/api/v1/agents", headers=authed)).status_code == 200
    # a fresh gateway has no cache: the service is unavailable, the user is fine
    async with secure_with() as running:
        async with running.http() as http:
            answer = await http.get("/api/v1/agents", headers=authed)
            ready = await http.get("/api/v1/health")
        assert answer.status_code == 503 and "retry-after" in answer.headers
        assert ready.status_code == 503 and ready.json()["checks"]["jwks"] == "unavailable"
        assert (await refusal(running.ws("down", token))).status_code == 503
    running.jwks.go_up()


async def test_key_rotation_and_a_kid_flood(secure_with: SecureFactory) -> None:
    async with secure_with(jwks_refetch_cooldown=1.0) as running:
        server, old_issuer = running.jwks, running.issuer
        async with running.http() as http:
            old = running.token("alice")
            assert (await http.get("/api/v1/agents", headers=auth(old))).status_code == 200
            # a flood of unknown kids costs the auth service at most one request per cooldown
            forger = DevIssuer()
            forged_tokens = [
                forger.mint("alice", extra_headers={"kid": f"random-{n}"}) for n in range(30)
            ]
            MINTED.update(forged_tokens)
            before = server.requests
            for forged in forged_tokens:
                answer = await http.get("/api/v1/agents", headers=auth(forged))
                assert answer.status_code == 401
            assert server.requests - before <= 1
            # rotation: the new key joins the set; after the cooldown its tokens work
            new_issuer = DevIssuer()
            server.jwks = {"keys": [*old_issuer.jwks()["keys"], *new_issuer.jwks()["keys"]]}
            await trio.sleep(1.1)
            new = new_issuer.mint("alice")
            MINTED.add(new)
            assert (await http.get("/api/v1/agents", headers=auth(new))).status_code == 200
            assert (await http.get("/api/v1/agents", headers=auth(old))).status_code == 200


# --- limits ----------------------------------------------------------------------------------


async def test_rest_rate_limit_is_429_with_retry_after(secure_with: SecureFactory) -> None:
    async with secure_with(rest_requests_per_second=1, rest_request_burst=3) as running:
        token = running.token("alice")
        async with running.http() as http:
            statuses = [(await http.get("/api/v1/agents", headers=auth(token))) for _ in range(5)]
    assert [a.status_code for a in statuses] == [200, 200, 200, 429, 429]
    assert statuses[-1].headers["retry-after"] == "1"


async def test_message_rate_limit_then_4429(secure_with: SecureFactory) -> None:
    async with secure_with(ws_messages_per_second=0.1, ws_message_burst=2) as running:
        async with running.ws("chatty", running.token("alice")) as ws:
            client = WsClient(ws)
            for _ in range(6):
                await client.send({"type": "cancel"})
            codes = []
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    codes.append((await client.recv())["code"])
    assert codes == ["rate_limited", "rate_limited"]
    assert close_code(closed.value) == 4429


async def test_per_user_connection_cap_is_429_at_the_handshake(secure_with: SecureFactory) -> None:
    async with secure_with(max_connections_per_user=2) as running:
        mine, other = running.token("alice"), running.token("bob")
        async with running.ws("c1", mine), running.ws("c2", mine):
            assert (await refusal(running.ws("c3", mine))).status_code == 429
            async with running.ws("c4", other):
                pass  # other users are unaffected


async def test_the_global_connection_cap_is_503(secure_with: SecureFactory) -> None:
    async with secure_with(max_connections=1) as running:
        alice, bob = running.token("alice"), running.token("bob")
        async with running.ws("g1", alice):
            assert (await refusal(running.ws("g2", bob))).status_code == 503


async def test_a_query_string_token_works_when_an_operator_opts_in(
    secure_with: SecureFactory,
) -> None:
    async with secure_with(allow_query_token=True) as running:
        token = running.token("alice")
        async with trio_websocket.open_websocket_url(
            running.gateway.ws_url("q") + f"?access_token={token}"
        ) as ws:
            assert len(await chat(WsClient(ws))) == 3


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("https://ide.example.com", True),
        ("https://a.apps.example.com", True),
        ("null", False),
        ("https://ide.example.com.evil.io", False),
        ("https://evilexample.com", False),
        ("http://ide.example.com", False),
    ],
)
async def test_origin_allow_list(
    secure_with: SecureFactory, origin: str | None, allowed: bool
) -> None:
    allowed_origins = "https://ide.example.com,https://*.apps.example.com"
    async with secure_with(allowed_origins=allowed_origins) as running:
        headers = bearer(running.token("alice"))
        if origin is not None:
            headers.append((b"Origin", origin.encode()))
        opening = trio_websocket.open_websocket_url(
            running.gateway.ws_url("o"), extra_headers=headers
        )
        if allowed:
            async with opening:
                pass
        else:
            assert (await refusal(opening)).status_code == 403


# --- review findings: each of these once opened a hole --------------------------------------


async def test_dot_segments_cannot_reach_the_unfiltered_session_list(secure: Secure) -> None:
    alice = auth(secure.token("alice"))
    async with secure.http() as http:
        await http.post("/api/v1/sessions", json={"session_id": "victim"}, headers=alice)
        mallory = auth(secure.token("mallory"))
        # httpx itself folds a literal "/." away (the filtered list route answers); the
        # encoded form reaches the gateway as the id "." and must not become "/sessions"
        for path in ("/api/v1/sessions/.", "/api/v1/sessions/%2E", "/api/v1/sessions/%2E%2E"):
            answer = await http.get(path, headers=mallory)
            assert "victim" not in answer.text, path
        encoded = await http.get("/api/v1/sessions/%2E", headers=mallory)
        assert encoded.status_code == 400


async def test_a_repeated_session_query_parameter_is_refused(secure: Secure) -> None:
    mallory = auth(secure.token("mallory"))
    async with secure.http() as http:
        await http.post("/api/v1/sessions", json={"session_id": "mine"}, headers=mallory)
        answer = await http.get(
            "/api/v1/events/audit-log?session_id=mine&session_id=victim", headers=mallory
        )
    assert answer.status_code == 400


async def test_touching_an_unknown_session_does_not_squat_its_id(secure: Secure) -> None:
    async with secure.http() as http:
        ghost = await http.get("/api/v1/sessions/ghost", headers=auth(secure.token("mallory")))
        assert ghost.status_code == 404
        created = await http.post(
            "/api/v1/sessions", json={"session_id": "ghost"}, headers=auth(secure.token("alice"))
        )
    assert created.status_code == 201


async def test_a_refused_handshake_does_not_claim_the_session(secure_with: SecureFactory) -> None:
    async with secure_with(max_connections_per_user=1) as running:
        mallory, alice = running.token("mallory"), running.token("alice")
        async with running.ws("m1", mallory):
            assert (await refusal(running.ws("wanted", mallory))).status_code == 429
        async with running.ws("wanted", alice) as ws:
            assert len(await chat(WsClient(ws))) == 3


async def test_a_user_owns_at_most_max_sessions_and_idle_ownership_is_forgotten(
    secure_with: SecureFactory,
) -> None:
    async with secure_with(max_sessions_per_user=2, session_ownership_ttl=1.0) as running:
        alice, bob = running.token("alice"), running.token("bob")
        for session in ("own1", "own2"):
            async with running.ws(session, alice):
                pass
        refused = await refusal(running.ws("own3", alice))
        assert refused.status_code == 429
        assert b"too_many_sessions" in (refused.body or b"")
        assert (await refusal(running.ws("own1", bob))).status_code == 403
        await trio.sleep(1.2)  # both records are now idle for longer than the TTL
        async with running.ws("own3", alice) as ws:
            assert len(await chat(WsClient(ws))) == 3
        # An id unused for the TTL is unowned: the next user to touch it owns it (documented).
        async with running.ws("own1", bob):
            pass


async def test_without_jwt_auth_sessions_are_not_recorded_or_capped(
    gateway_with: GatewayWith,
) -> None:
    # Every caller is the same anonymous principal: owner records would protect nothing and
    # a long-lived gateway would refuse every session after MAX_SESSIONS_PER_USER (the soak
    # found this at 10,000).
    async with gateway_with(max_sessions_per_user=1) as gw:
        for session in ("anon1", "anon2", "anon3"):
            async with trio_websocket.open_websocket_url(gw.ws_url(session)) as ws:
                assert len(await chat(WsClient(ws))) == 3
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            listed = await http.get("/api/v1/sessions")
        assert {"anon1", "anon2", "anon3"} <= {s["id"] for s in listed.json()["sessions"]}
        assert len(gw.app.gateway.security.ownership) == 0  # type: ignore[arg-type]


async def test_the_internal_key_never_goes_to_the_auth_service(secure: Secure) -> None:
    async with secure.http() as http:
        await http.get("/api/v1/agents", headers=auth(secure.token()))
    assert secure.jwks.requests >= 1
    assert "x-internal-auth" not in secure.jwks.last_headers


async def test_sockets_waiting_for_their_auth_frame_have_their_own_global_cap(
    secure_with: SecureFactory,
) -> None:
    """MAX_PENDING_AUTH, not MAX_CONNECTIONS (issue 11; more in test_ws_edge.py)."""
    async with secure_with(max_connections=1, max_pending_auth=1, ws_auth_timeout=5.0) as running:
        async with running.ws("pending"):
            await wait_for(lambda: running.gateway.app.gateway.pending_auth.total == 1)
            refused = await refusal(running.ws("second"))
            assert refused.status_code == 503
            assert b"too_many_pending_auth" in (refused.body or b"")


async def test_a_refresh_to_a_read_only_token_closes_4403(secure: Secure) -> None:
    async with secure.ws("downgraded", secure.token("alice")) as ws:
        client = WsClient(ws)
        await client.send({"type": "auth", "token": secure.token("alice", scopes=["api:read"])})
        error = await client.recv()
        assert error["code"] == "invalid_token"
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await client.recv()
    assert close_code(closed.value) == 4403


# --- hygiene: the log check of every test (the fixture above) sees what it must --------------


def test_the_log_check_sees_the_logs_and_would_catch_token_material(
    no_token_material_in_the_logs: io.StringIO,
) -> None:
    token = DevIssuer().mint("leak-check")
    logging.getLogger().warning("a line the check must see")
    assert "a line the check must see" in no_token_material_in_the_logs.getvalue()
    assert token_material_in(f'{{"msg": "{token}"}}', {token})
    assert token_material_in(f"key={INTERNAL_KEY}", set())
    assert token_material_in("Authorization: Bearer eyJhbGciOi", set())
    assert not token_material_in(no_token_material_in_the_logs.getvalue(), {token})
