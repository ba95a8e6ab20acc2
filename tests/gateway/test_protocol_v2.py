"""Protocol v2 (subprotocol codelab.v2): new frame types only for clients that ask for them."""

from __future__ import annotations

import trio

from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import RunningGateway, gateway_settings, run_gateway
from ..support.scripted_runtime import Script, ScriptedRuntime


async def test_the_subprotocol_is_echoed_and_session_ready_comes_first(
    gateway: RunningGateway,
) -> None:
    async with gateway.connect("v2-ready", v2=True) as client:
        assert client.ws.subprotocol == "codelab.v2"
        ready = await client.recv()
    assert ready["type"] == "session_ready"
    assert ready["session_id"] == "v2-ready" and ready["protocol"] == "codelab.v2"
    assert "seq" not in ready, "connection frames are not numbered (never replayed)"
    assert ready["last_seq"] == 0
    assert ready["heartbeat_interval"] == gateway.settings.ws_heartbeat_interval


async def test_turns_are_framed_by_turn_started_and_turn_finished(gateway: RunningGateway) -> None:
    async with gateway.connect("v2-turns", v2=True) as client:
        await client.recv()
        await client.send({"type": "user_message", "content": "bench 3"})
        frames = await client.recv_until(lambda f: f["type"] == "turn_finished")
    assert frames[0] == {
        "type": "turn_started",
        "turn_id": 1,
        "message_type": "user_message",
        "seq": frames[0]["seq"],
    }
    assert [f["type"] for f in frames[1:-1]] == ["assistant_message"] * 4
    assert frames[-1]["status"] == "completed" and frames[-1]["turn_id"] == 1


async def test_a_cancelled_turn_finishes_as_cancelled_with_an_ack(gateway: RunningGateway) -> None:
    async with gateway.connect("v2-cancel", v2=True) as client:
        await client.recv()
        await client.send({"type": "user_message", "content": "bench 100000 100"})
        await client.recv_until(lambda f: f["type"] == "assistant_message")
        await client.send({"type": "cancel"})
        frames = await client.recv_until(lambda f: f["type"] == "turn_finished")
    ack = next(f for f in frames if f["type"] == "cancel_ack")
    assert ack["turn_cancelled"] is True and ack["dropped_messages"] == 0
    assert frames[-1]["status"] == "cancelled"
    assert any(f.get("code") == "cancelled" for f in frames)


async def test_a_failed_turn_finishes_as_failed(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    scripted_runtime.scripts["fail"] = Script(status=500, body=[b"{}"])
    async with run_gateway(nursery, gateway_settings(scripted_runtime.url)) as gw:
        async with gw.connect("v2-fail", v2=True) as client:
            await client.recv()
            await client.send({"type": "user_message", "content": "fail"})
            frames = await client.recv_until(lambda f: f["type"] == "turn_finished")
    assert [f["type"] for f in frames] == ["turn_started", "error", "turn_finished"]
    assert frames[-1]["status"] == "failed"


async def test_ping_gets_pong_with_the_same_id(gateway: RunningGateway) -> None:
    async with gateway.connect("v2-ping", v2=True) as client:
        await client.recv()
        await client.send({"type": "ping", "id": "abc"})
        pong = await client.recv()
    assert pong["type"] == "pong" and pong["id"] == "abc"


async def test_v1_clients_get_none_of_the_v2_frames(
    gateway: RunningGateway, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    async with gateway.connect("v1-only") as client:
        assert client.ws.subprotocol is None
        await client.send({"type": "ping"})
        await client.send({"type": "user_message", "content": "bench 2"})
        frames = await client.turn()
        await client.send({"type": "cancel"})
        await client.send({"type": "user_message", "content": "bench 1"})
        frames += await client.turn()
    assert {f["type"] for f in frames} == {"assistant_message"}
