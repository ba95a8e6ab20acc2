"""Graceful drain: 503 for newcomers, running turns finish, every session closes with 1012."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
import trio_websocket

from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import INTERNAL_KEY, GatewayWith, WsClient, close_code
from ..support.processes import child_env, spawned


async def read_until_close(client: WsClient) -> tuple[list[dict[str, object]], int]:
    frames = []
    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        while True:
            frames.append(await client.recv())
    return frames, close_code(closed.value)


async def test_a_running_turn_finishes_then_the_session_closes_with_1012(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(drain_timeout=10) as gw:
        async with gw.connect("busy") as busy, gw.connect("idle") as idle:
            await busy.send({"type": "user_message", "content": "bench 40 40"})
            await busy.recv()
            gw.stop.set()
            _, idle_code = await read_until_close(idle)
            assert idle_code == 1012
            # newcomers are refused while the drain runs
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket.open_websocket_url(gw.ws_url("late")):
                    pass
            assert rejected.value.status_code == 503
            frames, code = await read_until_close(busy)
            assert frames[-1]["is_final"] is True and len(frames) == 40
            assert code == 1012
        with trio.fail_after(5):
            await gw.stopped.wait()
    assert runtime.completed_streams == 1 and runtime.cancelled_streams == 0


async def test_turns_still_running_at_the_drain_timeout_are_cancelled(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(drain_timeout=0.5) as gw:
        async with gw.connect("long") as client:
            await client.send({"type": "user_message", "content": "bench 100000 100"})
            await client.recv()
            started = trio.current_time()
            gw.stop.set()
            _, code = await read_until_close(client)
            assert code == 1012
            assert trio.current_time() - started < 3
        with trio.fail_after(5):
            await gw.stopped.wait()
    assert runtime.active_streams == 0 and runtime.cancelled_streams == 1


async def test_sigterm_drains_and_the_process_exits_0(
    demo_runtime: tuple[DemoRuntime, str], tmp_path: Path
) -> None:
    env = child_env(INTERNAL_KEY, agent_url=demo_runtime[1], drain_timeout="5")
    with spawned("gateway", ["serve"], env, tmp_path) as gateway:
        await gateway.wait_healthy(20)
        async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{gateway.port}/api/v1/ws/sigterm"
        ) as ws:
            client = WsClient(ws)
            await client.send({"type": "user_message", "content": "bench 20 40"})
            await client.recv()
            gateway.process.send_signal(signal.SIGTERM)
            frames, code = await read_until_close(client)
        assert code == 1012
        assert frames[-1]["is_final"] is True, "the running turn finished before the close"
        with trio.fail_after(15):
            assert await gateway.wait_exit() == 0
