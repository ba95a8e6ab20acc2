"""Regression: a client that makes hypercorn close its connection while something is being
written to it must not take the whole server down (trio_gateway/hypercorn_patches.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

from trio_gateway import hypercorn_patches

from .conftest import RunningGateway, port_of
from .fuzzing import (
    OP_TEXT,
    FrameBatch,
    WireFrame,
    encode_frame,
    exchange_frames,
)


class BusyStream:
    """A stream whose send-conflict detector is held by a concurrent ``send_eof``."""

    async def send_all(self, data: bytes) -> None:
        raise trio.BusyResourceError("another task is currently sending data on this SocketStream")


class Protocol:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def handle(self, event: Any) -> None:
        self.events.append(event)


def fake_server() -> Any:
    return SimpleNamespace(send_lock=trio.Lock(), stream=BusyStream(), protocol=Protocol())


async def test_unpatched_hypercorn_lets_the_error_escape() -> None:
    """The bug itself (if hypercorn fixes it, this test tells us the patch can go)."""
    server = fake_server()
    with pytest.raises(trio.BusyResourceError):
        await hypercorn_patches._original_protocol_send(server, RawData(data=b"x"))


async def test_patched_send_treats_a_write_racing_the_close_as_closed() -> None:
    server = fake_server()
    await hypercorn_patches.protocol_send(server, RawData(data=b"x"))
    assert [type(e) for e in server.protocol.events] == [Closed]


async def test_serve_installs_the_patch(gateway: RunningGateway) -> None:
    assert TCPServer.protocol_send is hypercorn_patches.protocol_send


async def test_invalid_utf8_after_frames_never_stops_the_server(gateway: RunningGateway) -> None:
    """End to end: refused frames (whose error frames are being written) then invalid UTF-8,
    which makes hypercorn drop the connection; the server keeps accepting sessions."""
    refused = WireFrame("text", encode_frame(OP_TEXT, b'{"type":"x"}'), text='{"type":"x"}')
    bad = WireFrame("bad_utf8", encode_frame(OP_TEXT, b"ab\xff"), terminal=True, close=None)
    # 8 x 2 refused frames: within the anonymous user's message burst (30) of the default settings.
    for index in range(8):
        seen = await exchange_frames(
            port_of(gateway.base_url), f"utf8-{index}", FrameBatch([refused] * 2, bad, False)
        )
        assert seen.close_code is None  # hypercorn drops the connection
    async with gateway.connect("after-utf8") as client:
        await client.send({"type": "user_message", "content": "bench 2"})
        frames = await client.turn()
        assert frames[-1]["type"] == "assistant_message"


async def test_an_error_escaping_a_connection_is_contained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's TCPServer.run lets everything but OSError escape, and serve_listeners then
    cancels the listener and every connection; the fuzzer hit it with h11's LocalProtocolError
    ("Can't send data when our state is ERROR") after a malformed upgrade request."""
    import h11

    async def failing_run(self: Any) -> None:
        raise h11.LocalProtocolError("Can't send data when our state is ERROR")

    closed: list[bool] = []

    class Stream:
        async def aclose(self) -> None:
            closed.append(True)

    monkeypatch.setattr(hypercorn_patches, "_original_run", failing_run)
    with pytest.raises(h11.LocalProtocolError):
        await failing_run(SimpleNamespace())
    await hypercorn_patches.run(SimpleNamespace(stream=Stream()))
    assert closed == [True]


async def test_serve_installs_the_run_patch(gateway: RunningGateway) -> None:
    assert TCPServer.run is hypercorn_patches.run


async def test_unpatched_hypercorn_still_switches_to_http2_on_h2c_and_the_preface() -> None:
    """The behaviour item 4 of the patches removes (if hypercorn drops it, the patch can go)."""
    import h11
    from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError

    sent: list[Any] = []

    async def send(event: Any) -> None:
        sent.append(event)

    protocol: Any = SimpleNamespace(
        connection=SimpleNamespace(
            trailing_data=(b"", False), send=lambda event: b"101", their_state=None
        ),
        config=SimpleNamespace(response_headers=lambda _: []),
        send=send,
    )
    protocol._send_h11_event = lambda event: send(event)
    upgrade = h11.Request(
        method="GET",
        target="/",
        headers=[("Host", "x"), ("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings")],
    )
    with pytest.raises(H2CProtocolRequiredError):
        await hypercorn_patches._original_check_protocol(protocol, upgrade)
    preface = h11.Request(method="PRI", target="*", headers=[], http_version="2.0")
    with pytest.raises(H2ProtocolAssumedError):
        await hypercorn_patches._original_check_protocol(protocol, preface)
    # The patched check does neither.
    await hypercorn_patches.check_protocol(protocol, upgrade)
    await hypercorn_patches.check_protocol(protocol, preface)


async def test_serve_installs_the_protocol_and_reader_patches(gateway: RunningGateway) -> None:
    from hypercorn.protocol.h11 import H11Protocol

    assert H11Protocol._check_protocol is hypercorn_patches.check_protocol
    assert TCPServer._read_data is hypercorn_patches.read_data
