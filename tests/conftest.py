"""Fixtures: real servers on 127.0.0.1 with OS-chosen ports, talked to over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_gateway.tools.demo_runtime import (
    DemoRuntime,
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)
from trio_gateway.tools.dev_auth import DevIssuer

from .support.gateway import (
    INTERNAL_KEY,
    RunningGateway,
    WsClient,
    close_code,
    gateway_settings,
    port_of,
    run_gateway,
    wait_for,
)
from .support.jwks_server import JWKSServer
from .support.keepalive_runtime import KeepAliveRuntime
from .support.redis_server import RedisServer
from .support.scripted_runtime import ScriptedRuntime
from .support.task_tree import task_names

# The helpers of tests/support/gateway.py, imported from here by the test modules.
__all__ = [
    "INTERNAL_KEY",
    "RunningGateway",
    "WsClient",
    "close_code",
    "gateway_settings",
    "port_of",
    "run_gateway",
    "task_names",
    "wait_for",
]


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


@pytest.fixture(autouse=True, scope="session")
def _state_file_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Gateways that tests start as processes (``trio-gateway serve``, the load bench) use the
    default backend, sqlite, whose default file is in the working directory: point it at a
    temporary directory, so that no test leaves a state file in the checkout."""
    state = tmp_path_factory.mktemp("state") / "trio-gateway.sqlite3"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GATEWAY__SQLITE_PATH", str(state))
        yield


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
def runtime(demo_runtime: tuple[DemoRuntime, str]) -> DemoRuntime:
    """The demo runtime itself (what the ``gateway`` fixture stands in front of)."""
    return demo_runtime[0]


@pytest.fixture
async def scripted_runtime(nursery: trio.Nursery) -> AsyncIterator[ScriptedRuntime]:
    async with ScriptedRuntime().serving(nursery) as runtime:
        yield runtime


@pytest.fixture
async def keepalive(nursery: trio.Nursery) -> AsyncIterator[KeepAliveRuntime]:
    """A keep-alive runtime stand-in that can close pooled connections behind our back."""
    async with KeepAliveRuntime().serving(nursery) as runtime:
        yield runtime


GatewayFactory = Callable[..., Awaitable[RunningGateway]]
GatewayWith = Callable[..., AbstractAsyncContextManager[RunningGateway]]


@pytest.fixture
def gateway_with(nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]) -> GatewayWith:
    """Start a gateway in front of the demo runtime with the test settings and ``overrides``,
    for one ``async with`` (drained when the block ends)."""

    def start(**overrides: Any) -> AbstractAsyncContextManager[RunningGateway]:
        return run_gateway(nursery, gateway_settings(demo_runtime[1], **overrides))

    return start


@pytest.fixture
async def gateway(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> AsyncIterator[RunningGateway]:
    """A gateway in front of the demo runtime, default test settings."""
    async with run_gateway(nursery, gateway_settings(demo_runtime[1])) as running:
        yield running


@pytest.fixture
async def scripted_gateway(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> AsyncIterator[RunningGateway]:
    """A gateway in front of the scripted runtime, default test settings."""
    async with run_gateway(nursery, gateway_settings(scripted_runtime.url)) as running:
        yield running


@pytest.fixture
async def jwks_server(nursery: trio.Nursery) -> AsyncIterator[tuple[JWKSServer, DevIssuer]]:
    """An Auth Service stand-in serving a fresh dev issuer's key set; the server and issuer."""
    issuer = DevIssuer()
    server = JWKSServer(issuer.jwks())
    await nursery.start(server.serve)
    yield server, issuer
    server.stop()


@pytest.fixture
def issuer(jwks_server: tuple[JWKSServer, DevIssuer]) -> tuple[DevIssuer, str]:
    """``jwks_server`` as the JWT tests use it: the token issuer and its JWKS URL."""
    server, dev = jwks_server
    return dev, server.url


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
