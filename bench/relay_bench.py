"""Relay benchmark: what the gateway costs compared with reading the Agent Runtime directly.

Run ``python bench/relay_bench.py`` (default sizes, about 90 s) or ``--quick`` (a smoke run of
about 20 s); ``--json FILE`` also writes the figures, ``--profile DIR`` records the
gateway with py-spy during the load phases (that run's figures are then perturbed). The script
starts the demo runtime (``trio-gateway demo-runtime --instant``) and the gateway
(``trio-gateway serve``) as child processes on free loopback ports, drives them from this process
under trio, prints one table and stops every child whatever happens. Only ``127.0.0.1`` is ever
bound or dialled, every wait is bounded, and the script ends by itself.

Methodology
-----------
Every figure that matters is a *ratio or a difference between two paths measured in the same
run*: "direct" (a careful plain client reading the runtime's SSE stream with httpx) and "gateway"
(trio-websocket clients reading the same turns through the gateway). The machines this runs on
have two shared, noisy cores, so absolute tokens/s or milliseconds change from run to run and
from machine to machine; what the two paths have in common (the runtime, the load, the client's
interpreter, the noise of the moment) cancels out in the ratio. Compare ratios, never absolute
numbers across runs. The runtime, the gateway and this client share those two cores: a path's
throughput is bounded by the CPU all three need per token, which the report shows per process.

Each phase gets a freshly started gateway (the runtime stays up): a closed WebSocket leaves work
behind in the gateway for a while (its session waits out the reconnect grace period, hypercorn's
ping task wakes up once more), and a process that has served load holds freed heap that new
sessions reuse. Neither may leak into the next phase's figures.

1. **Throughput.** ``S`` concurrent sessions each stream ``bench T`` (unpaced). Tokens/s is
   ``S*T`` divided by the wall time from the first send to the last final chunk. Both clients do
   the same per-token work (parse the JSON, keep the token) and check the same thing at the end:
   the concatenated text is exactly ``t0 t1 ... t{T-1}``. Connection set-up is outside the timed
   window for both: the httpx pool is warmed, the WebSockets are opened before the clock starts,
   and one small untimed round per path warms both the gateway's own pool and the interpreters.
   Rounds alternate direct / gateway so slow drifts of the machine hit both alike; the medians
   are compared. The gateway coalesces consecutive tokens into one frame when its client falls
   behind, so tokens are counted by their text, never by frames; tokens per frame shows how much
   it coalesced. CPU seconds of each process (``/proc/<pid>/stat``) over the timed windows show
   where the time went. With the demo runtime saturating one core in both paths, the tokens/s
   ratio also depends on how the kernel splits the two cores between three busy processes (and
   whatever else runs on the machine), so the report adds the round-by-round ratios (the spread
   within the run) and the CPU per token of the whole pipeline, which depends much less on it.
2. **Latency.** ``C`` sessions each stream ``bench R*D R``: ``R`` tokens/s for ``D`` seconds on
   the runtime's absolute schedule, every chunk stamped with ``metadata.emitted_ns``
   (``time.time_ns()`` in the runtime; same host, same clock). Latency = ``time.time_ns()`` when
   the client got the frame (or, direct, the network read carrying the event) minus
   ``emitted_ns``. The session starts are spread evenly over one token interval so the load is
   smooth instead of ``C`` tokens in lock-step. The same load is read directly, then through the
   gateway (each session first runs one untimed ``bench 1`` turn, which warms the gateway's
   connection pool as the direct client's is warmed); the gateway's *added* latency is the
   difference of the two distributions' percentiles. A coalesced frame only carries its first
   token's stamp; at this pace frames should not coalesce, and the count of those that did is
   reported.
3. **Memory per idle WebSocket session.** Gateway RSS (``VmRSS``) after a warm-up of 50 sessions
   opened and closed, then with ``M`` more sessions connected and idle (distinct ids, opened 100
   at a time), after ~2 s of settling. Per session = RSS delta / ``M``.

Exit status: 0 when the measurement completed (whether or not the targets are met), 1 when the
benchmark itself failed (wrong text, an error frame, a timeout, a child that died), 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

if __package__ in (None, ""):  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    UNLIMITED_USER,
    BenchError,
    Child,
    CpuMeter,
    CpuUse,
    Services,
    child_env,
    describe,
    find_py_spy,
    gateway_sources_digest,
    hottest_functions,
    interrupted,
    leaves,
    loadavg,
    log,
    profiled,
    raise_fd_limit,
    rss_kib,
    spawned,
)

STREAM_PATH = "/agent/message/stream"

TARGET_THROUGHPUT_RATIO = 0.9  # gateway tokens/s >= 0.9 x direct
TARGET_ADDED_P99_MS = 5.0  # gateway p99 latency - direct p99 latency
TARGET_IDLE_SESSION_KIB = 40.0  # RSS per idle WebSocket session

ROUND_TIMEOUT = 300.0  # seconds for one throughput round (connect, stream, close)
PACED_TIMEOUT_MARGIN = 120.0  # seconds a paced phase may take beyond its nominal duration
CONNECT_TIMEOUT = 30.0  # seconds for one WebSocket handshake
CLOSE_TIMEOUT = 10.0  # seconds for one WebSocket close
MEMORY_PHASE_TIMEOUT = 300.0
WARMUP_SESSIONS = 50
OPEN_CONCURRENCY = 100  # WebSocket handshakes (and closes) in flight at once
SETTLE_SECONDS = 2.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a fully coalesced turn must never trip the client's limit

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the three phases."""

    sessions: int  # S: concurrent sessions in the throughput phase
    tokens: int  # T: tokens per throughput turn
    rounds: int  # timed rounds per path (alternating direct / gateway)
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
            at = next(
                (i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
                min(len(text), len(expected)),
            )
            raise BenchError(
                f"{where}: wrong text ({len(text)} chars, expected {len(expected)}); first "
                f"difference at {at}: got {text[at : at + 40]!r}, expected "
                f"{expected[at : at + 40]!r}"
            )


def verify_all(results: Sequence[TurnResult], tokens: int, where: str) -> None:
    """Every turn ended and carried exactly ``bench tokens``'s text."""
    expected = expected_text(tokens)
    for index, result in enumerate(results):
        result.verify(expected, f"{where} session {index}")


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
# Clients and connections
# ------------------------------------------------------------------------------------------------


def direct_client(services: Services, connections: int) -> httpx.AsyncClient:
    """An httpx client for the runtime with room for ``connections`` concurrent streams."""
    return httpx.AsyncClient(
        base_url=services.runtime.url,
        headers={"X-Internal-Auth": services.internal_key, "Content-Type": "application/json"},
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(60.0),
        trust_env=False,
    )


async def warm_direct_pool(client: httpx.AsyncClient, connections: int, prefix: str) -> None:
    """Open ``connections`` keep-alive connections (one tiny concurrent turn each), so the timed
    streams measure streaming, not TCP set-up, as they do through the gateway's warm pool."""
    results = [TurnResult() for _ in range(connections)]
    async with trio.open_nursery() as nursery:
        for index, result in enumerate(results):
            nursery.start_soon(direct_turn, client, f"{prefix}-{index}", "bench 1", result)
    verify_all(results, 1, "direct warm-up")


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
                nursery.cancel_scope.cancel()  # a reader left behind by a close that timed out
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
    cpu: CpuUse


@dataclass
class ThroughputResult:
    """Phase 1 figures."""

    sessions: int
    tokens: int
    rounds: list[RoundResult]
    direct_median: float
    gateway_median: float
    ratio: float
    direct_cpu: CpuUse  # summed over the direct rounds' timed windows
    gateway_cpu: CpuUse  # summed over the gateway rounds' timed windows
    gateway_cpu_us_per_token: float
    gateway_frames: int
    gateway_tokens: int
    tokens_per_frame: float  # through the gateway: the coalescing factor
    pair_ratios: list[float]  # gateway round i / direct round i: the spread within this run
    pipeline_us_per_token_direct: float  # CPU of runtime + gateway + client per token
    pipeline_us_per_token_gateway: float
    profile: list[str] | None = None

    def path_rounds(self, path: str) -> list[float]:
        """Tokens/s of each round of ``path``, in order."""
        return [r.tokens_per_s for r in self.rounds if r.path == path]


def _round_result(
    path: str, results: Sequence[TurnResult], started: float, meter: CpuMeter, cfg: BenchConfig
) -> RoundResult:
    cpu = meter.elapsed()
    verify_all(results, cfg.tokens, path)
    finished = max(r.finished_at for r in results if r.finished_at is not None)
    wall = finished - started
    return RoundResult(
        path=path,
        tokens_per_s=cfg.sessions * cfg.tokens / wall,
        wall_s=wall,
        frames=sum(r.frames for r in results),
        multi_token_frames=sum(r.multi_token_frames for r in results),
        cpu=cpu,
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
    services: Services, cfg: BenchConfig, profile_dir: Path | None
) -> ThroughputResult:
    """Warm both paths, then alternate direct and gateway rounds; compare the medians."""
    rounds: list[RoundResult] = []
    profile_path = profile_dir / "throughput.collapsed" if profile_dir else None
    async with direct_client(services, cfg.sessions) as client:
        await warm_direct_pool(client, cfg.sessions, f"warm-{secrets.token_hex(3)}")
        warm = replace(cfg, tokens=min(cfg.tokens, 100))
        await direct_round(client, services, warm, f"warm-direct-{secrets.token_hex(3)}")
        await gateway_round(services, warm, f"warm-gateway-{secrets.token_hex(3)}")
        async with profiled(services.gateway.pid, profile_path):
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
                        f"  round {number} {path:<7} {outcome.tokens_per_s:>9,.0f} tok/s in "
                        f"{outcome.wall_s:.2f} s; cores busy: {outcome.cpu.cores()}"
                    )
    direct = [r for r in rounds if r.path == "direct"]
    gateway = [r for r in rounds if r.path == "gateway"]
    direct_median = statistics.median(r.tokens_per_s for r in direct)
    gateway_median = statistics.median(r.tokens_per_s for r in gateway)
    gateway_cpu = _sum_cpu(r.cpu for r in gateway)
    gateway_frames = sum(r.frames for r in gateway)
    gateway_tokens = cfg.sessions * cfg.tokens * len(gateway)
    return ThroughputResult(
        sessions=cfg.sessions,
        tokens=cfg.tokens,
        rounds=rounds,
        direct_median=direct_median,
        gateway_median=gateway_median,
        ratio=gateway_median / direct_median,
        direct_cpu=_sum_cpu(r.cpu for r in direct),
        gateway_cpu=gateway_cpu,
        gateway_cpu_us_per_token=gateway_cpu.gateway_s / gateway_tokens * 1e6,
        gateway_frames=gateway_frames,
        gateway_tokens=gateway_tokens,
        tokens_per_frame=gateway_tokens / gateway_frames if gateway_frames else math.nan,
        pair_ratios=[g.tokens_per_s / d.tokens_per_s for d, g in zip(direct, gateway, strict=True)],
        pipeline_us_per_token_direct=_pipeline_us(direct, cfg),
        pipeline_us_per_token_gateway=_pipeline_us(gateway, cfg),
        profile=_profile_summary(profile_path),
    )


def _pipeline_us(rounds: Sequence[RoundResult], cfg: BenchConfig) -> float:
    """CPU microseconds per token of all three processes together over ``rounds``."""
    cpu = _sum_cpu(r.cpu for r in rounds)
    tokens = cfg.sessions * cfg.tokens * len(rounds)
    return (cpu.gateway_s + cpu.runtime_s + cpu.client_s) / tokens * 1e6


def _sum_cpu(uses: Iterable[CpuUse]) -> CpuUse:
    total = CpuUse(0.0, 0.0, 0.0, 0.0)
    for use in uses:
        total = total + use
    return total


def _profile_summary(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    if not path.exists():
        return ["(no profile: py-spy not found or it failed)"]
    return hottest_functions(path)


# ------------------------------------------------------------------------------------------------
# Phase 2: latency at a paced load
# ------------------------------------------------------------------------------------------------


@dataclass
class LatencyStats:
    """Latency distribution of one path, in milliseconds, and the CPU it took."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    frames: int
    multi_token_frames: int
    cpu: CpuUse

    @classmethod
    def of(cls, results: Sequence[TurnResult], cpu: CpuUse) -> LatencyStats:
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
            cpu=cpu,
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
    profile: list[str] | None = None


def percentile(sorted_values: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


async def _staggered(index: int, cfg: BenchConfig) -> None:
    # Spread the C session starts evenly over one token interval: a smooth load, not C tokens
    # arriving in lock-step every 1/R seconds.
    await trio.sleep(index / (cfg.paced_sessions * cfg.rate))


def _paced_timeout(cfg: BenchConfig) -> float:
    return cfg.duration + PACED_TIMEOUT_MARGIN


async def paced_direct(services: Services, cfg: BenchConfig) -> LatencyStats:
    """C paced turns read straight from the runtime."""
    content = f"bench {cfg.paced_tokens} {cfg.rate}"
    results = [TurnResult(measure_latency=True) for _ in range(cfg.paced_sessions)]
    tag = f"lat-direct-{secrets.token_hex(3)}"

    async def one(index: int) -> None:
        await _staggered(index, cfg)
        await direct_turn(client, f"{tag}-{index}", content, results[index])

    with trio.fail_after(_paced_timeout(cfg)):
        async with direct_client(services, cfg.paced_sessions) as client:
            await warm_direct_pool(client, cfg.paced_sessions, f"{tag}-warm")
            meter = CpuMeter(services)
            async with trio.open_nursery() as nursery:
                for index in range(cfg.paced_sessions):
                    nursery.start_soon(one, index)
            cpu = meter.elapsed()
    verify_all(results, cfg.paced_tokens, "paced direct")
    return LatencyStats.of(results, cpu)


async def paced_gateway(services: Services, cfg: BenchConfig) -> LatencyStats:
    """C paced turns through the gateway, on WebSockets opened (and warmed) beforehand."""
    content = f"bench {cfg.paced_tokens} {cfg.rate}"
    results = [TurnResult(measure_latency=True) for _ in range(cfg.paced_sessions)]
    warm_results = [TurnResult() for _ in range(cfg.paced_sessions)]
    tag = f"lat-gateway-{secrets.token_hex(3)}"

    async def one(index: int, ws: trio_websocket.WebSocketConnection) -> None:
        await _staggered(index, cfg)
        await gateway_turn(ws, content, results[index])

    with trio.fail_after(_paced_timeout(cfg)):
        async with trio.open_nursery() as connections:
            group = SocketGroup(connections, services)
            try:
                sockets = await group.open([f"{tag}-{i}" for i in range(cfg.paced_sessions)])
                async with trio.open_nursery() as nursery:
                    for ws, warm in zip(sockets, warm_results, strict=True):
                        nursery.start_soon(gateway_turn, ws, "bench 1", warm)
                verify_all(warm_results, 1, "paced gateway warm-up")
                meter = CpuMeter(services)
                async with trio.open_nursery() as nursery:
                    for index, ws in enumerate(sockets):
                        nursery.start_soon(one, index, ws)
                cpu = meter.elapsed()
            finally:
                group.close_all()
    verify_all(results, cfg.paced_tokens, "paced gateway")
    return LatencyStats.of(results, cpu)


async def latency_phase(
    services: Services, cfg: BenchConfig, profile_dir: Path | None
) -> LatencyResult:
    """The same paced load read directly, then through the gateway."""
    direct = await paced_direct(services, cfg)
    services.check_alive()
    log(f"  direct  p50 {direct.p50_ms:.2f} ms, p99 {direct.p99_ms:.2f} ms")
    profile_path = profile_dir / "latency.collapsed" if profile_dir else None
    async with profiled(services.gateway.pid, profile_path):
        gateway = await paced_gateway(services, cfg)
    services.check_alive()
    log(f"  gateway p50 {gateway.p50_ms:.2f} ms, p99 {gateway.p99_ms:.2f} ms")
    return LatencyResult(
        sessions=cfg.paced_sessions,
        rate=cfg.rate,
        duration_s=cfg.duration,
        direct=direct,
        gateway=gateway,
        added_p50_ms=gateway.p50_ms - direct.p50_ms,
        added_p99_ms=gateway.p99_ms - direct.p99_ms,
        profile=_profile_summary(profile_path),
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


async def memory_phase(
    services: Services, cfg: BenchConfig, profile_dir: Path | None
) -> MemoryResult:
    """RSS delta of a fresh gateway for M idle WebSocket sessions, after a small warm-up."""
    del profile_dir  # nothing to profile: the sessions are idle
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
                    raise BenchError("the gateway closed an idle WebSocket")
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
    throughput: ThroughputResult
    latency: LatencyResult
    memory: MemoryResult

    def targets(self) -> list[Target]:
        """The three targets with this run's values."""
        tp, lat, mem = self.throughput, self.latency, self.memory
        return [
            Target("throughput gateway/direct", ">=", TARGET_THROUGHPUT_RATIO, tp.ratio, "x"),
            Target("added p99 latency", "<=", TARGET_ADDED_P99_MS, lat.added_p99_ms, "ms"),
            Target(
                "memory per idle session", "<=", TARGET_IDLE_SESSION_KIB, mem.per_session_kib, "KiB"
            ),
        ]

    def to_json(self) -> dict[str, Any]:
        """Everything as a JSON-able dict, targets included."""
        data = asdict(self)
        data["targets"] = [{**asdict(t), "met": t.met} for t in self.targets()]
        return data

    def render(self) -> str:
        """The human-readable table."""
        env = self.environment
        lines = [
            f"trio-gateway relay benchmark ({self.mode}): python {env['python']}, "
            f"{env['cpus']} CPUs, load average {env['loadavg_start']} at start, "
            f"{env['loadavg_end']} at end",
            f"gateway sources sha256 {env['gateway_sources_sha256'][:12]}"
            + ("" if env["sources_unchanged"] else "  (WARNING: they changed during the run)"),
            "Compare the ratios and differences; absolute figures vary with the machine's load.",
            "Each process is single-threaded: one at ~1.00 core busy is the bottleneck.",
        ]
        if env["profiled"]:
            lines.append(
                "PROFILED RUN (py-spy attached): figures perturbed, use for hot spots only"
            )
        lines += ["", *self._throughput_lines(), "", *self._latency_lines(), ""]
        lines += [*self._memory_lines(), "", "Targets"]
        for target in self.targets():
            verdict = "PASS" if target.met else "MISS"
            lines.append(
                f"  {target.name:<27}{target.comparison} {target.limit:<5g}{target.unit:<4}"
                f"measured {target.value:>9.2f} {target.unit:<4} {verdict}"
            )
        for title, profile in (
            ("throughput", self.throughput.profile),
            ("latency", self.latency.profile),
        ):
            if profile:
                lines += ["", f"Gateway profile, {title} phase (py-spy):", *profile]
        return "\n".join(lines)

    def _throughput_lines(self) -> list[str]:
        tp, cfg = self.throughput, self.config
        direct_tokens = tp.sessions * tp.tokens * len(tp.path_rounds("direct"))
        direct_us = _us_per_token(tp.direct_cpu, direct_tokens)
        gateway_us = _us_per_token(tp.gateway_cpu, tp.gateway_tokens)
        return [
            f"1. Throughput: {tp.sessions} sessions x {tp.tokens} tokens, "
            f"{cfg.rounds} timed round(s) per path, alternating",
            f"  {'path':<9}{'median tok/s':>13}  {'rounds':<26}{'CPU us/token: gateway':>22}"
            f"{'runtime':>9}{'client':>8}",
            f"  {'direct':<9}{tp.direct_median:>13,.0f}  "
            f"{', '.join(f'{v:,.0f}' for v in tp.path_rounds('direct')):<26}"
            f"{'-':>22}{direct_us.runtime_s:>9.0f}{direct_us.client_s:>8.0f}",
            f"  {'gateway':<9}{tp.gateway_median:>13,.0f}  "
            f"{', '.join(f'{v:,.0f}' for v in tp.path_rounds('gateway')):<26}"
            f"{gateway_us.gateway_s:>22.0f}{gateway_us.runtime_s:>9.0f}{gateway_us.client_s:>8.0f}",
            f"  ratio gateway/direct (medians): {tp.ratio:.2f}; round by round: "
            + ", ".join(f"{r:.2f}" for r in tp.pair_ratios),
            f"  CPU per token of the whole pipeline (all three processes): direct "
            f"{tp.pipeline_us_per_token_direct:.0f} us, gateway "
            f"{tp.pipeline_us_per_token_gateway:.0f} us",
            f"  gateway CPU in the gateway rounds: {tp.gateway_cpu.gateway_s:.2f} s; cores busy "
            f"on average: {tp.gateway_cpu.cores()} (direct rounds: {tp.direct_cpu.cores()})",
            f"  frames through the gateway: {tp.gateway_frames:,} for {tp.gateway_tokens:,} "
            f"tokens ({tp.tokens_per_frame:.1f} tokens/frame coalesced)",
        ]

    def _latency_lines(self) -> list[str]:
        lat = self.latency
        lines = [
            f"2. Latency: {lat.sessions} sessions x {lat.rate} tok/s x {lat.duration_s:g} s "
            f"(runtime emit -> client receipt)",
            f"  {'path':<9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'samples':>9}"
            f"{'coalesced':>11}   cores busy",
        ]
        for name, stats in (("direct", lat.direct), ("gateway", lat.gateway)):
            lines.append(
                f"  {name:<9}{stats.p50_ms:>9.2f}{stats.p99_ms:>9.2f}{stats.max_ms:>9.2f}"
                f"{stats.samples:>9}{stats.multi_token_frames:>11}   {stats.cpu.cores()}"
            )
        gateway_us = lat.gateway.cpu.gateway_s / max(lat.gateway.samples, 1) * 1e6
        lines += [
            f"  {'added':<9}{lat.added_p50_ms:>9.2f}{lat.added_p99_ms:>9.2f}",
            f"  gateway CPU per paced token: {gateway_us:.0f} us (paced chunks carry their own "
            "metadata, so the gateway cannot coalesce them even when it falls behind)",
        ]
        return lines

    def _memory_lines(self) -> list[str]:
        mem = self.memory
        return [
            f"3. Memory: {mem.idle_sessions} idle WebSocket sessions on a fresh gateway",
            f"  gateway RSS after warm-up {mem.rss_before_kib / 1024:.1f} MiB, with the sessions "
            f"{mem.rss_with_sessions_kib / 1024:.1f} MiB: {mem.per_session_kib:.1f} KiB/session",
        ]


def _us_per_token(cpu: CpuUse, tokens: int) -> CpuUse:
    """``cpu`` divided by ``tokens``, in microseconds (``wall_s`` likewise)."""
    scale = 1e6 / tokens if tokens else math.nan
    return CpuUse(
        cpu.gateway_s * scale, cpu.runtime_s * scale, cpu.client_s * scale, cpu.wall_s * scale
    )


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


Phase = Callable[[Services, BenchConfig, Path | None], Awaitable[T]]


def run_phase(
    name: str,
    phase: Phase[T],
    runtime: Child,
    key: str,
    workdir: Path,
    cfg: BenchConfig,
    profile_dir: Path | None,
) -> T:
    """Start a fresh gateway, run ``phase`` against it under trio, stop the gateway."""
    env = child_env(key, agent_url=runtime.url, **UNLIMITED_USER)
    with spawned(f"gateway-{name}", ["serve"], env, workdir) as gateway:
        services = Services(runtime, gateway, key)

        async def body() -> T:
            await runtime.wait_healthy()
            await gateway.wait_healthy()
            log(f"{name}: gateway pid {gateway.pid}, runtime pid {runtime.pid}")
            return await phase(services, cfg, profile_dir)

        try:
            return trio.run(body)
        except BaseException as error:
            if not interrupted(error):  # the children's last words help explain a failure
                for child in (runtime, gateway):
                    log(f"--- {child.name} log tail ---\n{child.log_tail()}")
            raise


def run_memory_only(cfg: BenchConfig) -> MemoryResult:
    """Only the memory phase (``--memory-only``), on a fresh gateway against a fresh runtime."""
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        workdir = Path(tmp)
        with spawned("runtime", ["demo-runtime", "--instant"], child_env(key), workdir) as runtime:
            log(f"memory: {cfg.idle_sessions} idle sessions")
            return run_phase("memory", memory_phase, runtime, key, workdir, cfg, None)


def run(cfg: BenchConfig, mode: str, profile_dir: Path | None) -> Report:
    """All three phases, each on a fresh gateway, against one runtime."""
    digest = gateway_sources_digest()
    environment: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "gateway_sources_sha256": digest,
        "profiled": profile_dir is not None,
    }
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        workdir = Path(tmp)
        with spawned("runtime", ["demo-runtime", "--instant"], child_env(key), workdir) as runtime:
            log(f"throughput: {cfg.sessions} x {cfg.tokens} tokens, {cfg.rounds} round(s)/path")
            throughput = run_phase(
                "throughput", throughput_phase, runtime, key, workdir, cfg, profile_dir
            )
            log(f"latency: {cfg.paced_sessions} x {cfg.rate} tok/s x {cfg.duration:g} s")
            latency = run_phase("latency", latency_phase, runtime, key, workdir, cfg, profile_dir)
            log(f"memory: {cfg.idle_sessions} idle sessions")
            memory = run_phase("memory", memory_phase, runtime, key, workdir, cfg, profile_dir)
    environment["loadavg_end"] = loadavg()
    environment["sources_unchanged"] = gateway_sources_digest() == digest
    return Report(mode, cfg, environment, throughput, latency, memory)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table; 0 unless the benchmark failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the gateway with py-spy during the load phases (perturbs the figures)",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="run only phase 3 (memory per idle session) and print its figures",
    )
    args = parser.parse_args(argv)
    cfg = BenchConfig.quick() if args.quick else BenchConfig.full()
    if args.profile is not None:
        if find_py_spy() is None:
            parser.error("--profile needs py-spy (pip install py-spy)")
        args.profile.mkdir(parents=True, exist_ok=True)

    # SIGTERM unwinds exactly like Ctrl-C (trio delivers SIGINT at a safe point), so the
    # children are stopped by the same finally blocks.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: signal.raise_signal(signal.SIGINT))
    fd_limit = raise_fd_limit()
    needed = cfg.idle_sessions + 512
    if fd_limit < needed:
        print(f"relay_bench: RLIMIT_NOFILE is {fd_limit}, {needed} needed", file=sys.stderr)
        return 1
    if args.memory_only:
        return _main_memory_only(cfg, args.json)
    try:
        report = run(cfg, "quick" if args.quick else "full", args.profile)
    except BaseException as error:
        if interrupted(error):
            print("relay_bench: interrupted", file=sys.stderr)
            return 130
        if isinstance(error, SystemExit):
            raise
        failures = "\n".join(f"  {describe(leaf)}" for leaf in leaves(error))
        print(f"relay_bench: FAILED\n{failures}", file=sys.stderr)
        return 1
    print(report.render(), flush=True)
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
        print(f"\nfigures written to {args.json}")
    return 0


def _main_memory_only(cfg: BenchConfig, json_path: Path | None) -> int:
    try:
        memory = run_memory_only(cfg)
    except BaseException as error:
        if interrupted(error):
            print("relay_bench: interrupted", file=sys.stderr)
            return 130
        if isinstance(error, SystemExit):
            raise
        failures = "\n".join(f"  {describe(leaf)}" for leaf in leaves(error))
        print(f"relay_bench: FAILED\n{failures}", file=sys.stderr)
        return 1
    print(
        f"{memory.idle_sessions} idle sessions: RSS {memory.rss_before_kib} KiB -> "
        f"{memory.rss_with_sessions_kib} KiB, {memory.per_session_kib:.1f} KiB/session "
        f"(target <= {TARGET_IDLE_SESSION_KIB:g}; load average {loadavg()})",
        flush=True,
    )
    if json_path is not None:
        json_path.write_bytes(orjson.dumps(asdict(memory), option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
