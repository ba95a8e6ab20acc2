"""One session in several IDE windows: v1 sockets of one user share the session as viewers.

Every numbered frame goes to every attached v1 socket, in the same order with the same seq;
messages from any of them join the session's one queue; when the live socket leaves, a viewer
carries on. A v2 client takes the session over (4409 for the others).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_websocket

from trio_gateway.session.session import MAX_SOCKETS_PER_SESSION
from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import GatewayWith, RunningGateway, WsClient, close_code, wait_for

HI = {"type": "user_message", "content": "hi", "role": "user"}


async def viewers_attached(gateway: RunningGateway, session_id: str, count: int) -> None:
    """Wait until ``count`` viewers share ``session_id`` with its live socket."""
    sessions = gateway.app.gateway.sessions
    assert sessions is not None

    def attached() -> bool:
        session = sessions.sessions.get(session_id)
        return session is not None and len(session.viewers) == count

    await wait_for(attached, timeout=10)


def assistant(frames: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(f["seq"], f.get("token", "")) for f in frames if f["type"] == "assistant_message"]


async def test_two_v1_windows_both_see_every_frame_in_the_same_order(
    gateway: RunningGateway,
) -> None:
    async with gateway.connect("two-windows") as first, gateway.connect("two-windows") as second:
        await viewers_attached(gateway, "two-windows", 1)
        await first.send(HI)
        seen_first = await first.turn()
        seen_second = await second.turn()
        assert seen_first == seen_second
        assert len(assistant(seen_first)) > 3
        seqs = [f["seq"] for f in seen_first]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # A message from the other window joins the same session: both see its answer.
        await second.send({"type": "user_message", "content": "and you?", "role": "user"})
        again_first = await first.turn()
        again_second = await second.turn()
        assert again_first == again_second
        assert again_first[0]["seq"] == seqs[-1] + 1


async def test_when_the_first_window_closes_the_other_carries_on(
    gateway: RunningGateway,
) -> None:
    async with gateway.connect("carry-on") as live:
        async with gateway.connect("carry-on") as viewer:
            await viewers_attached(gateway, "carry-on", 1)
            await live.send(HI)
            before = await viewer.turn()
            await live.ws.aclose()
            await viewers_attached(gateway, "carry-on", 0)
            await viewer.send({"type": "user_message", "content": "still here?", "role": "user"})
            after = await viewer.turn()
    assert after[0]["seq"] == before[-1]["seq"] + 1, "numbering continues without a gap"
    assert after[-1]["is_final"] is True


async def test_a_v2_client_takes_the_session_over_from_every_window(
    gateway: RunningGateway,
) -> None:
    async with gateway.connect("takeover") as first, gateway.connect("takeover") as second:
        await viewers_attached(gateway, "takeover", 1)
        async with gateway.connect("takeover", v2=True) as resumer:
            for window in (first, second):
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await window.recv()
                assert close_code(closed.value) == 4409
            await resumer.send(HI)
            assert (await resumer.turn())[-1]["is_final"] is True


async def test_too_many_windows_close_the_oldest_viewer(gateway: RunningGateway) -> None:
    async with trio.open_nursery() as nursery:
        windows: list[WsClient] = []
        closed_codes: list[int] = []

        async def hold(index: int, ready: trio.Event) -> None:
            async with gateway.connect("crowded") as window:
                windows.append(window)
                ready.set()
                try:
                    while True:
                        await window.recv(timeout=30)
                except trio_websocket.ConnectionClosed as closed:
                    closed_codes.append(close_code(closed))

        for index in range(MAX_SOCKETS_PER_SESSION + 1):
            ready = trio.Event()
            nursery.start_soon(hold, index, ready)
            await ready.wait()
            await viewers_attached(gateway, "crowded", min(index, MAX_SOCKETS_PER_SESSION - 1))
        with trio.fail_after(10):
            while not closed_codes:
                await trio.sleep(0.01)
        assert closed_codes == [4409]
        nursery.cancel_scope.cancel()


async def test_a_drain_closes_every_window_with_1012_after_the_turn(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with(drain_timeout=10.0) as gw:
        async with gw.connect("drained") as first, gw.connect("drained") as second:
            await viewers_attached(gw, "drained", 1)
            await first.send({"type": "user_message", "content": "bench 200 100"})
            await first.recv()
            async with trio.open_nursery() as inner:
                inner.start_soon(gw.app.gateway.drain, 10.0)
                for window in (first, second):
                    frames: list[dict[str, Any]] = []
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        while True:
                            frames.append(await window.recv(timeout=20))
                    assert close_code(closed.value) == 1012
                    assert frames and frames[-1]["is_final"] is True, "the turn ended first"


async def test_a_stalled_viewer_does_not_cancel_the_live_windows_turn(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(
        outbound_queue_max_bytes=64 * 1024 * 1024,  # the viewer's byte bound never trips
        ws_slow_client_timeout=1.0,
        ws_heartbeat_interval=60.0,
    ) as gw:
        async with gw.connect("stall") as live:
            # The second window: same (anonymous) user, v1, never reads.
            viewer = await gw.stalled_client("stall")
            await viewers_attached(gw, "stall", 1)
            await live.send({"type": "user_message", "content": "bench 20000 10000"})
            frames = await live.turn(timeout=60)
            assert frames[-1].get("code") != "cancelled", frames[-1]
            assert runtime.cancelled_streams == 0
            await viewer.aclose()


async def test_a_window_promoted_during_a_drain_is_closed_promptly(
    gateway_with: GatewayWith,
) -> None:
    from trio_gateway.protocol import CloseCode

    async with gateway_with(drain_timeout=10.0) as gw:
        async with gw.connect("promo"), gw.connect("promo") as second:
            await viewers_attached(gw, "promo", 1)
            sessions = gw.app.gateway.sessions
            assert sessions is not None
            session = sessions.sessions["promo"]
            assert session.connection is not None
            # The first window is on its way out (its client closed) as SIGTERM arrives.
            session.connection.shut(CloseCode.NORMAL)
            with trio.fail_after(5):  # not the 10 s drain timeout
                await sessions.drain(10.0)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await second.recv(timeout=5)
            assert close_code(closed.value) == 1012
