"""The demo Agent Runtime's turns over real HTTP (docs/compatibility.md §1): what a turn streams
(plain questions, the coding flow with tool calls and approvals, agent switches, bench mode), the
plain-HTTP errors before a stream starts, and cancellation with one turn at a time per session.
"""

# The runtime fixtures are demo_runtime_harness's, imported by name (pytest finds fixtures in a
# module's namespace); parameters of the same names are what ruff's F811 sees.
# ruff: noqa: F811

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import httpx
import pytest
import trio

from trio_gateway.tools.demo_runtime import (
    DemoRuntime,
    DemoRuntimeConfig,
)

from ..support.frames import ide_frame
from .demo_runtime_harness import (  # noqa: F401 - fixtures
    AUTH,
    KEY,
    STREAM,
    client,
    get_json,
    runtime,
    served,
    serving,
    start_coding,
    tool_result,
    turn,
    user,
    wait_until,
)

# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------


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


async def reach_write_approval(client: httpx.AsyncClient, session_id: str) -> str:
    """Run the coding flow up to the write_file call that needs approval; return its id."""
    read_call = await start_coding(client, session_id)
    chunks = await turn(client, session_id, tool_result(read_call, result="# Demo"))
    return str(chunks[-1]["call_id"])


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
