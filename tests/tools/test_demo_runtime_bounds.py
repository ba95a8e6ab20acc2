"""The demo Agent Runtime's bounds over real HTTP: sessions beyond the limit are evicted least
recently active first (never one with a running turn), recorded requests, history and the audit
log are capped, its config is validated when built, and a late request on a new connection is
still served.
"""

from __future__ import annotations

from typing import Any

import h11
import orjson
import pytest
import trio

from trio_gateway.tools.demo_runtime import (
    DemoRuntimeConfig,
)
from trio_gateway.tools.demo_runtime import state as demo_runtime_module

from .demo_runtime_harness import (
    AUTH,
    FAST,
    KEY,
    STREAM,
    get_json,
    parse_sse,
    serving,
    turn,
    user,
    wait_until,
)

# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------


async def test_sessions_beyond_the_limit_evict_the_least_recently_active() -> None:
    config = DemoRuntimeConfig(internal_api_key=KEY, token_delay=0, think_delay=0, max_sessions=2)
    async with serving(config) as (_, client):
        await client.post("/sessions", json={"session_id": "old"})
        await client.post("/sessions", json={"session_id": "busy"})
        await turn(client, "old", user("hi"))  # "old" is now the most recently active
        await client.post("/sessions", json={"session_id": "new"})
        listing = await get_json(client, "/sessions")
        assert sorted(s["id"] for s in listing["sessions"]) == ["new", "old"]


async def test_a_session_with_a_running_turn_is_not_evicted() -> None:
    config = DemoRuntimeConfig(internal_api_key=KEY, token_delay=0, think_delay=0, max_sessions=2)
    async with serving(config) as (runtime, client):
        body = {"session_id": "busy", "message": user("bench 1000 100")}
        async with client.stream("POST", STREAM, json=body):
            await wait_until(lambda: runtime.active_streams == 1)
            await client.post("/sessions", json={"session_id": "a"})
            await client.post("/sessions", json={"session_id": "b"})  # "busy" is the oldest
            listing = await get_json(client, "/sessions")
            assert sorted(s["id"] for s in listing["sessions"]) == ["b", "busy"]


async def test_recorded_requests_history_and_audit_log_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo_runtime_module, "MAX_RECORDED_REQUESTS", 3)
    monkeypatch.setattr(demo_runtime_module, "MAX_HISTORY_MESSAGES", 4)
    monkeypatch.setattr(demo_runtime_module, "MAX_AUDIT_EVENTS", 5)
    async with serving(FAST) as (runtime, client):
        for index in range(5):
            await turn(client, "s1", user(f"question {index}"))
        assert len(runtime.stream_requests) == len(runtime.stream_headers) == 3
        assert runtime.stream_requests[-1]["message"]["content"] == "question 4"
        history = await get_json(client, "/sessions/s1/history")
        assert [m["content"] for m in history["messages"] if m["role"] == "user"] == [
            "question 3",
            "question 4",
        ]
        log = await get_json(client, "/events/audit-log")
        assert log["total"] == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"internal_api_key": ""},
        {"token_delay": -1},
        {"think_delay": float("nan")},
        {"max_sessions": 0},
        {"max_bench_tokens": 0},
    ],
)
def test_config_is_validated_when_built(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DemoRuntimeConfig(**bad)


async def test_a_request_that_arrives_late_on_a_new_connection_is_still_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Regression (bench/load.py at 2000 sessions): hypercorn arms keep_alive_timeout (5 s by
    # default) when it takes a connection off the accept queue and closes the connection if no
    # request line has been parsed by then. A runtime that has fallen seconds behind a burst of
    # turn starts closed connections whose request was already waiting in the socket, and the
    # gateway could only report runtime_stream_broken. The virtual clock jumps past the old
    # 5 s while the connection is idle; a real loopback connection then sends its request.
    async with serving(FAST) as (_, client):
        port = int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await trio.sleep(30)
            connection = h11.Connection(h11.CLIENT)
            body = orjson.dumps({"session_id": "late", "message": user("bench 3")})
            headers = [
                ("Host", f"127.0.0.1:{port}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                (AUTH, KEY),
            ]
            await stream.send_all(
                connection.send(h11.Request(method="POST", target=STREAM, headers=headers))
                + connection.send(h11.Data(data=body))
                + connection.send(h11.EndOfMessage())
            )
            status = 0
            received = b""
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    received += bytes(event.data)
                else:
                    # EndOfMessage; ConnectionClosed here would mean the runtime hung up first
                    assert isinstance(event, h11.EndOfMessage), event
                    break
    assert status == 200
    chunks = parse_sse(received)
    assert "".join(chunk["token"] for chunk in chunks) == "t0 t1 t2 "
    assert chunks[-1]["is_final"] is True
