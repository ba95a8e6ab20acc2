"""A gateway served by hypercorn in this process on loopback (port 0), and a JSON WebSocket
client for it: what the fixtures of ``tests/conftest.py`` and the fuzzing harnesses build on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio
import trio_websocket

from trio_gateway.app import GatewayApp, create_app
from trio_gateway.server import serve
from trio_gateway.settings import Settings

from .rawws import RawWebSocket

INTERNAL_KEY = "test-internal-key-0123456789"


@dataclass
class RunningGateway:
    """A gateway served by hypercorn on loopback, plus helpers to talk to it."""

    app: GatewayApp
    settings: Settings
    base_url: str
    stop: trio.Event
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def ws_base(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    def ws_url(self, session_id: str) -> str:
        return f"{self.ws_base}/api/v1/ws/{session_id}"

    @asynccontextmanager
    async def connect(
        self, session_id: str, *, v2: bool = False, **kwargs: Any
    ) -> AsyncIterator[WsClient]:
        subprotocols = ["codelab.v2"] if v2 else None
        async with trio_websocket.open_websocket_url(
            self.ws_url(session_id), subprotocols=subprotocols, **kwargs
        ) as ws:
            yield WsClient(ws)

    async def stalled_client(self, session_id: str, message: str | None = None) -> RawWebSocket:
        """A v1 socket on ``session_id`` that sends ``message`` (if any) as a user message and
        never reads: its receive window is 4 KiB, so once the kernel's buffers are full the
        gateway's sends to it really block, as on a dead link or behind a frozen IDE."""
        raw = await RawWebSocket.connect(
            port_of(self.base_url), f"/api/v1/ws/{session_id}", receive_buffer=4096
        )
        if message is not None:
            await raw.send_json({"type": "user_message", "content": message})
        return raw


@dataclass
class WsClient:
    """A trio-websocket client that speaks JSON frames."""

    ws: trio_websocket.WebSocketConnection

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            await self.ws.send_message(orjson.dumps(frame).decode())
        else:
            await self.ws.send_message(frame)

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        with trio.fail_after(timeout):
            message = await self.ws.get_message()
        value = orjson.loads(message)
        assert isinstance(value, dict)
        return value

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> list[dict[str, Any]]:
        """Frames up to and including the first that satisfies ``predicate``."""
        frames = []
        with trio.fail_after(timeout):
            while True:
                frame = await self.recv(timeout)
                frames.append(frame)
                if predicate(frame):
                    return frames

    async def turn(self, timeout: float = 10) -> list[dict[str, Any]]:
        """Frames up to the end of the current turn (the first frame with is_final true)."""
        return await self.recv_until(lambda f: f.get("is_final") is True, timeout)


async def wait_for(predicate: Callable[[], bool], timeout: float = 8) -> None:
    """Poll ``predicate`` (state of a real server) until it holds, or fail."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def port_of(base_url: str) -> int:
    """The port of ``http://host:port``."""
    return int(base_url.rsplit(":", 1)[1])


def close_code(closed: trio_websocket.ConnectionClosed) -> int:
    """The close code a client received."""
    assert closed.reason is not None
    return int(closed.reason.code)


def gateway_settings(agent_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "agent_url": agent_url,
        "internal_api_key": INTERNAL_KEY,
        "log_level": "DEBUG",
        "ws_heartbeat_interval": 5.0,
        "session_grace_seconds": 2.0,
        "drain_timeout": 3.0,
        "ws_close_timeout": 0.5,
        # Authentication has its own suite (test_security.py); elsewhere it is off.
        "use_jwt_auth": False,
        # Nothing kept between tests; the SQLite backend has its own tests
        # (test_sqlite_state.py), which pass state_backend="sqlite" and a tmp_path file.
        "state_backend": "memory",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def jwt_settings(agent_url: str, jwks_url: str, **overrides: Any) -> Settings:
    """:func:`gateway_settings` with JWT auth on against the key set at ``jwks_url``."""
    return gateway_settings(agent_url, **{"use_jwt_auth": True, "jwks_url": jwks_url, **overrides})


@asynccontextmanager
async def run_gateway(nursery: trio.Nursery, settings: Settings) -> AsyncIterator[RunningGateway]:
    """Serve a fresh gateway app until the block ends, then drain it like SIGTERM would."""
    app = create_app(settings)
    stop = trio.Event()
    running: RunningGateway | None = None

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(
                app,
                settings,
                host="127.0.0.1",
                port=0,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        finally:
            if running is not None:
                running.stopped.set()

    binds = await nursery.start(run)
    running = RunningGateway(app, settings, binds[0], stop)
    try:
        yield running
    finally:
        stop.set()
        with trio.fail_after(30):
            await running.stopped.wait()
