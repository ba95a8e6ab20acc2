"""``trio-gateway serve --workers N``: several processes on one port, drained and restarted
as one gateway. Real processes, a real redis-server and a real runtime on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from trio_gateway.settings import SettingsError
from trio_gateway.tools.demo_runtime import (
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)
from trio_gateway.workers import check_worker_settings, parse_worker_count

from ..conftest import INTERNAL_KEY, WsClient, close_code, gateway_settings
from ..support.ports import free_port
from ..support.processes import (
    TrioChild,
    child_env,
    clean_env,
    cli_command,
    run_cli,
    run_command,
    started,
)
from ..support.redis_server import REDIS_SERVER, RedisServer

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def test_the_worker_count_is_a_number_or_auto() -> None:
    assert parse_worker_count("1") == 1
    assert parse_worker_count("3") == 3
    assert parse_worker_count("auto") == len(os.sched_getaffinity(0))
    for bad in ("0", "65", "two", ""):
        with pytest.raises(SettingsError, match="--workers"):
            parse_worker_count(bad)


def test_several_workers_need_shared_state() -> None:
    memory = gateway_settings("http://rt:1", state_backend="memory")
    check_worker_settings(memory, 1)
    with pytest.raises(SettingsError, match="GATEWAY__STATE_BACKEND=redis"):
        check_worker_settings(memory, 2)
    check_worker_settings(gateway_settings("http://rt:1", state_backend="redis"), 2)


async def test_serve_refuses_several_workers_without_redis() -> None:
    env = clean_env(internal_api_key=INTERNAL_KEY, state_backend="memory")
    result = await run_cli("serve", "--workers", "2", "--port", "0", env=env)
    assert result.returncode == 2
    assert b"needs GATEWAY__STATE_BACKEND=redis" in result.stderr


@dataclass
class Fleet:
    """A ``serve --workers N`` process and what its JSON log lines said so far."""

    child: TrioChild
    port: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def read_logs(self) -> None:
        assert self.child.stderr is not None
        async for line in self.child.stderr:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"message": line})
            self.changed.set()
            self.changed = trio.Event()

    async def wait_log(self, predicate: Any, count: int = 1, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while sum(1 for line in self.lines if predicate(line)) < count:
                await self.changed.wait()

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker index, from the supervisor's log."""
        pids: dict[int, int] = {}
        for line in self.lines:
            if line.get("event") == "worker_started":
                pids[line["worker"]] = line["pid"]
        return pids

    def served_by(self, event: str) -> Counter[int]:
        return Counter(
            line["worker"] for line in self.lines if line.get("event") == event and "worker" in line
        )


@asynccontextmanager
async def fleet(
    nursery: trio.Nursery, runtime_url: str, redis_url: str, workers: int = 2
) -> AsyncIterator[Fleet]:
    port = free_port()
    env = child_env(
        INTERNAL_KEY,
        log_level="INFO",
        agent_url=runtime_url,
        state_backend="redis",
        redis_url=redis_url,
        log_format="json",
        drain_timeout="2",
        ws_close_timeout="1",
    )
    command = cli_command(
        *("serve", "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port))
    )
    async with started(
        command, env=env, stderr=subprocess.PIPE, stop_signal=signal.SIGKILL
    ) as child:
        running = Fleet(child, port)
        nursery.start_soon(running.read_logs)
        try:
            await running.wait_log(lambda line: line.get("event") == "worker_started", workers)
            # Every worker listening: each says so once hypercorn has bound.
            await running.wait_log(
                lambda line: "serving on" in line.get("message", ""), workers + 1
            )
            yield running
        finally:
            with trio.CancelScope(shield=True):  # first: a living supervisor restarts workers
                await child.stop(signal.SIGKILL)
            for pid in running.worker_pids().values():  # never leave an orphan behind
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def slow_runtime(nursery: trio.Nursery) -> AsyncIterator[str]:
    """The demo runtime with turns of ~2 s (so a drain can catch them mid-turn)."""
    runtime = create_demo_runtime(
        DemoRuntimeConfig(internal_api_key=INTERNAL_KEY, token_delay=0.05, think_delay=0.0)
    )
    stop = trio.Event()
    binds = await nursery.start(
        partial(serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=stop.wait)
    )
    yield binds[0]
    stop.set()


async def fresh_connection_requests(base_url: str, count: int) -> None:
    # A new TCP connection per request: the kernel spreads connections, not requests.
    for _ in range(count):
        async with httpx.AsyncClient(base_url=base_url) as http:
            assert (await http.get("/health")).status_code == 200


@needs_redis
async def test_every_worker_serves_requests_and_sessions(
    nursery: trio.Nursery, slow_runtime: str, redis_server: RedisServer
) -> None:
    async with fleet(nursery, slow_runtime, redis_server.url(1)) as running:
        await fresh_connection_requests(running.base_url, 60)
        await running.wait_log(lambda line: line.get("event") == "http_access", 60)
        requests = running.served_by("http_access")
        assert set(requests) == {0, 1}, requests
        # SO_REUSEPORT hashes connections: roughly even, never all on one worker.
        assert min(requests.values()) >= 10, requests

        for number in range(20):  # all 20 on one worker: 2 in a million
            ws_url = f"ws://127.0.0.1:{running.port}/api/v1/ws/spread-{number}"
            async with trio_websocket.open_websocket_url(ws_url) as ws:
                client = WsClient(ws)
                await client.send({"type": "user_message", "content": "hi", "role": "user"})
                frames = await client.turn(timeout=30)
                assert frames[-1]["is_final"] is True
        sessions = running.served_by("ws_connected")
        assert set(sessions) == {0, 1}, sessions


@needs_redis
async def test_a_worker_that_dies_is_started_again(
    nursery: trio.Nursery, slow_runtime: str, redis_server: RedisServer
) -> None:
    async with fleet(nursery, slow_runtime, redis_server.url(2)) as running:
        victim = running.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        await running.wait_log(
            lambda line: line.get("event") == "worker_started" and line.get("worker") == 0, 2
        )
        assert running.worker_pids()[0] != victim
        await running.wait_log(lambda line: "serving on" in line.get("message", ""), 4)
        await fresh_connection_requests(running.base_url, 20)
        assert running.child.returncode is None


@needs_redis
async def test_sigterm_drains_every_worker_and_clients_get_1012(
    nursery: trio.Nursery, slow_runtime: str, redis_server: RedisServer
) -> None:
    codes: list[int] = []
    async with fleet(nursery, slow_runtime, redis_server.url(3)) as running:
        all_mid_turn = trio.Event()
        mid_turn = 0

        async def session(number: int) -> None:  # 16 sessions: all on one worker 1 in 30,000
            nonlocal mid_turn
            ws_url = f"ws://127.0.0.1:{running.port}/api/v1/ws/drain-{number}"
            async with trio_websocket.open_websocket_url(ws_url) as ws:
                client = WsClient(ws)
                # A long answer: the drain finds it mid-turn.
                await client.send({"type": "user_message", "content": "x" * 400, "role": "user"})
                await client.recv(timeout=20)
                mid_turn += 1
                if mid_turn == 16:
                    all_mid_turn.set()
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await client.recv(timeout=30)
                codes.append(close_code(closed.value))

        async with trio.open_nursery() as clients:
            for number in range(16):
                clients.start_soon(session, number)
            with trio.fail_after(30):
                await all_mid_turn.wait()
            assert set(running.served_by("ws_connected")) == {0, 1}
            assert await running.child.stop(signal.SIGTERM, grace=30) == 0
    assert codes == [1012] * 16


def process_alive(pid: int) -> bool:
    """Running (an exited orphan may stay a zombie where nothing reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_worker_whose_supervisor_died_during_its_startup_still_drains() -> None:
    port = free_port()
    env = child_env(INTERNAL_KEY, agent_url="http://127.0.0.1:9", drain_timeout="1")
    # The "supervisor" (a shell) starts the worker as the real one does (its pid in the
    # environment) and is gone before the worker has even imported the gateway.
    script = (
        f"TRIO_GATEWAY_SUPERVISOR_PID=$$ {sys.executable} -m trio_gateway.cli serve "
        f"--reuse-port --host 127.0.0.1 --port {port} >/dev/null 2>&1 & echo $!"
    )
    result = await run_command(["sh", "-c", script], env=env)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.strip())
    try:
        with trio.fail_after(30):  # start-up, one poll, the drain
            while process_alive(pid):
                await trio.sleep(0.2)
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
