"""The WebSocket edge before and around authentication (issue 11, §1 and §3):

- ``permessage-deflate``: off by default (never negotiated), bounded inflation when on; the
  compression bomb measured on a gateway process of its own (RSS);
- a socket opened without a token is read for one small message only, and an honest client
  that pipelines its next message behind its ``auth`` frame loses nothing;
- sockets waiting for their first-frame auth have caps of their own (process and client
  address), so they cannot lock users out of ``MAX_CONNECTIONS``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from wsproto.events import CloseConnection, Message
from wsproto.extensions import PerMessageDeflate

from trio_gateway.edge.ws_handshake import AUTH_FRAME_MAX_BYTES
from trio_gateway.settings import Settings
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import INTERNAL_KEY, RunningGateway, gateway_settings, port_of, run_gateway
from ..support.fuzzing_wire import (
    OP_TEXT,
    compressed_frame,
    deflate_bomb,
    deflate_payload,
    encode_frame,
)
from ..support.gateway import jwt_settings
from ..support.gateway_process import resident_bytes
from ..support.processes import started
from ..support.rawws import RawWebSocket, Rejected
from ..support.scripted_runtime import ScriptedRuntime

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


async def connect(gw: RunningGateway, session_id: str, **kwargs: Any) -> RawWebSocket:
    return await RawWebSocket.connect(port_of(gw.base_url), f"/api/v1/ws/{session_id}", **kwargs)


async def wait_close(client: RawWebSocket, timeout: float = 10) -> int | None:
    """Read until the server ends the connection, answering its close frame like a polite
    client would (so the gateway need not wait out its close timeout); the close code or None
    when the TCP connection ended without one."""
    with trio.fail_after(timeout):
        while True:
            try:
                data = await client.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return client.close_code
            if not data:
                return client.close_code
            client.ws.receive_data(data)
            for event in client.ws.events():
                if isinstance(event, CloseConnection):
                    client.close_code = event.code
                    if client.ws.state.name == "REMOTE_CLOSING":
                        await client.stream.send_all(client.ws.send(event.response()))


async def turn(client: RawWebSocket, timeout: float = 10) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await client.recv_json(timeout)
        frames.append(frame)
        if frame.get("is_final") is True:
            return frames


def text_message(text: str) -> bytes:
    return encode_frame(OP_TEXT, text.encode())


def varied_text(size: int) -> str:
    """Text that compresses like real code, not like one repeated byte."""
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else"]
    rng = random.Random(size)
    parts: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(words) + rng.choice([" ", "\n", "(", ")", ": "])
        parts.append(word)
        length += len(word)
    return "".join(parts)[:size]


# --- compression off (the default) ---------------------------------------------------------


async def test_compression_is_off_by_default_and_never_negotiated(
    gateway: RunningGateway,
) -> None:
    assert gateway.settings.ws_compression == "off"
    client = await connect(gateway, "no-deflate", extensions=[PerMessageDeflate()])
    try:
        assert client.extensions == []  # no Sec-WebSocket-Extensions in the 101
        await client.send_json({"type": "user_message", "content": "bench 3"})
        assert (await turn(client))[-1]["is_final"] is True
    finally:
        await client.aclose()


async def test_the_101_of_an_offer_carries_no_extension_header(gateway: RunningGateway) -> None:
    """The raw answer, header by header, for a client that offers every parameter."""
    request = (
        b"GET /api/v1/ws/raw-offer HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; "
        b"client_max_window_bits, permessage-deflate\r\n\r\n"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(gateway.base_url))
    async with stream:
        await stream.send_all(request)
        head = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-extensions" not in head.lower()


async def test_a_compressed_frame_without_the_extension_is_a_protocol_error(
    gateway: RunningGateway,
) -> None:
    client = await connect(gateway, "rsv1-off", extensions=[PerMessageDeflate()])
    try:
        await client.send_raw(compressed_frame(deflate_payload(b'{"type":"ping"}')))
        assert await wait_close(client) in (None, 1002)  # hypercorn drops the connection
    finally:
        await client.aclose()


# --- compression on --------------------------------------------------------------------------


async def test_compression_on_negotiates_and_an_honest_compressed_chat_loses_nothing(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    settings = gateway_settings(scripted_runtime.url, ws_compression="on")
    async with run_gateway(nursery, settings) as gw:
        client = await connect(gw, "deflate-chat", extensions=[PerMessageDeflate()])
        try:
            assert [e.name for e in client.extensions] == ["permessage-deflate"]
            # Large (3 MiB inflated, within the 4 MiB limit) and in fragments: every chunk is
            # inflated in bounded steps, none of it may be lost.
            content = varied_text(3 * MiB)
            text = orjson.dumps({"type": "user_message", "content": content}).decode()
            third = len(text) // 3
            for start, end in ((0, third), (third, 2 * third), (2 * third, len(text))):
                await client.send_raw(
                    client.ws.send(Message(data=text[start:end], message_finished=end == len(text)))
                )
            frames = await turn(client)
            assert frames[-1]["is_final"] is True
            # ...and a small one after it: the compression context carries over.
            await client.send_json({"type": "user_message", "content": "second"})
            assert (await turn(client))[-1]["is_final"] is True
        finally:
            await client.aclose()
    contents = [request["message"]["content"] for request in scripted_runtime.requests]
    assert contents == [content, "second"]


async def test_an_over_limit_compressed_message_closes_1009_without_inflating_it(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    """64 MiB inflated from one 64 KB frame against a 64 KiB limit: 1009, and the gateway's
    process never held more than a few MiB for it (hypercorn + wsproto alone inflate the whole
    frame chunk by chunk: 64 MiB at once)."""
    settings = gateway_settings(
        demo_runtime[1], ws_compression="on", ws_max_message_bytes=64 * 1024
    )
    bomb = compressed_frame(deflate_bomb(64 * MiB))
    async with run_gateway(nursery, settings) as gw:
        client = await connect(gw, "deflate-bomb", extensions=[PerMessageDeflate()])
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            await client.send_raw(bomb)
            assert await wait_close(client) == 1009
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await client.aclose()
        assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB traced while refusing the bomb"
        # Over the limit in a later fragment of a message: 1009 as well.
        client = await connect(gw, "deflate-fragments", extensions=[PerMessageDeflate()])
        try:
            compressor_payload = deflate_payload(b" " * (200 * 1024))
            half = len(compressor_payload) // 2
            await client.send_raw(
                compressed_frame(compressor_payload[:half], fin=False)
                + encode_frame(0x0, compressor_payload[half:])
            )
            assert await wait_close(client) == 1009
        finally:
            await client.aclose()
        # A message just under the limit is fine, and the gateway serves on.
        client = await connect(gw, "deflate-ok", extensions=[PerMessageDeflate()])
        try:
            await client.send_json({"type": "user_message", "content": "bench 2 " + "x" * 60_000})
            assert (await turn(client))[-1]["is_final"] is True
        finally:
            await client.aclose()


# --- the compression bomb, measured on a gateway process of its own -------------------------


@asynccontextmanager
async def gateway_process(**values: Any) -> AsyncIterator[tuple[int, int]]:
    """A gateway (JWT on) in its own process: (pid, port)."""
    settings: dict[str, Any] = {
        "agent_url": "http://127.0.0.1:9",  # never reached: nothing here authenticates
        "internal_api_key": INTERNAL_KEY,
        "use_jwt_auth": True,
        "jwks_url": "http://127.0.0.1:9/jwks.json",
        "log_level": "WARNING",
        "ws_auth_timeout": 2.0,
        "ws_close_timeout": 1.0,
    }
    settings.update(values)
    async with started(
        [sys.executable, "-m", "tests.support.gateway_process", json.dumps(settings)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as gateway:
        assert gateway.stdout is not None
        with trio.fail_after(30):
            line = await gateway.stdout.read_line()  # "PORT <n>" once it listens
        yield gateway.pid, int(line.split()[1])


async def send_bomb(port: int, session_id: str, attack: str) -> None:
    """One anonymous socket (no token) sending its attack as its first frame."""
    offer = [PerMessageDeflate()] if attack.startswith("compressed") else []
    client = await RawWebSocket.connect(port, f"/api/v1/ws/{session_id}", extensions=offer)
    try:
        if attack.startswith("compressed"):
            # The 255 KB frame that inflates to 256 MiB.
            await client.send_raw(compressed_frame(deflate_bomb(256 * MiB)))
        else:
            # Uncompressed: a text frame announcing 64 MiB, sent in full. Masked with the key
            # 0 (the payload goes as it is: cheap to send).
            size = 64 * MiB
            await client.send_raw(bytes([0x81, 0xFF]) + size.to_bytes(8, "big") + bytes(4))
            block = b" " * MiB
            with trio.move_on_after(20):
                for _ in range(size // len(block)):
                    await client.send_raw(block)
        await wait_close(client, timeout=30)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the gateway may drop the connection while we still send
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("compression", "attack"),
    [("off", "compressed"), ("on", "compressed"), ("off", "oversize")],
)
async def test_an_anonymous_bomb_does_not_grow_the_gateway(compression: str, attack: str) -> None:
    """Four sockets at once, no token, JWT on: the gateway's peak RSS grows by a few MiB.

    Before the fix each compressed frame was inflated whole (+256 MiB for one frame; hypercorn
    kept what it had inflated), and an oversize plain message was buffered whole until the peer
    went away. The bound (32 MiB over the RSS before the attack) leaves room for the 4 x 255
    KB frames in flight and allocator noise, and none for even one inflated 64 KiB read
    (64 MiB)."""
    async with gateway_process(ws_compression=compression) as (pid, port):
        # Warm up the paths a socket takes (imports, first allocations) before the baseline.
        warm = await RawWebSocket.connect(port, "/api/v1/ws/warm", extensions=[PerMessageDeflate()])
        await warm.send_raw(text_message("{}"))
        await wait_close(warm)
        await warm.aclose()
        before, _ = resident_bytes(pid)
        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(send_bomb, port, f"bomb-{index}", attack)
        _, peak = resident_bytes(pid)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    growth = peak - before
    assert growth < 32 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"


# --- one small message before authentication ------------------------------------------------


async def test_a_large_first_frame_without_a_token_closes_1009(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    issuer: tuple[DevIssuer, str],
) -> None:
    settings = jwt_settings(demo_runtime[1], issuer[1])
    async with run_gateway(nursery, settings) as gw:
        client = await connect(gw, "big-first")
        try:
            token = issuer[0].mint("alice")
            padded = {"type": "auth", "token": token, "pad": "x" * AUTH_FRAME_MAX_BYTES}
            await client.send_json(padded)
            assert await wait_close(client) == 1009
        finally:
            await client.aclose()


@pytest.mark.parametrize("compression", ["off", "on"])
async def test_a_message_pipelined_behind_the_auth_frame_is_not_lost(
    nursery: trio.Nursery,
    scripted_runtime: ScriptedRuntime,
    issuer: tuple[DevIssuer, str],
    compression: str,
) -> None:
    """The auth frame and a 1 MiB message in one write: the small pre-auth limit applies to
    the first message only, the second waits in the kernel and arrives whole."""
    settings = jwt_settings(scripted_runtime.url, issuer[1], ws_compression=compression)
    content = varied_text(MiB)
    async with run_gateway(nursery, settings) as gw:
        client = await connect(gw, "pipelined", extensions=[PerMessageDeflate()])
        try:
            auth = orjson.dumps({"type": "auth", "token": issuer[0].mint("alice")}).decode()
            message = orjson.dumps({"type": "user_message", "content": content}).decode()
            await client.send_raw(
                client.ws.send(Message(data=auth)) + client.ws.send(Message(data=message))
            )
            assert (await turn(client))[-1]["is_final"] is True
        finally:
            await client.aclose()
    assert [request["message"]["content"] for request in scripted_runtime.requests] == [content]


# --- pending-auth caps ------------------------------------------------------------------------


def limit_hits(gw: RunningGateway, limit: str) -> float:
    registry = gw.app.gateway.metrics.registry
    return registry.get_sample_value("gateway_limit_hits_total", {"limit": limit}) or 0.0


async def header_token_chat(gw: RunningGateway, session_id: str, token: str) -> None:
    client = await connect(
        gw, session_id, extra_headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    try:
        await client.send_json({"type": "user_message", "content": "bench 2"})
        assert (await turn(client))[-1]["is_final"] is True
    finally:
        await client.aclose()


async def first_frame_auth_chat(client: RawWebSocket, token: str) -> None:
    """An open socket authenticates with its first frame, then runs a whole turn."""
    await client.send_json({"type": "auth", "token": token})
    await client.send_json({"type": "user_message", "content": "bench 2"})
    assert (await turn(client))[-1]["is_final"] is True


async def assert_refused(
    gw: RunningGateway, session_id: str, status: int, limit: str, **connect_options: Any
) -> None:
    """One socket too many: refused with ``status`` and a retry hint, counted once as ``limit``."""
    with pytest.raises(Rejected) as rejected:
        await connect(gw, session_id, **connect_options)
    assert rejected.value.status == status
    assert rejected.value.headers[b"retry-after"] == b"10"
    assert limit_hits(gw, limit) == 1


async def test_pending_sockets_have_their_own_cap_and_users_still_get_in(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    issuer: tuple[DevIssuer, str],
) -> None:
    settings = jwt_settings(
        demo_runtime[1], issuer[1], max_connections=2, max_pending_auth=3, ws_auth_timeout=10.0
    )
    async with run_gateway(nursery, settings) as gw:
        pending = [await connect(gw, f"pending-{i}") for i in range(3)]  # > MAX_CONNECTIONS
        try:
            await assert_refused(gw, "one-too-many", 503, "pending_auth")
            registry = gw.app.gateway.metrics.registry
            assert registry.get_sample_value("gateway_pending_auth_websockets") == 3
            # The pending cap is full, MAX_CONNECTIONS is smaller than it: a user with a token
            # in the header still gets in and chats.
            await header_token_chat(gw, "with-token", issuer[0].mint("alice"))
            # A pending socket that authenticates leaves the pending count for a connection.
            await first_frame_auth_chat(pending[0], issuer[0].mint("bob"))
            assert registry.get_sample_value("gateway_pending_auth_websockets") == 2
            late = await connect(gw, "now-there-is-room")
            await late.aclose()
        finally:
            for client in pending:
                await client.aclose()


async def test_the_refusal_body_is_json(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    issuer: tuple[DevIssuer, str],
) -> None:
    settings = jwt_settings(demo_runtime[1], issuer[1], max_pending_auth=1)
    async with run_gateway(nursery, settings) as gw:
        first = await connect(gw, "first")
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(gw.base_url))
            async with stream:
                await stream.send_all(
                    b"GET /api/v1/ws/second HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                answer = b""
                with trio.fail_after(10):
                    while b"}" not in answer:
                        answer += await stream.receive_some(4096)
        finally:
            await first.aclose()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"application/json" in head.lower()
    assert orjson.loads(body)["error"] == "too_many_pending_auth"


async def test_one_address_at_its_pending_cap_does_not_block_another(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    issuer: tuple[DevIssuer, str],
) -> None:
    settings = jwt_settings(
        demo_runtime[1], issuer[1], max_pending_auth_per_address=2, ws_auth_timeout=10.0
    )
    async with run_gateway(nursery, settings) as gw:
        crowd = [await connect(gw, f"crowd-{i}", source="127.0.0.2") for i in range(2)]
        try:
            await assert_refused(
                gw, "crowd-more", 429, "pending_auth_per_address", source="127.0.0.2"
            )
            # Another address is not affected, and authenticates with its first frame.
            other = await connect(gw, "other-address", source="127.0.0.3")
            try:
                await first_frame_auth_chat(other, issuer[0].mint("carol"))
            finally:
                await other.aclose()
            # When one of the crowd goes away its address has room again.
            await crowd.pop().aclose()
            with trio.fail_after(5):
                while True:
                    try:
                        again = await connect(gw, "crowd-again", source="127.0.0.2")
                        break
                    except Rejected:
                        await trio.sleep(0.05)
            await again.aclose()
        finally:
            for client in crowd:
                await client.aclose()


def test_pending_auth_defaults() -> None:
    settings = Settings(_env_file=None, internal_api_key=INTERNAL_KEY)  # type: ignore[call-arg]
    assert settings.ws_auth_timeout == 5.0
    assert settings.max_pending_auth == 256
    assert settings.max_pending_auth_per_address == 16
    assert settings.ws_compression == "off"
