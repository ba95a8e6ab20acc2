"""Fixtures: real servers on 127.0.0.1 with OS-chosen ports, talked to over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from trio_gateway.app import GatewayApp, create_app
from trio_gateway.server import serve
from trio_gateway.settings import Settings
from trio_gateway.tools.demo_runtime import (
    DemoRuntime,
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)

from .support.redis_server import RedisServer
from .support.scripted_runtime import ScriptedRuntime


def _no_pong_after_close() -> None:
    """Make the tests' client library stop answering pings once it has sent its close.

    trio-websocket 0.12.2 (the newest) answers a server ping that arrives after its own close
    frame; wsproto refuses (``LocalProtocolError``) and ``open_websocket`` re-raises that as a
    stray ``trio.Cancelled``. An enclosing cancelled scope then swallowed it, and a test body
    ended early *and passed* (found in the ownership test: it stopped after its first socket).
    A server may ping until it sends its own close (RFC 6455), so the client is what is wrong.
    """
    from trio_websocket._impl import WebSocketConnection
    from wsproto.connection import ConnectionState

    original = WebSocketConnection._handle_ping_event

    async def handle_ping(self: Any, event: Any) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            await original(self, event)

    WebSocketConnection._handle_ping_event = handle_ping  # type: ignore[method-assign]


_no_pong_after_close()

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


def task_names(predicate: Callable[[str], bool]) -> list[str]:
    """Names of every live task in this process whose name satisfies ``predicate``."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if predicate(task.name):
            names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return names


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


@pytest.fixture(autouse=True, scope="session")
def _state_file_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Gateways that tests start as processes (``trio-gateway serve``, the load bench) use the
    default backend, sqlite, whose default file is in the working directory: point it at a
    temporary directory, so that no test leaves a state file in the checkout."""
    state = tmp_path_factory.mktemp("state") / "trio-gateway.sqlite3"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GATEWAY__SQLITE_PATH", str(state))
        yield


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


@pytest.fixture
async def demo_runtime(nursery: trio.Nursery) -> AsyncIterator[tuple[DemoRuntime, str]]:
    runtime = create_demo_runtime(
        DemoRuntimeConfig(internal_api_key=INTERNAL_KEY, token_delay=0.0, think_delay=0.0)
    )
    stop = trio.Event()
    binds = await nursery.start(
        partial(serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=stop.wait)
    )
    yield runtime, binds[0]
    stop.set()


@pytest.fixture
async def scripted_runtime(nursery: trio.Nursery) -> AsyncIterator[ScriptedRuntime]:
    runtime = ScriptedRuntime()
    await nursery.start(runtime.serve)
    yield runtime
    runtime.stop()


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def gateway(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> AsyncIterator[RunningGateway]:
    """A gateway in front of the demo runtime, default test settings."""
    async with run_gateway(nursery, gateway_settings(demo_runtime[1])) as running:
        yield running


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server on loopback for one test (killed, whatever happens)."""
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def pytest_report_header(config: pytest.Config) -> str | None:
    """In every run that leaves them out: the container tests exist, and how to run them."""
    if "container" in str(config.getoption("markexpr")).replace("not container", ""):
        return None
    return (
        "container tests (marker `container`): not selected; run `pytest -m container` "
        "(needs a Docker daemon; .ci/run does it)"
    )
