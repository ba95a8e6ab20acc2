"""A thin ASGI WebSocket adapter for one connection, with a way to abort a stuck transport.

Why the session engine speaks ASGI directly instead of through quart-trio's ``websocket``
object: quart-trio's wrapper differs between 0.12 and 0.13 (0.13 buffers inbound frames without
limit and raises ``ClientDisconnectedError``), its ``send`` is not a checkpoint once hypercorn
has dropped the peer (a send loop then spins and freezes the worker), and it hides the ASGI
``send`` callable that :func:`find_transport_aborter` needs. Reading ``receive()`` only when the
reader is ready keeps inbound buffering bounded by hypercorn's app queue (TCP backpressure does
the rest), and :meth:`WebSocketConnection.send_text` checkpoints before every send.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio
from wsproto.events import Ping  # hypercorn's WebSocket engine

logger = logging.getLogger("trio_gateway.transport")

T = TypeVar("T")

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


class ConnectionClosed(Exception):
    """The peer closed the WebSocket (or the server dropped it)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"websocket closed (code={code})")
        self.code = code


def find_transport_aborter(send: ASGISend) -> Callable[[], None] | None:
    """Return a function that closes the TCP stream under a hypercorn h11 WebSocket, or None.

    hypercorn's trio transport writes inside a *shielded* cancel scope, so a client that stops
    reading blocks the writing task forever and no timeout or cancellation reaches it. The one
    thing that ends that send is closing the socket (trio then wakes the blocked send with
    ``ClosedResourceError``, which hypercorn turns into a disconnect). ASGI offers no such call,
    so we follow the bound methods hypercorn hands us: ``WSStream.app_send`` ->
    ``H11Protocol.stream_send`` -> ``TCPServer.protocol_send`` -> ``TCPServer.stream``. Every
    hop is checked; on any other server (or a future hypercorn) this returns None and the caller
    falls back to ordinary closes. ``tests/gateway/test_slow_clients.py`` proves the path works.
    """
    try:
        ws_stream = getattr(send, "__self__", None)
        protocol = getattr(getattr(ws_stream, "send", None), "__self__", None)
        tcp_server = getattr(getattr(protocol, "send", None), "__self__", None)
        stream = getattr(tcp_server, "stream", None)
    except Exception:  # pragma: no cover - defensive: attribute access on foreign objects
        return None
    socket = getattr(stream, "socket", None)
    if not isinstance(stream, trio.abc.Stream) or socket is None:
        return None

    def abort() -> None:
        # SocketStream.aclose() is just socket.close() plus a checkpoint; closing the trio
        # socket synchronously notifies every task blocked on it (the shielded send included).
        with contextlib.suppress(OSError):  # already closed
            socket.close()

    return abort


class FirstMessageLimit:
    """Until released: hypercorn delivers at most one message of at most ``max_bytes``, then
    stops reading the socket.

    For a socket that has not authenticated yet (first-frame auth): it may cost one small
    message, whatever it sends, and an honest client that sends its next (large) message right
    behind its ``auth`` frame loses nothing - that message waits in the kernel until
    :meth:`release` restores the normal limit. Lowering the limit only after the first message
    arrived would be too late: hypercorn assembles each message in its ``WebsocketBuffer``
    (bounded by ``websocket_max_message_size``) before the app sees it, so the bound has to be
    on that buffer. Its ``max_length`` is also the budget of the bounded inflater
    (``hypercorn_patches.BoundedPerMessageDeflate``), so compressed frames are covered too.

    The pause wraps the stream's ``app_put`` (how hypercorn queues events for the app): after a
    ``websocket.receive`` it waits for :meth:`release`. That waits in hypercorn's read task, so
    the socket is not read meanwhile (TCP backpressure). :meth:`release` must therefore always
    run; :class:`WebSocketConnection` also releases on close and abort.
    """

    def __init__(self, ws_stream: Any, max_bytes: int) -> None:
        self._stream = ws_stream
        self._buffer = ws_stream.buffer
        self._normal_limit = int(self._buffer.max_length)
        self._buffer.max_length = min(max_bytes, self._normal_limit)
        self._released = trio.Event()
        put = ws_stream.app_put

        async def put_then_hold(message: dict[str, Any]) -> None:
            await put(message)
            if message.get("type") == "websocket.receive":
                await self._released.wait()

        ws_stream.app_put = put_then_hold
        self._put = put

    @classmethod
    def install(cls, send: ASGISend, max_bytes: int) -> FirstMessageLimit | None:
        """Install on the hypercorn stream behind ``send``; None on another server (then the
        limit is only what the server itself enforces). Same path as
        :func:`find_transport_aborter`: ``send`` is the bound ``WSStream.app_send``."""
        ws_stream = getattr(send, "__self__", None)
        buffer = getattr(ws_stream, "buffer", None)
        if not isinstance(getattr(buffer, "max_length", None), int) or not callable(
            getattr(ws_stream, "app_put", None)
        ):
            return None
        return cls(ws_stream, max_bytes)

    def release(self, *, restore: bool) -> None:
        """Resume reading; with ``restore`` the normal message limit applies again (after a
        successful auth), without it the small one stays (a socket being closed)."""
        if self._released.is_set():
            return
        if restore:
            self._buffer.max_length = self._normal_limit
        self._stream.app_put = self._put
        self._released.set()


class WebSocketConnection:
    """One ASGI WebSocket: handshake, receive, send, close, and abort.

    One task at a time sends: the connection's writer (or, while the writer waits, its sibling
    that only pings; before the writer exists, the handshake's :meth:`receive_pinging`).
    ``send_started_at`` lets a watchdog outside that task see a send blocked for too long.
    """

    # Slots: one per open socket (docs/performance.md, "Idle memory").
    __slots__ = (
        "_abort",
        "_first_message_limit",
        "_receive",
        "_send",
        "_send_finished",
        "aborted",
        "accepted",
        "closed",
        "disconnected",
        "last_send_at",
        "peer_closed_code",
        "ping_due",
        "scope",
        "send_started_at",
    )

    def __init__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self._abort = find_transport_aborter(send)
        self.accepted = False
        self.closed = False
        self.peer_closed_code: int | None = None
        self.disconnected = False  # hypercorn delivered websocket.disconnect
        self.aborted = False
        self.send_started_at: float | None = None
        self.last_send_at = trio.current_time()
        self.ping_due = False  # see ask_ping
        # Created by the first wait_send_finished (a close guard); most sockets never need it.
        self._send_finished: trio.lowlevel.ParkingLot | None = None
        self._first_message_limit: FirstMessageLimit | None = None

    @property
    def requested_subprotocols(self) -> list[str]:
        """Subprotocols the client offered in ``Sec-WebSocket-Protocol``."""
        return list(self.scope.get("subprotocols") or [])

    @property
    def can_abort(self) -> bool:
        """Whether a blocked transport can be force-closed on this server."""
        return self._abort is not None

    async def wait_connect(self) -> None:
        """Consume the initial ``websocket.connect`` event."""
        event = await self._receive()
        if event["type"] == "websocket.disconnect":
            self.closed = True
            self.disconnected = True
            raise ConnectionClosed(event.get("code"))

    async def reject(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """Refuse the handshake with a real HTTP response (ASGI denial-response extension)."""
        all_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ]
        await self._send(
            {"type": "websocket.http.response.start", "status": status, "headers": all_headers}
        )
        await self._send({"type": "websocket.http.response.body", "body": body})
        self.closed = True

    def limit_first_message(self, max_bytes: int) -> bool:
        """Before :meth:`accept` of a socket that must authenticate with its first frame:
        see :class:`FirstMessageLimit`. Returns False when the server offers no way to."""
        self._first_message_limit = FirstMessageLimit.install(self._send, max_bytes)
        return self._first_message_limit is not None

    def release_first_message_limit(self, *, restore: bool) -> None:
        """End :meth:`limit_first_message` (idempotent); ``restore``: full limit again."""
        if self._first_message_limit is not None:
            self._first_message_limit.release(restore=restore)

    async def accept(self, subprotocol: str | None) -> None:
        """Complete the handshake, echoing ``subprotocol`` when one was chosen."""
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol})
        self.accepted = True

    async def receive(self) -> str | bytes:
        """Next inbound message; raises :class:`ConnectionClosed` on disconnect."""
        event = await self._receive()
        kind = event["type"]
        if kind == "websocket.receive":
            text = event.get("text")
            if text is not None:
                return str(text)
            return bytes(event.get("bytes") or b"")
        if kind == "websocket.disconnect":
            self.closed = True
            self.disconnected = True
            self.peer_closed_code = event.get("code")
            raise ConnectionClosed(self.peer_closed_code)
        # Anything else is a server bug; treat it as a disconnect rather than spin.
        self.closed = True
        self.disconnected = True
        raise ConnectionClosed(None)

    async def send_text(self, text: str) -> None:
        """Send one text frame.

        The explicit checkpoint matters: once hypercorn has dropped the peer its ``send``
        returns without ever yielding, so a send loop would spin and freeze the worker. It is
        also where cancellation reaches the writer *before* anything is written.
        """
        if self.ping_due:
            await self.send_ping_if_due()
        try:
            await self._send_watched(self._send, {"type": "websocket.send", "text": text})
        finally:
            self.last_send_at = trio.current_time()

    def ask_ping(self) -> None:
        """A protocol ping is owed: the next send on this socket (a frame, a batch between
        two frames, or :meth:`send_ping_if_due` of an idle or waiting writer) sends it first.

        The peer's pong is inbound traffic, so hypercorn's read timeout keeps a quiet live
        peer and drops a dead one. The sending task sends the ping, like every frame, instead
        of hypercorn's own ping task: that task costs every idle socket ~3.5 KiB, and a ping
        sent here is watched by the slow-client guard like any other send (a ping to a client
        that stopped reading blocks in hypercorn's shielded send too). Owed rather than sent at
        once, it also goes out between two frames of a long batch to a slow reader.
        """
        self.ping_due = True

    async def send_ping_if_due(self) -> None:
        """Send the ping :meth:`ask_ping` asked for, if any.

        ASGI has no ping event, so this takes the same hypercorn path as
        :func:`find_transport_aborter` (``WSStream._send_wsproto_event``); on another server it
        sends nothing.
        """
        if not self.ping_due:
            return
        self.ping_due = False
        ws_stream = getattr(self._send, "__self__", None)
        send_event = getattr(ws_stream, "_send_wsproto_event", None)
        if send_event is not None:
            await self._send_watched(send_event, Ping())

    async def pinging_while(self, wait: Callable[[], Awaitable[T]], tick: float) -> T:
        """Run ``wait()`` (a wait of the task that sends on this socket: for the client's
        resume, the previous writer, the shared stream) with a sibling that sends the pings
        :meth:`ask_ping` asks for meanwhile, looking every ``tick`` seconds: a quiet client must
        not meet the read timeout. The sending task sends nothing during ``wait``, so the two
        never send at once; the pings are watched by the guard like any send."""

        async def ping_meanwhile() -> None:
            while True:
                await self.send_ping_if_due()
                await trio.sleep(tick)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping_meanwhile)
            try:
                return await wait()
            finally:
                nursery.cancel_scope.cancel()

    async def receive_pinging(self, timeout: float, interval: float) -> str | bytes | None:
        """:meth:`receive` within ``timeout`` (None after it), pinging every ``interval``
        meanwhile: for a socket no writer serves yet (first-frame auth), which hypercorn's read
        timeout would otherwise drop while it is quiet.

        A ping still blocked at the deadline (a peer that stopped reading: hypercorn's send is
        shielded) aborts the transport, so the wait never outlasts ``timeout``.
        """
        deadline = trio.current_time() + timeout
        while True:
            with trio.move_on_at(min(deadline, trio.current_time() + interval)):
                return await self.receive()  # a memory-channel receive: cancel-safe
            if trio.current_time() >= deadline:
                return None
            self.ping_due = True
            closed = False
            async with trio.open_nursery() as nursery:

                async def abort_at_deadline() -> None:
                    await trio.sleep_until(deadline)
                    self.abort()

                nursery.start_soon(abort_at_deadline)
                try:
                    await self.send_ping_if_due()
                except ConnectionClosed:
                    closed = True  # raised below, outside the nursery: not in a group
                finally:
                    nursery.cancel_scope.cancel()
            if closed:
                raise ConnectionClosed(self.peer_closed_code)

    async def _send_watched(self, send: Callable[[Any], Awaitable[None]], message: Any) -> None:
        # One send the slow-client watchdog can see (send_started_at), after a checkpoint.
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise ConnectionClosed(self.peer_closed_code)
        self.send_started_at = trio.current_time()
        try:
            await send(message)
        finally:
            self.send_started_at = None
            if self._send_finished:
                self._send_finished.unpark_all()

    async def send_texts(self, texts: Sequence[str], sent: Callable[[int], object]) -> None:
        """Send a batch of text frames in order, calling ``sent(i)`` once frame ``i`` is out.

        The writer's hot path: one checkpoint per batch rather than per frame (hypercorn's send
        yields on its own while the peer is there; once it is gone, the loop ends at the batch's
        end or at the ``closed`` check, so it cannot spin). ``send_started_at`` is still set per
        frame: the slow-client watchdog measures how long one frame's send has been blocked.
        """
        await trio.lowlevel.checkpoint()
        send = self._send
        for index, text in enumerate(texts):
            if self.ping_due:  # a long batch to a slow reader still pings on time
                await self.send_ping_if_due()
            if self.closed:
                raise ConnectionClosed(self.peer_closed_code)
            self.send_started_at = trio.current_time()
            try:
                await send({"type": "websocket.send", "text": text})
            finally:
                self.send_started_at = None
                if self._send_finished:  # someone waits for this send to end
                    self._send_finished.unpark_all()
            sent(index)
        self.last_send_at = trio.current_time()

    async def wait_send_finished(self) -> None:
        """Wait until the send in flight (if any) returns."""
        if self.send_started_at is not None:
            if self._send_finished is None:
                self._send_finished = trio.lowlevel.ParkingLot()
            await self._send_finished.park()

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame with ``code`` (no-op when already closed)."""
        if self.closed:
            return
        self.closed = True
        # hypercorn must read on to see the peer's answer to our close.
        self.release_first_message_limit(restore=False)
        await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})

    def abort(self) -> bool:
        """Close the underlying socket now, ending any blocked send. Returns False if unable."""
        self.closed = True
        self.release_first_message_limit(restore=False)
        if self._abort is None:
            return False
        self.aborted = True
        self._abort()
        if self._send_finished:
            self._send_finished.unpark_all()
        return True

    async def drain_until_disconnect(self, timeout: float) -> None:
        """Consume inbound events until hypercorn reports the disconnect.

        Required before the app returns: hypercorn posts the final disconnect into its bounded
        per-connection queue, and if that queue is full of frames nobody reads, hypercorn's
        connection task blocks forever (a leaked task and file descriptor per connection).
        If the peer does not complete the close within ``timeout``, the transport is aborted,
        which makes hypercorn post the disconnect, and we keep draining until it arrives.
        """
        if self.disconnected:
            return
        for attempt in range(2):
            with trio.move_on_after(timeout):
                try:
                    while True:
                        await self.receive()
                except ConnectionClosed:
                    return
            if attempt == 0 and not self.abort():
                return  # cannot abort on this server: nothing more we can do

    async def finish(self, code: int, timeout: float, reason: str = "") -> None:
        """The last thing done with a socket: close with ``code`` and drain to the disconnect,
        each bounded by ``timeout``, shielded so that it also runs for a cancelled task."""
        with trio.CancelScope(shield=True):
            await self.close_within(code, timeout, reason)
            await self.drain_until_disconnect(timeout)

    async def close_within(self, code: int, timeout: float, reason: str = "") -> None:
        """Close with ``code``; if the close frame cannot be written within ``timeout``
        (a client that stopped reading), abort the transport instead.

        A ``move_on_after`` around the send would not fire (the send is shielded inside
        hypercorn), hence the sibling timer that aborts from outside.
        """
        if self.closed:
            return
        async with trio.open_nursery() as nursery:

            async def abort_later() -> None:
                await trio.sleep(timeout)
                logger.warning("closing handshake timed out; aborting the connection")
                self.abort()

            nursery.start_soon(abort_later)
            try:
                await self.close(code, reason)
            finally:
                nursery.cancel_scope.cancel()
