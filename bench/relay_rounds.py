"""The relay workload, written once: its sizes (:class:`BenchConfig`), a timed round of ``S``
concurrent ``bench T`` turns read directly or through the gateway (:class:`RoundResult`), and
``C`` paced turns stamped by the runtime, read either way (:class:`LatencyStats`). Used by
``relay_bench.py`` (gateway against direct) and ``resume_bench.py`` (memory against Redis).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import trio
import trio_websocket

from bench.clients import (
    SocketGroup,
    TurnResult,
    direct_client,
    direct_turn,
    gateway_turn,
    verify_all,
    warm_direct_pool,
)
from bench.harness import BenchError, CpuMeter, CpuUse, Services
from bench.stats import sorted_percentile

TARGET_ADDED_P99_MS = 5.0  # gateway p99 latency - direct p99 latency (relay_bench, latency.py)

ROUND_TIMEOUT = 300.0  # seconds for one throughput round (connect, stream, close)
PACED_TIMEOUT_MARGIN = 120.0  # seconds a paced phase may take beyond its nominal duration


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


# ------------------------------------------------------------------------------------------------
# Throughput rounds: S concurrent unpaced turns, direct or through the gateway
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


def pipeline_us(rounds: Sequence[RoundResult], cfg: BenchConfig) -> float:
    """CPU microseconds per token of all three processes together over ``rounds``."""
    cpu = CpuUse.total(r.cpu for r in rounds)
    tokens = cfg.sessions * cfg.tokens * len(rounds)
    return (cpu.gateway_s + cpu.runtime_s + cpu.client_s) / tokens * 1e6


# ------------------------------------------------------------------------------------------------
# Paced rounds: C sessions at R tokens/s, latency from the runtime's stamp to the client
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
            p50_ms=sorted_percentile(samples, 50) / 1e6,
            p99_ms=sorted_percentile(samples, 99) / 1e6,
            max_ms=samples[-1] / 1e6,
            frames=sum(r.frames for r in results),
            multi_token_frames=sum(r.multi_token_frames for r in results),
            cpu=cpu,
        )


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
