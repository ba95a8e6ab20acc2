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

Applied once, idempotently, by :func:`trio_gateway.server.serve`.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.events import Closed, RawData
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
    else:
        await _original_protocol_send(self, event)


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


def apply() -> None:
    """Install :func:`protocol_send` and :func:`run` on hypercorn's trio ``TCPServer`` (once)."""
    if getattr(tcp_server.TCPServer.protocol_send, _PATCHED, False):
        return
    setattr(protocol_send, _PATCHED, True)
    tcp_server.TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    tcp_server.TCPServer.run = run  # type: ignore[method-assign]
