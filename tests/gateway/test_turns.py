"""One turn at a time per session: a bounded FIFO behind it, busy beyond, and cancel."""

from __future__ import annotations

import trio

from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import GatewayWith, RunningGateway, gateway_settings, run_gateway
from ..support.scripted_runtime import Script, ScriptedRuntime, chunk, sse


async def test_messages_sent_during_a_turn_wait_and_run_in_order(
    gateway: RunningGateway, runtime: DemoRuntime
) -> None:
    async with gateway.connect("fifo") as client:
        await client.send({"type": "user_message", "content": "bench 200 2000"})
        await client.send({"type": "user_message", "content": "bench 3"})
        await client.send({"type": "user_message", "content": "bench 2"})
        first, second, third = (await client.turn(), await client.turn(), await client.turn())
    assert len(first) == 201 and len(second) == 4 and len(third) == 3
    assert [r["message"]["content"] for r in runtime.stream_requests[-3:]] == [
        "bench 200 2000",
        "bench 3",
        "bench 2",
    ]


async def test_the_runtime_never_sees_two_streams_of_one_session_at_once(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    scripted_runtime.scripts["slow"] = Script(
        body=[0.2, sse(chunk(type="assistant_message", token="x", content="x", is_final=True))]
    )
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, scripted_runtime.open_streams)
            await trio.sleep(0.005)

    nursery.start_soon(watch)
    async with run_gateway(nursery, gateway_settings(scripted_runtime.url)) as gw:
        async with gw.connect("one-at-a-time") as client:
            for _ in range(3):
                await client.send({"type": "user_message", "content": "slow"})
            for _ in range(3):
                await client.turn()
    assert peak == 1


async def test_beyond_the_queue_limit_the_client_gets_busy(gateway_with: GatewayWith) -> None:
    async with gateway_with(max_queued_messages=2) as gw:
        async with gw.connect("busy") as client:
            await client.send({"type": "user_message", "content": "bench 50 100"})
            await client.recv()  # its first token: the first message is now the running turn
            for n in range(3):
                await client.send({"type": "user_message", "content": f"bench {n + 1}"})
            frames = await client.recv_until(lambda f: f.get("code") == "busy")
            busy = frames[-1]
            assert busy["is_final"] is False and "2" in busy["content"]
            # the running turn and the two queued ones all complete
            await client.turn()
            assert len(await client.turn()) == 2
            assert len(await client.turn()) == 3


async def test_cancel_stops_the_running_turn_closes_the_runtime_stream_and_drops_the_queue(
    gateway: RunningGateway, runtime: DemoRuntime
) -> None:
    async with gateway.connect("cancel") as client:
        await client.send({"type": "user_message", "content": "bench 100000 200"})
        await client.send({"type": "user_message", "content": "bench 5"})
        await client.recv()  # streaming has started
        await client.send({"type": "cancel"})
        frames = await client.recv_until(lambda f: f["type"] == "error")
        cancelled = frames[-1]
        assert cancelled["code"] == "cancelled" and cancelled["is_final"] is True
        with trio.fail_after(5):
            while runtime.active_streams:
                await trio.sleep(0.01)
        assert runtime.cancelled_streams == 1
        # the queued "bench 5" was dropped; the session takes new messages at once
        await client.send({"type": "user_message", "content": "bench 1"})
        after = await client.turn()
        assert [f.get("token") for f in after] == ["t0 ", ""]
    assert runtime.stream_requests[-1]["message"]["content"] == "bench 1"
    assert all(r["message"]["content"] != "bench 5" for r in runtime.stream_requests)


async def test_cancel_with_nothing_running_is_harmless(gateway: RunningGateway) -> None:
    async with gateway.connect("cancel-idle") as client:
        await client.send({"type": "cancel"})
        await client.send({"type": "user_message", "content": "hi"})
        frames = await client.turn()
    assert all(f["type"] == "assistant_message" for f in frames)
