"""Regression tests for defects found in review: each once wedged, leaked or reordered."""

from __future__ import annotations

import socket as stdlib_socket

import httpx
import orjson
import trio

from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import (
    GatewayWith,
    close_code,
    gateway_settings,
    port_of,
    run_gateway,
    task_names,
    wait_for,
)
from ..support.rawws import RawWebSocket
from ..support.scripted_runtime import ScriptedRuntime


def handler_tasks() -> int:
    """Live per-connection tasks of every server in this process (hypercorn's and ours)."""
    return len(task_names(lambda name: name.endswith("_run_handler")))


async def test_a_half_close_while_the_writer_is_blocked_frees_the_connection(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with(
        outbound_queue_max_bytes=16 * 1024,
        ws_slow_client_timeout=600.0,
        ws_heartbeat_interval=60.0,
        session_grace_seconds=0.5,
    ) as gw:
        raw = await gw.stalled_client("half", "bench 1000000")
        await trio.sleep(0.5)  # the writer is now stuck in a shielded send
        raw.stream.socket.shutdown(stdlib_socket.SHUT_WR)  # FIN: hypercorn reports disconnect
        sessions = gw.app.gateway.sessions
        assert sessions is not None
        await wait_for(lambda: sessions.connection_count == 0)
        await wait_for(lambda: not sessions.sessions)  # grace ran, the turn was cancelled
        await raw.aclose()


async def test_closing_a_connection_that_floods_frames_leaks_no_server_task(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with() as gw:
        port = port_of(gw.base_url)
        baseline = handler_tasks()
        for n in range(4):
            flooder = await RawWebSocket.connect(port, "/api/v1/ws/flooded")
            for _ in range(200):  # v1 pings: no reply, so the gateway's reader is the sink
                await flooder.send_json({"type": "ping"})
            replacement = await RawWebSocket.connect(  # v2 replaces the flooder: 4409
                port, "/api/v1/ws/flooded", subprotocols=["codelab.v2"]
            )
            with trio.move_on_after(3):
                await flooder.read_until_closed(timeout=3)
            await flooder.aclose()
            await replacement.aclose()
            assert n >= 0
        await wait_for(lambda: handler_tasks() <= baseline)


async def test_a_replacement_gets_contiguous_seq_and_ordered_tokens(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with(
        outbound_queue_max_bytes=16 * 1024,
        ws_heartbeat_interval=60.0,
        ws_close_timeout=0.5,
    ) as gw:
        stuck = await gw.stalled_client("replaced", "bench 8000")
        await trio.sleep(0.5)
        async with gw.connect("replaced", v2=True) as client:  # v2 takes the session over
            frames = await client.turn(timeout=30)
        await stuck.aclose()
    frames = [f for f in frames if f["type"] == "assistant_message"]
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq +1 per frame, no duplicate"
    indexes = [int(t[1:]) for f in frames for t in f["token"].split()]
    assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)
    assert indexes[-1] == 7999


async def test_with_no_grace_period_every_new_connection_gets_a_live_session(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with(session_grace_seconds=0) as gw:
        for n in range(15):
            async with gw.connect(f"nograce-{n}") as client:
                await client.send({"type": "user_message", "content": "bench 1"})
                assert (await client.turn())[-1]["is_final"] is True


async def test_zero_saturation_wait_still_serves_when_slots_are_free(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    settings = gateway_settings(scripted_runtime.url, saturation_wait=0)
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            assert (await http.get("/api/v1/agents")).status_code == 200


async def test_a_v1_client_reattaching_after_a_detached_overflow_still_gets_the_final_chunk(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(outbound_queue_max_bytes=4096, session_grace_seconds=10) as gw:
        async with gw.connect("overflow-v1") as client:
            await client.send({"type": "user_message", "content": "bench 3000"})
            await client.recv()
        await wait_for(lambda: runtime.completed_streams == 1)
        async with gw.connect("overflow-v1") as client:
            frames = await client.turn()
    assert frames[-1]["type"] == "assistant_message" and frames[-1]["is_final"] is True


async def test_messages_sent_during_a_drain_start_no_new_turn(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(drain_timeout=10) as gw:
        async with gw.connect("late-msg") as client:
            await client.send({"type": "user_message", "content": "bench 30 60"})
            await client.recv()
            gw.stop.set()
            await trio.sleep(0.1)
            await client.send({"type": "user_message", "content": "bench 5"})
            frames = []
            try:
                while True:
                    frames.append(await client.recv())
            except Exception as closed:  # the drain's 1012
                assert close_code(closed) == 1012  # type: ignore[arg-type]
    assert any(f.get("code") == "busy" and "restarting" in f["content"] for f in frames)
    assert [r["message"]["content"] for r in runtime.stream_requests] == ["bench 30 60"]
    assert orjson.dumps(frames)  # all frames were JSON
