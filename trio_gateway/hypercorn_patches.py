"""A work-around for a hypercorn 0.18 bug that lets one client stop the whole server.

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
own code path. Applied once, idempotently, by :func:`trio_gateway.server.serve`.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio import tcp_server

_PATCHED = "_trio_gateway_patched"


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


def apply() -> None:
    """Install :func:`protocol_send` on hypercorn's trio ``TCPServer`` (once)."""
    if getattr(tcp_server.TCPServer.protocol_send, _PATCHED, False):
        return
    setattr(protocol_send, _PATCHED, True)
    tcp_server.TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
