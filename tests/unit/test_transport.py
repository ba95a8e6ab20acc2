"""The ASGI WebSocket adapter's batch send, against a scripted ASGI ``send``."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from trio_gateway.session.transport import ConnectionClosed, WebSocketConnection


class ScriptedSend:
    """An ASGI ``send`` that records frames and fails on the ``fail_at``-th one (1-based)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.frames: list[str] = []
        self.fail_at = fail_at

    async def __call__(self, message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_at is not None and len(self.frames) + 1 == self.fail_at:
            raise trio.BrokenResourceError("peer reset")
        self.frames.append(message["text"])


async def never_receive() -> dict[str, Any]:
    await trio.sleep_forever()
    raise AssertionError


def socket_with(send: ScriptedSend) -> WebSocketConnection:
    return WebSocketConnection({"type": "websocket"}, never_receive, send)


async def test_a_batch_goes_out_in_order_and_reports_each_frame() -> None:
    send = ScriptedSend()
    ws = socket_with(send)
    sent: list[int] = []
    await ws.send_texts(["a", "b", "c"], sent.append)
    assert send.frames == ["a", "b", "c"] and sent == [0, 1, 2]
    assert ws.send_started_at is None


async def test_a_failure_half_way_reports_only_what_went_out() -> None:
    send = ScriptedSend(fail_at=2)
    ws = socket_with(send)
    sent: list[int] = []
    with pytest.raises(trio.BrokenResourceError):
        await ws.send_texts(["a", "b", "c"], sent.append)
    assert sent == [0]  # "b" and "c" stay undelivered (replayed on resume)
    assert ws.send_started_at is None


async def test_a_closed_socket_sends_nothing_more() -> None:
    send = ScriptedSend()
    ws = socket_with(send)
    ws.closed = True
    sent: list[int] = []
    with pytest.raises(ConnectionClosed):
        await ws.send_texts(["a"], sent.append)
    assert send.frames == [] and sent == []


async def test_a_batch_is_a_checkpoint_even_when_the_peer_is_gone() -> None:
    # hypercorn's send returns without yielding once the peer is gone: the batch itself must
    # yield, or a writer loop would spin and freeze the worker.
    async def send_without_yielding(message: dict[str, Any]) -> None:
        return None

    ws = WebSocketConnection({"type": "websocket"}, never_receive, send_without_yielding)
    with trio.CancelScope() as scope:
        scope.cancel()
        await ws.send_texts(["a"], lambda index: None)
    assert scope.cancelled_caught


class ScriptedStream:
    """hypercorn's ``WSStream`` as far as pings go: ``app_send`` is the ASGI send (a bound
    method, as hypercorn hands it over) and ``_send_wsproto_event`` takes the pings."""

    def __init__(self, after_first_frame: Any = None) -> None:
        self.wire: list[str] = []
        self.after_first_frame = after_first_frame

    async def app_send(self, message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        self.wire.append(message["text"])
        if len(self.wire) == 1 and self.after_first_frame is not None:
            self.after_first_frame()

    async def _send_wsproto_event(self, event: object) -> None:
        await trio.lowlevel.checkpoint()
        self.wire.append(type(event).__name__)


async def test_a_ping_asked_during_a_long_batch_goes_out_between_two_frames() -> None:
    stream = ScriptedStream()
    ws = WebSocketConnection({"type": "websocket"}, never_receive, stream.app_send)
    stream.after_first_frame = ws.ask_ping
    await ws.send_texts(["a", "b", "c"], lambda _: None)
    assert stream.wire == ["a", "Ping", "b", "c"]
    assert not ws.ping_due


async def test_a_ping_goes_out_once_however_often_it_was_asked() -> None:
    stream = ScriptedStream()
    ws = WebSocketConnection({"type": "websocket"}, never_receive, stream.app_send)
    ws.ask_ping()
    ws.ask_ping()
    await ws.send_ping_if_due()
    await ws.send_ping_if_due()
    await ws.send_text("a")
    assert stream.wire == ["Ping", "a"]


async def test_a_socket_waiting_for_its_first_message_is_pinged_until_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    stream = ScriptedStream()
    ws = WebSocketConnection({"type": "websocket"}, never_receive, stream.app_send)
    started = trio.current_time()
    assert await ws.receive_pinging(timeout=1.0, interval=0.3) is None
    assert trio.current_time() - started == pytest.approx(1.0)
    assert stream.wire == ["Ping", "Ping", "Ping"]  # at 0.3, 0.6 and 0.9 s


async def test_the_first_message_ends_the_pinged_wait(autojump_clock: trio.abc.Clock) -> None:
    arrives_at = trio.current_time() + 0.5

    async def receive_later() -> dict[str, Any]:  # cancellable, like hypercorn's app queue
        await trio.sleep_until(arrives_at)
        return {"type": "websocket.receive", "text": "hello"}

    stream = ScriptedStream()
    ws = WebSocketConnection({"type": "websocket"}, receive_later, stream.app_send)
    assert await ws.receive_pinging(timeout=10, interval=0.3) == "hello"
    assert stream.wire == ["Ping"]


async def test_a_pinged_wait_on_a_closed_socket_raises_connection_closed_itself(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Not inside an exception group: the handshake catches a plain ConnectionClosed."""
    stream = ScriptedStream()
    ws = WebSocketConnection({"type": "websocket"}, never_receive, stream.app_send)
    ws.closed = True  # the peer is gone by the first ping
    with pytest.raises(ConnectionClosed):
        await ws.receive_pinging(timeout=1.0, interval=0.3)
