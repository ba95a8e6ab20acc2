"""Work-arounds for hypercorn 0.18 bugs that let one client stop the whole server.

1. ``protocol_send`` and ``send_eof``:

hypercorn's trio ``TCPServer.protocol_send`` writes under its ``send_lock``, but the
connection's ``_close()`` calls ``SocketStream.send_eof()`` *without* that lock, and
``send_eof`` holds trio's send-conflict detector across a checkpoint. A write that starts in
that window (the session's writer sending an error frame, hypercorn's own ping task) raises
``trio.BusyResourceError``, which ``protocol_send`` does not catch: it escapes the connection's
task group, reaches ``trio.serve_listeners`` and takes the listener and every other connection
down with it. A client triggers it at will by sending a frame that makes hypercorn close the
connection (invalid UTF-8 in a text frame, a framing violation) while something is being sent
to it; ``tests/hostile/test_fuzz.py`` found it, ``tests/gateway/test_hypercorn_patches.py`` pins it.

The fix treats ``BusyResourceError`` during a write like the broken/closed connection it is
(the only other user of the stream is the close in progress). Everything else is hypercorn's
own code path.

2. Any other error escaping a connection: ``TCPServer.run`` catches only ``OSError``, and
``trio.serve_listeners`` lets a handler's exception cancel the listener and every connection.
One such error: a WebSocket upgrade request that carries a body makes hypercorn answer 400
while the app is still deciding, and the next answer raises h11's ``LocalProtocolError``
("Can't send data when our state is ERROR") out of the connection. :func:`run` contains such
errors to their own connection: logged (WARNING, with the exception type), socket closed.

3. WebSocket compression and message size (``GATEWAY__WS_COMPRESSION``):

hypercorn 0.18's ``Handshake.accept`` negotiates ``permessage-deflate`` whenever a client offers
it, before the app has a say, and wsproto's ``PerMessageDeflate`` inflates each chunk of a frame
without bound (``decompress(data)``, no ``max_length``): one 255 KB frame became 256 MiB in the
server before hypercorn's message-size check ran, no token needed. :func:`handshake_accept`
takes the decision from the server's own hypercorn ``Config`` (the flag
:func:`set_compression` puts there; settings are per app, this patch is process-wide): off, no
extension is negotiated whatever the client offers; on, :class:`BoundedPerMessageDeflate`
inflates at most the message budget. A server whose ``Config`` has no flag (not built by
``server.build_hypercorn_config``) keeps hypercorn's own behaviour.

:func:`websocket_buffer_extend` fixes the other half: hypercorn's ``WebsocketBuffer.extend``
stores a chunk *before* checking the size, and once a message was too big it kept appending
whatever the peer still sent (it closes with 1009, but reads on until the peer answers). It now
checks first and, once over, drops the buffered message and every later chunk; and
:func:`ws_stream_handle_events` keeps processing the frames behind a refused message (the
peer's close among them) instead of leaving them unread. The buffer's
``max_length`` is the one per-socket message limit: the bounded inflater reads it live, so
lowering it (first-frame authentication does, see ``session/transport.py``) bounds both.

4. A connection hypercorn means to close stayed open (``Connection: close`` not honoured):

At the end of an HTTP/1.1 request hypercorn decides, inside the app's last ``send()`` (so in
the app's own task), whether to recycle the connection or close it. It first queues
``http.disconnect`` for the app, which quart-trio takes as its cue to cancel the app's
nursery; the close that follows (``send_eof``) is then cancelled at its first checkpoint. So
a request with ``Connection: close``, a request whose body had not fully arrived, a CL+TE
request refused before its body: the answer went out and the socket stayed open until the
read timeout (41 s), fed one byte at a time for ever by a slow-loris. When the task that
sends a ``Closed`` event is cancelled before the socket is closed, :func:`protocol_send`
finishes the close in a new task of the connection's own nursery, where no app can cancel it.
(Shielding hypercorn's whole end-of-request instead was tried before and left
connections in CLOSE-WAIT: it also shielded the wait to queue ``http.disconnect``. This runs
only ``send_eof`` and ``aclose``, neither of which waits on the peer.)

The same cancellation lost the ``Updated(idle=True)`` that re-arms hypercorn's keep-alive timer
after a recycled request: from the second request on, nothing bounded how long a request head
may take, and one byte every < 41 s (the per-read timeout) held the connection for ever.
:func:`protocol_send` applies ``Updated`` events shielded (taking a lock held only by the other
idle-timer updates, starting or cancelling a task: nothing waits on the peer). With the timer
working, ``config.keep_alive_timeout`` (``GATEWAY__HTTP_HEAD_TIMEOUT``) bounds the time from a
connection's opening, or from the end of the previous response, to a complete request head.
A timer that works has one more consequence: hypercorn's connection task waits for it, so a
keep-alive connection the client closed kept its socket and two tasks until the timer ran out.
:func:`read_data` stops the timer as soon as the connection's reader has ended (EOF, read
timeout, closed): nothing can arrive any more, so there is nothing left for it to time.

5. HTTP/2 in cleartext: ``H11Protocol._check_protocol`` switches the connection to HTTP/2 on
a request carrying ``Upgrade: h2c`` (answering 101) or on the prior-knowledge preface ``PRI *
HTTP/2.0``. The gateway is HTTP/1.1 + WebSocket only, and behind a proxy that forwards
``Upgrade`` the 101 opened a raw tunnel past every proxy rule. :func:`check_protocol` does
nothing: an ``h2c`` upgrade is an ordinary HTTP/1.1 request (RFC 9110 7.8 lets a server ignore
``Upgrade``), and the preface reaches the app as an ``HTTP/2.0`` request, which the app
refuses with 400 and ``Connection: close`` (``GatewayApp``).

6. An answer cut by the request after it: when a client sends bytes h11 cannot take after a
request (anything after a request answered with ``Connection: close``, a body that breaks its
framing), hypercorn's reader closes the connection at once, racing the app's answer to the
request before: the client got half an answer, or none (``tests/hostile/test_http_edge.py``: the 400
for ``Content-Length`` + ``Transfer-Encoding`` with a request smuggled behind it).
:func:`protocol_send` leaves such a close to the end of the answer in flight, which closes the
connection anyway (h11 cannot reuse it); what the client sends meanwhile is read and dropped.

Applied once, idempotently, by :func:`trio_gateway.server.serve`.
"""

from __future__ import annotations

import logging
import sys
import zlib
from collections.abc import Iterable
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import h11 as h11_protocol
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import StreamClosed
from hypercorn.trio import tcp_server
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol
from wsproto.handshake import server_extensions_handshake

_PATCHED = "_trio_gateway_patched"
logger = logging.getLogger("trio_gateway.hypercorn")


async def protocol_send(self: Any, event: Any) -> None:
    """``TCPServer.protocol_send`` that survives a write racing the connection's close."""
    if isinstance(event, RawData):
        async with self.send_lock:
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                await self.protocol.handle(Closed())
    elif isinstance(event, Updated):
        # Re-arming or stopping the keep-alive timer must happen even in a task that is
        # being cancelled (item 4): bounded, it waits on nothing but the timer's own lock.
        with trio.CancelScope(shield=True):
            await _original_protocol_send(self, event)
    elif isinstance(event, Closed):
        if _answer_in_flight(self):
            return  # item 6: the end of that answer closes the connection
        try:
            await _original_protocol_send(self, event)
        except trio.Cancelled:
            # The caller's task was cancelled before the socket was closed: the app's task,
            # cancelled by quart-trio (item 4). Finish the close in a task of the
            # connection's own, which nothing cancels, then let the cancellation go on.
            nursery = getattr(getattr(self, "_task_group", None), "_nursery", None)
            if nursery is not None:
                nursery.start_soon(_close_connection, self)
            raise
    else:
        await _original_protocol_send(self, event)


def _answer_in_flight(self: Any) -> bool:
    """Whether the reader gave up on the client (h11 error) while the app's answer to the
    request before is still to be written (item 6)."""
    protocol = getattr(getattr(self, "protocol", None), "protocol", None)
    connection = getattr(protocol, "connection", None)
    return (
        isinstance(connection, h11.Connection)
        and connection.their_state is h11.ERROR
        and connection.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY)
        and getattr(protocol, "stream", None) is not None
    )


async def read_data(self: Any) -> None:
    """``TCPServer._read_data`` that stops the keep-alive timer once reading is over."""
    try:
        await _original_read_data(self)
    finally:
        with trio.CancelScope(shield=True):
            await self.idle_task.stop()


_original_read_data = tcp_server.TCPServer._read_data


async def _close_connection(self: Any) -> None:
    """What hypercorn does for a ``Closed`` event: close the socket, tell the protocol."""
    await self._close()
    await self.protocol.handle(Closed())


_original_protocol_send = tcp_server.TCPServer.protocol_send


async def run(self: Any) -> None:
    """``TCPServer.run`` whose errors end this connection only, never the listener."""
    try:
        await _original_run(self)
    except Exception as error:
        logger.warning(
            "connection dropped after an error in the HTTP server: %s",
            type(error).__name__,
            extra={"event": "server_connection_error", "error_type": type(error).__name__},
        )
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


_original_run = tcp_server.TCPServer.run


# --- 3. compression and message size -----------------------------------------------------

# Attribute of hypercorn's Config carrying our per-server decision (absent: not our server).
COMPRESSION_FLAG = "trio_gateway_ws_compression"
# WebsocketBuffer.length once a message was refused: every later chunk is refused too.
_OVERFLOWED = sys.maxsize


def set_compression(config: Config, enabled: bool) -> None:
    """Record on ``config`` whether this server negotiates ``permessage-deflate``."""
    setattr(config, COMPRESSION_FLAG, enabled)


def refuse_message(buffer: Any) -> None:
    """Mark hypercorn's ``WebsocketBuffer`` as over its limit: what it held is released now and
    every later chunk raises ``FrameTooLargeError`` (hypercorn then closes with 1009)."""
    buffer.value = None
    buffer.length = _OVERFLOWED


def websocket_buffer_extend(self: Any, event: Any) -> None:
    """``WebsocketBuffer.extend`` that checks the size *before* it stores the chunk."""
    if self.length + len(event.data) > self.max_length:
        refuse_message(self)
        raise ws_stream.FrameTooLargeError()
    _original_buffer_extend(self, event)


_original_buffer_extend = ws_stream.WebsocketBuffer.extend


async def ws_stream_handle_events(self: Any) -> None:
    """``WSStream._handle_events`` that goes on after refusing a message as too big.

    hypercorn's own loop ``break``s at the refusal, leaving every frame that came in the same
    read unprocessed until more data arrives: a client that answered the 1009 with its close
    frame right behind the rest of the refused message waited for a close that never came.
    Here the loop continues; the refused message's later chunks are dropped (the buffer stays
    over its limit, see :func:`websocket_buffer_extend`), pings and the close are answered.
    Otherwise hypercorn 0.18's code, line for line.
    """
    for event in self.connection.events():
        if isinstance(event, Message):
            try:
                self.buffer.extend(event)
            except ws_stream.FrameTooLargeError:
                # The first refusal sends the close; later ones are no-ops (wsproto refuses a
                # second close and _send_wsproto_event ignores that).
                await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                continue
            if event.message_finished:
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, CloseConnection):
            if self.connection.state == ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            await self.send(StreamClosed(stream_id=self.stream_id))


_original_handle_events = ws_stream.WSStream._handle_events


class BoundedPerMessageDeflate(PerMessageDeflate):
    """wsproto's ``permessage-deflate`` that never inflates a message past a budget.

    ``buffer`` is the stream's hypercorn ``WebsocketBuffer``: its ``max_length`` (read at every
    chunk, so a lowered limit applies at once) is the budget of one message, in inflated bytes.
    Each chunk is inflated with ``max_length`` = what is left of the budget + 1, so no single
    call can produce more than the budget. When a message would pass it, inflation stops for
    good (the deflate stream cannot be resumed half-way), the buffer is marked over its limit
    and empty payloads go up instead: hypercorn's own size check then closes the connection with
    1009, keeps reading (and dropping) until the peer answers the close, and never delivers the
    message. Memory per socket therefore stays within one budget here plus one in hypercorn's
    buffer.

    Nothing is dropped for honest clients: a call stops short only at ``max_length``, and that
    is exactly the over-budget case; below it zlib has consumed all input (``unconsumed_tail``
    is empty), which the loop below checks rather than assumes.
    """

    def __init__(self, buffer: Any) -> None:
        super().__init__()
        self._buffer = buffer
        self._message_bytes = 0  # inflated so far in the current message
        self._refused = False

    def _refuse(self) -> bytes:
        self._refused = True
        self._decompressor = None
        refuse_message(self._buffer)
        return b""

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if self._refused:
            return b""
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data  # not compressed: hypercorn's buffer bounds it
        decompressor = self._decompressor
        assert decompressor is not None
        inflated = bytearray()
        pending = bytes(data)
        while pending:
            left = self._buffer.max_length - self._message_bytes - len(inflated)
            try:
                inflated += decompressor.decompress(pending, max(left, 0) + 1)
            except zlib.error:
                return CloseReason.INVALID_FRAME_PAYLOAD_DATA
            if self._message_bytes + len(inflated) > self._buffer.max_length:
                return self._refuse()
            pending = decompressor.unconsumed_tail
        self._message_bytes += len(inflated)
        return bytes(inflated)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if self._refused:
            return None
        # The end-of-message flush only returns output still held back by zlib, which the
        # bounded calls above leave empty; counted anyway so the budget holds whatever zlib does.
        result = super().frame_inbound_complete(proto, fin)
        if isinstance(result, bytes):
            self._message_bytes += len(result)
            if self._message_bytes > self._buffer.max_length:
                return self._refuse()
        if fin:
            self._message_bytes = 0
        return result


def handshake_accept(
    self: Any, subprotocol: str | None, additional_headers: Iterable[tuple[bytes, bytes]]
) -> tuple[int, list[tuple[bytes, bytes]], Connection]:
    """``Handshake.accept`` whose extensions follow the server's config (see the module doc).

    hypercorn's own method still does everything else (subprotocol, accept token, headers): it
    runs with the client's extension offer hidden, so it negotiates nothing, and the answer
    then gets our extension (or none) added.
    """
    enabled = getattr(self, COMPRESSION_FLAG, None)
    if enabled is None:
        return _original_handshake_accept(self, subprotocol, additional_headers)
    offered, self.extensions = self.extensions, None
    try:
        status_code, headers, _ = _original_handshake_accept(self, subprotocol, additional_headers)
    finally:
        self.extensions = offered
    extensions: list[Extension] = []
    if enabled and offered:
        extensions = [BoundedPerMessageDeflate(getattr(self, _BUFFER))]
        accepts = server_extensions_handshake(offered, extensions)
        if accepts:
            headers.append((b"sec-websocket-extensions", accepts))
    return status_code, headers, Connection(ConnectionType.SERVER, extensions)


_original_handshake_accept = ws_stream.Handshake.accept
_BUFFER = "trio_gateway_buffer"


async def ws_stream_accept(self: Any, message: Any) -> None:
    """``WSStream._accept`` that hands the server's compression decision and the stream's
    message buffer to :func:`handshake_accept` (a ``Handshake`` knows neither)."""
    enabled = getattr(self.config, COMPRESSION_FLAG, None)
    if enabled is not None:
        setattr(self.handshake, COMPRESSION_FLAG, enabled)
        setattr(self.handshake, _BUFFER, self.buffer)
    await _original_ws_stream_accept(self, message)


_original_ws_stream_accept = ws_stream.WSStream._accept


# --- 5. HTTP/2 in cleartext -----------------------------------------------------------


async def check_protocol(self: Any, event: Any) -> None:
    """``H11Protocol._check_protocol`` that never leaves HTTP/1.1 (see item 5)."""


_original_check_protocol = h11_protocol.H11Protocol._check_protocol


def apply() -> None:
    """Install the patches above on hypercorn's classes (once)."""
    if getattr(tcp_server.TCPServer.protocol_send, _PATCHED, False):
        return
    setattr(protocol_send, _PATCHED, True)
    tcp_server.TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    tcp_server.TCPServer.run = run  # type: ignore[method-assign]
    ws_stream.WebsocketBuffer.extend = websocket_buffer_extend  # type: ignore[method-assign]
    ws_stream.Handshake.accept = handshake_accept  # type: ignore[method-assign]
    ws_stream.WSStream._accept = ws_stream_accept  # type: ignore[method-assign]
    ws_stream.WSStream._handle_events = ws_stream_handle_events  # type: ignore[method-assign]
    tcp_server.TCPServer._read_data = read_data  # type: ignore[method-assign]
    h11_protocol.H11Protocol._check_protocol = check_protocol  # type: ignore[method-assign]
