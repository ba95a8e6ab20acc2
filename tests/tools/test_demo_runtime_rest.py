"""The demo Agent Runtime's REST surface over real HTTP (docs/compatibility.md §1): which routes
need the internal key, sessions (create, list and page, get, patch, delete, history, pending
approvals), agents, and the events and metrics it reports.
"""

# The runtime fixtures are demo_runtime_harness's, imported by name (pytest finds fixtures in a
# module's namespace); parameters of the same names are what ruff's F811 sees.
# ruff: noqa: F811

from __future__ import annotations

from typing import Any

import httpx
import pytest

from trio_gateway.tools.demo_runtime import (
    DemoRuntime,
)

from .demo_runtime_harness import (  # noqa: F401 - fixtures
    AUTH,
    KEY,
    STREAM,
    client,
    get_json,
    runtime,
    served,
    start_coding,
    tool_result,
    turn,
    user,
)

AGENT_TYPES = ["orchestrator", "coder", "architect", "debug", "ask", "universal"]


# --------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------


async def test_health_is_public(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={AUTH: ""})
    assert response.status_code == 200
    assert response.json() == {"status": "healthy", "service": "agent-runtime", "version": "demo"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", STREAM),
        ("GET", "/sessions"),
        ("POST", "/sessions"),
        ("GET", "/sessions/s1"),
        ("PATCH", "/sessions/s1"),
        ("DELETE", "/sessions/s1"),
        ("GET", "/sessions/s1/history"),
        ("GET", "/sessions/s1/pending-approvals"),
        ("GET", "/agents"),
        ("GET", "/agents/s1/current"),
        ("POST", "/agents/s1/switch"),
        ("GET", "/events/metrics"),
        ("GET", "/events/metrics/sessions"),
        ("GET", "/events/metrics/session/s1"),
        ("GET", "/events/audit-log"),
        ("GET", "/events/stats"),
        ("GET", "/no/such/route"),
    ],
)
async def test_every_other_route_needs_the_internal_key(
    client: httpx.AsyncClient, runtime: DemoRuntime, method: str, path: str
) -> None:
    for key in [None, b"", b"wrong-key", KEY.encode() + b"x", "ключ".encode()]:
        headers = None if key is None else {AUTH.encode(): key}
        request = client.build_request(method, path, json={"session_id": "s1"}, headers=headers)
        if key is None:
            del request.headers[AUTH]
        response = await client.send(request)
        assert response.status_code == 401, key
        assert response.json() == {"detail": "Invalid or missing internal auth"}
    assert runtime.stream_requests == []  # nothing reached a handler


async def test_unknown_route_is_a_json_404(client: httpx.AsyncClient) -> None:
    body = await get_json(client, "/no/such/route", 404)
    assert isinstance(body["detail"], str)


# --------------------------------------------------------------------------------------------
# REST: sessions
# --------------------------------------------------------------------------------------------


async def test_create_session(client: httpx.AsyncClient) -> None:
    response = await client.post("/sessions")
    assert response.status_code == 201
    created = response.json()
    assert set(created) == {"id", "message_count", "created_at", "is_active", "current_agent"}
    assert created["message_count"] == 0
    assert created["is_active"] is True
    assert created["current_agent"] == "orchestrator"

    named = await client.post("/sessions", json={"session_id": "mine"})
    assert named.status_code == 201
    assert named.json()["id"] == "mine"

    duplicate = await client.post("/sessions", json={"session_id": "mine"})
    assert duplicate.status_code == 409
    assert "detail" in duplicate.json()

    for bad in ([1], {"session_id": 5}, {"session_id": ""}):
        assert (await client.post("/sessions", json=bad)).status_code == 422


async def test_list_sessions_pages_most_recent_first(client: httpx.AsyncClient) -> None:
    for name in ("a", "b", "c"):
        await client.post("/sessions", json={"session_id": name})
    await client.patch("/sessions/a", json={"is_active": False})  # also makes "a" most recent

    listing = await get_json(client, "/sessions")
    assert (listing["total"], listing["limit"], listing["offset"]) == (3, 50, 0)
    assert [s["id"] for s in listing["sessions"]] == ["a", "c", "b"]
    assert set(listing["sessions"][0]) == {
        "id",
        "title",
        "message_count",
        "last_activity",
        "is_active",
        "current_agent",
    }

    page = await get_json(client, "/sessions", limit=1, offset=1)
    assert [s["id"] for s in page["sessions"]] == ["c"]
    assert (page["total"], page["limit"], page["offset"]) == (3, 1, 1)

    active = await get_json(client, "/sessions", active_only="true")
    assert [s["id"] for s in active["sessions"]] == ["c", "b"]
    assert active["total"] == 2


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "ten"},
        {"offset": -1},
        {"offset": "1.5"},
        {"active_only": "maybe"},
    ],
)
async def test_list_sessions_rejects_bad_paging(
    client: httpx.AsyncClient, params: dict[str, Any]
) -> None:
    body = await get_json(client, "/sessions", 400, **params)
    assert isinstance(body["detail"], str)


async def test_get_session(client: httpx.AsyncClient) -> None:
    await turn(client, "s1", user("Hello there"))

    session = (await get_json(client, "/sessions/s1"))["session"]
    assert session["id"] == "s1"
    assert session["title"] == "Hello there"
    assert session["message_count"] == 2
    assert "messages" not in session

    with_messages = (await get_json(client, "/sessions/s1", include_messages="true"))["session"]
    assert [m["role"] for m in with_messages["messages"]] == ["user", "assistant"]
    assert set(with_messages["messages"][0]) == {"role", "content", "timestamp"}

    assert await get_json(client, "/sessions/nope", 404) == {"detail": "Session not found"}


async def test_patch_session(client: httpx.AsyncClient) -> None:
    await client.post("/sessions", json={"session_id": "s1"})
    response = await client.patch("/sessions/s1", json={"title": "Renamed", "is_active": False})
    assert response.status_code == 200
    session = response.json()["session"]
    assert (session["title"], session["is_active"]) == ("Renamed", False)

    assert (await client.patch("/sessions/nope", json={"title": "x"})).status_code == 404
    for bad in ({"title": 3}, {"is_active": "yes"}, [1]):
        assert (await client.patch("/sessions/s1", json=bad)).status_code == 422


async def test_delete_session(client: httpx.AsyncClient) -> None:
    await client.post("/sessions", json={"session_id": "s1"})
    response = await client.delete("/sessions/s1")
    assert response.status_code == 204
    assert response.content == b""
    assert (await client.get("/sessions/s1")).status_code == 404
    assert (await client.delete("/sessions/s1")).status_code == 404


async def test_history_shape_and_404(client: httpx.AsyncClient) -> None:
    await turn(client, "s1", user("hi"))
    history = await get_json(client, "/sessions/s1/history")
    assert set(history) == {
        "session_id",
        "messages",
        "message_count",
        "last_activity",
        "current_agent",
        "agent_history",
    }
    assert history["session_id"] == "s1"
    assert history["message_count"] == len(history["messages"]) == 2
    assert history["agent_history"] == []
    assert await get_json(client, "/sessions/nope/history", 404) == {"detail": "Session not found"}


async def test_pending_approvals_of_an_unknown_session_are_empty(
    client: httpx.AsyncClient,
) -> None:
    assert await get_json(client, "/sessions/nope/pending-approvals") == {
        "session_id": "nope",
        "pending_approvals": [],
        "count": 0,
    }


# --------------------------------------------------------------------------------------------
# REST: agents
# --------------------------------------------------------------------------------------------


async def test_list_agents(client: httpx.AsyncClient) -> None:
    body = await get_json(client, "/agents")
    assert body["total"] == len(AGENT_TYPES)
    assert [a["type"] for a in body["agents"]] == AGENT_TYPES
    for agent in body["agents"]:
        assert set(agent) == {
            "type",
            "name",
            "description",
            "allowed_tools",
            "has_file_restrictions",
        }


async def test_current_agent(client: httpx.AsyncClient) -> None:
    await client.post("/sessions", json={"session_id": "s1"})
    context = (await get_json(client, "/agents/s1/current"))["context"]
    assert context == {"session_id": "s1", "current_agent": "orchestrator", "switch_count": 0}
    with_history = await get_json(client, "/agents/s1/current", include_history="true")
    assert with_history["context"]["agent_history"] == []
    assert await get_json(client, "/agents/nope/current", 404) == {"detail": "Session not found"}


async def test_switch_agent_over_rest(client: httpx.AsyncClient) -> None:
    body = {"target_agent": "architect", "reason": "Needs a design", "confidence": 0.7}
    response = await client.post("/agents/s1/switch", json=body)
    assert response.status_code == 200
    context = response.json()["context"]
    assert context["current_agent"] == "architect"
    assert context["switch_count"] == 1
    (entry,) = context["agent_history"]
    assert (entry["from_agent"], entry["to_agent"], entry["confidence"]) == (
        "orchestrator",
        "architect",
        0.7,
    )

    unknown = await client.post("/agents/s1/switch", json={"target_agent": "x", "reason": "r"})
    assert unknown.status_code == 400
    for bad in (
        {"reason": "r"},
        {"target_agent": "coder"},
        {"target_agent": "coder", "reason": "r", "confidence": "hi"},
    ):
        assert (await client.post("/agents/s1/switch", json=bad)).status_code == 422


# --------------------------------------------------------------------------------------------
# REST: events and metrics
# --------------------------------------------------------------------------------------------


async def test_metrics_count_what_happened(client: httpx.AsyncClient) -> None:
    read_call = await start_coding(client, "s1")
    await turn(client, "s1", tool_result(read_call, result="x"))

    metrics = await get_json(client, "/events/metrics")
    assert metrics["streams"] == {"started": 2, "completed": 2, "cancelled": 0, "active": 0}
    assert metrics["messages"] == {"user": 1, "assistant": 2, "tool": 1}
    assert metrics["tool_calls"]["requested"] == 2
    assert metrics["tool_calls"]["approvals_requested"] == 1
    assert metrics["agent_switches"] == 1
    assert metrics["sessions"]["total"] == 1

    sessions = await get_json(client, "/events/metrics/sessions")
    assert sessions["total"] == 1
    assert sessions["sessions"][0]["session_id"] == "s1"

    one = await get_json(client, "/events/metrics/session/s1")
    assert (one["session_id"], one["tool_calls"], one["pending_approvals"]) == ("s1", 2, 1)
    assert await get_json(client, "/events/metrics/session/nope", 404) == {
        "detail": "Session not found"
    }

    stats = await get_json(client, "/events/stats")
    assert stats["events_by_type"]["tool_call_requested"] == 2
    assert stats["total_events"] == sum(stats["events_by_type"].values())


async def test_audit_log_filters_newest_first(client: httpx.AsyncClient) -> None:
    await turn(client, "s1", user("hi"))
    await turn(client, "s2", {"type": "switch_agent", "agent_type": "coder"})

    log = await get_json(client, "/events/audit-log")
    assert log["limit"] == 100
    ids = [event["event_id"] for event in log["events"]]
    assert ids == sorted(ids, reverse=True)
    assert set(log["events"][0]) == {"event_id", "event_type", "session_id", "timestamp", "data"}

    only_s1 = await get_json(client, "/events/audit-log", session_id="s1")
    assert {event["session_id"] for event in only_s1["events"]} == {"s1"}

    switches = await get_json(client, "/events/audit-log", event_type="agent_switched")
    assert [event["session_id"] for event in switches["events"]] == ["s2"]

    limited = await get_json(client, "/events/audit-log", limit=2)
    assert len(limited["events"]) == 2
    assert limited["total"] == log["total"]

    await get_json(client, "/events/audit-log", 400, limit=0)
