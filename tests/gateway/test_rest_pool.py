"""The REST proxy on the app's runtime pool, served below Quart: connection reuse, the
stale-connection retry rule per method, a fuzzed runtime answer, the response size limit, and
the raw ASGI route table agreeing with Quart's."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import trio

from trio_gateway.app import create_app
from trio_gateway.edge.rest_door import RestDoor
from trio_gateway.edge.rest_routes import ROUTES

from ..conftest import INTERNAL_KEY, RunningGateway, gateway_settings, run_gateway
from ..support.keepalive_runtime import KeepAliveRuntime
from ..support.scripted_runtime import Script, ScriptedRuntime


@pytest.fixture
async def pooled(
    nursery: trio.Nursery, keepalive: KeepAliveRuntime
) -> AsyncIterator[tuple[KeepAliveRuntime, RunningGateway]]:
    async with run_gateway(nursery, gateway_settings(keepalive.url)) as gw:
        yield keepalive, gw


def rest_connections(runtime: KeepAliveRuntime) -> list[list[str]]:
    """The proxied requests each runtime connection carried (the readiness probe aside)."""
    return [
        [t for t in served.targets if not t.endswith("/health")]
        for served in runtime.connections
        if any(not t.endswith("/health") for t in served.targets)
    ]


# --- one keep-alive pool ------------------------------------------------------------------------


async def test_sequential_rest_requests_share_one_runtime_connection(
    pooled: tuple[KeepAliveRuntime, RunningGateway],
) -> None:
    runtime, gw = pooled
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        for _ in range(10):
            assert (await http.get("/api/v1/agents")).status_code == 200
    # Counted on the runtime's side: one TCP connection carried all ten.
    assert rest_connections(runtime) == [["GET /agents"] * 10]
    pool = gw.app.gateway.pool
    assert pool is not None and (pool.opened, pool.reused, pool.retried) == (1, 9, 0)


async def test_turns_and_rest_share_the_one_pool(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        assert (await http.get("/api/v1/agents")).status_code == 200
        async with gateway.connect("shared-pool") as client:
            await client.send({"type": "user_message", "content": "hello"})
            assert (await client.turn())[-1]["is_final"] is True
        assert (await http.get("/api/v1/sessions/shared-pool/history")).status_code == 200
    pool = gateway.app.gateway.pool
    assert pool is not None and gateway.app.gateway.runtime is not None
    assert gateway.app.gateway.runtime.pool is pool
    # The turn went out on the connection the first REST request left idle, and back.
    assert (pool.opened, pool.reused) == (1, 2)


# --- stale pooled connections -------------------------------------------------------------------


async def test_a_get_on_a_connection_the_runtime_closed_is_retried_once(
    pooled: tuple[KeepAliveRuntime, RunningGateway],
) -> None:
    runtime, gw = pooled
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        assert (await http.get("/api/v1/agents")).status_code == 200
        # The pooled connection: the runtime reads the next request, then closes it unanswered.
        runtime.drop_next = 1
        answer = await http.get("/api/v1/agents")
    assert answer.status_code == 200  # a GET changes nothing: sent again on a fresh connection
    assert rest_connections(runtime) == [["GET /agents"] * 2, ["GET /agents"]]
    pool = gw.app.gateway.pool
    assert pool is not None and (pool.opened, pool.retried) == (2, 1)


async def test_a_post_that_may_have_been_processed_is_not_retried(
    pooled: tuple[KeepAliveRuntime, RunningGateway],
) -> None:
    runtime, gw = pooled
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        assert (await http.get("/api/v1/agents")).status_code == 200
        runtime.drop_next = 1  # reads the POST in full, then closes without an answer
        answer = await http.post("/api/v1/sessions", json={"session_id": "once"})
        assert answer.status_code == 502
        assert answer.json() == {
            "error": "runtime_unavailable",
            "error_description": "The agent runtime is unreachable",
        }
        # The pool is fine afterwards.
        assert (await http.get("/api/v1/agents")).status_code == 200
    # The runtime saw the POST exactly once.
    sent = [t for targets in rest_connections(runtime) for t in targets]
    assert sent == ["GET /agents", "POST /sessions", "GET /agents"]
    pool = gw.app.gateway.pool
    assert pool is not None and pool.retried == 0


# --- a fuzzed runtime answer --------------------------------------------------------------------

_TOKENS = [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 404 Not Found\r\n", b"HTTP/1.1 500 Boom\r\n",
    b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 20", b"HTTP/9.9 200 OK\r\n", b"HTTP/1.1 99 Low\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\n", b"Content-Length: 500\r\n", b"Content-Length: x\r\n",
    b"Content-Length: -1\r\n", b"Content-Type: application/json\r\n", b"Connection: close\r\n",
    b"X-Bad Header: y\r\n", b"\r\n", b"5\r\nhello\r\n", b"ffffffffffffffffff\r\n", b"zz\r\n",
    b"0\r\n\r\n", b'{"agents": []}', b"\x00", b"\xff", b" ", b":", b"\n", b"\r",
]  # fmt: skip


_STATUS_LINES = [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 404 Not Found\r\n", b"HTTP/1.1 500 Boom\r\n",
    b"HTTP/1.1 201 Created\r\n", b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 204 No Content\r\n",
]  # fmt: skip
_HEADERS = [
    b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"Content-Length: 0\r\n",
    b"Content-Type: application/json\r\n", b"Connection: close\r\n", b"ETag: x\r\n",
]  # fmt: skip
_BODIES = [b"5\r\nhello\r\n", b"0\r\n\r\n", b"hello", b'{"agents": []}', b"3\r\nab"]


def _answer(rng: random.Random) -> bytes:
    """A runtime answer: mostly well-formed pieces in a random order and number, sometimes
    cut short, with a random token or random bytes spliced in."""
    if rng.random() < 0.2:  # free-form garbage
        return b"".join(
            rng.choice(_TOKENS) if rng.random() < 0.8 else rng.randbytes(rng.randint(1, 8))
            for _ in range(rng.randint(0, 12))
        )
    wire = rng.choice(_STATUS_LINES)
    wire += b"".join(rng.choice(_HEADERS) for _ in range(rng.randint(0, 3))) + b"\r\n"
    wire += b"".join(rng.choice(_BODIES) for _ in range(rng.randint(0, 3)))
    if rng.random() < 0.3:
        at = rng.randint(0, len(wire))
        wire = wire[:at] + rng.choice(_TOKENS) + wire[at:]
    if rng.random() < 0.3:
        wire = wire[: rng.randint(0, len(wire))]
    return wire


async def test_any_runtime_answer_ends_in_a_relayed_status_or_a_clean_gateway_error(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    """Random runtime answers (status lines, headers, chunked and plain bodies, spliced,
    truncated, garbage; then the runtime closes): never a crash or a hang; either the
    runtime's status relayed or the gateway's own 502/504 in its JSON shape. The gateway
    keeps serving afterwards."""
    rng = random.Random(1315)
    settings = gateway_settings(scripted_runtime.url, request_timeout=0.5)
    outcomes: set[str] = set()
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            for _ in range(150):
                wire = _answer(rng)
                scripted_runtime.rest_scripts["GET /agents"] = Script(raw=wire)
                with trio.fail_after(10):
                    answer = await http.get("/api/v1/agents")
                status = answer.status_code
                own = answer.headers.get("content-type") == "application/json" and (
                    answer.content.startswith(b'{"error":"')
                )
                if own:
                    assert status in (502, 504), (wire, answer.content)
                    outcomes.add(answer.json()["error"])
                else:  # the runtime's status line, relayed
                    assert wire.startswith(b"HTTP/1.") and b" %d " % status in wire, wire
                    outcomes.add("relayed")
            scripted_runtime.rest_scripts["GET /agents"] = Script(
                content_type="application/json", body=[b'{"agents": []}']
            )
            assert (await http.get("/api/v1/agents")).json() == {"agents": []}
    assert outcomes == {"relayed", "runtime_unavailable"}  # both kinds were exercised
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# --- limits -------------------------------------------------------------------------------------


async def test_a_runtime_answer_over_the_limit_is_502_and_one_at_it_passes(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    settings = gateway_settings(scripted_runtime.url, max_response_body_bytes=4096)
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            scripted_runtime.rest_scripts["GET /agents"] = Script(
                content_type="application/json", body=[b"x" * 4096]
            )
            assert (await http.get("/api/v1/agents")).content == b"x" * 4096
            scripted_runtime.rest_scripts["GET /agents"] = Script(
                content_type="application/json", body=[b"x" * 3000, b"y" * 3000]
            )
            answer = await http.get("/api/v1/agents")
    assert answer.status_code == 502
    assert answer.json() == {
        "error": "response_too_large",
        "error_description": "The agent runtime's answer exceeds 4096 bytes",
    }


async def test_a_query_with_escaped_non_ascii_octets_is_proxied(
    scripted_runtime: ScriptedRuntime, scripted_gateway: RunningGateway
) -> None:
    """Found by schemathesis on the first version of the ASGI door: a 500."""
    scripted_runtime.rest_scripts["GET /events/audit-log"] = Script(
        content_type="application/json", body=[b'{"events": []}']
    )
    async with httpx.AsyncClient(base_url=scripted_gateway.base_url) as http:
        answer = await http.get(
            "/api/v1/events/audit-log?%C3%8A%F0%99%BB%A3=null&session_id=abc&x=%C2%87",
            headers={"X-Internal-Auth": INTERNAL_KEY},
        )
    assert answer.status_code == 200 and answer.json() == {"events": []}


# --- the ASGI route table -----------------------------------------------------------------------


def test_the_asgi_door_matches_exactly_what_quart_routes_to_the_proxy() -> None:
    """Every proxied route, and near misses, matched by the door the way Werkzeug matches them
    (what the door does not match falls through to Quart's identical rules)."""
    app = create_app(gateway_settings("http://127.0.0.1:1"))
    door = RestDoor(app.gateway.proxy)
    adapter = app.url_map.bind("localhost")
    paths = {route.path.replace("{session_id}", "s-1") for route in ROUTES}
    paths |= {p + "/" for p in paths} | {p.replace("s-1", "") for p in paths}
    paths |= {"/api/v1/agents/x/y/current", "/api/v1/sessions/a b", "/api/v1/sessions/é"}
    for path in sorted(paths):
        for method in ("GET", "POST", "PATCH", "DELETE", "PUT"):
            door_match = door.match(method, path)
            try:
                endpoint, params = adapter.match(path, method=method)
            except Exception:  # 404, 405, a redirect: not a proxied request
                endpoint, params = None, {}
            if door_match is None:
                assert endpoint is None or not str(endpoint).startswith(method + " /api"), (
                    method,
                    path,
                )
                continue
            route, door_params = door_match
            assert endpoint == f"{route.method} {route.path}", (method, path)
            assert door_params == params


async def test_head_on_a_proxied_get_route_is_served_by_quart_as_before(
    scripted_runtime: ScriptedRuntime, scripted_gateway: RunningGateway
) -> None:
    scripted_runtime.rest_scripts["GET /agents"] = Script(
        content_type="application/json", body=[b'{"agents": []}']
    )
    async with httpx.AsyncClient(base_url=scripted_gateway.base_url) as http:
        answer = await http.head("/api/v1/agents", headers={"X-Request-ID": "h-1"})
        options = await http.options("/api/v1/agents")
        wrong = await http.put("/api/v1/agents")
    assert answer.status_code == 200 and answer.content == b""
    assert answer.headers["x-request-id"] == "h-1"
    assert options.status_code == 200 and "GET" in options.headers["allow"]
    assert wrong.status_code == 405 and orjson.loads(wrong.content)["error"] == (
        "method_not_allowed"
    )
