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
to it; ``tests/test_fuzz.py`` found it, ``tests/test_hypercorn_patches.py`` pins it.

The fix treats ``BusyResourceError`` during a write like the broken/closed connection it is
(the only other user of the stream is the close in progress). Everything else is hypercorn's
own code path.

2. Any other error escaping a connection: ``TCPServer.run`` catches only ``OSError``, and
``trio.serve_listeners`` lets a handler's exception cancel the listener and every connection.
One such error: a WebSocket upgrade request that carries a body makes hypercorn answer 400
while the app is still deciding, and the next answer raises h11's ``LocalProtocolError``
("Can't send data when our state is ERROR") out of the connection. :func:`run` contains such
errors to their own connection: logged (WARNING, with the exception type), socket closed.

3. A connection hypercorn means to close stayed open (``Connection: close`` not honoured):

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

4. HTTP/2 in cleartext: ``H11Protocol._check_protocol`` switches the connection to HTTP/2 on
a request carrying ``Upgrade: h2c`` (answering 101) or on the prior-knowledge preface ``PRI *
HTTP/2.0``. The gateway is HTTP/1.1 + WebSocket only, and behind a proxy that forwards
``Upgrade`` the 101 opened a raw tunnel past every proxy rule. :func:`check_protocol` does
nothing: an ``h2c`` upgrade is an ordinary HTTP/1.1 request (RFC 9110 7.8 lets a server ignore
``Upgrade``), and the preface reaches the app as an ``HTTP/2.0`` request, which the app
refuses with 400 and ``Connection: close`` (``GatewayApp``).

5. An answer cut by the request after it: when a client sends bytes h11 cannot take after a
request (anything after a request answered with ``Connection: close``, a body that breaks its
framing), hypercorn's reader closes the connection at once, racing the app's answer to the
request before: the client got half an answer, or none (``tests/test_http_edge.py``: the 400
for ``Content-Length`` + ``Transfer-Encoding`` with a request smuggled behind it).
:func:`protocol_send` leaves such a close to the end of the answer in flight, which closes the
connection anyway (h11 cannot reuse it); what the client sends meanwhile is read and dropped.

Applied once, idempotently, by :func:`trio_gateway.server.serve`.
"""

from __future__ import annotations

import logging
from typing import Any

import h11
import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import h11 as h11_protocol
from hypercorn.trio import tcp_server

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
        # being cancelled (item 3): bounded, it waits on nothing but the timer's own lock.
        with trio.CancelScope(shield=True):
            await _original_protocol_send(self, event)
    elif isinstance(event, Closed):
        if _answer_in_flight(self):
            return  # item 5: the end of that answer closes the connection
        try:
            await _original_protocol_send(self, event)
        except trio.Cancelled:
            # The caller's task was cancelled before the socket was closed: the app's task,
            # cancelled by quart-trio (item 3). Finish the close in a task of the
            # connection's own, which nothing cancels, then let the cancellation go on.
            nursery = getattr(getattr(self, "_task_group", None), "_nursery", None)
            if nursery is not None:
                nursery.start_soon(_close_connection, self)
            raise
    else:
        await _original_protocol_send(self, event)


def _answer_in_flight(self: Any) -> bool:
    """Whether the reader gave up on the client (h11 error) while the app's answer to the
    request before is still to be written (item 5)."""
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


async def check_protocol(self: Any, event: Any) -> None:
    """``H11Protocol._check_protocol`` that never leaves HTTP/1.1 (see item 4)."""


_original_check_protocol = h11_protocol.H11Protocol._check_protocol


def apply() -> None:
    """Install :func:`protocol_send` and :func:`run` on hypercorn's trio ``TCPServer`` and
    :func:`check_protocol` on its HTTP/1.1 protocol (once)."""
    if getattr(tcp_server.TCPServer.protocol_send, _PATCHED, False):
        return
    setattr(protocol_send, _PATCHED, True)
    tcp_server.TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    tcp_server.TCPServer.run = run  # type: ignore[method-assign]
    tcp_server.TCPServer._read_data = read_data  # type: ignore[method-assign]
    h11_protocol.H11Protocol._check_protocol = check_protocol  # type: ignore[method-assign]
