"""The REST proxy: faithful in both directions, with clear errors of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from ..conftest import INTERNAL_KEY, RunningGateway, gateway_settings, run_gateway
from ..support.ports import free_port
from ..support.scripted_runtime import Script, ScriptedRuntime


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.base_url, verify=False) as client:
        yield client


Scripted = tuple[ScriptedRuntime, httpx.AsyncClient]


@pytest.fixture
async def scripted(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> AsyncIterator[Scripted]:
    """The scripted runtime, and a client of a gateway in front of it (0.5 s request timeout,
    4 KiB request bodies)."""
    settings = gateway_settings(
        scripted_runtime.url, request_timeout=0.5, max_request_body_bytes=4096
    )
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url, verify=False) as client:
            yield scripted_runtime, client


# --- every route against the demo runtime ---------------------------------------------------


async def test_create_then_read_a_session_201_stays_201(http: httpx.AsyncClient) -> None:
    created = await http.post("/api/v1/sessions", json={"session_id": "rest-1"})
    assert created.status_code == 201
    assert created.json()["id"] == "rest-1"
    again = await http.post("/api/v1/sessions", json={"session_id": "rest-1"})
    assert again.status_code == 409 and "detail" in again.json()
    got = await http.get("/api/v1/sessions/rest-1", params={"include_messages": "true"})
    assert got.status_code == 200 and got.json()["session"]["id"] == "rest-1"


async def test_list_sessions_passes_the_query_string(http: httpx.AsyncClient) -> None:
    for n in range(3):
        await http.post("/api/v1/sessions", json={"session_id": f"list-{n}"})
    page = await http.get("/api/v1/sessions", params={"limit": 2, "offset": 1})
    body = page.json()
    assert page.status_code == 200 and (body["limit"], body["offset"]) == (2, 1)
    assert len(body["sessions"]) == 2
    bad = await http.get("/api/v1/sessions", params={"limit": "-5"})
    assert bad.status_code == 400 and "detail" in bad.json()


async def test_patch_and_delete_a_session(http: httpx.AsyncClient) -> None:
    await http.post("/api/v1/sessions", json={"session_id": "p"})
    patched = await http.patch("/api/v1/sessions/p", json={"title": "renamed"})
    assert patched.status_code == 200 and patched.json()["session"]["title"] == "renamed"
    deleted = await http.delete("/api/v1/sessions/p")
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await http.get("/api/v1/sessions/p")).status_code == 404


async def test_history_and_pending_approvals_after_a_chat(
    gateway: RunningGateway, http: httpx.AsyncClient
) -> None:
    async with gateway.connect("chat-rest") as client:
        await client.send({"type": "user_message", "content": "write a hello world in python"})
        read_call = (await client.turn())[-1]
        await client.send({"type": "tool_result", "call_id": read_call["call_id"], "result": "x"})
        write_call = (await client.turn())[-1]
    history = (await http.get("/api/v1/sessions/chat-rest/history")).json()
    assert history["session_id"] == "chat-rest" and history["message_count"] >= 2
    pending = (await http.get("/api/v1/sessions/chat-rest/pending-approvals")).json()
    assert [p["call_id"] for p in pending["pending_approvals"]] == [write_call["call_id"]]


async def test_agents_routes(http: httpx.AsyncClient) -> None:
    agents = await http.get("/api/v1/agents")
    assert agents.status_code == 200 and agents.json()["total"] >= 5
    await http.post("/api/v1/sessions", json={"session_id": "ag"})
    switched = await http.post(
        "/api/v1/agents/ag/switch", json={"target_agent": "debug", "reason": "why not"}
    )
    assert switched.status_code == 200
    current = await http.get("/api/v1/agents/ag/current", params={"include_history": "true"})
    assert current.json()["context"]["current_agent"] == "debug"
    bad = await http.post(
        "/api/v1/agents/ag/switch", json={"target_agent": "wizard", "reason": "r"}
    )
    assert bad.status_code == 400


async def test_events_routes(http: httpx.AsyncClient) -> None:
    await http.post("/api/v1/sessions", json={"session_id": "ev"})
    for path in ("metrics", "metrics/sessions", "audit-log", "stats"):
        answer = await http.get(f"/api/v1/events/{path}", params={"limit": 5})
        assert answer.status_code == 200, path
    assert (await http.get("/api/v1/events/metrics/session/nope")).status_code == 404


# --- faithfulness, against a scripted runtime -------------------------------------------------


async def test_method_path_query_body_and_content_type_reach_the_runtime(
    scripted: Scripted,
) -> None:
    runtime, http = scripted
    await http.patch(
        "/api/v1/sessions/a%20b%3Fc",
        params={"x": "1", "y": "two words"},
        content=b'{"title": "t"}',
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Accept-Language": "de",
            "X-Custom": "not on the allow-list",
        },
    )
    request_line, headers, body = runtime.rest_requests[-1]
    assert request_line.startswith("PATCH /sessions/a%20b%3Fc?x=1&y=two+words ")
    assert body == b'{"title": "t"}'
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["accept-language"] == "de"
    assert "x-custom" not in headers  # an allow-list (see tests/hostile/test_rest_smuggling.py)
    assert headers["x-internal-auth"] == INTERNAL_KEY


async def test_credentials_and_hop_by_hop_headers_are_not_forwarded(scripted: Scripted) -> None:
    runtime, http = scripted
    await http.get(
        "/api/v1/agents",
        headers={
            "Authorization": "Bearer secret-token",
            "Cookie": "a=b",
            "X-Internal-Auth": "forged",
            "Keep-Alive": "timeout=5",
        },
    )
    _, headers, _ = runtime.rest_requests[-1]
    assert "authorization" not in headers and "cookie" not in headers
    assert "keep-alive" not in headers
    assert headers["x-internal-auth"] == INTERNAL_KEY


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (201, b'{"id": "n"}'),
        (404, b'{"detail": "Session not found"}'),
        (409, b'{"detail": "exists"}'),
        (422, b'{"detail": [{"loc": ["body"], "msg": "bad"}]}'),
        (500, b'{"detail": "boom"}'),
    ],
)
async def test_status_and_body_come_back_unchanged(
    scripted: tuple[ScriptedRuntime, httpx.AsyncClient], status: int, body: bytes
) -> None:
    runtime, http = scripted
    runtime.rest_scripts["POST /sessions"] = Script(
        status=status, content_type="application/json", body=[body]
    )
    answer = await http.post("/api/v1/sessions", json={})
    assert answer.status_code == status
    assert answer.content == body
    assert answer.headers["content-type"] == "application/json"


async def test_204_passes_through_without_a_body(scripted: Scripted) -> None:
    runtime, http = scripted
    runtime.rest_scripts["DELETE /sessions/x"] = Script(status=204)
    answer = await http.delete("/api/v1/sessions/x")
    assert answer.status_code == 204 and answer.content == b""


async def test_a_runtime_429_is_passed_through_with_retry_after(scripted: Scripted) -> None:
    runtime, http = scripted
    runtime.rest_scripts["GET /agents"] = Script(
        status=429,
        content_type="application/json",
        body=[b'{"detail": "Rate limit exceeded"}'],
        headers={"Retry-After": "42"},
    )
    answer = await http.get("/api/v1/agents")
    assert answer.status_code == 429 and answer.headers["retry-after"] == "42"
    assert answer.json() == {"detail": "Rate limit exceeded"}


async def test_a_runtime_that_does_not_answer_in_time_is_504(scripted: Scripted) -> None:
    runtime, http = scripted
    runtime.rest_scripts["GET /agents"] = Script(body=[2.0, b"{}"])
    answer = await http.get("/api/v1/agents")
    assert answer.status_code == 504
    assert answer.json()["error"] == "runtime_timeout"


async def test_an_unreachable_runtime_is_502(nursery: trio.Nursery) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # a port that was just free: nothing listens
    async with run_gateway(nursery, gateway_settings(nowhere)) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            answer = await http.get("/api/v1/agents")
    assert answer.status_code == 502
    assert answer.json() == {
        "error": "runtime_unavailable",
        "error_description": "The agent runtime is unreachable",
    }


async def test_a_body_over_the_limit_is_413_and_never_sent_upstream(scripted: Scripted) -> None:
    runtime, http = scripted
    before = len(runtime.rest_requests)
    answer = await http.post("/api/v1/sessions", content=b"x" * 5000)
    assert answer.status_code == 413 and answer.json()["error"] == "request_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for _ in range(5):
            yield b"y" * 1000

    answer = await http.post("/api/v1/sessions", content=chunked())
    assert answer.status_code == 413
    assert len(runtime.rest_requests) == before


async def test_saturation_is_503_with_retry_after(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    scripted_runtime.rest_scripts["GET /agents"] = Script(body=[1.0, b"{}"])
    settings = gateway_settings(
        scripted_runtime.url, max_concurrent_requests=2, saturation_wait=0.1
    )
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            answers: list[httpx.Response] = []

            async def call() -> None:
                answers.append(await http.get("/api/v1/agents"))

            async with trio.open_nursery() as calls:
                for _ in range(4):
                    calls.start_soon(call)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 200, 503, 503]
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"] == "saturated"


async def test_request_ids_are_kept_when_sane_and_sent_both_ways(scripted: Scripted) -> None:
    runtime, http = scripted
    answer = await http.get("/api/v1/agents", headers={"X-Request-ID": "abc-123"})
    assert answer.headers["x-request-id"] == "abc-123"
    assert runtime.rest_requests[-1][1]["x-request-id"] == "abc-123"
    insane = await http.get("/api/v1/agents", headers={"X-Request-ID": "bad id\x01" + "x" * 300})
    generated = insane.headers["x-request-id"]
    assert generated != "bad id" and len(generated) == 32
    assert runtime.rest_requests[-1][1]["x-request-id"] == generated


async def test_unknown_routes_and_methods_get_the_json_error_shape(
    http: httpx.AsyncClient,
) -> None:
    missing = await http.get("/api/v1/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong = await http.put("/api/v1/agents")
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"


# --- health and documents --------------------------------------------------------------------


async def test_liveness_never_touches_the_runtime(nursery: trio.Nursery) -> None:
    async with run_gateway(nursery, gateway_settings("http://127.0.0.1:1")) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            live = await http.get("/health")
            ready = await http.get("/api/v1/health")
    assert live.status_code == 200 and live.json()["status"] == "ok"
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"


async def test_readiness_with_a_healthy_runtime(http: httpx.AsyncClient) -> None:
    ready = await http.get("/api/v1/health")
    assert ready.status_code == 200 and ready.json()["checks"]["runtime"] == "ok"


async def test_the_openapi_document_covers_every_route(http: httpx.AsyncClient) -> None:
    from trio_gateway.edge.rest_routes import ROUTES

    document = (await http.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    for route in ROUTES:
        assert route.method.lower() in document["paths"][route.path]
    assert "GatewayError" in document["components"]["schemas"]
    page = await http.get("/docs")
    assert page.status_code == 200 and "/api/v1/sessions/{session_id}/history" in page.text
