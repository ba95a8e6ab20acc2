"""A keep-alive HTTP/1.1 server on loopback for the runtime connection pool's tests.

It answers every request with a chunked SSE body (one final chunk by default) and keeps the
connection open, like hypercorn does, unless the request's ``message.content`` (or, for
requests without a JSON body, the path) picks a misbehaviour:

* ``close-after``: answer, then close the connection without saying so (no
  ``Connection: close``): the client pools a connection that is already gone;
* ``reset-on-next``: answer, then wait until the next request arrives and close without
  reading it (the kernel answers the unread bytes with a reset): the race of a server whose
  keep-alive timer fires as the next request comes in;
* ``head-then-close``: send the response head and one event, then close mid-body;
* ``partial-head``: send the first bytes of a status line, then close;
* ``hang``: send the head and one event, then stay silent until the client goes away;
* ``slow``: answer after 50 ms (to keep connections busy).

``drop_next = N`` makes the next N requests (whatever they say) be read in full and then left
unanswered: the connection is closed cleanly (FIN), as by a server that processed a request
and died, or whose keep-alive timer fired just after reading it.

It records every connection and every request on it, so tests can say "N turns on one
connection" and "this request reached the server exactly once".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h11
import orjson
import trio

from .ports import LoopbackServer
from .scripted_runtime import chunk, sse

FINAL = sse(chunk(type="assistant_message", content="ok", token="ok", is_final=True))


@dataclass
class Served:
    """One accepted connection: the request bodies it carried, and whether it is open."""

    index: int
    requests: list[dict[str, Any]] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # "METHOD target" of each request
    open: bool = True


class KeepAliveRuntime(LoopbackServer):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.connections: list[Served] = []
        self.client_went_away = 0
        self.open_now = 0
        self.most_open = 0
        self.drop_next = 0

    @property
    def contents(self) -> list[str]:
        """``message.content`` of every request, in arrival order over all connections."""
        return [
            str((request.get("message") or {}).get("content"))
            for served in self.connections
            for request in served.requests
        ]

    async def _handle(self, stream: trio.SocketStream) -> None:
        served = Served(len(self.connections))
        self.connections.append(served)
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(stream, connection)
                if request is None:
                    return
                target, payload = request
                served.requests.append(payload)
                served.targets.append(target)
                if self.drop_next > 0:
                    self.drop_next -= 1
                    return  # read in full, never answered: the finally closes (FIN)
                path = target.partition(" ")[2]
                content = str((payload.get("message") or {}).get("content") or path)
                if not await self._answer(stream, connection, content):
                    return
                connection.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            served.open = False
            self.open_now -= 1
            await trio.aclose_forcefully(stream)

    async def _read_request(
        self, stream: trio.SocketStream, connection: h11.Connection
    ) -> tuple[str, dict[str, Any]] | None:
        body = b""
        target = ""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                target = f"{event.method.decode()} {event.target.decode()}"
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return target, (orjson.loads(body) if body else {})
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _answer(
        self, stream: trio.SocketStream, connection: h11.Connection, how: str
    ) -> bool:
        """Send the answer; False when the connection must end here."""
        head = h11.Response(
            status_code=200,
            headers=[("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")],
        )
        if how == "slow":
            await trio.sleep(0.05)
        if how == "partial-head":
            await stream.send_all(b"HTTP/1.1 20")
            return False
        if how in ("head-then-close", "hang"):
            first = sse(chunk(type="assistant_message", content="a", token="a"))
            await stream.send_all(connection.send(head) + connection.send(h11.Data(data=first)))
            if how == "hang":
                while await stream.receive_some(65536):
                    pass
                self.client_went_away += 1
            return False
        await stream.send_all(
            connection.send(head)
            + connection.send(h11.Data(data=FINAL))
            + connection.send(h11.EndOfMessage())
        )
        if how == "close-after":
            return False
        if how == "reset-on-next":
            # Close with the next request unread in our receive buffer: the kernel sends a RST.
            await trio.lowlevel.wait_readable(stream.socket)
            return False
        return True
