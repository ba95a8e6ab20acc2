"""A turn end to end: a client, a real gateway, a real runtime, over loopback."""

from __future__ import annotations

import trio

from trio_gateway.settings import Settings
from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import INTERNAL_KEY, RunningGateway, gateway_settings, run_gateway
from ..support.frames import ide_frame
from ..support.scripted_runtime import Script, ScriptedRuntime, chunk, sse

IDE_FRAME = ide_frame("what is trio?")


async def test_an_answer_streams_token_by_token_in_order(gateway: RunningGateway) -> None:
    async with gateway.connect("plain") as client:
        await client.send({"type": "user_message", "content": "hello there", "role": "user"})
        frames = await client.turn()
    tokens = [f for f in frames if not f["is_final"]]
    assert len(tokens) > 5, "streamed in pieces, not as one block"
    assert all(f["type"] == "assistant_message" for f in frames)
    text = "".join(f["token"] for f in frames)
    assert text.startswith('You asked: "hello there".')
    assert frames[-1]["is_final"] is True


async def test_every_frame_carries_seq_increasing_by_one(gateway: RunningGateway) -> None:
    async with gateway.connect("seq") as client:
        for _ in range(2):
            await client.send({"type": "user_message", "content": "hi", "role": "user"})
            await client.turn()
        await client.send("not json")
        error = await client.recv()
    assert error["type"] == "error"
    # seq continues across turns and covers gateway-made frames too
    assert error["seq"] > 2


async def test_null_keys_are_dropped_from_relayed_chunks(gateway: RunningGateway) -> None:
    async with gateway.connect("nulls") as client:
        await client.send({"type": "user_message", "content": "hi", "role": "user"})
        frames = await client.turn()
    for frame in frames:
        assert None not in frame.values()
        assert "call_id" not in frame  # null in the runtime's chunk


async def test_the_ides_frame_is_forwarded_unchanged_with_every_null_key(
    gateway: RunningGateway, runtime: DemoRuntime
) -> None:
    async with gateway.connect("ide-session") as client:
        await client.send(IDE_FRAME)
        await client.turn()
    body = runtime.stream_requests[-1]
    assert body == {"session_id": "ide-session", "message": IDE_FRAME}
    assert runtime.stream_headers[-1]["x-internal-auth"] == INTERNAL_KEY


async def test_the_coding_flow_with_tool_calls_and_approval(gateway: RunningGateway) -> None:
    async with gateway.connect("coding") as client:
        await client.send(
            {"type": "user_message", "content": "write a hello world in python", "role": "user"}
        )
        first = await client.turn()
        switched = [f for f in first if f["type"] == "agent_switched"]
        assert switched and switched[0]["metadata"]["to_agent"] == "coder"
        read_call = first[-1]
        assert read_call["type"] == "tool_call" and read_call["tool_name"] == "read_file"
        assert read_call["requires_approval"] is False

        await client.send(
            {"type": "tool_result", "call_id": read_call["call_id"], "result": {"content": "# hi"}}
        )
        second = await client.turn()
        write_call = second[-1]
        assert write_call["tool_name"] == "write_file" and write_call["requires_approval"] is True

        await client.send(
            {"type": "tool_result", "call_id": write_call["call_id"], "result": {"ok": True}}
        )
        third = await client.turn()
        assert third[-1]["type"] == "assistant_message"
        assert "hello.py" in "".join(f.get("token", "") for f in third)


async def test_switch_agent_gets_one_final_agent_switched(gateway: RunningGateway) -> None:
    async with gateway.connect("switch") as client:
        await client.send({"type": "switch_agent", "agent_type": "architect", "content": "plan"})
        [frame] = await client.turn()
    assert frame["type"] == "agent_switched" and frame["is_final"] is True


async def test_unknown_chunk_types_are_relayed_not_dropped(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    scripted_runtime.scripts["news"] = Script(
        body=[
            sse(
                chunk(type="session_info", metadata={"model": "x"}),
                chunk(type="plan_created", content="1. do it"),
                chunk(type="status", content="thinking"),
                chunk(type="done", is_final=True),
            )
        ]
    )
    async with run_gateway(nursery, gateway_settings(scripted_runtime.url)) as gw:
        async with gw.connect("news") as client:
            await client.send({"type": "user_message", "content": "news"})
            frames = await client.turn()
    assert [f["type"] for f in frames] == ["session_info", "plan_created", "status", "done"]
    assert frames[0]["metadata"] == {"model": "x"}


async def test_sse_variants_named_events_ids_comments_crlf_and_odd_splits(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    body = (
        b": keep-alive\r\n\r\n"
        b'event: token\r\nid: 1\r\ndata: {"type":"assistant_message",\r\n'
        b'data: "token":"a","is_final":false}\r\n\r\n'
        b'data: {"type":"assistant_message","token":"\xc3\xa9","is_final":false}\n\n'
        b'data: {"type":"assistant_message","token":"!","is_final":true}\r\r'
    )
    # split at every awkward place: inside CRLF, inside a multi-byte character, mid-field
    pieces: list[bytes | float] = []
    for start in range(0, len(body), 7):
        pieces += [body[start : start + 7], 0.001]
    scripted_runtime.scripts["variants"] = Script(body=pieces)
    async with run_gateway(nursery, gateway_settings(scripted_runtime.url)) as gw:
        async with gw.connect("variants") as client:
            await client.send({"type": "user_message", "content": "variants"})
            frames = await client.turn()
    assert "".join(f["token"] for f in frames) == "aé!"


async def test_a_whole_file_in_one_tool_result_reaches_the_runtime_with_default_limits(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    # The IDE answers read_file with the whole file in one frame; 5 MiB is a large source file
    # or log, well under the old gateway's 16 MiB (the default limit here too).
    content = "x" * (5 * 1024 * 1024)
    frame = {"type": "tool_result", "call_id": "call_big", "result": {"content": content}}
    settings = gateway_settings(scripted_runtime.url)
    assert settings.ws_max_message_bytes == Settings.model_fields["ws_max_message_bytes"].default
    async with run_gateway(nursery, settings) as running:
        async with running.connect("big-tool-result") as client:
            await client.send(frame)
            answer = await client.turn(timeout=30)
    assert answer[-1]["type"] == "assistant_message"
    assert scripted_runtime.requests[-1] == {"session_id": "big-tool-result", "message": frame}
