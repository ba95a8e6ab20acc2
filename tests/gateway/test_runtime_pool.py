"""The keep-alive pool that carries turns to the runtime (``http_stream.ConnectionPool``).

Against real sockets: a keep-alive server of our own (``keepalive_runtime.py``) that can close
pooled connections behind the client's back, and the demo runtime (hypercorn). Covers reuse,
idle expiry, the stale-connection retry and its limits, the bound under concurrency,
cancellation mid-stream, and HTTP/1.1 response parsing under fuzzing.
"""

from __future__ import annotations

import itertools
from typing import Any

import h11
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.upstream.http_stream import (
    ConnectionPool,
    PoolTimeout,
    StreamBroken,
    StreamingResponse,
    StreamTimeout,
    _Connection,
)

from ..conftest import INTERNAL_KEY, gateway_settings, run_gateway, wait_for
from ..support.keepalive_runtime import FINAL, KeepAliveRuntime

PATH = "/agent/message/stream"


def make_pool(url: str, **overrides: Any) -> ConnectionPool:
    options: dict[str, Any] = {
        "default_headers": {"X-Internal-Auth": INTERNAL_KEY},
        "connect_timeout": 5.0,
        "write_timeout": 5.0,
        "idle_timeout": 5.0,
        "max_connections": 10,
        "max_idle": 10,
        "idle_expiry": 4.0,
        "slot_wait": 5.0,
    }
    options.update(overrides)
    return ConnectionPool(url, **options)


def turn_body(content: str) -> bytes:
    return orjson.dumps(
        {"session_id": "s", "message": {"type": "user_message", "content": content}}
    )


async def post(pool: ConnectionPool, content: str) -> bytes:
    """One turn through ``pool``: the whole body."""
    async with pool.stream("POST", PATH, turn_body(content), {}) as response:
        assert response.status_code == 200
        pieces = []
        while (piece := await response.receive_body()) is not None:
            pieces.append(piece)
    return b"".join(pieces)


# --- reuse ---------------------------------------------------------------------------------------


async def test_sequential_turns_share_one_connection(keepalive: KeepAliveRuntime) -> None:
    pool = make_pool(keepalive.url)
    for index in range(20):
        assert await post(pool, f"turn {index}") == FINAL
    assert len(keepalive.connections) == 1
    assert len(keepalive.connections[0].requests) == 20
    assert (pool.opened, pool.reused, pool.retried) == (1, 19, 0)
    await pool.aclose()


async def test_turns_through_the_gateway_reach_the_runtime_on_one_connection(
    nursery: trio.Nursery, keepalive: KeepAliveRuntime
) -> None:
    async with run_gateway(nursery, gateway_settings(keepalive.url)) as gw:
        async with gw.connect("s") as client:
            for index in range(5):
                await client.send({"type": "user_message", "content": f"hello {index}"})
                frames = await client.turn()
                assert frames[-1]["content"] == "ok"
    assert len(keepalive.connections) == 1
    assert keepalive.contents == [f"hello {index}" for index in range(5)]


async def test_hypercorn_keeps_the_connection_alive_too(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    async with run_gateway(nursery, gateway_settings(demo_runtime[1])) as gw:
        async with gw.connect("s") as client:
            for _ in range(4):
                await client.send({"type": "user_message", "content": "bench 3"})
                assert (await client.turn())[-1]["is_final"] is True
        runtime = gw.app.gateway.runtime
        assert runtime is not None
        assert (runtime.pool.opened, runtime.pool.reused) == (1, 3)


async def test_only_a_response_read_to_the_end_leaves_the_connection_reusable(
    keepalive: KeepAliveRuntime,
) -> None:
    pool = make_pool(keepalive.url)
    async with pool.stream("POST", PATH, turn_body("hang"), {}) as response:
        assert await response.read_limited(5)  # stopped before the end: closed
    assert pool.idle_connections == 0
    async with pool.stream("POST", PATH, turn_body("y"), {}) as response:
        assert await response.read_limited(1 << 20) == FINAL  # complete: pooled
    assert pool.idle_connections == 1
    assert len(keepalive.connections) == 2
    with trio.fail_after(5):
        while keepalive.client_went_away < 1:
            await trio.sleep(0.01)


# --- expiry and bounds ---------------------------------------------------------------------------


async def test_an_idle_connection_expires_instead_of_being_reused(
    keepalive: KeepAliveRuntime,
) -> None:
    pool = make_pool(keepalive.url, idle_expiry=0.2)
    await post(pool, "one")
    await post(pool, "two")  # within the expiry: reused
    assert pool.opened == 1
    await trio.sleep(0.3)
    await post(pool, "three")
    assert (pool.opened, pool.reused) == (2, 1)
    assert [len(c.requests) for c in keepalive.connections] == [2, 1]
    await wait_for(lambda: not keepalive.connections[0].open)  # closed, not leaked
    await pool.aclose()


async def test_expired_idle_connections_are_closed_without_any_further_request(
    keepalive: KeepAliveRuntime,
) -> None:
    pool = make_pool(keepalive.url, idle_expiry=0.2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        await post(pool, "one")
        assert pool.idle_connections == 1
        with trio.fail_after(5):
            while keepalive.connections[0].open:
                await trio.sleep(0.02)
        assert pool.idle_connections == 0
        await pool.aclose()  # also ends run()


async def test_the_pool_is_bounded_under_concurrency(keepalive: KeepAliveRuntime) -> None:
    pool = make_pool(keepalive.url, max_connections=3, max_idle=3)
    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(post, pool, "slow")
    assert keepalive.most_open <= 3
    assert len(keepalive.connections) == 3  # opened once each, then reused
    assert sum(len(c.requests) for c in keepalive.connections) == 12
    assert (pool.idle_connections, pool.in_flight) == (3, 0)


async def test_the_most_recently_used_connection_is_taken_first(
    keepalive: KeepAliveRuntime,
) -> None:
    """LIFO: under light load one connection does the work and the others expire."""
    pool = make_pool(keepalive.url)
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(post, pool, "slow")
    assert pool.idle_connections == 2
    for _ in range(4):
        await post(pool, "light")
    assert sorted(len(c.requests) for c in keepalive.connections) == [1, 5]


async def test_no_more_idle_connections_are_kept_than_max_idle(
    keepalive: KeepAliveRuntime,
) -> None:
    pool = make_pool(keepalive.url, max_connections=4, max_idle=1)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(post, pool, "slow")
    assert keepalive.most_open <= 4
    assert pool.idle_connections == 1
    await wait_for(lambda: sum(c.open for c in keepalive.connections) == 1)  # others closed


async def test_a_request_that_finds_no_free_slot_in_time_fails(
    keepalive: KeepAliveRuntime,
) -> None:
    pool = make_pool(keepalive.url, max_connections=1, slot_wait=0.05)
    async with pool.stream("POST", PATH, turn_body("hang"), {}) as response:
        assert await response.receive_body()
        with pytest.raises(PoolTimeout):
            await post(pool, "second")
    await post(pool, "after")  # the slot came back


# --- stale connections ---------------------------------------------------------------------------


async def test_a_connection_closed_while_pooled_is_not_used(keepalive: KeepAliveRuntime) -> None:
    pool = make_pool(keepalive.url)
    await post(pool, "close-after")
    await trio.sleep(0.05)  # the server's FIN arrives while the connection is pooled
    assert await post(pool, "next") == FINAL
    assert (pool.opened, pool.reused, pool.retried) == (2, 0, 0)
    assert keepalive.contents == ["close-after", "next"]


async def test_a_request_the_server_closed_on_unread_is_retried_once_on_a_new_connection(
    keepalive: KeepAliveRuntime,
) -> None:
    pool = make_pool(keepalive.url)
    await post(pool, "reset-on-next")
    # The server closes the pooled connection only when this request arrives, without reading
    # it: it cannot have been processed, so it goes again on a fresh connection.
    assert await post(pool, "retried") == FINAL
    assert (pool.opened, pool.reused, pool.retried) == (2, 1, 1)
    assert keepalive.contents == ["reset-on-next", "retried"]  # processed exactly once
    assert [len(c.requests) for c in keepalive.connections] == [1, 1]


async def test_a_post_whose_answer_started_is_never_retried(keepalive: KeepAliveRuntime) -> None:
    pool = make_pool(keepalive.url)
    await post(pool, "warm")  # so the next request goes out on a reused connection
    with pytest.raises(StreamBroken):
        await post(pool, "head-then-close")
    assert pool.retried == 0
    assert keepalive.contents == ["warm", "head-then-close"]  # sent exactly once
    assert await post(pool, "later") == FINAL  # the pool is still usable


async def test_a_post_is_not_retried_once_any_byte_of_its_answer_arrived(
    keepalive: KeepAliveRuntime,
) -> None:
    pool = make_pool(keepalive.url)
    await post(pool, "warm")
    with pytest.raises(StreamBroken):
        await post(pool, "partial-head")  # "HTTP/1.1 20", then EOF: the server did read it
    assert pool.retried == 0
    assert keepalive.contents == ["warm", "partial-head"]


async def test_a_fresh_connection_that_fails_is_not_retried() -> None:
    # A server that accepts, reads nothing and closes: the first (fresh) request fails.
    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, close_at_once, 0)
        pool = make_pool(pool_url(listeners))
        with pytest.raises(StreamBroken):
            await post(pool, "x")
        assert (pool.opened, pool.retried) == (1, 0)
        nursery.cancel_scope.cancel()


# --- cancellation and timeouts -------------------------------------------------------------------


async def test_cancelling_mid_stream_closes_that_connection_and_the_pool_stays_usable(
    keepalive: KeepAliveRuntime,
) -> None:
    pool = make_pool(keepalive.url)
    await post(pool, "warm")
    with trio.move_on_after(0.2):
        async with pool.stream("POST", PATH, turn_body("hang"), {}) as response:
            assert await response.receive_body()
            await response.receive_body()  # silent: cancelled here
    with trio.fail_after(5):
        while keepalive.client_went_away < 1:
            await trio.sleep(0.01)
    assert pool.idle_connections == 0 and pool.in_flight == 0
    assert await post(pool, "after") == FINAL
    assert (pool.opened, pool.retried) == (2, 0)


async def test_a_silent_stream_fails_with_the_idle_timeout(keepalive: KeepAliveRuntime) -> None:
    pool = make_pool(keepalive.url, idle_timeout=0.2)
    started = trio.current_time()
    with pytest.raises(StreamTimeout):
        await post(pool, "hang")
    waited = trio.current_time() - started
    assert 0.2 <= waited < 2  # at least the idle timeout, at most idle + its slack (+ slop)
    assert pool.idle_connections == 0


async def test_a_lively_stream_longer_than_the_idle_timeout_does_not_time_out() -> None:
    """Events every 0.1 s for 1.2 s under a 0.3 s idle timeout: the lazily moved deadline."""

    async def trickle(stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        while connection.next_event() is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        head = h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")])
        await stream.send_all(connection.send(head))
        for index in range(12):
            await trio.sleep(0.1)
            await stream.send_all(connection.send(h11.Data(data=b"data: %d\n\n" % index)))
        await stream.send_all(connection.send(h11.EndOfMessage()))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, trickle, 0)
        pool = make_pool(pool_url(listeners), idle_timeout=0.3)
        body = await post(pool, "x")
        assert body == b"".join(b"data: %d\n\n" % index for index in range(12))
        nursery.cancel_scope.cancel()


def pool_url(listeners: list[trio.SocketListener]) -> str:
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


# --- fuzzing the response parser ----------------------------------------------------------------


class _FakeSocket:
    def close(self) -> None:
        pass


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


async def _read_response(pieces: list[bytes]) -> tuple[int, bytes, bool]:
    """Serve ``pieces`` (then EOF) over an in-memory stream and read them like a turn."""
    client, server = trio.testing.memory_stream_pair()
    connection = _Connection(client, _FakeSocket())  # type: ignore[arg-type]
    pool = make_pool("http://127.0.0.1:1")
    request = pool._encode(connection.h11, "POST", PATH, b"{}", {})

    async def serve() -> None:
        await server.receive_some()
        for piece in pieces:
            await server.send_all(piece)
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with trio.CancelScope() as scope:
            response = await pool._exchange(connection, request, False, scope)
            assert isinstance(response, StreamingResponse)
            body = []
            while (piece := await response.receive_body()) is not None:
                body.append(piece)
    # The pool's own decision (h11 alone calls a body ended by EOF "DONE" too).
    reusable = pool._reusable(connection)
    return response.status_code, b"".join(body), reusable


chunk_sizes = st.lists(st.integers(1, 40), max_size=8)
bodies = st.binary(max_size=200)
cuts = st.lists(st.integers(0, 10_000), max_size=10)


@settings(max_examples=150, deadline=None)
@given(bodies, chunk_sizes, cuts, st.booleans())
def test_any_valid_response_split_anywhere_parses_to_its_body(
    body: bytes, sizes: list[int], cut_at: list[int], chunked: bool
) -> None:
    if chunked:
        parts, rest = [], body
        for size in sizes:
            if rest:
                parts.append(b"%x\r\n%s\r\n" % (len(rest[:size]), rest[:size]))
                rest = rest[size:]
        if rest:
            parts.append(b"%x\r\n%s\r\n" % (len(rest), rest))
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(parts)
        wire += b"0\r\n\r\n"
    else:
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    status, received, reusable = trio.run(_read_response, _cut(wire, cut_at))
    assert (status, received, reusable) == (200, body, True)


garbage_tokens = st.sampled_from(
    [
        b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 500 Boom\r\n", b"HTTP/1.0 200 OK\r\n",
        b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"Content-Length: x\r\n",
        b"Connection: close\r\n", b"\r\n", b"5\r\nhello\r\n", b"0\r\n\r\n", b"zz\r\n",
        b"data: {}\n\n", b"\x00", b"\xff", b"HTTP/1.1 100 Continue\r\n\r\n", b" ", b":",
    ]
)  # fmt: skip
garbage = st.lists(garbage_tokens | st.binary(max_size=8), max_size=14).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(garbage, cuts)
def test_arbitrary_answers_end_in_a_body_or_a_stream_error_never_anything_else(
    wire: bytes, cut_at: list[int]
) -> None:
    try:
        status, _, reusable = trio.run(_read_response, _cut(wire, cut_at))
    except BaseExceptionGroup as group:
        _, unexpected = group.split((StreamBroken, StreamTimeout))
        assert unexpected is None, unexpected
        return
    assert 200 <= status <= 599
    # Reusable only when h11 saw a complete, keep-alive exchange.
    if reusable:
        assert b"Connection: close" not in wire and b"HTTP/1.0" not in wire.split(b"\r\n")[0]
