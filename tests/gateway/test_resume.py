"""Resume (protocol v2): a client that reconnects says where it stopped and loses nothing.

The exactness test cuts the client's TCP connection (a reset, no close frame, unread data
dropped by the kernel) at random points of long streamed turns, many times, and checks that
the tokens it assembles across all its connections are exactly what the runtime sent.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import GatewayWith, RunningGateway, gateway_settings, port_of, run_gateway, wait_for
from ..support.rawws import RawWebSocket
from ..support.resume import ResumingClient
from ..support.scripted_runtime import Script, ScriptedRuntime, chunk, sse


async def new_session(
    gw: RunningGateway, session_id: str, first_message: str | None = None
) -> ResumingClient:
    """A resuming client on a fresh session of ``gw``, ``first_message`` sent if given."""
    client = ResumingClient(port_of(gw.base_url), session_id)
    await client.connect(resume=False)
    if first_message is not None:
        await client.send({"type": "user_message", "content": first_message})
    return client


# 18,000 tokens and hundreds of reconnects: about a minute alone, but more than the suite's
# 120 s on a loaded machine, where pytest-timeout's signal then lands inside trio and ends the
# run with TrioInternalError. Every wait in the test is bounded on its own (10 s per frame, and
# that failure prints the gateway's task tree), so a wedge still fails fast.
@pytest.mark.timeout(300)
async def test_tokens_are_exact_across_many_random_cuts_in_long_turns(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    rng = random.Random(20261127)
    turns, tokens_per_turn = 3, 6000
    cuts = 0
    # Room for a whole turn while detached: this test is about replay, not about overflow
    # (test_lifecycle covers a detached turn that overflows: resync_required).
    async with gateway_with(
        session_grace_seconds=10,
        resume_wait_seconds=5,
        outbound_queue_max_bytes=8 * 1024 * 1024,
        ws_heartbeat_interval=30,  # a loaded machine must not turn a slow read into a timeout
        # Hundreds of cuts, each reconnecting at once: far beyond any real client's reconnects.
        ws_handshakes_per_second=10_000,
    ) as gw:
        client = await new_session(gw, "resume-exact")
        for turn in range(turns):
            await client.send({"type": "user_message", "content": f"bench {tokens_per_turn}"})

            # Counted over every frame processed: turn_finished may come among the frames
            # replayed before "resumed" as well as live.
            while client.turns_finished < turn + 1:
                # Read a random number of frames, then vanish mid-stream (often in the
                # middle of a burst the writer coalesced, with more frames in flight).
                for _ in range(rng.randint(1, 40)):
                    await client.next()
                    if client.turns_finished == turn + 1:
                        break
                if client.turns_finished == turn + 1:
                    break
                await client.cut()
                cuts += 1
                await trio.sleep(rng.choice([0, 0, 0.001, 0.01]))
                await client.connect(resume=True)
                resumed = await client.until("resumed")
                assert resumed["from_seq"] <= client.last_seq + 1
            # The runtime counts a stream once its generator has ended, which may be a
            # moment after the gateway relayed the final chunk: wait for it, bounded.
            with trio.fail_after(8):
                while runtime.completed_streams != turn + 1:
                    await trio.sleep(0.01)
    expected = "".join(f"t{i} " for i in range(tokens_per_turn)) * turns
    assert cuts >= 10
    assert not [f for f in client.control if f["type"] == "resync_required"]
    assert client.tokens() == expected, "every token once, in order, across every cut"
    finals = [f for f in client.frames if f["type"] == "assistant_message" and f["is_final"]]
    assert len(finals) == turns


async def test_resume_replays_the_missed_frames_then_says_resumed(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(session_grace_seconds=10) as gw:
        client = await new_session(gw, "resume-replay", "bench 50")
        await client.until("turn_started")
        seen = client.last_seq
        # Stop reading (frames are accepted by the socket, never processed), then vanish.
        await wait_for(lambda: runtime.completed_streams == 1)
        await client.cut()
        ready = await client.connect(resume=True)
        assert ready["last_seq"] > seen and ready["reattached"] is False
        resumed = await client.until("resumed")
        replayed = [f for f in client.frames if f["seq"] > seen]
        if client.frames[-1]["type"] != "turn_finished":  # the rest may still come live
            await client.until("turn_finished")
    assert resumed == {"type": "resumed", "from_seq": seen + 1, "replayed": len(replayed)}
    assert len(replayed) > 1
    assert client.tokens() == "".join(f"t{i} " for i in range(50))


async def test_a_client_ahead_of_the_session_is_told_to_resync_then_continues_live(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with() as gw:
        client = ResumingClient(port_of(gw.base_url), "resume-ahead")
        client.last_seq = 500  # e.g. a session of another gateway process that restarted
        await client.connect(resume=True)
        resync = await client.recv()
        await client.send({"type": "user_message", "content": "bench 2"})
        live = await client.recv()
    assert resync == {"type": "resync_required", "reason": "unknown_seq"}
    assert live["type"] == "turn_started" and live["seq"] == 1


async def test_frames_evicted_from_the_replay_buffer_mean_resync_never_a_partial_replay(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(replay_max_frames=5, session_grace_seconds=10) as gw:
        client = await new_session(gw, "resume-evicted", "bench 200 2000")
        await client.until("turn_started")
        await wait_for(lambda: runtime.completed_streams == 1)
        await client.cut()
        await client.connect(resume=True)
        resync = await client.recv()
    assert resync == {"type": "resync_required", "reason": "frames_expired"}


async def test_resume_is_refused_on_v1_and_after_the_first_frame(gateway_with: GatewayWith) -> None:
    async with gateway_with() as gw:
        port = port_of(gw.base_url)
        v1 = await RawWebSocket.connect(port, "/api/v1/ws/resume-v1")
        await v1.send_json({"type": "resume", "last_seq": 0})
        v1_error = await v1.recv_json()
        client = await new_session(gw, "resume-late")
        await client.send({"type": "ping"})
        await client.send({"type": "resume", "last_seq": 0})
        pong, late_error = await client.recv(), await client.recv()
        await client.send({"type": "resume", "last_seq": -1})
        invalid = await client.recv()
    assert v1_error["code"] == "invalid_message" and "v2" in v1_error["error"]
    assert pong["type"] == "pong"
    assert late_error["code"] == "invalid_message" and "first frame" in late_error["error"]
    assert invalid["code"] == "invalid_message"


async def test_a_resume_on_a_fresh_session_is_answered_even_without_history(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with() as gw:
        client = ResumingClient(port_of(gw.base_url), "resume-fresh")
        await client.connect(resume=True)
        resumed = await client.recv()
    assert resumed == {"type": "resumed", "from_seq": 1, "replayed": 0}


@pytest.fixture
async def approval_gw(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> AsyncIterator[RunningGateway]:
    """A gateway (10 s of grace) in front of a runtime that, told "write it", asks after 0.3 s
    for approval of a tool call (``call_1``)."""
    call = chunk(
        type="tool_call",
        call_id="call_1",
        tool_name="write_file",
        arguments={"path": "x.py"},
        requires_approval=True,
        is_final=True,
    )
    scripted_runtime.scripts["write it"] = Script(body=[0.3, sse(call)])
    settings = gateway_settings(scripted_runtime.url, session_grace_seconds=10)
    async with run_gateway(nursery, settings) as gw:
        yield gw


async def test_an_approval_asked_while_detached_reaches_the_resumed_client_and_is_answered_once(
    approval_gw: RunningGateway, scripted_runtime: ScriptedRuntime
) -> None:
    client = await new_session(approval_gw, "resume-approval", "write it")
    await client.until("turn_started")
    await client.cut()  # gone before the runtime asks for approval
    await wait_for(lambda: scripted_runtime.open_streams == 0 and not gw_turns(approval_gw))
    await client.connect(resume=True)
    await client.until("resumed")
    call = await client.until("tool_call")
    answer = {"type": "tool_result", "call_id": "call_1", "result": {"ok": True}}
    await client.send(answer)
    await client.until("turn_finished")  # the tool_call's turn
    await client.until("turn_finished")  # the turn the answer started
    await client.send(answer)
    duplicate = await client.until("error")
    assert call["requires_approval"] is True and call["call_id"] == "call_1"
    assert duplicate["code"] == "already_answered" and duplicate["call_id"] == "call_1"
    forwarded = [r for r in scripted_runtime.requests if r["message"]["type"] == "tool_result"]
    assert len(forwarded) == 1, "the second answer never reached the runtime"


def gw_turns(gw: Any) -> list[object]:
    """Sessions of ``gw`` with a turn running."""
    return [s for s in gw.app.gateway.sessions.sessions.values() if s.turn_running]


async def test_a_client_that_must_resync_gets_the_unanswered_approval_again(
    approval_gw: RunningGateway,
) -> None:
    client = await new_session(approval_gw, "resync-approval", "write it")
    first = await client.until("tool_call")
    await client.until("turn_finished")
    await client.cut()
    client.last_seq = 10_000  # cannot be replayed: resync
    await client.connect(resume=True)
    resync = await client.recv()
    again = await client.recv()
    assert resync["type"] == "resync_required"
    assert again["type"] == "tool_call" and again["call_id"] == first["call_id"]


async def test_an_idle_sessions_replay_buffer_empties_after_the_grace_period(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with(session_grace_seconds=1) as gw:
        async with gw.connect("quiet-after-burst") as client:
            await client.send({"type": "user_message", "content": "bench 50"})
            await client.turn()
            sessions = gw.app.gateway.sessions
            assert sessions is not None
            session = sessions.sessions["quiet-after-burst"]
            assert len(session.replay) > 0
            # No frame is appended any more, yet the frames age out (swept, not only on append).
            await wait_for(lambda: len(session.replay) == 0, timeout=10)
            assert session.replay.size == 0
