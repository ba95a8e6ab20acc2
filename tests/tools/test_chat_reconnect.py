"""``trio-gateway chat`` reconnecting and resuming, against a fake v2 gateway that drops
connections on purpose (no repeated output, announced losses, final close codes, giving up) and
against the real gateway behind a proxy that cuts the connection.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import RunningGateway
from .chat_support import (
    DEADLINE,
    chat,
    chunk,
    private_issuer_file,  # noqa: F401 - autouse fixture
)

# ------------------------------------------------------------------------------------------------
# Reconnect and resume, against a fake v2 gateway that drops connections on purpose
# ------------------------------------------------------------------------------------------------

Script = Callable[["FakeConnection"], Awaitable[None]]


@dataclass
class FakeConnection:
    ws: trio_websocket.WebSocketConnection
    received: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, type_: str, seq: int | None = None, **fields: Any) -> None:
        await self.ws.send_message(json.dumps(chunk(type_, seq, **fields)))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(DEADLINE):
            frame = json.loads(await self.ws.get_message())
        assert isinstance(frame, dict)
        self.received.append(frame)
        return frame

    async def drop(self) -> None:
        # An abrupt TCP close without a close frame: what a crash or a network cut looks like.
        await self.ws._close_stream()

    async def until_closed(self) -> None:
        try:
            while True:
                await self.recv()
        except trio_websocket.ConnectionClosed:
            pass


@dataclass
class FakeGateway:
    """A trio-websocket server speaking v2; connection N runs ``scripts[N]``."""

    scripts: list[Script]
    connections: list[FakeConnection] = field(default_factory=list)
    port: int = 0

    @property
    def ws_url(self) -> str:
        """The URL a chat is given: session ``fake`` on this server."""
        return f"ws://127.0.0.1:{self.port}/api/v1/ws/fake"

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="codelab.v2")
        connection = FakeConnection(ws)
        index = len(self.connections)
        self.connections.append(connection)
        await self.scripts[index](connection)


@asynccontextmanager
async def fake_gateway(*scripts: Script) -> AsyncIterator[FakeGateway]:
    fake = FakeGateway(list(scripts))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                fake.handle,
                "127.0.0.1",
                0,
                None,
                handler_nursery=nursery,
            )
        )
        fake.port = server.port
        yield fake
        nursery.cancel_scope.cancel()


def ready(last_seq: int, *, turn_running: bool = False) -> dict[str, Any]:
    return {
        "session_id": "fake",
        "protocol": "codelab.v2",
        "turn_running": turn_running,
        "reattached": turn_running,
        "heartbeat_interval": 20.0,
        "max_message_bytes": 4194304,
        "last_seq": last_seq,
    }


async def first_turn_then(connection: FakeConnection, end: Callable[[], Awaitable[None]]) -> None:
    await connection.send("session_ready", **ready(0))
    await connection.recv()  # the user's message
    await connection.send("turn_started", 1, turn_id=1, message_type="user_message")
    await connection.send("assistant_message", 2, token="alpha ", is_final=False)
    await connection.send("assistant_message", 3, token="bravo ", is_final=False)
    await end()


async def test_a_dropped_connection_is_resumed_without_repeating_output(tmp_path: Path) -> None:
    async def dropped_mid_turn(connection: FakeConnection) -> None:
        await first_turn_then(connection, connection.drop)

    async def resumed(connection: FakeConnection) -> None:
        await connection.recv()  # the resume frame, checked below
        await connection.send("session_ready", **ready(5, turn_running=True))
        # The replay overlaps what the client already showed: it must skip seq 2 and 3.
        await connection.send("assistant_message", 2, token="alpha ", is_final=False)
        await connection.send("assistant_message", 3, token="bravo ", is_final=False)
        await connection.send("assistant_message", 4, token="charlie ", is_final=False)
        await connection.send("assistant_message", 5, token="delta ", is_final=False)
        await connection.send("resumed", from_seq=4)
        await connection.send("assistant_message", 6, token="echo", is_final=True)
        await connection.send("turn_finished", 7, turn_id=1, status="completed")
        await connection.until_closed()

    async with (
        fake_gateway(dropped_mid_turn, resumed) as fake,
        chat(fake.ws_url, cwd=tmp_path) as terminal,
    ):
        await terminal.ask("tell me")
        await terminal.expect(r"assistant> alpha bravo \n")
        await terminal.expect(r"connection lost \(close 1006\); reconnecting in 0\.2 s")
        await terminal.expect(r"\[session\] reconnected; resuming after seq 3\n")
        await terminal.expect(r"assistant> charlie delta echo\nyou> ")
        await terminal.type("/quit\n")
        assert await terminal.exit_code() == 0
    assert terminal.output.count("alpha") == 1 and terminal.output.count("bravo") == 1
    first, second = fake.connections
    assert first.received == [{"type": "user_message", "content": "tell me", "role": "user"}]
    assert second.received[0] == {"type": "resume", "last_seq": 3}


async def test_a_restarting_gateway_is_rejoined_and_lost_output_is_announced(
    tmp_path: Path,
) -> None:
    async def restarting(connection: FakeConnection) -> None:
        await first_turn_then(connection, partial(connection.ws.aclose, 1012, "restarting"))

    async def resync(connection: FakeConnection) -> None:
        await connection.recv()
        await connection.send("session_ready", **ready(9, turn_running=True))
        await connection.send("resync_required", reason="frames_dropped_while_detached")
        await connection.send("assistant_message", 10, token="omega", is_final=True)
        await connection.send("turn_finished", 11, turn_id=1, status="completed")
        await connection.until_closed()

    async with (
        fake_gateway(restarting, resync) as fake,
        chat(fake.ws_url, cwd=tmp_path) as terminal,
    ):
        await terminal.ask("tell me")
        await terminal.expect(r"the gateway is restarting \[close 1012\]\); reconnecting")
        await terminal.expect(r"some output may be missing \(frames_dropped_while_detached\)")
        await terminal.expect(r"assistant> omega\nyou> ")
        terminal.process.send_signal(signal.SIGINT)
        assert await terminal.exit_code() == 0
    assert fake.connections[1].received[0] == {"type": "resume", "last_seq": 3}


async def test_each_loss_is_announced_once_and_the_prompt_comes_back(tmp_path: Path) -> None:
    async def idle_then_dropped(connection: FakeConnection) -> None:
        async def finish_then_drop() -> None:
            await connection.send("assistant_message", 4, token="charlie", is_final=True)
            await connection.send("turn_finished", 5, turn_id=1, status="completed")
            await connection.drop()  # the client reads the frames before the drop

        await first_turn_then(connection, finish_then_drop)

    async def restarted(connection: FakeConnection) -> None:
        # What today's gateway does after a restart: a fresh session (seq 0) that cannot
        # replay what the client saw, so it greets behind the client and refuses its resume.
        await connection.recv()
        await connection.send("session_ready", **ready(0))
        await connection.send("resync_required", reason="unknown_seq")
        await connection.drop()

    async def frames_dropped(connection: FakeConnection) -> None:
        await connection.recv()
        await connection.send("session_ready", **ready(7))
        await connection.send("resync_required", reason="frames_dropped_while_detached")
        await connection.drop()

    async def resumes_exactly_from_seven(connection: FakeConnection) -> None:
        resume = await connection.recv()
        await connection.send("session_ready", **ready(7))
        if resume == {"type": "resume", "last_seq": 7}:
            await connection.send("resumed", from_seq=8, replayed=0)
        else:  # frames 1..7 are not held any more: the same loss again
            await connection.send("resync_required", reason="frames_dropped_while_detached")
        await connection.until_closed()

    scripts = (idle_then_dropped, restarted, frames_dropped, resumes_exactly_from_seven)
    async with fake_gateway(*scripts) as fake, chat(fake.ws_url, cwd=tmp_path) as terminal:
        await terminal.ask("tell me")
        await terminal.expect(r"charlie\n(?:.*\n)?you> ")  # (maybe: no pending approvals)
        await terminal.expect(r"reconnecting in 0\.2 s \(attempt 1/10\)\n")
        await terminal.expect(r"resuming after seq 5\n")
        await terminal.expect(r"some output may be missing \(the gateway lost the session's")
        await terminal.expect(r"/history\nyou> ")  # the prompt again, after the notice
        await terminal.expect(r"resuming after seq 0\n")
        await terminal.expect(r"some output may be missing \(frames_dropped_while_detached")
        await terminal.expect(r"/history\nyou> ")
        await terminal.expect(r"resuming after seq 7\nyou> ")
        await terminal.type("/quit\n")
        assert await terminal.exit_code() == 0
    assert terminal.output.count("some output may be missing") == 2, terminal.output
    assert fake.connections[3].received[0] == {"type": "resume", "last_seq": 7}


async def test_a_final_close_code_ends_the_chat_without_reconnecting(tmp_path: Path) -> None:
    async def replaced(connection: FakeConnection) -> None:
        await connection.send("session_ready", **ready(0))
        await connection.ws.aclose(4409, "replaced by a newer connection")

    async with fake_gateway(replaced) as fake, chat(fake.ws_url, cwd=tmp_path) as terminal:
        await terminal.expect(r"another connection to this session replaced this one")
        await terminal.expect(r"\[close 4409\]")
        assert await terminal.exit_code() == 1
    assert len(fake.connections) == 1


async def test_reconnecting_gives_up_after_the_allowed_attempts(tmp_path: Path) -> None:
    async def then_dropped(connection: FakeConnection) -> None:
        await connection.send("session_ready", **ready(0))
        await connection.drop()

    async def dies_at_once(connection: FakeConnection) -> None:
        await connection.drop()  # opens, says nothing: a failed attempt

    async with (
        fake_gateway(then_dropped, dies_at_once, dies_at_once) as fake,
        chat(fake.ws_url, "--reconnect-attempts", "2", cwd=tmp_path) as terminal,
    ):
        await terminal.expect(r"reconnecting in 0\.2 s \(attempt 1/2\)")
        await terminal.expect(r"reconnecting in 0\.4 s \(attempt 2/2\)")
        await terminal.expect(r"close 1006; giving up after 2 attempts")
        assert await terminal.exit_code() == 1
    assert len(fake.connections) == 3


class CuttableProxy:
    """A TCP relay in front of the gateway whose connections can be cut at once: the chat
    sees its connection drop without a close frame (a network blink)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._scopes: list[trio.CancelScope] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            with trio.CancelScope() as scope:
                self._scopes.append(scope)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._copy, client, server)
                    nursery.start_soon(self._copy, server, client)

    @staticmethod
    async def _copy(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()


async def test_the_chat_resumes_a_dropped_connection_against_the_real_gateway_exactly(
    nursery: trio.Nursery,
    gateway: RunningGateway,
    demo_runtime: tuple[DemoRuntime, str],
    tmp_path: Path,
) -> None:
    proxy = CuttableProxy(int(gateway.base_url.rsplit(":", 1)[1]))
    await nursery.start(proxy.serve)
    async with chat(f"ws://127.0.0.1:{proxy.port}", "--session", "chat-resume", cwd=tmp_path) as t:
        await t.ask("bench 400 200")  # paced: two seconds of streaming
        for cut in range(3):
            await t.expect(rf"t{100 * (cut + 1)} ")
            proxy.cut()
        await t.expect(r"t399 ")
        await t.type("/quit\n")
        assert await t.exit_code() == 0
    tokens = [int(n) for n in re.findall(r"\bt(\d+) ", t.output)]
    assert tokens == list(range(400)), "every token once, in order, through three drops"
    assert proxy.accepted >= 4
    assert demo_runtime[0].completed_streams == 1
