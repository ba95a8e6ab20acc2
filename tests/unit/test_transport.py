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
