"""Heartbeat: protocol pings keep live peers, drop dead ones; v2 gets application heartbeats."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import pytest
import trio
import trio_websocket

from trio_gateway.protocol import CloseCode
from trio_gateway.session.interfaces import Socket
from trio_gateway.session.outbound import Outgoing
from trio_gateway.session.session import Session
from trio_gateway.session.transport import WebSocketConnection
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import GatewayWith, RunningGateway, gateway_settings, port_of, run_gateway
from ..support.gateway import WsClient, close_code, jwt_settings
from ..support.rawws import RawWebSocket
from ..support.resume import ResumingClient
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


# --- every phase of a socket is pinged (a quiet client there must not meet the read timeout) ---


async def test_a_socket_waiting_for_its_auth_frame_is_pinged(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    issuer: tuple[DevIssuer, str],
) -> None:
    """First-frame auth: no writer serves the socket yet, the handshake pings it."""
    settings = jwt_settings(
        demo_runtime[1], issuer[1], ws_heartbeat_interval=0.3, ws_auth_timeout=5.0
    )
    async with run_gateway(nursery, settings) as running, running.connect("slow-auth") as client:
        await trio.sleep(2.5)  # within the auth timeout, past the read timeout (1.6 s)
        await client.send({"type": "auth", "token": issuer[0].mint("alice")})
        await client.send({"type": "user_message", "content": "bench 2"})
        assert (await client.turn())[-1]["is_final"] is True


async def test_a_v2_client_silent_through_the_resume_wait_is_pinged(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    settings = gateway_settings(demo_runtime[1], ws_heartbeat_interval=0.3, resume_wait_seconds=3)
    async with run_gateway(nursery, settings) as running:
        async with running.connect("resumable", v2=True) as first:
            assert (await first.recv())["type"] == "session_ready"
            await first.send({"type": "user_message", "content": "hello"})
            await first.turn()
        async with running.connect("resumable", v2=True) as second:
            assert (await second.recv())["type"] == "session_ready"
            await trio.sleep(3.5)  # says nothing: the writer waits resume_wait_seconds
            await second.send({"type": "user_message", "content": "again"})
            assert (await second.turn())[-1]["is_final"] is True


async def test_a_viewer_busy_with_frames_is_still_pinged(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A viewer on a link slower than the token rate always finds frames waiting; a v1
    viewer sends nothing of its own, so only pings between its batches keep it."""
    send_texts = WebSocketConnection.send_texts

    async def slow_viewer_batches(
        self: WebSocketConnection, texts: Sequence[str], sent: Callable[[int], object]
    ) -> None:
        if getattr(sent, "__name__", "") == "_count_viewed":
            await trio.sleep(0.04)
        await send_texts(self, texts, sent)

    monkeypatch.setattr(WebSocketConnection, "send_texts", slow_viewer_batches)
    async with gw.connect("busy") as live, gw.connect("busy") as viewer:
        await live.send({"type": "user_message", "content": "bench 200 50"})  # 4 s of tokens
        finals: dict[str, object] = {}

        async def read(name: str, client: WsClient) -> None:
            finals[name] = (await client.turn(timeout=20))[-1]["is_final"]

        async with trio.open_nursery() as readers:
            readers.start_soon(read, "live", live)
            readers.start_soon(read, "viewer", viewer)
        assert finals == {"live": True, "viewer": True}


async def test_frames_queued_while_a_ping_is_sent_still_go_out_before_a_flushing_close(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ping in flight (TCP backpressure) while refusals are queued and the rate-limit close
    (4429, after a flush) is decided: the refusals still reach the client first."""
    send_ping_if_due = WebSocketConnection.send_ping_if_due

    async def slow_ping(self: WebSocketConnection) -> None:
        if self.ping_due:
            await trio.sleep(1.0)
        await send_ping_if_due(self)

    monkeypatch.setattr(WebSocketConnection, "send_ping_if_due", slow_ping)
    settings = gateway_settings(
        demo_runtime[1], ws_messages_per_second=0.1, ws_message_burst=2, ws_heartbeat_interval=0.4
    )
    async with run_gateway(nursery, settings) as running, running.connect("chatty") as client:
        await trio.sleep(0.6)  # the first ping is in flight now
        for _ in range(6):
            await client.send({"type": "cancel"})
        codes = []
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                codes.append((await client.recv())["code"])
    assert close_code(closed.value) == 4429
    assert codes == ["rate_limited", "rate_limited"], codes


async def test_a_ping_cut_short_by_a_disconnect_loses_no_frame(
    gateway_with: GatewayWith, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ping is only sent where the frames around it are already numbered and recorded: a
    client cut while a ping is in flight (its checkpoint widened here) and resuming gets every
    token exactly once."""
    send_ping_if_due = WebSocketConnection.send_ping_if_due
    wait_frames = Session.wait_frames
    in_flight = trio.Event()

    armed = False
    tokens_flowing = False

    async def widened(self: WebSocketConnection) -> None:
        if armed and self.ping_due and not in_flight.is_set():
            in_flight.set()
            await trio.sleep(0.3)
        await send_ping_if_due(self)

    async def frames_with_a_ping_due(self: Session, connection: Socket) -> list[Outgoing]:
        # The writer wakes with frames in hand just as a ping is due (rare, made certain);
        # the next ping, wherever the writer sends it, is the one cut short.
        nonlocal armed
        frames = await wait_frames(self, connection)
        if frames and tokens_flowing and not armed:
            while not connection.ping_due:
                await trio.sleep(0.01)
            armed = True
        return frames

    monkeypatch.setattr(WebSocketConnection, "send_ping_if_due", widened)
    monkeypatch.setattr(Session, "wait_frames", frames_with_a_ping_due)
    async with gateway_with(
        session_grace_seconds=10, resume_wait_seconds=5, ws_heartbeat_interval=0.3
    ) as running:
        client = ResumingClient(port_of(running.base_url), "ping-cut")
        await client.connect(resume=False)
        await client.send({"type": "user_message", "content": "bench 300 100"})  # 3 s of tokens
        await client.until("turn_started")
        tokens_flowing = True
        async with trio.open_nursery() as reading:

            async def read_on() -> None:
                while True:
                    await client.next()

            reading.start_soon(read_on)
            await in_flight.wait()
            reading.cancel_scope.cancel()
        # The connection ends while the ping is in flight (as a disconnect or a replacing
        # socket ends it): the writer is cancelled there.
        sessions = running.app.gateway.sessions
        assert sessions is not None
        live = sessions.sessions["ping-cut"].connection
        assert live is not None
        live.shut(CloseCode.GOING_AWAY)
        await client.cut()
        await client.connect(resume=True)
        await client.until("resumed")
        if client.turns_finished == 0:
            await client.until("turn_finished")
    assert client.tokens() == "".join(f"t{i} " for i in range(300))
    assert client.resyncs == []
