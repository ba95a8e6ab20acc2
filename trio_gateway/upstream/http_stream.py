"""A lean HTTP/1.1 keep-alive connection pool to the runtime, on trio + h11.

Why not httpx here (it stays where it is not hot: JWKS, ``check``): measured on this stack,
relaying a paced token through httpx cost the gateway ~650 us of CPU, most of it in two places
that grow with load:

- httpcore's connection pool rescans every pooled connection (``is_idle``) on each request start
  and close, so with N concurrent streams every turn start costs O(N) - 12 ms of event-loop time
  per turn start at 100 open streams (encode/httpcore#1035); a gateway holds thousands;
- every network read climbs five nested async generators (httpx -> httpcore -> h11).

This pool does O(1) work per request: idle connections sit on a deque used as a stack, and
nothing else is ever scanned. A response is read with one plain coroutine call per network read
(``receive_body``: one ``receive_some``, h11 parsing, no generator), under one idle deadline per
response that is moved forward lazily (see :meth:`StreamingResponse._read`).

Reuse policy, and why:

- **LIFO.** The most recently released connection is taken first. It is the one least likely to
  have been closed by the server's keep-alive timer, and under fluctuating load the connections
  at the bottom of the stack stay unused and expire, so the pool shrinks back to what the load
  needs (FIFO would keep every connection barely alive and hit the server's timeout more often).
- **Idle expiry** shorter than the servers' keep-alive timeouts (hypercorn and uvicorn close idle
  connections after 5 s): a connection idle longer is closed instead of reused, so the race with
  the server's own close is rare. Expired connections are found at the bottom of the stack (the
  oldest) on every release and at the top (all expired) on every checkout: amortised O(1); a
  background task (:meth:`ConnectionPool.run`) closes them when no request comes along.
- **Bounded.** At most ``max_connections`` requests in flight (a slot each; a request that waits
  longer than ``slot_wait`` for one fails with :class:`PoolTimeout`); at most ``max_idle``
  connections kept. A new connection is opened only when no idle one is left, so open
  connections never exceed ``max_connections`` either.
- **Returned only when clean.** A connection goes back to the pool only after its response was
  read to the end and h11 says both sides are ``DONE`` (so the server did not ask to close);
  then ``start_next_cycle``. A cancelled, timed-out, broken or half-read response closes its
  connection at once (closing is also what cancels a turn at the runtime).
- **Stale-connection retry**, see :func:`_stale_retry_rule`.

One pool per app carries both the turns (``runtime_client.py``) and the REST proxy
(``edge/rest_proxy.py``), under one connection cap: ``async with pool.stream(method, path,
body, headers, idle_timeout=..., slot_wait=...) as response``, then either
``receive_body()`` per network read (a turn's SSE) or ``read_limited(limit)`` (a REST answer;
a complete small body leaves the connection reusable).
"""

from __future__ import annotations

import select
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import h11
import trio

MAX_READ = 65536
# The idle deadline is pushed to ``now + idle_timeout + slack`` whenever it is found less than
# ``idle_timeout`` away, so a silence fails after at least idle_timeout and at most
# idle_timeout + slack, and a lively stream moves the deadline (a heap update, ~3 us) at most once
# per ``slack`` seconds instead of paying a new cancel scope (~10 us) on every read.
MAX_IDLE_SLACK = 5.0
# Methods a server must be able to receive twice (RFC 9110 9.2.1 "safe"): a request of these may
# be sent again after any failure before the first response byte.
RETRY_SAFE_METHODS = frozenset({"GET", "HEAD"})

# Extra request headers: a mapping of text, or the client's header lines as bytes (forwarded
# unchanged by the REST proxy).
RequestHeaders = Mapping[str, str] | Sequence[tuple[bytes, bytes]]


class StreamConnectError(Exception):
    """The server could not be reached (refused, unresolvable, connect timeout)."""


class StreamTimeout(Exception):
    """No byte arrived within the idle timeout (or the request could not be written in time)."""


class StreamBroken(Exception):
    """The connection failed or the server broke HTTP framing mid-response."""


class PoolTimeout(Exception):
    """No connection slot became free within the wait (``max_connections`` in flight)."""


class _StaleConnection(Exception):
    """A reused connection failed in a way that shows the request was not processed."""


def _stale_retry_rule() -> None:
    """Documentation anchor: when a request is retried on a fresh connection.

    A request is sent again, once, on a newly opened connection only when ALL of these hold:

    1. it went out on a *reused* connection (a fresh connection that fails is not stale: the
       failure is reported);
    2. not a single byte of the response has arrived (a request whose response started is
       never retried, whatever happens next);
    3. the failure shows that the request may safely be sent again:

       - for every method: writing the request failed (the connection was found closed, reset
         or broken before or while writing: the server cannot have read a whole request), or
         the first read was reset (ECONNRESET/EPIPE: a server that closes a socket with unread
         bytes in its receive buffer, our request, makes the kernel send a reset);
       - for ``GET`` and ``HEAD`` only (:data:`RETRY_SAFE_METHODS`): also when the first read
         returned EOF. A server may have read a request, acted on it and then closed without
         answering (a crash, a worker recycled): a POST, PATCH or DELETE that met a clean EOF
         may have been processed, so it is reported (502) rather than sent twice; a safe
         method changes nothing, so it goes again.

    A timeout is never a reason (the server may be working on the request). Before a reused
    connection is even written to, it is polled: any readiness on an idle connection (EOF, a
    reset, bytes nobody asked for) discards it without sending anything, so the retry only
    covers the race where the server closes while the request is in flight. This is close to
    the rule of Go's net/http for requests on reused connections: a server that closes an idle
    keep-alive connection has not read what arrived after its decision to close.
    """


def _framed_by_close(response: h11.Response) -> bool:
    """Whether the body of ``response`` (to a request that is not HEAD) runs until the server
    closes the connection (RFC 9112 6.3, item 8)."""
    if response.status_code in (204, 304):
        return False
    for name, _ in response.headers:
        if name in (b"content-length", b"transfer-encoding"):  # h11 lower-cases names
            return False
    return True


def _unusable(fd: int) -> bool:
    """Whether an idle kept-alive connection is readable: EOF (the server closed it), an error
    or unsolicited bytes. Any of them means it must not carry another request (over TLS a late
    session ticket would count too: at worst a new connection). ``poll`` rather than
    ``select``: descriptors above 1023 are normal in a gateway."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Connection:
    """One TCP (or TLS) connection to the server and its h11 state."""

    __slots__ = ("framed_by_close", "h11", "idle_since", "sock", "stream")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        # The last response's body ended with the connection (no Content-Length, not chunked):
        # h11 still reports both sides DONE at that EOF, but the connection is gone.
        self.framed_by_close = False

    def close(self) -> None:
        """Close at once, without waiting for the peer (synchronous: usable while cancelled)."""
        self.sock.close()


class StreamingResponse:
    """Status, headers and the body, read one network read at a time."""

    __slots__ = (
        "_error",
        "_h11",
        "_idle",
        "_scope",
        "_slack",
        "_stream",
        "complete",
        "headers",
        "status_code",
    )

    def __init__(
        self,
        connection: _Connection,
        response: h11.Response,
        scope: trio.CancelScope,
        idle_timeout: float,
    ) -> None:
        self._stream = connection.stream
        self._h11 = connection.h11
        self._scope = scope
        self._idle = idle_timeout
        self._slack = min(idle_timeout / 4, MAX_IDLE_SLACK)
        self._error: StreamBroken | None = None
        self.complete = False
        self.status_code = response.status_code
        self.headers = {name.decode("latin-1"): value.decode("latin-1")
                        for name, value in response.headers}  # fmt: skip

    async def receive_body(self) -> bytes | None:
        """The body bytes h11 parsed from the next network read (joined), ``None`` at the end.

        Raises :class:`StreamBroken` (framing broken, connection lost) after first returning
        whatever good bytes came in the same read (the relay forwards complete events first).
        """
        if self.complete:
            return None
        if self._error is not None:
            raise self._error
        connection = self._h11
        pieces: list[bytes] = []
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as error:
                broken = StreamBroken(str(error))
                if pieces:
                    self._error = broken
                    return b"".join(pieces)
                raise broken from None
            kind = type(event)
            if kind is h11.Data:
                pieces.append(event.data)  # type: ignore[union-attr]
            elif event is h11.NEED_DATA:
                if pieces:
                    return b"".join(pieces)
                await self._read()
            elif kind is h11.EndOfMessage:
                self.complete = True
                return b"".join(pieces) if pieces else None
            elif kind is h11.ConnectionClosed:
                raise StreamBroken("connection closed before the response ended")

    async def _read(self) -> None:
        """One network read into h11, under the response's idle deadline.

        The deadline is checked before the read (so time the caller spent between reads, e.g.
        handing a batch on, never counts as silence) and after it (so the caller starts its
        hand-off with a full idle period ahead), and moved only when it is less than the idle
        timeout away: two clock reads per network read instead of a cancel scope. A silence
        therefore fails after between ``idle_timeout`` and ``idle_timeout + slack`` seconds.
        The one scope also covers the caller's hand-off between reads: a hand-off blocked for
        longer than the idle timeout (a client that reads this slowly is aborted by the
        slow-client watchdog long before: 30 s against 900 s by default) would end the turn
        with a timeout too.
        """
        scope = self._scope
        idle = self._idle
        now = trio.current_time()
        if scope.deadline - now < idle:
            scope.deadline = now + idle + self._slack
        try:
            data = await self._stream.receive_some(MAX_READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            raise StreamBroken(str(error)) from None
        now = trio.current_time()
        if scope.deadline - now < idle:
            scope.deadline = now + idle + self._slack
        try:
            self._h11.receive_data(data)  # type: ignore[arg-type]  # bytearray is fine
        except h11.RemoteProtocolError as error:
            raise StreamBroken(str(error)) from None

    async def read_limited(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body (for error answers and small documents)."""
        pieces: list[bytes] = []
        size = 0
        while size < limit:
            piece = await self.receive_body()
            if piece is None:
                break
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces)[:limit]


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one ``base_url``; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        *,
        default_headers: dict[str, str],
        connect_timeout: float,
        write_timeout: float,
        idle_timeout: float,
        max_connections: int,
        max_idle: int,
        idle_expiry: float,
        slot_wait: float,
    ) -> None:
        parts = urlsplit(base_url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._base_headers = [("Host", parts.netloc), *default_headers.items()]
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._slot_wait = slot_wait
        # A semaphore, not a CapacityLimiter: one task may hold two requests at once.
        self._max_connections = max_connections
        self._slots = trio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()
        self._closed = False
        self._reaper = trio.CancelScope()
        # Built once: creating an SSL context loads the CA bundle (~tens of ms).
        self._ssl_context = ssl.create_default_context() if self._tls else None
        # Counters (tests and the benchmark read them).
        self.opened = 0
        self.reused = 0
        self.retried = 0

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pool."""
        return len(self._idle)

    @property
    def in_flight(self) -> int:
        """Requests holding a slot right now."""
        return self._max_connections - self._slots.value

    async def run(self) -> None:
        """Close idle connections once they expire, even when no request comes to notice,
        until :meth:`aclose` (a quiet gateway must not hold sockets the runtime has closed).

        Wakes twice per expiry period; the exact expiry is enforced at checkout anyway."""
        with self._reaper:
            while True:
                await trio.sleep(self._idle_expiry / 2)
                self._expire(trio.current_time())

    def _expire(self, now: float) -> None:
        """Close the expired idle connections (the oldest are at the left end)."""
        idle = self._idle
        expiry = self._idle_expiry
        while idle and now - idle[0].idle_since >= expiry:
            idle.popleft().close()

    async def aclose(self) -> None:
        """Close every idle connection and stop :meth:`run`; later releases close their
        connections instead of pooling them."""
        self._closed = True
        self._reaper.cancel()
        while self._idle:
            self._idle.pop().close()
        await trio.lowlevel.checkpoint()

    async def _connect(self) -> _Connection:
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(self._connect_timeout):
                tcp = await trio.open_tcp_stream(self._host, self._port)
                stream: trio.abc.Stream = tcp
                if self._ssl_context is not None:
                    tls = trio.SSLStream(tcp, self._ssl_context, server_hostname=self._host)
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        tcp.socket.close()  # a failed or cancelled handshake leaks no socket
                        raise
                    stream = tls
        except trio.TooSlowError:
            raise StreamConnectError("connect timed out") from None
        except (OSError, trio.BrokenResourceError) as error:
            raise StreamConnectError(str(error)) from None
        self.opened += 1
        assert tcp is not None
        return _Connection(stream, tcp.socket)

    def _checkout(self) -> _Connection | None:
        """The most recently pooled connection that is still usable, or None."""
        idle = self._idle
        if not idle:
            return None
        now = trio.current_time()
        while idle:
            connection = idle.pop()
            if now - connection.idle_since >= self._idle_expiry:
                # The newest is expired, so all are.
                connection.close()
                while idle:
                    idle.pop().close()
                return None
            if _unusable(connection.sock.fileno()):
                connection.close()
                continue
            return connection
        return None

    @staticmethod
    def _reusable(connection: _Connection) -> bool:
        """Whether ``connection``'s exchange ended cleanly and it may carry another request."""
        state = connection.h11
        return (
            state.our_state is h11.DONE
            and state.their_state is h11.DONE
            and not connection.framed_by_close
        )

    def _release(self, connection: _Connection) -> None:
        """Pool ``connection`` if its exchange ended cleanly and h11 allows reuse, else close."""
        if self._closed or not self._reusable(connection):
            connection.close()
            return
        state = connection.h11
        state.start_next_cycle()
        now = trio.current_time()
        connection.idle_since = now
        idle = self._idle
        idle.append(connection)
        while len(idle) > self._max_idle:
            idle.popleft().close()
        self._expire(now)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: RequestHeaders,
        *,
        idle_timeout: float | None = None,
        slot_wait: float | None = None,
    ) -> AsyncIterator[StreamingResponse]:
        """Send one request and yield the response once its head has arrived.

        ``path`` is the target (with its query string), below the base URL's path. From the
        written request to the last body read no silence may last longer than the idle timeout
        (:class:`StreamTimeout`; ``idle_timeout`` overrides the pool's for this request);
        connect and write have their own timeouts, and waiting for a free slot longer than
        ``slot_wait`` (default: the pool's) raises :class:`PoolTimeout`. Cancelling the caller
        closes the connection at once.
        """
        idle = self._idle_timeout if idle_timeout is None else idle_timeout
        retry_safe = method in RETRY_SAFE_METHODS
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            acquired = False
            with trio.move_on_after(self._slot_wait if slot_wait is None else slot_wait):
                await self._slots.acquire()
                acquired = True
            if not acquired:
                raise PoolTimeout("no free connection slot") from None
        connection: _Connection | None = None
        try:
            # The idle deadline starts once the request is written (connect and write have
            # their own timeouts); StreamingResponse._read moves it on from there.
            with trio.CancelScope() as scope:
                connection = self._checkout()
                reused = connection is not None
                if connection is None:
                    connection = await self._connect()
                else:
                    self.reused += 1
                request = self._encode(connection.h11, method, path, body, headers)
                try:
                    response = await self._exchange(
                        connection, request, reused, scope, retry_safe=retry_safe, idle=idle
                    )
                except _StaleConnection:
                    self.retried += 1
                    connection.close()
                    connection = None
                    connection = await self._connect()
                    request = self._encode(connection.h11, method, path, body, headers)
                    response = await self._exchange(
                        connection, request, False, scope, retry_safe=retry_safe, idle=idle
                    )
                yield response
            if scope.cancelled_caught:
                raise StreamTimeout("no data within the idle timeout")
        finally:
            if connection is not None:
                self._release(connection)
            self._slots.release()

    def _encode(
        self,
        state: h11.Connection,
        method: str,
        path: str,
        body: bytes,
        headers: RequestHeaders,
    ) -> bytes:
        extra = headers.items() if isinstance(headers, Mapping) else headers
        request = h11.Request(
            method=method,
            target=self._prefix + path,
            # h11 takes str or bytes per line (bytes: the client's header lines, unchanged).
            headers=[  # type: ignore[arg-type]
                *self._base_headers,
                ("Content-Length", str(len(body))),
                *extra,
            ],
        )
        payload = state.send(request)
        if body:
            payload += state.send(h11.Data(data=body))
        return payload + state.send(h11.EndOfMessage())  # type: ignore[operator]

    async def _exchange(
        self,
        connection: _Connection,
        request: bytes,
        reused: bool,
        scope: trio.CancelScope,
        *,
        retry_safe: bool = False,
        idle: float | None = None,
    ) -> StreamingResponse:
        """Write the request and read the response head (see :func:`_stale_retry_rule`;
        ``retry_safe``: the method may be sent twice; ``idle``: the idle timeout, default the
        pool's)."""
        if idle is None:
            idle = self._idle_timeout
        stream = connection.stream
        try:
            with trio.fail_after(self._write_timeout):
                await stream.send_all(request)
        except trio.TooSlowError:
            raise StreamTimeout("timed out sending the request") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            if reused:
                raise _StaleConnection from None
            raise StreamBroken(str(error)) from None
        scope.deadline = trio.current_time() + idle + min(idle / 4, MAX_IDLE_SLACK)
        state = connection.h11
        received = False
        while True:
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as error:
                raise StreamBroken(str(error)) from None
            if isinstance(event, h11.Response):
                connection.framed_by_close = _framed_by_close(event)
                return StreamingResponse(connection, event, scope, idle)
            if isinstance(event, h11.ConnectionClosed):
                raise StreamBroken("connection closed before a response")
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(MAX_READ)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    if reused and not received:
                        raise _StaleConnection from None
                    raise StreamBroken(str(error)) from None
                if not data and reused and not received and retry_safe:
                    raise _StaleConnection  # EOF: see rule 3 (may have been processed)
                received = True
                try:
                    state.receive_data(data)  # type: ignore[arg-type]  # bytearray is fine
                except h11.RemoteProtocolError as error:
                    raise StreamBroken(str(error)) from None
            # an InformationalResponse (1xx): keep reading


__all__ = [
    "RETRY_SAFE_METHODS",
    "ConnectionPool",
    "PoolTimeout",
    "RequestHeaders",
    "StreamBroken",
    "StreamConnectError",
    "StreamTimeout",
    "StreamingResponse",
]
