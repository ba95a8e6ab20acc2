"""Session lifetimes: grace after a disconnect, re-attach, replacement, teardown, crashes."""

from __future__ import annotations

import pytest
import trio_websocket

from trio_gateway.protocol import parse_client_frame
from trio_gateway.session import connection as session_module
from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import (
    GatewayWith,
    RunningGateway,
    close_code,
    task_names,
    wait_for,
)


def gateway_tasks() -> list[str]:
    """Names of every live task running trio_gateway code."""
    return task_names(lambda name: name.startswith("trio_gateway."))


async def test_a_turn_continues_after_a_disconnect_and_finishes_at_the_runtime(
    gateway: RunningGateway, runtime: DemoRuntime
) -> None:
    async with gateway.connect("grace") as client:
        await client.send({"type": "user_message", "content": "bench 20 40"})
        await client.recv()
    # the client is gone; the turn goes on for up to the grace period (2 s) and completes
    await wait_for(lambda: runtime.completed_streams == 1)
    assert runtime.cancelled_streams == 0


async def test_after_the_grace_period_the_detached_turn_is_cancelled(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(session_grace_seconds=0.3) as gw:
        async with gw.connect("expire") as client:
            await client.send({"type": "user_message", "content": "bench 100000 100"})
            await client.recv()
        await wait_for(lambda: runtime.cancelled_streams == 1)
        assert runtime.active_streams == 0
        await wait_for(lambda: not gw.app.gateway.sessions.sessions)  # type: ignore[union-attr]


async def test_a_reconnect_within_the_grace_period_receives_the_rest_of_the_live_turn(
    gateway: RunningGateway, runtime: DemoRuntime
) -> None:
    received: list[str] = []
    async with gateway.connect("reattach") as client:
        await client.send({"type": "user_message", "content": "bench 40 40"})
        for _ in range(5):
            received.append((await client.recv())["token"])
    async with gateway.connect("reattach") as client:
        rest = await client.turn()
    received += [f["token"] for f in rest]
    # no duplicates, in order, up to the end of the turn (frames in flight at the moment of the
    # disconnect may be lost: lossless resume is protocol v2's job)
    indexes = [int(t[1:]) for t in received if t]
    assert indexes == sorted(set(indexes))
    assert indexes[-1] == 39 and rest[-1]["is_final"] is True
    assert runtime.completed_streams == 1 and runtime.cancelled_streams == 0


async def test_a_v2_connection_replaces_the_first_which_gets_4409(
    gateway: RunningGateway,
) -> None:
    # A resuming v2 client takes the session over (a v1 second window becomes a viewer
    # instead: tests/gateway/test_windows.py).
    async with gateway.connect("dup") as first:
        async with gateway.connect("dup", v2=True) as second:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await first.recv()
            assert close_code(closed.value) == 4409
            await second.send({"type": "user_message", "content": "hi"})
            assert (await second.turn())[-1]["is_final"] is True


async def test_no_task_outlives_its_session(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(session_grace_seconds=0.2) as gw:
        baseline = sorted(gateway_tasks())
        async with gw.connect("leak-1") as a, gw.connect("leak-2") as b:
            await a.send({"type": "user_message", "content": "bench 100000 500"})
            await b.send({"type": "user_message", "content": "hi"})
            await a.recv()
            await b.turn()
            assert len(gateway_tasks()) > len(baseline)
        await wait_for(lambda: sorted(gateway_tasks()) == baseline)
        # and the runtime saw its stream closed (it notices on its next write)
        await wait_for(lambda: runtime.active_streams == 0)


async def test_cancelling_a_session_tears_down_its_turn_and_connection(
    gateway: RunningGateway, runtime: DemoRuntime
) -> None:
    async with gateway.connect("teardown") as client:
        await client.send({"type": "user_message", "content": "bench 100000 500"})
        await client.recv()
        gateway.app.gateway.sessions.sessions["teardown"].end()  # type: ignore[union-attr]
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await client.recv()
        assert close_code(closed.value) == 1001
    await wait_for(lambda: runtime.active_streams == 0)
    assert runtime.cancelled_streams == 1


async def test_an_exception_in_a_session_closes_it_with_1011_and_spares_the_others(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = parse_client_frame

    def buggy(text: str) -> dict[str, object]:
        if "boom" in text:
            raise RuntimeError("simulated bug")
        return original(text)

    monkeypatch.setattr(session_module, "parse_client_frame", buggy)  # a bug on demand
    async with gateway.connect("healthy") as healthy:
        await healthy.send({"type": "user_message", "content": "bench 30 100"})
        async with gateway.connect("crashing") as crashing:
            await crashing.send({"type": "user_message", "content": "boom"})
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await crashing.recv()
            assert close_code(closed.value) == 1011
        frames = await healthy.turn()
        assert len(frames) == 31
    assert "simulated bug" in caplog.text and "Traceback" in caplog.text


async def test_a_v2_client_is_told_to_resync_when_a_detached_turn_overflowed_the_buffer(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(outbound_queue_max_bytes=4096, session_grace_seconds=10) as gw:
        async with gw.connect("overflow", v2=True) as client:
            await client.recv()  # session_ready
            await client.send({"type": "user_message", "content": "bench 3000"})
            await client.recv()  # turn_started: the turn runs, then we vanish
        await wait_for(lambda: runtime.completed_streams == 1)  # it finished while detached
        async with gw.connect("overflow", v2=True) as client:
            ready = await client.recv()
            resync = await client.recv()
            rest = await client.recv_until(lambda f: f["type"] == "turn_finished")
    assert ready["type"] == "session_ready" and ready["reattached"] is False
    assert resync == {"type": "resync_required", "reason": "frames_dropped_while_detached"}
    assert rest[-1]["status"] == "completed"


async def test_a_v2_client_reattaching_to_a_live_turn_gets_session_ready_first(
    gateway: RunningGateway,
) -> None:
    async with gateway.connect("live-v2", v2=True) as client:
        await client.recv()
        await client.send({"type": "user_message", "content": "bench 40 40"})
        await client.recv_until(lambda f: f["type"] == "assistant_message")
    async with gateway.connect("live-v2", v2=True) as client:
        ready = await client.recv()
        rest = await client.recv_until(lambda f: f["type"] == "turn_finished")
    assert ready["type"] == "session_ready"
    assert ready["turn_running"] is True and ready["reattached"] is True
    assert rest[-1]["status"] == "completed"
