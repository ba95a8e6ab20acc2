"""Relay benchmark: what the gateway costs compared with reading the Agent Runtime directly.

Run ``python bench/relay_bench.py`` (default sizes, about two minutes) or ``--quick`` (seconds),
optionally ``--json FILE`` to keep the figures. The script starts the demo runtime
(``trio-gateway demo-runtime --instant``) and the gateway (``trio-gateway serve``) as two child
processes on free loopback ports, drives them from this process under trio, prints one table and
stops both children whatever happens. Only ``127.0.0.1`` is ever bound or dialled.

Methodology
-----------
Every figure is a *ratio or a difference between two paths measured in the same run*: "direct"
(a careful plain client reading the runtime's SSE stream with httpx) and "gateway" (trio-websocket
clients reading the same turns through the gateway). The machines this runs on have two shared,
noisy cores, so absolute tokens/s or milliseconds change from run to run and from machine to
machine; what the two paths have in common (the runtime, the load, the client's interpreter, the
noise of the moment) cancels out in the ratio. Compare ratios, never absolute numbers across runs.

1. **Throughput.** ``S`` concurrent sessions each stream ``bench T`` (unpaced). Tokens/s is
   ``S*T`` divided by the wall time from the first send to the last final chunk. Both clients do
   the same per-token work (parse the JSON, keep the token) and check the same thing at the end:
   the concatenated text is exactly ``t0 t1 ... t{T-1}``. Connection set-up is outside the timed
   window for both: the httpx pool is warmed, the WebSockets are opened before the clock starts.
   Rounds alternate direct / gateway so slow drifts of the machine hit both alike; the medians are
   compared. The gateway coalesces consecutive tokens into one frame when its client falls behind,
   so tokens are counted by their text, never by frames; the frames/token figure shows how much
   it coalesced. CPU seconds of each process (``/proc/<pid>/stat``) over the timed windows show
   where the time went.
2. **Latency.** ``C`` sessions each stream ``bench R*D R``: ``R`` tokens/s for ``D`` seconds on
   the runtime's absolute schedule, every chunk stamped with ``metadata.emitted_ns``
   (``time.time_ns()`` in the runtime; same host, same clock). Latency = ``time.time_ns()`` when
   the client got the frame (or, direct, the network read carrying the event) minus
   ``emitted_ns``. The session starts are spread evenly over one token interval so the load is
   smooth instead of ``C`` tokens in lock-step. The same load is read directly, then through the
   gateway; the gateway's *added* latency is the difference of the two distributions' percentiles.
   A coalesced frame only carries its first token's stamp; at this pace frames should not
   coalesce, and the count of those that did is reported.
3. **Memory per idle WebSocket session.** Gateway RSS (``VmRSS``) after a warm-up of 50 sessions
   opened and closed, then with ``M`` more sessions connected and idle (distinct ids, opened 100
   at a time), after ~2 s of settling. Per session = RSS delta / ``M``. This phase runs *first*,
   on a fresh gateway: after the load phases the heap holds freed blocks that new sessions would
   reuse, which would make sessions look cheaper than they are on a long-running process.

Exit status: 0 when the measurement completed (whether or not the targets are met), 1 when the
benchmark itself failed (wrong text, an error frame, a timeout, a child that died).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

HOST = "127.0.0.1"
STREAM_PATH = "/agent/message/stream"
WS_PATH = "/api/v1/ws/"

TARGET_THROUGHPUT_RATIO = 0.9  # gateway tokens/s >= 0.9 x direct
TARGET_ADDED_P99_MS = 5.0  # gateway p99 latency - direct p99 latency
TARGET_IDLE_SESSION_KIB = 64.0  # RSS per idle WebSocket session

STARTUP_TIMEOUT = 30.0  # seconds for a child to answer /health
ROUND_TIMEOUT = 300.0  # seconds for one throughput round (connect, stream, close)
CONNECT_TIMEOUT = 30.0  # seconds for one WebSocket handshake
CLOSE_TIMEOUT = 10.0  # seconds for one WebSocket close
MEMORY_PHASE_TIMEOUT = 300.0
WARMUP_SESSIONS = 50
OPEN_CONCURRENCY = 100  # WebSocket handshakes in flight at once
SETTLE_SECONDS = 2.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a fully coalesced turn must never trip the client's limit
CHILD_STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


class BenchError(Exception):
    """The benchmark itself failed: wrong text, an error frame, a dead child, a timeout."""


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the three phases."""

    sessions: int  # S: concurrent sessions in the throughput phase
    tokens: int  # T: tokens per throughput turn
    rounds: int  # rounds per path (alternating direct / gateway)
    paced_sessions: int  # C: concurrent sessions in the latency phase
    rate: int  # R: tokens/s per paced session
    duration: float  # D: seconds per paced turn
    idle_sessions: int  # M: idle WebSockets in the memory phase

    @property
    def paced_tokens(self) -> int:
        """Tokens per paced turn (``R * D``)."""
        return max(1, round(self.rate * self.duration))

    @classmethod
    def full(cls) -> BenchConfig:
        """The default sizes: 20 x 2000 tokens, 100 x 20 tok/s x 10 s, 2000 idle sessions."""
        return cls(
            sessions=20,
            tokens=2000,
            rounds=3,
            paced_sessions=100,
            rate=20,
            duration=10.0,
            idle_sessions=2000,
        )

    @classmethod
    def quick(cls) -> BenchConfig:
        """Smoke-test sizes: 5 x 300 tokens, 10 x 20 tok/s x 2 s, 200 idle sessions."""
        return cls(
            sessions=5,
            tokens=300,
            rounds=1,
            paced_sessions=10,
            rate=20,
            duration=2.0,
            idle_sessions=200,
        )


def expected_text(tokens: int) -> str:
    """The exact text of a ``bench N`` turn: ``t0 t1 ... t{N-1} ``."""
    return "".join(f"t{index} " for index in range(tokens))


# ------------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port the OS considers free on 127.0.0.1 right now (closed again before returning)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # An unlimited hard limit cannot be the soft limit on Linux (nr_open caps it).
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with suppress(ValueError, OSError):  # keep what we have; main() checks it is enough
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by process ``pid`` (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    """User + system CPU seconds of this (the client) process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


@dataclass
class Child:
    """One child process and the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The child's process id (the Python interpreter running trio-gateway)."""
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the child wrote, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise :class:`BenchError` (with its output) if the child has exited."""
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (the gateway drains), then SIGKILL after a grace period. Never raises."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(CHILD_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(CHILD_STOP_TIMEOUT)


@dataclass(frozen=True)
class Services:
    """The running runtime and gateway: their addresses, pids and the shared internal key."""

    runtime: Child
    gateway: Child
    runtime_url: str
    gateway_url: str
    internal_key: str

    def ws_url(self, session_id: str) -> str:
        """The gateway's WebSocket URL for ``session_id``."""
        return self.gateway_url.replace("http://", "ws://", 1) + WS_PATH + session_id

    def check_alive(self) -> None:
        """Raise if either child has died."""
        self.runtime.check_alive()
        self.gateway.check_alive()


def _child_env(internal_key: str, **settings: str) -> dict[str, str]:
    # Inherited GATEWAY__* variables would silently change what is measured: start from none.
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY__")}
    env["GATEWAY__INTERNAL_API_KEY"] = internal_key
    env["GATEWAY__LOG_LEVEL"] = "WARNING"
    env.update({f"GATEWAY__{key.upper()}": value for key, value in settings.items()})
    return env


def _spawn(name: str, args: list[str], env: dict[str, str], workdir: Path) -> Child:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_gateway.cli", *args],
            env=env,
            cwd=workdir,  # no stray .env from the caller's directory
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the children
        )
    return Child(name, process, log_path)


async def _wait_healthy(child: Child, url: str) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                child.check_alive()
                try:
                    response = await client.get(url + "/health", timeout=2.0)
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


@contextmanager
def running_services(workdir: Path) -> Iterator[Services]:
    """Start the runtime and the gateway, wait for ``/health``; stop both on exit, always."""
    key = secrets.token_urlsafe(24)
    runtime_port, gateway_port = free_port(), free_port()
    runtime_url = f"http://{HOST}:{runtime_port}"
    gateway_url = f"http://{HOST}:{gateway_port}"
    children: list[Child] = []
    try:
        children.append(
            _spawn(
                "runtime",
                ["demo-runtime", "--host", HOST, "--port", str(runtime_port), "--instant"],
                _child_env(key),
                workdir,
            )
        )
        children.append(
            _spawn(
                "gateway",
                ["serve", "--host", HOST, "--port", str(gateway_port)],
                _child_env(key, agent_url=runtime_url),
                workdir,
            )
        )
        services = Services(children[0], children[1], runtime_url, gateway_url, key)

        async def wait_both() -> None:
            await _wait_healthy(services.runtime, runtime_url)
            await _wait_healthy(services.gateway, gateway_url)

        try:
            trio.run(wait_both)
        except trio.TooSlowError:
            raise BenchError(
                f"children not healthy after {STARTUP_TIMEOUT:g} s:\n"
                + "\n".join(f"[{c.name}]\n{c.log_tail()}" for c in children)
            ) from None
        yield services
    finally:
        for child in reversed(children):
            child.stop()


# ------------------------------------------------------------------------------------------------
# One turn, read by either client
# ------------------------------------------------------------------------------------------------


@dataclass
class TurnResult:
    """What one client saw of one turn. Both paths fill it the same way, chunk by chunk."""

    measure_latency: bool = False
    parts: list[str] = field(default_factory=list)
    frames: int = 0  # non-final token frames (WebSocket frames, or SSE events direct)
    multi_token_frames: int = 0  # frames that carried more than one token (coalesced)
    latencies_ns: list[int] = field(default_factory=list)
    finished_at: float | None = None  # time.perf_counter() when the final chunk arrived

    def absorb(self, chunk: Any, received_ns: int) -> bool:
        """Account one chunk received at ``received_ns``; True when it ends the turn."""
        if not isinstance(chunk, dict) or chunk.get("type") != "assistant_message":
            raise BenchError(f"unexpected chunk: {_short(chunk)}")
        token = chunk.get("token")
        if chunk.get("is_final") is True:
            if token:
                self.parts.append(token)
            self.finished_at = time.perf_counter()
            return True
        if not isinstance(token, str):
            raise BenchError(f"token chunk without a string token: {_short(chunk)}")
        self.parts.append(token)
        self.frames += 1
        if token.count(" ") > 1:
            self.multi_token_frames += 1
        if self.measure_latency:
            metadata = chunk.get("metadata")
            if not isinstance(metadata, dict) or not isinstance(metadata.get("emitted_ns"), int):
                raise BenchError(f"paced chunk without metadata.emitted_ns: {_short(chunk)}")
            self.latencies_ns.append(received_ns - metadata["emitted_ns"])
        return False

    def verify(self, expected: str, where: str) -> None:
        """Raise unless the turn ended and its text is exactly ``expected``."""
        if self.finished_at is None:
            raise BenchError(f"{where}: the turn ended without a final chunk")
        text = "".join(self.parts)
        if text != expected:
            mismatch = next(
                (i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
                min(len(text), len(expected)),
            )
            raise BenchError(
                f"{where}: wrong text ({len(text)} chars, expected {len(expected)}); first "
                f"difference at {mismatch}: got {text[mismatch : mismatch + 40]!r}, expected "
                f"{expected[mismatch : mismatch + 40]!r}"
            )


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _user_message(content: str) -> dict[str, str]:
    return {"type": "user_message", "content": content}


async def direct_turn(
    client: httpx.AsyncClient, session_id: str, content: str, result: TurnResult
) -> None:
    """Stream one turn straight from the runtime, the way a careful plain client would.

    The byte stream is split on the blank line that ends each event (the runtime sends exactly
    ``data: {json}\\n\\n``) and each ``data:`` payload is parsed with orjson. The receipt time of
    a network read is taken once, before any of its events are parsed.
    """
    body = orjson.dumps({"session_id": session_id, "message": _user_message(content)})
    async with client.stream("POST", STREAM_PATH, content=body) as response:
        if response.status_code != 200:
            detail = (await response.aread())[:300]
            raise BenchError(f"runtime answered HTTP {response.status_code}: {detail!r}")
        buffer = b""
        done = False
        async for piece in response.aiter_bytes():
            received_ns = time.time_ns()
            *events, buffer = (buffer + piece).split(b"\n\n")
            for event in events:
                if done:
                    raise BenchError(f"direct {session_id}: data after the final chunk")
                if event.startswith(b"data: "):
                    done = result.absorb(orjson.loads(event[6:]), received_ns)
        # Reading to the end (not breaking at the final chunk) returns the connection to the pool.
        if buffer.strip():
            raise BenchError(f"direct {session_id}: unterminated event at the end of the stream")


async def gateway_turn(
    ws: trio_websocket.WebSocketConnection, content: str, result: TurnResult
) -> None:
    """Send one message over an open gateway WebSocket and read frames until ``is_final``.

    Checks, per frame: a JSON text frame, not an error, ``seq`` one more than the previous one.
    """
    await ws.send_message(orjson.dumps(_user_message(content)).decode())
    last_seq: int | None = None
    while True:
        message = await ws.get_message()
        received_ns = time.time_ns()
        if not isinstance(message, str):
            raise BenchError("gateway sent a binary frame")
        frame = orjson.loads(message)
        seq = frame.get("seq") if isinstance(frame, dict) else None
        if not isinstance(seq, int) or (last_seq is not None and seq != last_seq + 1):
            raise BenchError(f"gateway frame out of sequence after seq {last_seq}: {_short(frame)}")
        last_seq = seq
        if result.absorb(frame, received_ns):
            return


# ------------------------------------------------------------------------------------------------
# Clients and connection pools
# ------------------------------------------------------------------------------------------------


def direct_client(services: Services, connections: int) -> httpx.AsyncClient:
    """An httpx client for the runtime with room for ``connections`` concurrent streams."""
    return httpx.AsyncClient(
        base_url=services.runtime_url,
        headers={"X-Internal-Auth": services.internal_key, "Content-Type": "application/json"},
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(60.0),
        trust_env=False,
    )


async def warm_direct_pool(client: httpx.AsyncClient, connections: int, prefix: str) -> None:
    """Open ``connections`` keep-alive connections (one tiny concurrent turn each), so the timed
    rounds measure streaming, not TCP set-up, exactly as the gateway's warm pool does."""

    async def one(index: int) -> None:
        result = TurnResult()
        await direct_turn(client, f"{prefix}-{index}", "bench 1", result)
        result.verify(expected_text(1), "direct warm-up")

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(one, index)


class SocketGroup:
    """WebSockets to the gateway, each owned by its own holder task.

    A holder runs the connection's background reader in a nursery of its own, so the one known
    client-side failure of trio-websocket stays contained: when the server's ping crosses our
    close frame, the reader answers it with a pong in ``LOCAL_CLOSING`` and dies with wsproto's
    ``LocalProtocolError`` (python-trio/trio-websocket#184). hypercorn pings every connection
    right after the handshake, so closing a freshly opened socket hits it often. The error is
    ignored only once the close has begun; anywhere else it fails the benchmark.

    Use inside a nursery: ``await group.open(ids)``, work, ``group.close_all()``; the nursery
    exits when every socket is closed (each close bounded by ``CLOSE_TIMEOUT``).
    """

    def __init__(self, nursery: trio.Nursery, services: Services) -> None:
        """Holders will run in ``nursery``."""
        self._nursery = nursery
        self._services = services
        self._release = trio.Event()
        self._limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)

    async def open(self, session_ids: Sequence[str]) -> list[trio_websocket.WebSocketConnection]:
        """Connect one WebSocket per session id, ``OPEN_CONCURRENCY`` handshakes at a time."""
        sockets: list[trio_websocket.WebSocketConnection | None] = [None] * len(session_ids)

        async def one(index: int, session_id: str) -> None:
            async with self._limiter:
                sockets[index] = await self._nursery.start(self._hold, session_id)

        async with trio.open_nursery() as opener:
            for index, session_id in enumerate(session_ids):
                opener.start_soon(one, index, session_id)
        return [ws for ws in sockets if ws is not None]

    def close_all(self) -> None:
        """Ask every holder to close its socket."""
        self._release.set()

    async def _hold(
        self,
        session_id: str,
        task_status: trio.TaskStatus[trio_websocket.WebSocketConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        closing = False
        try:
            async with trio.open_nursery() as nursery:
                ws = await self._connect(nursery, session_id)
                task_status.started(ws)
                await self._release.wait()
                closing = True
                async with self._limiter:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await ws.aclose()
                nursery.cancel_scope.cancel()  # a reader stuck after a failed close
        except* LocalProtocolError as group:
            if not closing:
                raise BenchError(f"WebSocket protocol error: {group.exceptions[0]}") from None

    async def _connect(
        self, nursery: trio.Nursery, session_id: str
    ) -> trio_websocket.WebSocketConnection:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await trio_websocket.connect_websocket_url(
                    nursery,
                    self._services.ws_url(session_id),
                    max_message_size=MAX_MESSAGE_BYTES,
                )
        except trio.TooSlowError:
            raise BenchError(f"WebSocket handshake took over {CONNECT_TIMEOUT:g} s") from None
        except (trio_websocket.HandshakeError, OSError) as error:
            raise BenchError(f"WebSocket connect failed: {error!r}") from None


# ------------------------------------------------------------------------------------------------
# Phase 1: throughput
# ------------------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    """One timed throughput round of one path."""

    path: str
    tokens_per_s: float
    wall_s: float
    frames: int
    multi_token_frames: int
    gateway_cpu_s: float
    runtime_cpu_s: float
    client_cpu_s: float


@dataclass
class ThroughputResult:
    """Phase 1 figures."""

    sessions: int
    tokens: int
    direct_rounds: list[float]
    gateway_rounds: list[float]
    direct_median: float
    gateway_median: float
    ratio: float
    gateway_cpu_s: float  # over the gateway rounds' timed windows
    gateway_cpu_us_per_token: float
    runtime_cpu_s_direct: float
    runtime_cpu_s_gateway: float
    client_cpu_s_direct: float
    client_cpu_s_gateway: float
    gateway_frames: int
    gateway_tokens: int
    coalescing_factor: float  # tokens per frame through the gateway


class CpuMeter:
    """CPU seconds of the gateway, the runtime and this client over one timed window."""

    def __init__(self, services: Services) -> None:
        """Read the starting values now."""
        self._services = services
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        return (
            cpu_seconds(self._services.gateway.pid),
            cpu_seconds(self._services.runtime.pid),
            self_cpu_seconds(),
        )

    def elapsed(self) -> tuple[float, float, float]:
        """(gateway, runtime, client) CPU seconds since construction."""
        end = self._read()
        return end[0] - self._start[0], end[1] - self._start[1], end[2] - self._start[2]


def _round_result(
    path: str, results: Sequence[TurnResult], started: float, meter: CpuMeter, cfg: BenchConfig
) -> RoundResult:
    expected = expected_text(cfg.tokens)
    for index, result in enumerate(results):
        result.verify(expected, f"{path} session {index}")
    finished = max(r.finished_at for r in results if r.finished_at is not None)
    wall = finished - started
    gateway_cpu, runtime_cpu, client_cpu = meter.elapsed()
    return RoundResult(
        path=path,
        tokens_per_s=cfg.sessions * cfg.tokens / wall,
        wall_s=wall,
        frames=sum(r.frames for r in results),
        multi_token_frames=sum(r.multi_token_frames for r in results),
        gateway_cpu_s=gateway_cpu,
        runtime_cpu_s=runtime_cpu,
        client_cpu_s=client_cpu,
    )


async def direct_round(
    client: httpx.AsyncClient, services: Services, cfg: BenchConfig, tag: str
) -> RoundResult:
    """S concurrent ``bench T`` streams straight from the runtime (pool already warm)."""
    results = [TurnResult() for _ in range(cfg.sessions)]
    content = f"bench {cfg.tokens}"
    with trio.fail_after(ROUND_TIMEOUT):
        meter = CpuMeter(services)
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index, result in enumerate(results):
                nursery.start_soon(direct_turn, client, f"{tag}-{index}", content, result)
    return _round_result("direct", results, started, meter, cfg)


async def gateway_round(services: Services, cfg: BenchConfig, tag: str) -> RoundResult:
    """S concurrent ``bench T`` turns through the gateway on WebSockets opened beforehand."""
    results = [TurnResult() for _ in range(cfg.sessions)]
    content = f"bench {cfg.tokens}"
    with trio.fail_after(ROUND_TIMEOUT):
        async with trio.open_nursery() as connections:
            group = SocketGroup(connections, services)
            try:
                sockets = await group.open([f"{tag}-{index}" for index in range(cfg.sessions)])
                meter = CpuMeter(services)
                started = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for ws, result in zip(sockets, results, strict=True):
                        nursery.start_soon(gateway_turn, ws, content, result)
                outcome = _round_result("gateway", results, started, meter, cfg)
            finally:
                group.close_all()
    return outcome


async def throughput_phase(
    services: Services, cfg: BenchConfig, log: Callable[[str], None]
) -> ThroughputResult:
    """Warm both paths, then alternate direct and gateway rounds; compare the medians."""
    rounds: list[RoundResult] = []
    async with direct_client(services, cfg.sessions) as client:
        await warm_direct_pool(client, cfg.sessions, "warm-direct")
        warm = BenchConfig(**{**asdict(cfg), "tokens": min(cfg.tokens, 100)})
        await direct_round(client, services, warm, "warm-direct-round")
        await gateway_round(services, warm, "warm-gateway-round")
        for number in range(1, cfg.rounds + 1):
            for path in ("direct", "gateway"):
                tag = f"tp{number}-{path}-{secrets.token_hex(3)}"
                if path == "direct":
                    outcome = await direct_round(client, services, cfg, tag)
                else:
                    outcome = await gateway_round(services, cfg, tag)
                services.check_alive()
                rounds.append(outcome)
                log(
                    f"  round {number} {path:<7} {outcome.tokens_per_s:>10,.0f} tok/s "
                    f"({outcome.wall_s:.2f} s; CPU s gateway {outcome.gateway_cpu_s:.2f}, "
                    f"runtime {outcome.runtime_cpu_s:.2f}, client {outcome.client_cpu_s:.2f})"
                )
    direct = [r for r in rounds if r.path == "direct"]
    gateway = [r for r in rounds if r.path == "gateway"]
    direct_median = statistics.median(r.tokens_per_s for r in direct)
    gateway_median = statistics.median(r.tokens_per_s for r in gateway)
    gateway_cpu = sum(r.gateway_cpu_s for r in gateway)
    gateway_frames = sum(r.frames for r in gateway)
    gateway_tokens = cfg.sessions * cfg.tokens * len(gateway)
    return ThroughputResult(
        sessions=cfg.sessions,
        tokens=cfg.tokens,
        direct_rounds=[r.tokens_per_s for r in direct],
        gateway_rounds=[r.tokens_per_s for r in gateway],
        direct_median=direct_median,
        gateway_median=gateway_median,
        ratio=gateway_median / direct_median,
        gateway_cpu_s=gateway_cpu,
        gateway_cpu_us_per_token=gateway_cpu / gateway_tokens * 1e6,
        runtime_cpu_s_direct=sum(r.runtime_cpu_s for r in direct),
        runtime_cpu_s_gateway=sum(r.runtime_cpu_s for r in gateway),
        client_cpu_s_direct=sum(r.client_cpu_s for r in direct),
        client_cpu_s_gateway=sum(r.client_cpu_s for r in gateway),
        gateway_frames=gateway_frames,
        gateway_tokens=gateway_tokens,
        coalescing_factor=gateway_tokens / gateway_frames if gateway_frames else math.nan,
    )


# ------------------------------------------------------------------------------------------------
# Phase 2: latency at a paced load
# ------------------------------------------------------------------------------------------------


@dataclass
class LatencyStats:
    """Latency distribution of one path, in milliseconds."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    frames: int
    multi_token_frames: int

    @classmethod
    def of(cls, results: Sequence[TurnResult]) -> LatencyStats:
        """Pool every session's samples."""
        samples = sorted(ns for r in results for ns in r.latencies_ns)
        if not samples:
            raise BenchError("no latency samples")
        return cls(
            samples=len(samples),
            p50_ms=percentile(samples, 50) / 1e6,
            p99_ms=percentile(samples, 99) / 1e6,
            max_ms=samples[-1] / 1e6,
            frames=sum(r.frames for r in results),
            multi_token_frames=sum(r.multi_token_frames for r in results),
        )


@dataclass
class LatencyResult:
    """Phase 2 figures."""

    sessions: int
    rate: int
    duration_s: float
    direct: LatencyStats
    gateway: LatencyStats
    added_p50_ms: float
    added_p99_ms: float


def percentile(sorted_values: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


async def _staggered(index: int, cfg: BenchConfig) -> None:
    # Spread the C session starts evenly over one token interval: a smooth load, not C tokens
    # arriving in lock-step every 1/R seconds.
    await trio.sleep(index / (cfg.paced_sessions * cfg.rate))


async def paced_direct(services: Services, cfg: BenchConfig) -> LatencyStats:
    """C paced turns read straight from the runtime."""
    content = f"bench {cfg.paced_tokens} {cfg.rate}"
    results = [TurnResult(measure_latency=True) for _ in range(cfg.paced_sessions)]
    tag = f"lat-direct-{secrets.token_hex(3)}"

    async def one(index: int) -> None:
        await _staggered(index, cfg)
        await direct_turn(client, f"{tag}-{index}", content, results[index])

    async with direct_client(services, cfg.paced_sessions) as client:
        await warm_direct_pool(client, cfg.paced_sessions, f"{tag}-warm")
        with trio.fail_after(cfg.duration + ROUND_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for index in range(cfg.paced_sessions):
                    nursery.start_soon(one, index)
    expected = expected_text(cfg.paced_tokens)
    for index, result in enumerate(results):
        result.verify(expected, f"paced direct session {index}")
    return LatencyStats.of(results)


async def paced_gateway(services: Services, cfg: BenchConfig) -> LatencyStats:
    """C paced turns through the gateway, on WebSockets opened beforehand."""
    content = f"bench {cfg.paced_tokens} {cfg.rate}"
    results = [TurnResult(measure_latency=True) for _ in range(cfg.paced_sessions)]
    tag = f"lat-gateway-{secrets.token_hex(3)}"

    async def one(index: int, ws: trio_websocket.WebSocketConnection) -> None:
        await _staggered(index, cfg)
        await gateway_turn(ws, content, results[index])

    with trio.fail_after(cfg.duration + ROUND_TIMEOUT):
        async with trio.open_nursery() as connections:
            group = SocketGroup(connections, services)
            try:
                ids = [f"{tag}-{index}" for index in range(cfg.paced_sessions)]
                sockets = await group.open(ids)
                async with trio.open_nursery() as nursery:
                    for index, ws in enumerate(sockets):
                        nursery.start_soon(one, index, ws)
            finally:
                group.close_all()
    expected = expected_text(cfg.paced_tokens)
    for index, result in enumerate(results):
        result.verify(expected, f"paced gateway session {index}")
    return LatencyStats.of(results)


async def latency_phase(services: Services, cfg: BenchConfig) -> LatencyResult:
    """The same paced load read directly, then through the gateway."""
    direct = await paced_direct(services, cfg)
    services.check_alive()
    gateway = await paced_gateway(services, cfg)
    services.check_alive()
    return LatencyResult(
        sessions=cfg.paced_sessions,
        rate=cfg.rate,
        duration_s=cfg.duration,
        direct=direct,
        gateway=gateway,
        added_p50_ms=gateway.p50_ms - direct.p50_ms,
        added_p99_ms=gateway.p99_ms - direct.p99_ms,
    )


# ------------------------------------------------------------------------------------------------
# Phase 3: memory per idle WebSocket session
# ------------------------------------------------------------------------------------------------


@dataclass
class MemoryResult:
    """Phase 3 figures."""

    idle_sessions: int
    rss_before_kib: int
    rss_with_sessions_kib: int
    per_session_kib: float


async def memory_phase(services: Services, cfg: BenchConfig) -> MemoryResult:
    """RSS delta of the gateway for M idle WebSocket sessions, after a small warm-up."""
    pid = services.gateway.pid
    tag = f"idle-{secrets.token_hex(3)}"
    with trio.fail_after(MEMORY_PHASE_TIMEOUT):
        async with trio.open_nursery() as connections:
            group = SocketGroup(connections, services)
            try:
                await group.open([f"{tag}-warm-{index}" for index in range(WARMUP_SESSIONS)])
            finally:
                group.close_all()
        await trio.sleep(SETTLE_SECONDS)
        before = rss_kib(pid)
        async with trio.open_nursery() as connections:
            group = SocketGroup(connections, services)
            try:
                sockets = await group.open([f"{tag}-{i}" for i in range(cfg.idle_sessions)])
                await trio.sleep(SETTLE_SECONDS)
                services.check_alive()
                with_sessions = rss_kib(pid)
                if any(ws.closed for ws in sockets):
                    raise BenchError("an idle WebSocket was closed by the gateway")
            finally:
                group.close_all()
    return MemoryResult(
        idle_sessions=cfg.idle_sessions,
        rss_before_kib=before,
        rss_with_sessions_kib=with_sessions,
        per_session_kib=(with_sessions - before) / cfg.idle_sessions,
    )


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One target, its measured value and the verdict."""

    name: str
    comparison: str  # ">=" or "<="
    limit: float
    value: float
    unit: str

    @property
    def met(self) -> bool:
        """Whether ``value`` satisfies the target."""
        return self.value >= self.limit if self.comparison == ">=" else self.value <= self.limit


@dataclass
class Report:
    """Every figure of one run."""

    mode: str
    config: BenchConfig
    environment: dict[str, Any]
    memory: MemoryResult
    throughput: ThroughputResult
    latency: LatencyResult

    def targets(self) -> list[Target]:
        """The three targets with this run's values."""
        return [
            Target(
                "throughput gateway/direct",
                ">=",
                TARGET_THROUGHPUT_RATIO,
                self.throughput.ratio,
                "x",
            ),
            Target("added p99 latency", "<=", TARGET_ADDED_P99_MS, self.latency.added_p99_ms, "ms"),
            Target(
                "memory per idle session",
                "<=",
                TARGET_IDLE_SESSION_KIB,
                self.memory.per_session_kib,
                "KiB",
            ),
        ]

    def to_json(self) -> dict[str, Any]:
        """Everything as a JSON-able dict, targets included."""
        data = asdict(self)
        data["targets"] = [{**asdict(t), "met": t.met} for t in self.targets()]
        return data

    def render(self) -> str:
        """The human-readable table."""
        tp, lat, mem, cfg = self.throughput, self.latency, self.memory, self.config
        env = self.environment
        fmt_rounds = ", ".join
        lines = [
            "",
            f"trio-gateway relay benchmark ({self.mode})  python {env['python']}, "
            f"{env['cpus']} CPUs, load average at start {env['loadavg']}",
            "All comparisons are between two paths measured in this run; absolute figures "
            "vary with the machine.",
            "",
            f"1. Throughput: {tp.sessions} sessions x {tp.tokens} tokens, "
            f"{cfg.rounds} alternating round(s) per path",
            f"   {'path':<9}{'median tok/s':>14}   rounds",
            f"   {'direct':<9}{tp.direct_median:>14,.0f}   "
            + fmt_rounds(f"{v:,.0f}" for v in tp.direct_rounds),
            f"   {'gateway':<9}{tp.gateway_median:>14,.0f}   "
            + fmt_rounds(f"{v:,.0f}" for v in tp.gateway_rounds),
            f"   ratio gateway/direct: {tp.ratio:.2f}",
            f"   gateway CPU during gateway rounds: {tp.gateway_cpu_s:.2f} s "
            f"({tp.gateway_cpu_us_per_token:.1f} us/token)",
            f"   runtime CPU: {tp.runtime_cpu_s_direct:.2f} s in direct rounds, "
            f"{tp.runtime_cpu_s_gateway:.2f} s in gateway rounds; client CPU: "
            f"{tp.client_cpu_s_direct:.2f} s direct, {tp.client_cpu_s_gateway:.2f} s gateway",
            f"   gateway frames received: {tp.gateway_frames:,} for {tp.gateway_tokens:,} tokens "
            f"(coalescing factor {tp.coalescing_factor:.1f} tokens/frame)",
            "",
            f"2. Latency: {lat.sessions} sessions x {lat.rate} tok/s x {lat.duration_s:g} s "
            "(emit in runtime -> receipt in client)",
            f"   {'path':<9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'samples':>9}"
            f"{'coalesced frames':>18}",
        ]
        for name, stats in (("direct", lat.direct), ("gateway", lat.gateway)):
            lines.append(
                f"   {name:<9}{stats.p50_ms:>9.2f}{stats.p99_ms:>9.2f}{stats.max_ms:>9.2f}"
                f"{stats.samples:>9}{stats.multi_token_frames:>18}"
            )
        lines += [
            f"   {'added':<9}{lat.added_p50_ms:>9.2f}{lat.added_p99_ms:>9.2f}",
            "",
            f"3. Memory: {mem.idle_sessions} idle WebSocket sessions (measured first, on a "
            "fresh gateway)",
            f"   gateway RSS after warm-up {mem.rss_before_kib / 1024:.1f} MiB, with the sessions "
            f"{mem.rss_with_sessions_kib / 1024:.1f} MiB: {mem.per_session_kib:.1f} KiB/session",
            "",
            "Targets",
        ]
        for target in self.targets():
            verdict = "PASS" if target.met else "MISS"
            lines.append(
                f"   {target.name:<27}{target.comparison} {target.limit:<6g}{target.unit:<4}"
                f"measured {target.value:>8.2f} {target.unit:<4} {verdict}"
            )
        return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Facts about this machine that help read the figures."""
    try:
        loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        loadavg = "?"
    return {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg": loadavg,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run_phases(services: Services, cfg: BenchConfig, mode: str) -> Report:
    """Memory (on a fresh gateway), throughput, latency; then the report."""
    env = environment()
    _log(f"runtime pid {services.runtime.pid} at {services.runtime_url}")
    _log(f"gateway pid {services.gateway.pid} at {services.gateway_url}")
    _log(f"memory: {cfg.idle_sessions} idle sessions ...")
    memory = await memory_phase(services, cfg)
    _log(f"throughput: {cfg.sessions} x {cfg.tokens} tokens, {cfg.rounds} round(s) per path ...")
    throughput = await throughput_phase(services, cfg, _log)
    _log(f"latency: {cfg.paced_sessions} x {cfg.rate} tok/s x {cfg.duration:g} s, each path ...")
    latency = await latency_phase(services, cfg)
    return Report(mode, cfg, env, memory, throughput, latency)


def _failure_text(error: BaseException) -> str:
    """Flatten exception groups into one line per leaf."""
    if isinstance(error, BaseExceptionGroup):
        return "\n".join(_failure_text(inner) for inner in error.exceptions)
    if isinstance(error, trio.TooSlowError):
        return "timed out (trio.fail_after)"
    return f"{type(error).__name__}: {error}"


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table; 0 unless the benchmark failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    cfg = BenchConfig.quick() if args.quick else BenchConfig.full()
    mode = "quick" if args.quick else "full"

    fd_limit = raise_fd_limit()
    needed = cfg.idle_sessions + 256
    if fd_limit < needed:
        print(f"relay_bench: RLIMIT_NOFILE {fd_limit} < {needed} needed", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as workdir:
            with running_services(Path(workdir)) as services:
                try:
                    report = trio.run(run_phases, services, cfg, mode)
                except BaseException as error:
                    # Attach the children's last words to whatever went wrong.
                    if not any(isinstance(e, KeyboardInterrupt) for e in _leaves(error)):
                        for child in (services.runtime, services.gateway):
                            _log(f"--- {child.name} log tail ---\n{child.log_tail()}")
                    raise
    except KeyboardInterrupt:
        print("relay_bench: interrupted", file=sys.stderr)
        return 130
    except BaseException as error:  # a failed benchmark: report every leaf, exit 1
        if any(isinstance(e, KeyboardInterrupt) for e in _leaves(error)):
            print("relay_bench: interrupted", file=sys.stderr)
            return 130
        print(f"relay_bench: FAILED\n{_failure_text(error)}", file=sys.stderr)
        return 1
    print(report.render(), flush=True)
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
