"""Regression: a client that makes hypercorn close its connection while something is being
written to it must not take the whole server down (trio_gateway/hypercorn_patches.py)."""

from __future__ import annotations

import tracemalloc
import zlib
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.ws_stream import FrameTooLargeError, Handshake, WebsocketBuffer, WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto.events import TextMessage
from wsproto.frame_protocol import CloseReason, FrameDecoder, Opcode, RsvBits

from trio_gateway import hypercorn_patches
from trio_gateway.hypercorn_patches import BoundedPerMessageDeflate

from ..conftest import RunningGateway, port_of
from ..support.fuzzing_exchange import exchange_frames
from ..support.fuzzing_strategies import FrameBatch
from ..support.fuzzing_wire import OP_TEXT, WireFrame, deflate_bomb, deflate_payload, encode_frame


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


# --- 3. compression and message size ---------------------------------------------------------

OFFER = [
    (b"connection", b"Upgrade"),
    (b"upgrade", b"websocket"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits"),
]


def test_unpatched_hypercorn_negotiates_deflate_whatever_the_server_wants() -> None:
    """The bug (if hypercorn grows a setting for it, the patch can go)."""
    _, headers, _ = hypercorn_patches._original_handshake_accept(Handshake(OFFER, "1.1"), None, [])
    assert b"sec-websocket-extensions" in dict(headers)


@pytest.mark.parametrize("enabled", [False, True])
def test_the_extension_follows_the_flag(enabled: bool) -> None:
    handshake = Handshake(OFFER, "1.1")
    buffer = WebsocketBuffer(1024)
    setattr(handshake, hypercorn_patches.COMPRESSION_FLAG, enabled)
    setattr(handshake, hypercorn_patches._BUFFER, buffer)
    status, headers, connection = hypercorn_patches.handshake_accept(handshake, None, [])
    assert status == 101
    assert (b"sec-websocket-extensions" in dict(headers)) is enabled
    assert b"sec-websocket-accept" in dict(headers)
    extensions = connection._proto.extensions  # the ones in effect
    assert [type(e) for e in extensions] == ([BoundedPerMessageDeflate] if enabled else [])


def inflate_in_pieces(
    extension: BoundedPerMessageDeflate, payload: bytes, piece: int
) -> bytes | CloseReason:
    """Feed one compressed message to ``extension`` as wsproto would, ``piece`` bytes at a time."""
    decoder = FrameDecoder(client=False, extensions=[extension])
    extension.frame_inbound_header(decoder, Opcode.TEXT, RsvBits(True, False, False), len(payload))
    out = b""
    for start in range(0, len(payload), piece):
        result = extension.frame_inbound_payload_data(decoder, payload[start : start + piece])
        if isinstance(result, CloseReason):
            return result
        out += result
    tail = extension.frame_inbound_complete(decoder, True)
    if isinstance(tail, CloseReason):
        return tail
    return out + (tail or b"")


def negotiated(buffer: WebsocketBuffer) -> BoundedPerMessageDeflate:
    extension = BoundedPerMessageDeflate(buffer)
    extension.finalize("permessage-deflate")
    return extension


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_honest_messages_inflate_whole_up_to_the_limit(piece: int) -> None:
    """Bounded steps lose nothing (unconsumed_tail), at any chunking, message after message
    (the budget is per message, and the compression context carries over)."""
    buffer = WebsocketBuffer(64 * 1024)
    extension = negotiated(buffer)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    for index in range(3):
        text = (f"message {index} " * 10_000)[: 64 * 1024].encode()  # exactly the limit
        payload = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert inflate_in_pieces(extension, payload[:-4], piece) == text
    assert buffer.length == 0  # never marked


def test_a_bomb_is_refused_without_being_inflated() -> None:
    buffer = WebsocketBuffer(64 * 1024)
    extension = negotiated(buffer)
    bomb = deflate_bomb(64 << 20)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = inflate_in_pieces(extension, bomb, 1 << 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result == b""  # nothing goes up; the buffer refuses the message (1009)
    assert peak < 1 << 20
    with pytest.raises(FrameTooLargeError):
        hypercorn_patches.websocket_buffer_extend(buffer, TextMessage(data=""))
    # Everything after the refusal is dropped, never inflated.
    assert inflate_in_pieces(extension, deflate_payload(b"{}"), 10) == b""


def test_a_refused_message_is_not_kept() -> None:
    """hypercorn stored a chunk before checking the size and kept appending after the
    refusal; the patched extend refuses first and drops everything from then on."""
    buffer = WebsocketBuffer(10)
    hypercorn_patches.websocket_buffer_extend(
        buffer, TextMessage(data="12345", message_finished=False)
    )
    with pytest.raises(FrameTooLargeError):
        hypercorn_patches.websocket_buffer_extend(buffer, TextMessage(data="x" * 100))
    assert buffer.value is None
    with pytest.raises(FrameTooLargeError):
        hypercorn_patches.websocket_buffer_extend(buffer, TextMessage(data="y"))
    assert buffer.value is None


async def test_serve_installs_the_websocket_patches(gateway: RunningGateway) -> None:
    assert Handshake.accept is hypercorn_patches.handshake_accept
    assert WebsocketBuffer.extend is hypercorn_patches.websocket_buffer_extend
    assert WSStream._handle_events is hypercorn_patches.ws_stream_handle_events
    hypercorn_patches.apply()  # idempotent
    assert Handshake.accept is hypercorn_patches.handshake_accept


async def test_unpatched_hypercorn_still_switches_to_http2_on_h2c_and_the_preface() -> None:
    """The behaviour item 5 of the patches removes (if hypercorn drops it, the patch can go)."""
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
