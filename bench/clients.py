"""The relay benchmarks' clients, written once: one ``bench N`` turn read straight from the
runtime's SSE stream (httpx, the way a careful plain client would) or through the gateway
(trio-websocket), both accounted chunk by chunk in a :class:`TurnResult` and checked exact; the
httpx client for the runtime and its warm-up; a group of gateway WebSockets opened and closed
together (:class:`SocketGroup`); a gateway WebSocket read all the time by a task of its own, on
the tests' raw client (:class:`LiveClient`); a keep-alive REST connection (:class:`RestConnection`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
import orjson
import trio
import trio_websocket
from wsproto.events import CloseConnection, Message, Ping
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import LocalProtocolError

from bench.harness import HOST, BenchError, Services
from tests.support.frames import ide_frame
from tests.support.rawws import RawWebSocket

STREAM_PATH = "/agent/message/stream"

CONNECT_TIMEOUT = 30.0  # seconds for one WebSocket handshake
CLOSE_TIMEOUT = 10.0  # seconds for one WebSocket close
OPEN_CONCURRENCY = 100  # WebSocket handshakes (and closes) in flight at once
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a fully coalesced turn must never trip the client's limit


def expected_text(tokens: int) -> str:
    """The exact text of a ``bench N`` turn: ``t0 t1 ... t{N-1} ``."""
    return "".join(f"t{index} " for index in range(tokens))


# ------------------------------------------------------------------------------------------------
# One turn, read by either client
# ------------------------------------------------------------------------------------------------


@dataclass
class TurnResult:
    """What one client saw of one turn. Both paths fill it the same way, chunk by chunk."""

    measure_latency: bool = False
    parts: list[str] = field(default_factory=list)
    frames: int = 0  # non-final token frames (WebSocket frames, or SSE events direct)
    multi_token_frames: int = 0  # frames that carried more than one token (coalesced)
    latencies_ns: list[int] = field(default_factory=list)
    finished_at: float | None = None  # time.perf_counter() when the final chunk arrived

    def absorb(self, chunk: Any, received_ns: int) -> bool:
        """Account one chunk received at ``received_ns``; True when it ends the turn."""
        if not isinstance(chunk, dict) or chunk.get("type") != "assistant_message":
            raise BenchError(f"unexpected chunk: {short(chunk)}")
        token = chunk.get("token")
        if chunk.get("is_final") is True:
            if token:
                self.parts.append(token)
            self.finished_at = time.perf_counter()
            return True
        if not isinstance(token, str):
            raise BenchError(f"token chunk without a string token: {short(chunk)}")
        self.parts.append(token)
        self.frames += 1
        if token.count(" ") > 1:
            self.multi_token_frames += 1
        if self.measure_latency:
            metadata = chunk.get("metadata")
            if not isinstance(metadata, dict) or not isinstance(metadata.get("emitted_ns"), int):
                raise BenchError(f"paced chunk without metadata.emitted_ns: {short(chunk)}")
            self.latencies_ns.append(received_ns - metadata["emitted_ns"])
        return False

    def verify(self, expected: str, where: str) -> None:
        """Raise unless the turn ended and its text is exactly ``expected``."""
        if self.finished_at is None:
            raise BenchError(f"{where}: the turn ended without a final chunk")
        text = "".join(self.parts)
        if text != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
                min(len(text), len(expected)),
            )
            raise BenchError(
                f"{where}: wrong text ({len(text)} chars, expected {len(expected)}); first "
                f"difference at {at}: got {text[at : at + 40]!r}, expected "
                f"{expected[at : at + 40]!r}"
            )


def verify_all(results: Sequence[TurnResult], tokens: int, where: str) -> None:
    """Every turn ended and carried exactly ``bench tokens``'s text."""
    expected = expected_text(tokens)
    for index, result in enumerate(results):
        result.verify(expected, f"{where} session {index}")


def short(value: Any, limit: int = 300) -> str:
    """``repr(value)``, cut at ``limit`` characters: for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def user_message(content: str) -> dict[str, str]:
    """The IDE's ``user_message`` frame."""
    return {"type": "user_message", "content": content}


def next_seq(frame: Any, last_seq: int | None) -> int:
    """``frame``'s ``seq``, which must be one more than ``last_seq`` (any int on a first frame)."""
    seq = frame.get("seq") if isinstance(frame, dict) else None
    if not isinstance(seq, int) or (last_seq is not None and seq != last_seq + 1):
        raise BenchError(f"gateway frame out of sequence after seq {last_seq}: {short(frame)}")
    return seq


async def direct_turn(
    client: httpx.AsyncClient, session_id: str, content: str, result: TurnResult
) -> None:
    """Stream one turn straight from the runtime, the way a careful plain client would.

    The byte stream is split on the blank line that ends each event (the runtime sends exactly
    ``data: {json}\\n\\n``) and each ``data:`` payload is parsed with orjson. The receipt time of
    a network read is taken once, before any of its events are parsed.
    """
    body = orjson.dumps({"session_id": session_id, "message": user_message(content)})
    async with client.stream("POST", STREAM_PATH, content=body) as response:
        if response.status_code != 200:
            detail = (await response.aread())[:300]
            raise BenchError(f"runtime answered HTTP {response.status_code}: {detail!r}")
        buffer = b""
        done = False
        async for piece in response.aiter_bytes():
            received_ns = time.time_ns()
            *events, buffer = (buffer + piece).split(b"\n\n")
            for event in events:
                if done:
                    raise BenchError(f"direct {session_id}: data after the final chunk")
                if event.startswith(b"data: "):
                    done = result.absorb(orjson.loads(event[6:]), received_ns)
        # Reading to the end (not breaking at the final chunk) returns the connection to the pool.
        if buffer.strip():
            raise BenchError(f"direct {session_id}: unterminated event at the end of the stream")


async def gateway_turn(
    ws: trio_websocket.WebSocketConnection, content: str, result: TurnResult
) -> None:
    """Send one message over an open gateway WebSocket and read frames until ``is_final``.

    Checks, per frame: a JSON text frame, not an error, ``seq`` one more than the previous one.
    """
    await ws.send_message(orjson.dumps(user_message(content)).decode())
    last_seq: int | None = None
    while True:
        message = await ws.get_message()
        received_ns = time.time_ns()
        if not isinstance(message, str):
            raise BenchError("gateway sent a binary frame")
        frame = orjson.loads(message)
        last_seq = next_seq(frame, last_seq)
        if result.absorb(frame, received_ns):
            return


# ------------------------------------------------------------------------------------------------
# Clients and connections
# ------------------------------------------------------------------------------------------------


def direct_client(services: Services, connections: int) -> httpx.AsyncClient:
    """An httpx client for the runtime with room for ``connections`` concurrent streams."""
    return httpx.AsyncClient(
        base_url=services.runtime.url,
        headers={"X-Internal-Auth": services.internal_key, "Content-Type": "application/json"},
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(60.0),
        trust_env=False,
    )


async def warm_direct_pool(client: httpx.AsyncClient, connections: int, prefix: str) -> None:
    """Open ``connections`` keep-alive connections (one tiny concurrent turn each), so the timed
    streams measure streaming, not TCP set-up, as they do through the gateway's warm pool."""
    results = [TurnResult() for _ in range(connections)]
    async with trio.open_nursery() as nursery:
        for index, result in enumerate(results):
            nursery.start_soon(direct_turn, client, f"{prefix}-{index}", "bench 1", result)
    verify_all(results, 1, "direct warm-up")


class SocketGroup:
    """WebSockets to the gateway, each owned by its own holder task.

    A holder runs the connection's background reader in a nursery of its own, so the one known
    client-side failure of trio-websocket stays contained: when the server's ping crosses our
    close frame, the reader answers it with a pong in ``LOCAL_CLOSING`` and dies with wsproto's
    ``LocalProtocolError`` (python-trio/trio-websocket#184). hypercorn pings every connection
    right after the handshake, so closing a freshly opened socket hits it often. The error is
    ignored only once the close has begun; anywhere else it fails the benchmark.

    Use inside a nursery: ``await group.open(ids)``, work, ``group.close_all()``; the nursery
    exits when every socket is closed (each close bounded by ``CLOSE_TIMEOUT``).
    """

    def __init__(self, nursery: trio.Nursery, services: Services) -> None:
        """Holders will run in ``nursery``."""
        self._nursery = nursery
        self._services = services
        self._release = trio.Event()
        self._limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)

    async def open(self, session_ids: Sequence[str]) -> list[trio_websocket.WebSocketConnection]:
        """Connect one WebSocket per session id, ``OPEN_CONCURRENCY`` handshakes at a time."""
        sockets: list[trio_websocket.WebSocketConnection | None] = [None] * len(session_ids)

        async def one(index: int, session_id: str) -> None:
            async with self._limiter:
                sockets[index] = await self._nursery.start(self._hold, session_id)

        async with trio.open_nursery() as opener:
            for index, session_id in enumerate(session_ids):
                opener.start_soon(one, index, session_id)
        return [ws for ws in sockets if ws is not None]

    def close_all(self) -> None:
        """Ask every holder to close its socket."""
        self._release.set()

    async def _hold(
        self,
        session_id: str,
        task_status: trio.TaskStatus[trio_websocket.WebSocketConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        closing = False
        try:
            async with trio.open_nursery() as nursery:
                ws = await self._connect(nursery, session_id)
                task_status.started(ws)
                await self._release.wait()
                closing = True
                async with self._limiter:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await ws.aclose()
                nursery.cancel_scope.cancel()  # a reader left behind by a close that timed out
        except* LocalProtocolError as group:
            if not closing:
                raise BenchError(f"WebSocket protocol error: {group.exceptions[0]}") from None

    async def _connect(
        self, nursery: trio.Nursery, session_id: str
    ) -> trio_websocket.WebSocketConnection:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await trio_websocket.connect_websocket_url(
                    nursery,
                    self._services.ws_url(session_id),
                    max_message_size=MAX_MESSAGE_BYTES,
                )
        except trio.TooSlowError:
            raise BenchError(f"WebSocket handshake took over {CONNECT_TIMEOUT:g} s") from None
        except (trio_websocket.HandshakeError, OSError) as error:
            raise BenchError(f"WebSocket connect failed: {error!r}") from None


class RestConnection:
    """One keep-alive HTTP/1.1 connection to a gateway (h11 on a trio socket)."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> RestConnection:
        """A fresh connection to ``127.0.0.1:port``."""
        return cls(await trio.open_tcp_stream(HOST, port), f"{HOST}:{port}")

    @property
    def local_port(self) -> int:
        """This end's port (to find the server-side socket)."""
        return int(self.stream.socket.getsockname()[1])

    async def get(self, path: str) -> int:
        """One GET, read to its end; the status code."""
        request = h11.Request(method="GET", target=path, headers=[("Host", self.host)])
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise BenchError("the gateway closed a keep-alive connection")


class LiveClient:
    """A :class:`~tests.support.rawws.RawWebSocket` (offering permessage-deflate) whose socket a
    background task reads all the time.

    The reader answers the gateway's pings (a client that stops reading while another path has
    its round would, rightly, be dropped by the gateway's heartbeat) and hands each complete
    frame on with the time the network read that carried it returned, taken before parsing.
    Run :meth:`read_forever` in a nursery; cancel it before :meth:`aclose`."""

    def __init__(self, client: RawWebSocket) -> None:
        """Wrap a connected client."""
        self.client = client
        self._send_lock = trio.Lock()  # the reader's pongs and the turns' messages share a socket
        self._frames_in, self._frames = trio.open_memory_channel[tuple[int, Any]](math.inf)

    @property
    def local_port(self) -> int:
        """This end's port (to find the server-side socket)."""
        return int(self.client.stream.socket.getsockname()[1])

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.client.stream.send_all(data)

    async def read_forever(self) -> None:
        """Read, answer pings, queue frames; ends at EOF or a close frame."""
        ws, pieces = self.client.ws, []
        async with self._frames_in:
            while True:
                data = await self.client.stream.receive_some(65536)
                received_ns = time.time_ns()
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Ping):
                        await self._send(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        return
                    elif isinstance(event, Message):
                        pieces.append(str(event.data))
                        if event.message_finished:
                            self._frames_in.send_nowait(
                                (received_ns, orjson.loads("".join(pieces)))
                            )
                            pieces = []

    async def turn(self, content: str, result: TurnResult) -> None:
        """Send ``content`` as an IDE frame and account frames into ``result`` until
        ``is_final``; ``seq`` must grow by one per frame."""
        await self._send(
            self.client.ws.send(Message(data=orjson.dumps(ide_frame(content)).decode()))
        )
        last_seq: int | None = None
        while True:
            try:
                received_ns, frame = await self._frames.receive()
            except trio.EndOfChannel:
                raise BenchError("the gateway closed the socket mid-turn") from None
            last_seq = next_seq(frame, last_seq)
            if result.absorb(frame, received_ns):
                return

    async def aclose(self) -> None:
        """Close frame (best effort), then the socket."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.client.close()


@contextlib.asynccontextmanager
async def live_clients(port: int, paths: Sequence[str]) -> AsyncIterator[list[LiveClient]]:
    """One :class:`LiveClient` per path on ``127.0.0.1:port``, read until the block ends."""
    clients: list[LiveClient] = []
    async with trio.open_nursery() as nursery:
        try:
            for path in paths:
                client = LiveClient(
                    await RawWebSocket.connect(port, path, extensions=[PerMessageDeflate()])
                )
                clients.append(client)
                nursery.start_soon(client.read_forever)
            yield clients
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):  # the close frames go out even when cancelled
                for client in clients:
                    await client.aclose()
