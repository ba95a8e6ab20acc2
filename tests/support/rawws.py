"""A WebSocket client on a raw TCP socket (wsproto framing) that can misbehave on purpose:
stop reading, never answer pings, send half a frame, vanish without a close frame (a TCP reset
or a plain FIN: the two ways a laptop lid, a crashed IDE or a dropped link look to the gateway).
The tests and the benchmarks (soak, resume) share it."""

from __future__ import annotations

import socket as stdlib_socket
import struct
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension
from wsproto.utilities import LocalProtocolError


class Rejected(ConnectionError):
    """The handshake got an HTTP answer instead of 101."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(f"rejected {status}")
        self.status = status
        self.headers = {name.lower(): value for name, value in headers}


class RawWebSocket:
    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.extensions: list[Extension] = []  # negotiated in the handshake
        self.close_code: int | None = None
        self.eof = False
        self._pending: list[str] = []
        self._partial: list[str] = []  # the pieces of a text message not finished yet

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str,
        *,
        receive_buffer: int | None = None,
        subprotocols: list[str] | None = None,
        extensions: Sequence[Extension] | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        source: str | None = None,
    ) -> RawWebSocket:
        """Open a WebSocket; ``extensions`` are offered (``PerMessageDeflate()``), ``source``
        binds the client socket to that local address (``127.0.0.2``: another client)."""
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Before connect, so the advertised window stays small: the server's sends block
            # as soon as its own send buffer is full.
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, receive_buffer)
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(
            host=f"127.0.0.1:{port}",
            target=path,
            subprotocols=subprotocols or [],
            extensions=list(extensions or []),
            extra_headers=extra_headers or [],
        )
        client = cls(stream, ws)
        try:
            await stream.send_all(ws.send(request))
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise ConnectionError("closed during handshake")
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        client.extensions = list(event.extensions)
                        return client
                    if isinstance(event, RejectConnection):
                        raise Rejected(event.status_code, event.headers)
        except BaseException:
            # No client for the caller to close: the socket must not outlive the refusal.
            await trio.aclose_forcefully(stream)
            raise

    async def send_raw(self, data: bytes) -> None:
        """Bytes on the wire as they are (hand-made frames)."""
        await self.stream.send_all(data)

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(Message(data=orjson.dumps(frame).decode())))

    async def read_until_closed(self, timeout: float) -> list[str]:
        """Read (without answering pings) until the server closes; returns text messages."""
        messages: list[str] = []
        with trio.fail_after(timeout):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    self.eof = True
                    return messages
                if not data:
                    self.eof = True
                    return messages
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, TextMessage):
                        messages += self._whole(event)
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code

    async def count_pings(self, duration: float) -> int:
        """Read for ``duration`` seconds, answering pings like a real client; how many came."""
        pings = 0
        with trio.move_on_after(duration):
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    self.eof = True
                    break
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, Ping):
                        pings += 1
                        await self.stream.send_all(self.ws.send(event.response()))
        return pings

    async def recv_json(self, timeout: float = 10) -> dict[str, Any]:
        """The next text message as JSON; pings are answered while waiting for it."""
        with trio.fail_after(timeout):
            while True:
                for event in self.ws.events():  # bytes that came with the handshake too
                    if isinstance(event, TextMessage):
                        self._pending += self._whole(event)
                    elif isinstance(event, Ping):  # like any real client library
                        await self.stream.send_all(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                if self._pending:
                    break
                data = await self.stream.receive_some(65536)
                if not data:
                    raise ConnectionError(f"closed by the server ({self.close_code})")
                self.ws.receive_data(data)
        value = orjson.loads(self._pending.pop(0))
        assert isinstance(value, dict)
        return value

    def _whole(self, event: TextMessage) -> list[str]:
        """The text message ``event`` completes, if any: wsproto hands a message that arrives
        over several reads (a large frame, a compressed one) in pieces."""
        self._partial.append(event.data)
        if not event.message_finished:
            return []
        whole = "".join(self._partial)
        self._partial.clear()
        return [whole]

    async def close(self, code: int = 1000) -> None:
        """A close frame (bounded, errors ignored: the peer may be gone), then the socket goes;
        the peer's reply is not awaited."""
        with trio.move_on_after(2), suppress(LocalProtocolError, OSError, trio.BrokenResourceError):
            await self.stream.send_all(self.ws.send(CloseConnection(code=code)))
        await self.stream.aclose()

    async def read_some(self) -> bytes:
        """One network read (whatever the gateway sent; not parsed)."""
        return await self.stream.receive_some(65536)

    async def vanish(self, *, reset: bool) -> None:
        """Close the socket without a WebSocket close frame (with a TCP RST when ``reset``)."""
        if reset:
            self.stream.socket.setsockopt(
                stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        await self.stream.aclose()

    def reset(self) -> None:
        """Vanish without a close frame: the kernel sends a TCP RST and drops unread data."""
        self.stream.socket.setsockopt(
            stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.stream.socket.close()

    async def aclose(self) -> None:
        await self.stream.aclose()
