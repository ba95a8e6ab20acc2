"""Heartbeat: protocol pings keep live peers, drop dead ones; v2 gets application heartbeats."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import RunningGateway, gateway_settings, port_of, run_gateway
from ..support.rawws import RawWebSocket
from ..support.task_tree import task_names


@pytest.fixture
async def gw(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> AsyncIterator[RunningGateway]:
    """A gateway that pings every 0.3 s (its read timeout: 2 x 0.3 s + 1 s)."""
    settings = gateway_settings(demo_runtime[1], ws_heartbeat_interval=0.3)
    async with run_gateway(nursery, settings) as running:
        yield running


async def test_a_peer_that_never_answers_pings_is_dropped_after_about_two_intervals(
    gw: RunningGateway,
) -> None:
    raw = await RawWebSocket.connect(port_of(gw.base_url), "/api/v1/ws/dead-peer")
    started = trio.current_time()
    await raw.read_until_closed(timeout=10)  # reads pings, never answers them
    elapsed = trio.current_time() - started
    assert raw.eof
    assert 0.5 <= elapsed <= 5, elapsed  # read timeout = 2 x 0.3 s + 1 s
    await raw.aclose()


async def test_a_peer_that_answers_pings_stays_connected_while_idle(gw: RunningGateway) -> None:
    async with gw.connect("alive") as client:
        await trio.sleep(3)  # well past the read timeout; trio-websocket answers pings
        await client.send({"type": "user_message", "content": "still here"})
        assert (await client.turn())[-1]["is_final"] is True


async def test_the_gateway_pings_every_interval_from_the_writer_not_a_hypercorn_task(
    gw: RunningGateway,
) -> None:
    """Pings come from the connection's writer (watched like any send) rather than from a
    hypercorn ping task per socket (~3.5 KiB of every idle session)."""
    raw = await RawWebSocket.connect(port_of(gw.base_url), "/api/v1/ws/pinged")
    pings = await raw.count_pings(2.0)
    assert not raw.eof
    assert 4 <= pings <= 12, pings  # every 0.3 s, give or take a heartbeat tick
    assert task_names(lambda name: name.endswith("_send_pings")) == []
    await raw.aclose()


async def test_a_second_window_answering_pings_stays_connected_while_idle(
    gw: RunningGateway,
) -> None:
    """A viewer (the IDE's second window on a session) is pinged by its own writer too."""
    async with gw.connect("two-windows") as live, gw.connect("two-windows") as viewer:
        await trio.sleep(3)  # well past the read timeout
        await live.send({"type": "user_message", "content": "still here"})
        assert (await live.turn())[-1]["is_final"] is True
        assert (await viewer.turn())[-1]["is_final"] is True


async def test_v2_clients_get_a_heartbeat_frame_when_the_socket_is_quiet(
    gw: RunningGateway,
) -> None:
    async with gw.connect("hb-v2", v2=True) as client:
        assert (await client.recv())["type"] == "session_ready"
        frame = await client.recv(timeout=3)
        assert frame["type"] == "heartbeat"


async def test_v1_clients_never_get_heartbeat_frames(gw: RunningGateway) -> None:
    async with gw.connect("hb-v1") as client:
        with trio.move_on_after(1.5) as waited:  # five intervals
            frame = await client.recv(timeout=5)
            raise AssertionError(f"v1 client got an unsolicited frame: {frame}")
        assert waited.cancelled_caught
