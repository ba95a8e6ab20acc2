"""The demo Agent Runtime, specified by talking to it over real HTTP (docs/compatibility.md §1).

Every test starts the real server (hypercorn on 127.0.0.1:0) and speaks to it with httpx, the
same way the gateway does. Pacing is switched off so the whole file runs in seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Any

import h11
import httpx
import orjson
import pytest
import trio

from trio_gateway.tools.demo_runtime import (
    DemoRuntime,
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)
from trio_gateway.tools.demo_runtime import state as demo_runtime_module

from ..support.frames import CHUNK_FIELDS, ide_frame

KEY = "test-internal-key"
AUTH = "X-Internal-Auth"
STREAM = "/agent/message/stream"
FAST = DemoRuntimeConfig(internal_api_key=KEY, token_delay=0, think_delay=0)
AGENT_TYPES = ["orchestrator", "coder", "architect", "debug", "ask", "universal"]


# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------


@asynccontextmanager
async def serving(
    config: DemoRuntimeConfig,
) -> AsyncIterator[tuple[DemoRuntime, httpx.AsyncClient]]:
    """Serve a fresh runtime on an OS-chosen port; yield it with a client that holds the key."""
    runtime = create_demo_runtime(config)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=stop.wait)
        )
        try:
            # Plain HTTP on loopback: verify=False only skips loading the CA bundle, which
            # costs about 0.25 s per client.
            async with httpx.AsyncClient(
                base_url=binds[0], headers={AUTH: KEY}, timeout=10, verify=False
            ) as client:
                yield runtime, client
        finally:
            stop.set()


@pytest.fixture
async def served() -> AsyncIterator[tuple[DemoRuntime, httpx.AsyncClient]]:
    async with serving(FAST) as pair:
        yield pair


@pytest.fixture
def runtime(served: tuple[DemoRuntime, httpx.AsyncClient]) -> DemoRuntime:
    return served[0]


@pytest.fixture
def client(served: tuple[DemoRuntime, httpx.AsyncClient]) -> httpx.AsyncClient:
    return served[1]


def parse_sse(body: bytes) -> list[dict[str, Any]]:
    """Parse the runtime's SSE body strictly: every event is exactly ``data: <json>\\n\\n``."""
    assert body.endswith(b"\n\n")
    chunks = []
    for event in body.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        assert b"\n" not in event
        chunk = orjson.loads(event[len(b"data: ") :])
        assert set(chunk) == set(CHUNK_FIELDS)  # every field, nulls included
        chunks.append(chunk)
    return chunks


async def turn(client: httpx.AsyncClient, session_id: str, message: dict[str, Any]) -> list[Any]:
    """Stream one turn to the end and return its chunks."""
    body = {"session_id": session_id, "message": message}
    async with client.stream("POST", STREAM, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = await response.aread()
    chunks = parse_sse(raw)
    assert chunks[-1]["is_final"] is True
    assert all(chunk["is_final"] is False for chunk in chunks[:-1])
    return chunks


def user(content: str, **extra: Any) -> dict[str, Any]:
    return {"type": "user_message", "content": content, "role": "user", **extra}


def tool_result(call_id: str, **outcome: Any) -> dict[str, Any]:
    return {"type": "tool_result", "call_id": call_id, **outcome}


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["token"] for c in chunks if c["type"] == "assistant_message")


def assert_words(chunks: list[dict[str, Any]]) -> None:
    """Streamed words: non-final assistant messages whose token == content == word + space."""
    assert chunks
    for chunk in chunks:
        assert chunk["type"] == "assistant_message"
        assert chunk["is_final"] is False
        assert chunk["token"] == chunk["content"]
        assert chunk["token"].endswith(" ") and chunk["token"].strip()


def assert_final_message(chunk: dict[str, Any]) -> None:
    assert chunk["type"] == "assistant_message"
    assert chunk["is_final"] is True
    assert chunk["token"] == "" and chunk["content"] == ""


async def get_json(client: httpx.AsyncClient, path: str, status: int = 200, **params: Any) -> Any:
    response = await client.get(path, params=params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a runtime counter (the runtime offers no event to wait on), for up to 5 s."""
    for _ in range(1000):
        if condition():
            return
        await trio.sleep(0.005)
    raise AssertionError("condition not reached within 5 s")


async def start_coding(client: httpx.AsyncClient, session_id: str) -> str:
    """Run the first coding turn; return the read_file call id."""
    chunks = await turn(client, session_id, user("Write a hello world script"))
    return str(chunks[-1]["call_id"])


async def reach_write_approval(client: httpx.AsyncClient, session_id: str) -> str:
    """Run the coding flow up to the write_file call that needs approval; return its id."""
    read_call = await start_coding(client, session_id)
    chunks = await turn(client, session_id, tool_result(read_call, result="# Demo"))
    return str(chunks[-1]["call_id"])


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
# Streaming a turn
# --------------------------------------------------------------------------------------------


async def test_plain_question_streams_words_then_an_empty_final_message(
    client: httpx.AsyncClient, runtime: DemoRuntime
) -> None:
    # The IDE sends all 15 fields of its model, nulls included: they must be accepted.
    frame = ide_frame("What is a monad?")
    *words, final = await turn(client, "s1", frame)

    assert_words(words)
    assert "What is a monad?" in text_of(words)
    assert_final_message(final)
    assert runtime.completed_streams == 1 and runtime.active_streams == 0

    # The runtime records exactly what it received, for the gateway's tests.
    assert runtime.stream_requests == [{"session_id": "s1", "message": frame}]
    assert runtime.stream_headers[0][AUTH.lower()] == KEY
    assert runtime.stream_headers[0]["content-type"] == "application/json"

    history = await get_json(client, "/sessions/s1/history")
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", "What is a monad?"),
        ("assistant", text_of(words).strip()),
    ]


async def test_coding_flow_end_to_end(client: httpx.AsyncClient) -> None:
    # 1. A coding request switches to the coder, streams a sentence and asks to read README.md.
    switch, *words, read_call = await turn(client, "s1", user("Please WRITE a hello script"))
    assert switch["type"] == "agent_switched"
    assert switch["is_final"] is False
    assert switch["content"] == "Switching to coder agent"
    assert switch["metadata"] == {
        "from_agent": "orchestrator",
        "to_agent": "coder",
        "reason": switch["metadata"]["reason"],
        "confidence": 0.9,
    }
    assert_words(words)
    assert read_call["type"] == "tool_call"
    assert read_call["is_final"] is True
    assert read_call["tool_name"] == "read_file"
    assert read_call["arguments"] == {"path": "README.md"}
    assert read_call["requires_approval"] is False
    assert read_call["call_id"].startswith("call_")
    assert (await get_json(client, "/sessions/s1/pending-approvals"))["count"] == 0

    # 2. The file's content comes back: the coder asks, with approval, to write hello.py.
    result = tool_result(read_call["call_id"], result={"content": "# Demo"})
    *words, write_call = await turn(client, "s1", result)
    assert_words(words)
    assert write_call["type"] == "tool_call"
    assert write_call["is_final"] is True
    assert write_call["tool_name"] == "write_file"
    assert write_call["arguments"] == {"path": "hello.py", "content": 'print("Hello, world!")\n'}
    assert write_call["requires_approval"] is True
    assert write_call["call_id"] not in (None, read_call["call_id"])

    approvals = await get_json(client, "/sessions/s1/pending-approvals")
    assert approvals["session_id"] == "s1"
    assert approvals["count"] == 1
    (approval,) = approvals["pending_approvals"]
    assert set(approval) == {
        "request_id",
        "request_type",
        "subject",
        "details",
        "reason",
        "created_at",
        "call_id",
        "tool_name",
        "arguments",
    }
    assert approval["request_type"] == "tool_call"
    assert approval["call_id"] == write_call["call_id"]
    assert approval["tool_name"] == "write_file"
    assert approval["arguments"] == write_call["arguments"]

    # 3. The IDE wrote the file: the coder reports it and the turn ends with a final message.
    *words, final = await turn(client, "s1", tool_result(write_call["call_id"], result="ok"))
    assert_words(words)
    assert text_of(words).startswith("Done: wrote hello.py")
    assert_final_message(final)
    assert (await get_json(client, "/sessions/s1/pending-approvals"))["count"] == 0

    history = await get_json(client, "/sessions/s1/history")
    assert [m["role"] for m in history["messages"]] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert history["current_agent"] == "coder"
    assert [(h["from_agent"], h["to_agent"]) for h in history["agent_history"]] == [
        ("orchestrator", "coder")
    ]


async def test_a_second_coding_request_does_not_switch_again(client: httpx.AsyncClient) -> None:
    await start_coding(client, "s1")
    chunks = await turn(client, "s1", user("Now refactor it"))
    assert [c["type"] for c in chunks if c["type"] != "assistant_message"] == ["tool_call"]


async def test_the_ides_rejection_of_a_write_is_acknowledged(client: httpx.AsyncClient) -> None:
    write_call = await reach_write_approval(client, "s1")
    rejection = tool_result(write_call, error="User rejected the change")
    *words, final = await turn(client, "s1", rejection)
    assert_words(words)
    assert "did not write hello.py" in text_of(words)
    assert "User rejected the change" in text_of(words)
    assert_final_message(final)
    assert (await get_json(client, "/sessions/s1/pending-approvals"))["count"] == 0


@pytest.mark.parametrize(
    ("decision", "extra", "expected"),
    [
        ("approve", {}, "Done: wrote hello.py"),
        ("edit", {"modified_arguments": {"path": "hi.py"}}, "Done: wrote hi.py"),
        ("reject", {"feedback": "Not now"}, "did not write hello.py (Not now)"),
    ],
)
async def test_hitl_decision_answers_a_pending_approval(
    client: httpx.AsyncClient, decision: str, extra: dict[str, Any], expected: str
) -> None:
    write_call = await reach_write_approval(client, "s1")
    message = {"type": "hitl_decision", "call_id": write_call, "decision": decision, **extra}
    *words, final = await turn(client, "s1", message)
    assert expected in text_of(words)
    assert_final_message(final)
    assert (await get_json(client, "/sessions/s1/pending-approvals"))["count"] == 0


async def test_switch_agent_is_one_final_agent_switched_chunk(client: httpx.AsyncClient) -> None:
    message = {"type": "switch_agent", "agent_type": "debug", "reason": "It crashes"}
    (chunk,) = await turn(client, "s1", message)
    assert chunk["type"] == "agent_switched"
    assert chunk["is_final"] is True
    assert chunk["metadata"] == {
        "from_agent": "orchestrator",
        "to_agent": "debug",
        "reason": "It crashes",
        "confidence": 1.0,
    }
    context = (await get_json(client, "/agents/s1/current"))["context"]
    assert context == {"session_id": "s1", "current_agent": "debug", "switch_count": 1}


async def test_user_message_agent_type_picks_the_agent(client: httpx.AsyncClient) -> None:
    switch, *_ = await turn(client, "s1", user("What now?", agent_type="ask"))
    assert switch["type"] == "agent_switched"
    assert switch["metadata"]["to_agent"] == "ask"
    assert switch["is_final"] is False
    assert (await get_json(client, "/agents/s1/current"))["context"]["current_agent"] == "ask"


async def test_bench_streams_n_numbered_tokens_without_metadata_when_unpaced(
    client: httpx.AsyncClient, runtime: DemoRuntime
) -> None:
    *tokens, final = await turn(client, "s1", user("bench 50"))
    assert [c["token"] for c in tokens] == [f"t{i} " for i in range(50)]
    for chunk in tokens:
        assert chunk["type"] == "assistant_message"
        assert chunk["content"] == chunk["token"]
        assert chunk["metadata"] is None  # so a gateway may coalesce them
    assert_final_message(final)
    # No agent switch, and only a short summary in the history.
    history = await get_json(client, "/sessions/s1/history")
    assert history["current_agent"] == "orchestrator"
    assert len(history["messages"]) == 2
    assert len(history["messages"][1]["content"]) < 100


async def test_bench_with_a_rate_follows_an_absolute_schedule(client: httpx.AsyncClient) -> None:
    # 11 tokens at 100 tokens/s: token i is due at start + i/100 s, so the last at +100 ms.
    *tokens, _ = await turn(client, "s1", user("bench 11 100"))
    assert [c["metadata"]["index"] for c in tokens] == list(range(11))
    emitted = [c["metadata"]["emitted_ns"] for c in tokens]
    assert emitted == sorted(emitted)
    span = (emitted[-1] - emitted[0]) / 1e9
    assert 0.095 <= span < 1.0


async def test_instant_mode_skips_every_delay_but_streams_everything() -> None:
    # Default (realistic) delays, switched off by instant: a coding turn would otherwise take
    # 0.2 s of thinking plus 0.03 s per word.
    async with serving(DemoRuntimeConfig(internal_api_key=KEY, instant=True)) as (_, fast):
        started = trio.current_time()
        await start_coding(fast, "s1")
        assert trio.current_time() - started < 0.2

        *tokens, final = await turn(fast, "s2", user("bench 500"))
        assert [c["token"] for c in tokens] == [f"t{i} " for i in range(500)]
        assert_final_message(final)


# --------------------------------------------------------------------------------------------
# Errors before the stream: plain HTTP
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[1, 2]",
        b'{"message": {"type": "user_message", "content": "hi"}}',
        b'{"session_id": "", "message": {"type": "user_message", "content": "hi"}}',
        b'{"session_id": 7, "message": {"type": "user_message", "content": "hi"}}',
        b'{"session_id": "s1"}',
        b'{"session_id": "s1", "message": "hi"}',
        b'{"session_id": "s1", "message": {"content": "hi"}}',
        b'{"session_id": "s1", "message": {"type": 3}}',
        b'{"session_id": "s1", "message": {"type": "user_message", "content": null}}',
    ],
)
async def test_a_bad_body_is_422(
    client: httpx.AsyncClient, runtime: DemoRuntime, body: bytes
) -> None:
    headers = {"content-type": "application/json"}
    response = await client.post(STREAM, content=body, headers=headers)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)
    assert runtime.completed_streams == runtime.cancelled_streams == 0


@pytest.mark.parametrize(
    "message",
    [
        {"type": "telepathy"},
        {"type": "tool_result", "result": "no call id"},
        {"type": "tool_result", "call_id": "", "result": "empty call id"},
        {"type": "tool_result", "call_id": "call_unknown", "result": "x"},
        {"type": "hitl_decision", "call_id": "call_unknown", "decision": "approve"},
        {"type": "hitl_decision", "decision": "approve"},
        {"type": "hitl_decision", "call_id": "call_unknown", "decision": ["approve"]},
        {"type": "switch_agent", "agent_type": "wizard"},
        {"type": "switch_agent"},
        {"type": "switch_agent", "agent_type": ["coder"]},
        {"type": "user_message", "content": "hi", "agent_type": "wizard"},
        {"type": "user_message", "content": "hi", "agent_type": {"name": "coder"}},
        {"type": "user_message", "content": "bench 0"},
        {"type": "user_message", "content": "bench 1000001"},
        {"type": "user_message", "content": "bench many"},
        {"type": "user_message", "content": "bench 5 -1"},
        {"type": "user_message", "content": "bench 5 nan"},
        {"type": "user_message", "content": "bench 1 2 3"},
    ],
)
async def test_an_unacceptable_message_is_400(
    client: httpx.AsyncClient, runtime: DemoRuntime, message: dict[str, Any]
) -> None:
    response = await client.post(STREAM, json={"session_id": "s1", "message": message})
    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)
    assert runtime.completed_streams == runtime.cancelled_streams == 0


async def test_tool_results_must_match_a_pending_call_of_that_session(
    client: httpx.AsyncClient,
) -> None:
    read_call = await start_coding(client, "s1")

    # Another session cannot answer it.
    other = {"session_id": "s2", "message": tool_result(read_call, result="x")}
    assert (await client.post(STREAM, json=other)).status_code == 400

    # read_file needs no approval, so a hitl_decision for it is refused.
    decision = {"type": "hitl_decision", "call_id": read_call, "decision": "approve"}
    response = await client.post(STREAM, json={"session_id": "s1", "message": decision})
    assert response.status_code == 400

    # Answered once, the call is no longer pending.
    await turn(client, "s1", tool_result(read_call, result="x"))
    again = {"session_id": "s1", "message": tool_result(read_call, result="x")}
    assert (await client.post(STREAM, json=again)).status_code == 400


# --------------------------------------------------------------------------------------------
# Cancellation and one turn at a time
# --------------------------------------------------------------------------------------------


async def test_a_client_that_goes_away_cancels_the_turn(
    client: httpx.AsyncClient, runtime: DemoRuntime
) -> None:
    body = {"session_id": "s1", "message": user("bench 100000 1000")}  # 100 s if left alone
    async with client.stream("POST", STREAM, json=body) as response:
        # aiter_lines() is an async generator (typed as an iterator): close it, do not leak it.
        async with aclosing(response.aiter_lines()) as lines:  # type: ignore[type-var]
            async for line in lines:
                if line.startswith("data: ") and '"index":3' in line:
                    break
        assert runtime.active_streams == 1
    # Leaving the block closes the connection mid-stream.
    await wait_until(lambda: runtime.active_streams == 0)
    assert runtime.cancelled_streams == 1
    assert runtime.completed_streams == 0

    # The session is not left locked: the next turn runs normally.
    await turn(client, "s1", user("still there?"))
    assert runtime.completed_streams == 1
    metrics = await get_json(client, "/events/metrics")
    assert metrics["streams"] == {"started": 2, "completed": 1, "cancelled": 1, "active": 0}


async def emitted_times(
    client: httpx.AsyncClient, session_id: str, content: str, into: list[list[int]]
) -> None:
    *tokens, _ = await turn(client, session_id, user(content))
    into.append([c["metadata"]["emitted_ns"] for c in tokens])


async def two_turns_at_once(
    client: httpx.AsyncClient, sessions: tuple[str, str], content: str
) -> list[list[int]]:
    """Two turns started together (one per entry of ``sessions``): their token times, the
    turn whose first token came first, first."""
    runs: list[list[int]] = []
    async with trio.open_nursery() as nursery:
        for session_id in sessions:
            nursery.start_soon(emitted_times, client, session_id, content, runs)
    return sorted(runs)


async def test_turns_of_one_session_run_one_at_a_time(client: httpx.AsyncClient) -> None:
    first, second = await two_turns_at_once(client, ("s1", "s1"), "bench 20 200")
    assert len(first) == len(second) == 20
    assert first[-1] < second[0]  # no interleaving


async def test_turns_of_different_sessions_run_concurrently(client: httpx.AsyncClient) -> None:
    first, second = await two_turns_at_once(client, ("s1", "s2"), "bench 20 100")
    assert second[0] < first[-1]  # overlapping


async def test_a_call_consumed_while_queued_ends_with_an_error_chunk(
    client: httpx.AsyncClient, runtime: DemoRuntime
) -> None:
    read_call = await start_coding(client, "s1")
    outcomes: list[list[dict[str, Any]]] = []

    async def answer() -> None:
        outcomes.append(await turn(client, "s1", tool_result(read_call, result="x")))

    async with trio.open_nursery() as nursery:
        # Keep the session busy so both answers pass validation and queue for the lock.
        nursery.start_soon(turn, client, "s1", user("bench 10 40"))
        await wait_until(lambda: runtime.active_streams == 1)
        nursery.start_soon(answer)
        nursery.start_soon(answer)
    kinds = sorted(chunks[-1]["type"] for chunks in outcomes)
    assert kinds == ["error", "tool_call"]
    (error,) = [chunks for chunks in outcomes if chunks[-1]["type"] == "error"]
    assert error[-1]["error"] == "The tool call is no longer pending"


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
