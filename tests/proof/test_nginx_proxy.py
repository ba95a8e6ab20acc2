"""The shipped deploy/nginx.conf, run by a real nginx on loopback in front of real upstreams.

What it must do with upgrades: forward ``Upgrade`` only for a WebSocket handshake on
``/api/v1/ws/``, so that an ``Upgrade: h2c`` can never turn a proxied connection into a raw
tunnel past nginx's own rules (the shipped ``location = /metrics { return 404; }``), and
WebSocket sessions still work through it. See tests/support/nginx_server.py for how the
shipped file is
turned into a loopback config (upstream and listen addresses only).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import h2.connection
import h2.events
import httpx
import orjson
import pytest
import trio
import trio_websocket

from ..conftest import RunningGateway, port_of
from ..support.nginx_server import NGINX, SKIP_REASON, NginxServer
from ..support.rawhttp import content_length, receive_until

pytestmark = pytest.mark.skipif(NGINX is None, reason=SKIP_REASON)

# The shipped config answers /metrics itself (every request through nginx comes from nginx's
# address, so the gateway's address check cannot tell callers apart): the rule to get past.
DENIED_METRICS_STATUS = 404
H2C_HEADERS = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
)


@pytest.fixture
def nginx_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "nginx"
    directory.mkdir()
    yield directory


def running_nginx(directory: Path, upstream_port: int, locations: str = "") -> NginxServer:
    server = NginxServer(directory, upstream_port, locations)
    server.start()
    return server


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response (head, body by Content-Length) from ``stream``; b"" on EOF."""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return b"", b""
            buffer += data
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        length = content_length(head)
        while len(rest) < length:
            data = await stream.receive_some(65536)
            if not data:
                break
            rest += data
        buffer[:] = rest[length:]
        return head, rest[:length]


# --- against the real gateway ------------------------------------------------------------------


@pytest.fixture
async def proxied(gateway: RunningGateway, nginx_dir: Path) -> AsyncIterator[NginxServer]:
    server = running_nginx(nginx_dir, port_of(gateway.base_url), "")
    try:
        yield server
    finally:
        server.stop()


async def test_an_h2c_upgrade_through_nginx_opens_no_tunnel(proxied: NginxServer) -> None:
    """Before the fix: nginx forwarded ``Upgrade: h2c``, the gateway answered 101, nginx
    relayed raw bytes from then on, and HTTP/2 streams on that connection reached /metrics
    although nginx answers 404 there. Now the upgrade is plain HTTP/1.1 and the HTTP/2 bytes
    that follow are a bad request to nginx itself."""
    async with await trio.open_tcp_stream("127.0.0.1", proxied.port) as stream:
        await stream.send_all(
            b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + H2C_HEADERS + b"\r\n"
        )
        buffer = bytearray()
        head, body = await read_response(stream, buffer)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b'"status":"ok"' in body
        # Now speak HTTP/2 on the connection, as a client would after a 101 (stream 1 was
        # the upgraded request; ask for /metrics on stream 3).
        client = h2.connection.H2Connection()
        client.initiate_upgrade_connection()
        client.send_headers(
            3,
            [(":method", "GET"), (":path", "/metrics"), (":scheme", "http"),
             (":authority", "localhost")],
            end_stream=True,
        )  # fmt: skip
        await stream.send_all(client.data_to_send())
        received = bytes(buffer)
        with trio.move_on_after(3):  # nginx closes after its 400; a tunnel would answer h2
            received += await receive_until(stream, lambda _: False)
    assert b"gateway_active_websockets" not in received
    assert b"HTTP/1.1 101" not in head


async def test_metrics_rule_holds_for_h2c_upgrades_to_metrics(proxied: NginxServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxied.port}") as http:
        answer = await http.get(
            "/metrics",
            headers={"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                     "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"},
        )  # fmt: skip
        assert answer.status_code == DENIED_METRICS_STATUS


async def test_a_websocket_chat_works_through_nginx(
    gateway: RunningGateway, proxied: NginxServer
) -> None:
    url = f"ws://127.0.0.1:{proxied.port}/api/v1/ws/through-nginx"
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message('{"type":"user_message","content":"bench 3"}')
        text = ""
        with trio.fail_after(10):
            while True:
                frame = orjson.loads(await ws.get_message())
                text += frame.get("token") or ""
                if frame.get("is_final") is True:
                    break
    assert text == "t0 t1 t2 "
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxied.port}") as http:
        assert (await http.get("/health")).status_code == 200


# --- against a recording upstream: what nginx forwards ---------------------------------------


class RecordingUpstream:
    """An HTTP/1.1 upstream that records every request head and answers 200 (keep-alive)."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.heads.append(head)
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def header_values(head: bytes, name: bytes) -> list[bytes]:
    values = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            values.append(value.strip().lower())
    return values


@pytest.mark.parametrize(
    ("path", "upgrade", "forwarded"),
    [
        ("/health", b"h2c", False),
        ("/api/v1/events/metrics", b"h2c", False),
        ("/api/v1/agents", b"websocket", False),
        ("/api/v1/ws", b"websocket", False),
        ("/api/v1/ws/s1", b"h2c", False),
        ("/api/v1/ws/s1", b"websocket, h2c", False),
        ("/api/v1/ws/s1", b"websocket", True),
        ("/api/v1/ws/s1", b"WebSocket", True),
    ],
)
async def test_nginx_forwards_upgrade_only_for_websockets_on_the_session_path(
    nursery: trio.Nursery, nginx_dir: Path, path: str, upgrade: bytes, forwarded: bool
) -> None:
    """Before the fix: every Upgrade value went upstream on every path, with
    ``Connection: upgrade``."""
    upstream = RecordingUpstream()
    await nursery.start(upstream.serve)
    server = running_nginx(nginx_dir, upstream.port)
    try:
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
                + b"Connection: Upgrade\r\nUpgrade: "
                + upgrade
                + b"\r\n"
                b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            head, _ = await read_response(stream, bytearray())
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        server.stop()
    assert len(upstream.heads) == 1
    sent = upstream.heads[0]
    if forwarded:
        assert header_values(sent, b"upgrade") == [b"websocket"]
        assert header_values(sent, b"connection") == [b"upgrade"]
    else:
        assert header_values(sent, b"upgrade") == []
        assert b"upgrade" not in b" ".join(header_values(sent, b"connection"))
