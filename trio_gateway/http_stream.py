"""A lean HTTP/1.1 client for one long streamed response (the runtime's SSE turn), on trio + h11.

Why not httpx here (it is used everywhere else): measured on this stack, relaying a paced token
through httpx cost the gateway ~650 us of CPU, most of it in two places that grow with load:

- httpcore's connection pool rescans every pooled connection (``is_idle``) on each request start
  and close, so with N concurrent streams every turn start costs O(N) - 12 ms of event-loop time
  per turn start at 100 open streams (encode/httpcore#1035); a gateway holds thousands;
- every network read climbs five nested async generators (httpx -> httpcore -> h11).

A turn is one request on its own connection (``Connection: close``): a TCP connect per turn is
noise next to an LLM turn, and there is no pool to scan. Each network read is one
``receive_some`` plus h11 parsing. Cancelling the caller closes the socket at once.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import h11
import trio

MAX_READ = 65536


class StreamConnectError(Exception):
    """The server could not be reached (refused, unresolvable, connect timeout)."""


class StreamTimeout(Exception):
    """No byte arrived within the idle timeout (or the request could not be written in time)."""


class StreamBroken(Exception):
    """The connection failed or the server broke HTTP framing mid-response."""


async def _receive_into(
    stream: trio.abc.Stream, connection: h11.Connection, idle_timeout: float
) -> None:
    """One network read, fed to h11; every failure mapped to this module's exceptions."""
    # A bare CancelScope rather than fail_after: this runs once per token, and fail_after's
    # generator-based context manager costs several times more.
    try:
        with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as scope:
            data = await stream.receive_some(MAX_READ)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        raise StreamBroken(str(error)) from None
    if scope.cancelled_caught:
        raise StreamTimeout("no data within the idle timeout")
    try:
        connection.receive_data(bytes(data))
    except h11.RemoteProtocolError as error:
        raise StreamBroken(str(error)) from None


def _next_event(connection: h11.Connection) -> object:
    try:
        return connection.next_event()
    except h11.RemoteProtocolError as error:
        raise StreamBroken(str(error)) from None


class StreamingResponse:
    """Status, headers and an iterator over body chunks of one streamed response."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: h11.Connection,
        response: h11.Response,
        idle_timeout: float,
    ) -> None:
        self._stream = stream
        self._connection = connection
        self.status_code = response.status_code
        self.headers = {name.decode("latin-1"): value.decode("latin-1")
                        for name, value in response.headers}  # fmt: skip
        self._idle_timeout = idle_timeout

    async def iter_chunks(self) -> AsyncGenerator[bytes, None]:
        """Body bytes as they arrive (everything h11 parsed from one network read, joined)."""
        connection = self._connection
        while True:
            pieces: list[bytes] = []
            while True:
                try:
                    event = _next_event(connection)
                except StreamBroken:
                    # Broken framing after good data in the same network read: deliver the
                    # good part first (the relay forwards complete events), then fail.
                    if pieces:
                        yield b"".join(pieces)
                    raise
                if isinstance(event, h11.Data):
                    pieces.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    if pieces:
                        yield b"".join(pieces)
                    return
                elif event is h11.NEED_DATA:
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise StreamBroken("connection closed before the response ended")
            if pieces:
                yield b"".join(pieces)
            await _receive_into(self._stream, connection, self._idle_timeout)

    async def read_limited(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body (for error answers)."""
        body = b""
        async for chunk in self.iter_chunks():
            body += chunk
            if len(body) >= limit:
                break
        return body[:limit]


class StreamingClient:
    """Opens one connection per streamed request to ``base_url``."""

    def __init__(
        self,
        base_url: str,
        *,
        default_headers: dict[str, str],
        connect_timeout: float,
        write_timeout: float,
        idle_timeout: float,
    ) -> None:
        parts = urlsplit(base_url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc
        self._default_headers = default_headers
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        self._idle_timeout = idle_timeout
        # Built once: creating an SSL context loads the CA bundle (~tens of ms).
        self._ssl_context = ssl.create_default_context() if self._tls else None

    async def _connect(self) -> trio.abc.Stream:
        try:
            with trio.fail_after(self._connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
                if self._ssl_context is not None:
                    tls = trio.SSLStream(stream, self._ssl_context, server_hostname=self._host)
                    await tls.do_handshake()
                    stream = tls
        except trio.TooSlowError:
            raise StreamConnectError("connect timed out") from None
        except (OSError, trio.BrokenResourceError) as error:
            raise StreamConnectError(str(error)) from None
        return stream

    @asynccontextmanager
    async def post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[StreamingResponse]:
        """POST ``body`` and yield the response once its head has arrived."""
        stream = await self._connect()
        try:
            connection = h11.Connection(h11.CLIENT)
            request_headers = [
                ("Host", self._host_header),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                *self._default_headers.items(),
                *headers.items(),
            ]
            request = h11.Request(
                method="POST", target=self._prefix + path, headers=request_headers
            )
            payload = connection.send(request) + connection.send(h11.Data(data=body))
            payload += connection.send(h11.EndOfMessage())
            try:
                with trio.fail_after(self._write_timeout):
                    await stream.send_all(payload)
            except trio.TooSlowError:
                raise StreamTimeout("timed out sending the request") from None
            except (trio.BrokenResourceError, OSError) as error:
                raise StreamBroken(str(error)) from None
            response = await self._read_head(stream, connection)
            yield StreamingResponse(stream, connection, response, self._idle_timeout)
        finally:
            # Closing is what cancels the turn at the runtime; never wait for a peer here.
            await trio.aclose_forcefully(stream)

    async def _read_head(self, stream: trio.abc.Stream, connection: h11.Connection) -> h11.Response:
        while True:
            event = _next_event(connection)
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise StreamBroken("connection closed before a response")
            if event is h11.NEED_DATA:
                await _receive_into(stream, connection, self._idle_timeout)
            # an InformationalResponse (1xx): keep reading
