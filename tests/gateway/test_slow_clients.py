"""A client that stops reading: bounded memory, its turn cancelled, shutdown not held up.

hypercorn writes inside a shielded scope, so these tests use a raw socket whose receive window
is tiny and which never reads: the gateway's send really blocks, as it would on a dead link.
"""

from __future__ import annotations

import trio

from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import GatewayWith, port_of, wait_for
from ..support.rawws import RawWebSocket

QUEUE_BYTES = 16 * 1024


async def test_a_client_that_stops_reading_is_cut_off_and_its_turn_cancelled(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(
        outbound_queue_max_bytes=QUEUE_BYTES,
        ws_slow_client_timeout=1.0,
        ws_heartbeat_interval=60.0,
    ) as gw:
        raw = await gw.stalled_client("stalled", "bench 1000000")
        sessions = gw.app.gateway.sessions
        assert sessions is not None
        # while the socket is stuck, the relay stops at the queue bound (backpressure)
        peak = 0
        with trio.move_on_after(0.8):
            while True:
                session = sessions.sessions.get("stalled")
                if session is not None:
                    peak = max(peak, session.outbound.pending_bytes)
                await trio.sleep(0.005)
        assert 0 < peak <= QUEUE_BYTES + 64 * 1024  # one network read may overshoot
        # after the slow-client timeout the turn is cancelled and the runtime stream closed
        await wait_for(lambda: runtime.cancelled_streams > 0, timeout=5)
        assert runtime.active_streams == 0
        # the connection is gone (aborted: the client sees EOF or a reset)
        await wait_for(lambda: not sessions.connection_count, timeout=5)
        await raw.aclose()


async def test_a_stuck_client_does_not_hold_up_shutdown(
    gateway_with: GatewayWith, runtime: DemoRuntime
) -> None:
    async with gateway_with(
        outbound_queue_max_bytes=QUEUE_BYTES,
        ws_slow_client_timeout=600.0,
        drain_timeout=1.0,
        ws_close_timeout=0.5,
        ws_heartbeat_interval=60.0,
    ) as gw:
        raw = await gw.stalled_client("stuck", "bench 1000000")
        await trio.sleep(0.5)  # the writer is now blocked in hypercorn's shielded send
        started = trio.current_time()
        gw.stop.set()
        with trio.fail_after(10):
            await gw.stopped.wait()
        elapsed = trio.current_time() - started
        # drain timeout + close timeout + hypercorn's graceful step, with room for a slow CI
        assert elapsed < 1.0 + 0.5 + 0.5 + 3.0
        assert runtime.active_streams == 0
        await raw.aclose()


async def test_a_flooding_client_is_read_at_the_gateways_pace_with_bounded_buffers(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with(max_queued_messages=4, max_pending_control_frames=64) as gw:
        raw = await RawWebSocket.connect(port_of(gw.base_url), "/api/v1/ws/flood")
        # thousands of frames the session must refuse (busy) while never reading the replies
        sent = 0
        with trio.move_on_after(3):
            try:
                for sent in range(5000):  # noqa: B007
                    await raw.send_json({"type": "user_message", "content": "bench 100000 10"})
            except trio.BrokenResourceError:
                pass  # the gateway hung up on us: expected
        assert sent > 64
        sessions = gw.app.gateway.sessions
        assert sessions is not None
        # the client left too many refusals unread: closed with a policy violation, and
        # nothing grew without bound meanwhile
        await wait_for(lambda: not sessions.connection_count, timeout=5)
        session = sessions.sessions.get("flood")
        assert session is None or len(session.queue) <= 4
        await raw.aclose()
