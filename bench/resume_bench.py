"""Resume benchmark: how long a v2 client that lost its connection waits before it has its
missed frames back (on the same replica, and on another replica over Redis), and what the
Redis backend costs in throughput.

Run ``python bench/resume_bench.py`` (about 5 minutes) or ``--quick`` (about 30 s); ``--json``
prints the figures as JSON instead of the table (``--json FILE`` writes them to FILE as well as
printing the table). The demo runtime (``trio-gateway demo-runtime --instant``), the gateways
(``trio-gateway serve``) and a ``redis-server`` (no persistence, files in a temporary
directory) run as child processes on free 127.0.0.1 ports; every wait is bounded, and every
child is stopped when the run ends, fails or is interrupted (Ctrl-C, SIGTERM; children also
get SIGTERM from the kernel if this process is killed).

What is measured
----------------
1. **Resume, one replica** (``STATE_BACKEND=memory``). Each iteration is a new session: a v2
   client (``codelab.v2``, a raw wsproto client) sends one long turn, processes a random number
   of numbered frames, stops reading for a random stall (0-200 ms: frames the gateway wrote in
   that time are lost with the socket), resets the TCP connection (RST, no close frame, unread
   bytes dropped), reconnects at once and sends ``{"type":"resume","last_seq":<last processed
   seq>}`` as its first frame. Timed from the start of the reconnect (before the TCP connect):
   ``session_ready``, the first replayed frame, and ``resumed``. The client then reads the turn
   to its end and sends a 3-token follow-up turn (timed: send -> first token), and the iteration
   is checked: every ``seq`` exactly one more than the previous one across both connections,
   the tokens exactly ``t0 t1 ... t{N-1}`` then ``t0 t1 t2``, ``resumed.from_seq`` = last seq
   + 1, ``resumed.replayed`` = the frames that came before it, both turns ``completed``, no
   ``resync_required``, no error frame. Anything else counts as an exactness failure.
   Two turn shapes: paced (``bench 1200 300``: 300 tokens/s on the runtime's clock, a few
   iterations in flight at once, staggered) and unpaced (``bench 5000``: as fast as the
   pipeline goes, one iteration at a time).
2. **Resume across replicas** (``STATE_BACKEND=redis``, two gateway processes A and B on one
   Redis). The same iterations, but the client drops from one replica and resumes on the other
   (A -> B and B -> A alternately): the missed frames come from the session's Redis stream and
   the rest of the turn is relayed from the replica still running it; the follow-up turn waits
   until the first replica has let the session go (lease hand-over).
3. **Throughput cost of the Redis backend.** The same workload through a gateway with
   ``STATE_BACKEND=memory`` and one with ``STATE_BACKEND=redis`` (both up for the whole phase,
   rounds alternating, each round starting on an idle gateway), plus the runtime read directly
   (the baseline, as in ``bench/relay_bench.py``, whose rounds are reused here): ``S`` sessions
   x unpaced ``bench T`` (tokens/s from first send to last final chunk, v1 clients as in
   relay_bench: every numbered frame is appended to the Redis stream whatever the protocol
   version), and ``C`` sessions x ``bench R*D R`` paced (CPU per token and relay latency;
   tokens/s is set by the pacing). CPU seconds per 1000 tokens of the gateway and of
   ``redis-server`` come from ``/proc/<pid>/stat`` (redis-server's over the whole round,
   socket set-up included).

The machine's cores are shared by every process here (and whatever else runs): compare ratios
and differences within one run, not absolute figures across runs.

Exit status: 0 when everything ran and every resume was exact; 1 on an exactness failure or
when the benchmark itself failed; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import trio

if __package__ in (None, ""):  # run as a script: make ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    UNLIMITED_USER,
    BenchError,
    Child,
    CpuUse,
    Services,
    child_env,
    cpu_seconds,
    describe,
    gateway_metrics,
    gateway_sources_digest,
    interrupted,
    leaves,
    loadavg,
    log,
    percentile,
    raise_fd_limit,
    spawned,
)
from bench.relay_bench import (
    BenchConfig,
    LatencyStats,
    RoundResult,
    direct_client,
    direct_round,
    expected_text,
    gateway_round,
    paced_direct,
    paced_gateway,
    warm_direct_pool,
)
from tests.support.redis_server import REDIS_SERVER, RedisServer, running_redis
from tests.support.resume import ResumingClient

STALLS = (0.0, 0.0, 0.01, 0.05, 0.2)  # seconds the client stops reading before the reset
FOLLOW_UP_TOKENS = 3
ITERATION_MARGIN = 60.0  # seconds one iteration may take beyond its turn's nominal length
IDLE_TIMEOUT = 20.0  # seconds for a gateway's sessions to end after a round (grace + margin)
THROUGHPUT_GRACE_SECONDS = 1  # phase 3 gateways: closed sessions end quickly between rounds


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One turn shape for the resume iterations."""

    name: str
    tokens: int
    rate: float | None  # tokens/s, or None for unpaced
    concurrency: int  # iterations in flight at once (staggered over one turn)
    max_cut_tokens: int  # the client processes 1..this many tokens before the cut

    @property
    def content(self) -> str:
        """The ``bench`` message of the turn."""
        return f"bench {self.tokens}" + (f" {self.rate:g}" if self.rate else "")

    @property
    def nominal_s(self) -> float:
        """How long the runtime takes to stream the turn when nothing is slow."""
        return self.tokens / self.rate if self.rate else 0.0


@dataclass(frozen=True)
class ResumeBenchConfig:
    """Sizes of the three phases."""

    iterations: int
    variants: tuple[Variant, ...]
    throughput: BenchConfig  # sessions, tokens, rounds; paced_sessions, rate, duration

    @classmethod
    def full(cls) -> ResumeBenchConfig:
        """About 5 minutes: 50 iterations per turn shape, 50 x 2000 tokens x 3 rounds,
        50 sessions x 20 tokens/s x 10 s."""
        return cls(
            iterations=50,
            variants=(
                Variant("paced", 1200, 300.0, concurrency=4, max_cut_tokens=300),
                Variant("unpaced", 5000, None, concurrency=1, max_cut_tokens=2500),
            ),
            throughput=BenchConfig(
                sessions=50,
                tokens=2000,
                rounds=3,
                paced_sessions=50,
                rate=20,
                duration=10.0,
                idle_sessions=0,
            ),
        )

    @classmethod
    def quick(cls) -> ResumeBenchConfig:
        """About 30 s: 10 iterations per shape, 10 x 500 tokens, 10 x 20 tokens/s x 2 s."""
        return cls(
            iterations=10,
            variants=(
                Variant("paced", 600, 300.0, concurrency=4, max_cut_tokens=150),
                Variant("unpaced", 2000, None, concurrency=1, max_cut_tokens=1000),
            ),
            throughput=BenchConfig(
                sessions=10,
                tokens=500,
                rounds=1,
                paced_sessions=10,
                rate=20,
                duration=2.0,
                idle_sessions=0,
            ),
        )


# ------------------------------------------------------------------------------------------------
# redis-server as a child
# ------------------------------------------------------------------------------------------------


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` (the tests' launcher) on a free loopback port, without
    persistence, refusing writes rather than evicting; stopped when the block ends."""
    if REDIS_SERVER is None:
        raise BenchError("redis-server is not installed")
    with running_redis(workdir, ["--maxmemory-policy", "noeviction"]) as server:
        yield server


# ------------------------------------------------------------------------------------------------
# The resuming client
# ------------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------
# Phases 1 and 2: resume iterations
# ------------------------------------------------------------------------------------------------


@dataclass
class ResumeSample:
    """One iteration: where it was cut and what the reconnect took (milliseconds)."""

    iteration: int
    route: str  # e.g. "A->B"
    cut_after_tokens: int
    stall_ms: float
    cut_seq: int = 0
    ready_ms: float = math.nan  # reconnect start -> session_ready
    first_replayed_ms: float | None = None  # -> first replayed frame (None: nothing replayed)
    resumed_ms: float = math.nan  # -> resumed
    replayed: int = 0
    next_turn_ms: float = math.nan  # follow-up turn: send -> first token
    resyncs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exact: nothing lost, nothing twice, no resync, no error."""
        return not self.problems and not self.resyncs


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def resume_iteration(
    variant: Variant, index: int, ports: tuple[int, int], route: str, tag: str, seed: int
) -> ResumeSample:
    """One session: stream, cut, resume on ``ports[1]``, finish, follow-up turn, check."""
    rng = random.Random(seed * 100_003 + index)
    sample = ResumeSample(
        iteration=index,
        route=route,
        cut_after_tokens=rng.randint(1, variant.max_cut_tokens),
        stall_ms=rng.choice(STALLS) * 1000,
    )
    session_id = f"{tag}-{variant.name}-{index}"
    # Not strict: every violation is recorded and the iteration goes on to the end of its turn.
    client = ResumingClient(ports[0], session_id, strict=False, frame_timeout=math.inf)
    try:
        with trio.fail_after(variant.nominal_s + ITERATION_MARGIN):
            await client.connect(resume=False)
            await client.send({"type": "user_message", "content": variant.content})
            while client.token_count < sample.cut_after_tokens:
                frame = await client.next()
                if frame.get("type") == "turn_finished":
                    raise BenchError("the turn ended before the cut (cut later than the turn)")
            await trio.sleep(sample.stall_ms / 1000)  # frames keep arriving, unread
            sample.cut_seq = client.last_seq
            await client.cut()

            started = time.perf_counter()
            client.port = ports[1]
            await client.connect(resume=True)
            sample.ready_ms = _ms_since(started)
            replayed = 0
            while True:
                frame = await client.next()
                if "seq" in frame:
                    replayed += 1
                    if sample.first_replayed_ms is None:
                        sample.first_replayed_ms = _ms_since(started)
                elif frame.get("type") == "resumed":
                    sample.resumed_ms = _ms_since(started)
                    expected = {
                        "type": "resumed",
                        "from_seq": sample.cut_seq + 1,
                        "replayed": replayed,
                    }
                    if frame != expected:
                        sample.problems.append(f"{_short(frame)}, expected {expected}")
                    break
                elif frame.get("type") == "resync_required":
                    sample.first_replayed_ms = None
                    break
            sample.replayed = replayed
            await client.until_turns_finished(1)

            sent = time.perf_counter()
            await client.send({"type": "user_message", "content": f"bench {FOLLOW_UP_TOKENS}"})
            while True:
                frame = await client.next()
                if frame.get("type") == "assistant_message":
                    sample.next_turn_ms = _ms_since(sent)
                    break
            await client.until_turns_finished(2)
            await client.close()
        text = client.text()
        expected_tokens = expected_text(variant.tokens) + expected_text(FOLLOW_UP_TOKENS)
        if text != expected_tokens:
            at = next(
                (i for i, (a, b) in enumerate(zip(text, expected_tokens, strict=False)) if a != b),
                min(len(text), len(expected_tokens)),
            )
            sample.problems.append(
                f"wrong text ({len(text)} chars, expected {len(expected_tokens)}); first "
                f"difference at {at}: {text[at : at + 30]!r} vs {expected_tokens[at : at + 30]!r}"
            )
        if client.finals != 2 or client.turn_statuses != ["completed", "completed"]:
            sample.problems.append(
                f"{client.finals} final chunk(s), turn statuses {client.turn_statuses}"
            )
    except (BenchError, trio.TooSlowError, OSError, orjson.JSONDecodeError) as error:
        sample.problems.append(describe(error))
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await client.cut()
    sample.problems[:0] = client.problems
    sample.resyncs = client.resyncs
    return sample


@dataclass
class Spread:
    """p50 / p95 / max of one measurement, in milliseconds (NaN when there is no sample)."""

    p50: float
    p95: float
    max: float
    samples: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (NaN entries ignored)."""
        kept = [v for v in values if not math.isnan(v)]
        return cls(
            percentile(kept, 50), percentile(kept, 95), max(kept, default=math.nan), len(kept)
        )


@dataclass
class VariantResult:
    """Every iteration of one turn shape in one phase, and their spreads."""

    variant: Variant
    samples: list[ResumeSample]
    ready: Spread
    first_replayed: Spread
    resumed: Spread
    replayed: Spread
    next_turn: Spread
    failures: int
    resyncs: int
    nothing_replayed: int  # iterations where every missed frame came live (none to replay)

    @classmethod
    def of(cls, variant: Variant, samples: list[ResumeSample]) -> VariantResult:
        """Summarise ``samples``."""
        return cls(
            variant=variant,
            samples=samples,
            ready=Spread.of([s.ready_ms for s in samples]),
            first_replayed=Spread.of(
                [s.first_replayed_ms for s in samples if s.first_replayed_ms is not None]
            ),
            resumed=Spread.of([s.resumed_ms for s in samples]),
            replayed=Spread.of([float(s.replayed) for s in samples]),
            next_turn=Spread.of([s.next_turn_ms for s in samples]),
            failures=sum(not s.ok for s in samples),
            resyncs=sum(bool(s.resyncs) for s in samples),
            nothing_replayed=sum(s.first_replayed_ms is None and not s.resyncs for s in samples),
        )


@dataclass
class ResumePhaseResult:
    """One resume phase (one replica, or across replicas)."""

    name: str
    variants: list[VariantResult]
    gateway_counters: dict[str, float]  # resumes exact/resync, append failures (all gateways)

    @property
    def failures(self) -> int:
        """Iterations that were not exact."""
        return sum(v.failures for v in self.variants)


async def run_variant(
    variant: Variant,
    iterations: int,
    gateways: Sequence[Child],
    tag: str,
    seed: int,
) -> VariantResult:
    """``iterations`` iterations, ``variant.concurrency`` at a time (staggered). With two
    gateways, iteration i starts on gateway i % 2 and resumes on the other one."""
    ports = [_port_of(g) for g in gateways]
    names = "AB"
    samples: list[ResumeSample] = []
    indices = iter(range(iterations))
    workers = max(1, min(variant.concurrency, iterations))

    async def worker(number: int) -> None:
        await trio.sleep(number * variant.nominal_s / workers)
        for index in indices:  # shared: each index goes to exactly one worker
            first = index % len(ports)
            second = (first + 1) % len(ports)
            route = f"{names[first]}->{names[second]}"
            pair = (ports[first], ports[second])
            sample = await resume_iteration(variant, index, pair, route, tag, seed)
            samples.append(sample)
            if not sample.ok:
                log(f"  {variant.name} iteration {index} NOT EXACT: {sample.problems[:3]} "
                     f"resyncs {sample.resyncs}")  # fmt: skip
            for gateway in gateways:
                gateway.check_alive()

    async with trio.open_nursery() as nursery:
        for number in range(workers):
            nursery.start_soon(worker, number)
    samples.sort(key=lambda s: s.iteration)
    return VariantResult.of(variant, samples)


async def resume_phase(
    name: str, gateways: Sequence[Child], runtime: Child, cfg: ResumeBenchConfig, seed: int
) -> ResumePhaseResult:
    """Every variant against ``gateways`` (one: same replica; two: across replicas)."""
    await runtime.wait_healthy()
    for gateway in gateways:
        await gateway.wait_healthy()
    tag = f"resume-{name}-{secrets.token_hex(3)}"
    results = []
    for variant in cfg.variants:
        log(f"{name}: {cfg.iterations} x {variant.content}, {variant.concurrency} at a time")
        result = await run_variant(variant, cfg.iterations, gateways, tag, seed)
        log(
            f"  resumed p50 {result.resumed.p50:.1f} ms, p95 {result.resumed.p95:.1f} ms, "
            f"max {result.resumed.max:.1f} ms; {result.failures} not exact"
        )
        results.append(result)
    counters: dict[str, float] = {}
    for gateway in gateways:
        found = _redis_trouble(await gateway_metrics(Services(runtime, gateway, "")), gateway)
        for key, value in found.items():
            counters[key] = counters.get(key, 0.0) + value
    return ResumePhaseResult(name, results, counters)


def _redis_trouble(metrics: dict[str, float], gateway: Child) -> dict[str, float]:
    """Resume outcomes, failed stream appends and Redis failures one gateway counted, and how
    often its log says it marked Redis unavailable (``state_down``)."""
    wanted = ("gateway_resumes_total", "gateway_state_backend_failures_total")
    found = {
        key: value
        for key, value in metrics.items()
        if key.startswith(wanted)
        or (key.startswith("gateway_limit_hits_total") and "stream_append_failed" in key)
    }
    try:
        log = gateway.log_path.read_text(errors="replace")
    except OSError:
        log = ""
    downs = log.count('"event":"state_down"')
    if downs:
        found["redis marked unavailable (state_down log events)"] = float(downs)
    return found


def _port_of(child: Child) -> int:
    return int(child.url.rsplit(":", 1)[1])


# ------------------------------------------------------------------------------------------------
# Phase 3: throughput, memory vs redis backend
# ------------------------------------------------------------------------------------------------


@dataclass
class PathFigures:
    """One path's figures in phase 3 (``direct``, ``memory`` or ``redis``)."""

    path: str
    rounds_tokens_per_s: list[float] = field(default_factory=list)
    tokens: int = 0
    frames: int = 0
    cpu: CpuUse = field(default_factory=lambda: CpuUse(0.0, 0.0, 0.0, 0.0))
    redis_cpu_s: float = 0.0
    latency_p50_ms: float = math.nan  # paced only
    latency_p99_ms: float = math.nan

    @property
    def median_tokens_per_s(self) -> float:
        """Median over the rounds."""
        values = self.rounds_tokens_per_s
        return statistics.median(values) if values else math.nan

    def per_1000_tokens(self, seconds: float) -> float:
        """``seconds`` per 1000 tokens of this path."""
        return seconds / self.tokens * 1000 if self.tokens else math.nan

    @property
    def gateway_cpu_per_1000(self) -> float:
        """Gateway CPU seconds per 1000 tokens."""
        return self.per_1000_tokens(self.cpu.gateway_s)

    @property
    def redis_cpu_per_1000(self) -> float:
        """redis-server CPU seconds per 1000 tokens."""
        return self.per_1000_tokens(self.redis_cpu_s)


@dataclass
class ThroughputPhaseResult:
    """Phase 3: unpaced and paced, per path."""

    config: BenchConfig
    unpaced: dict[str, PathFigures]
    paced: dict[str, PathFigures]
    round_ratios: list[float]  # redis / memory, round by round (unpaced)
    redis_trouble: dict[str, float]  # the redis gateway's append/Redis failures (see above)

    @property
    def ratio(self) -> float:
        """Median tokens/s, redis / memory (unpaced)."""
        return (
            self.unpaced["redis"].median_tokens_per_s / self.unpaced["memory"].median_tokens_per_s
        )


async def _wait_idle(services: Services) -> None:
    """Until the gateway holds no session (closed sessions wait out a short grace period)."""
    with trio.move_on_after(IDLE_TIMEOUT):
        while True:
            metrics = await gateway_metrics(services)
            if not metrics.get("gateway_active_sessions"):
                return
            await trio.sleep(0.25)
    log(f"  warning: {services.gateway.name} still holds sessions after {IDLE_TIMEOUT:g} s")


def _account(figures: PathFigures, outcome: RoundResult, tokens: int, redis_cpu: float) -> None:
    figures.rounds_tokens_per_s.append(outcome.tokens_per_s)
    figures.tokens += tokens
    figures.frames += outcome.frames
    figures.cpu = figures.cpu + outcome.cpu
    figures.redis_cpu_s += redis_cpu


async def throughput_phase(
    runtime: Child,
    memory_gw: Child,
    redis_gw: Child,
    redis: RedisServer,
    cfg: BenchConfig,
    key: str,
) -> ThroughputPhaseResult:
    """Unpaced rounds alternating direct / memory / redis (order rotated each round), then the
    paced load on each path."""
    services = {
        "direct": Services(runtime, memory_gw, key),
        "memory": Services(runtime, memory_gw, key),
        "redis": Services(runtime, redis_gw, key),
    }
    for child in (runtime, memory_gw, redis_gw):
        await child.wait_healthy()
    unpaced = {path: PathFigures(path) for path in services}
    paced = {path: PathFigures(path) for path in services}
    ratios: list[float] = []
    tokens = cfg.sessions * cfg.tokens
    async with direct_client(services["direct"], cfg.sessions) as http:
        tag = secrets.token_hex(3)
        await warm_direct_pool(http, cfg.sessions, f"warm-{tag}")
        warm = replace(cfg, tokens=min(cfg.tokens, 100))
        await direct_round(http, services["direct"], warm, f"warm-direct-{tag}")
        for path in ("memory", "redis"):
            await gateway_round(services[path], warm, f"warm-{path}-{tag}")
            await _wait_idle(services[path])
        paths = ["direct", "memory", "redis"]
        for number in range(cfg.rounds):
            order = paths[number % 3 :] + paths[: number % 3]
            by_path: dict[str, RoundResult] = {}
            for path in order:
                round_tag = f"tp{number}-{path}-{tag}"
                redis_before = cpu_seconds(redis.pid)
                if path == "direct":
                    outcome = await direct_round(http, services[path], cfg, round_tag)
                else:
                    outcome = await gateway_round(services[path], cfg, round_tag)
                redis_cpu = cpu_seconds(redis.pid) - redis_before
                _account(unpaced[path], outcome, tokens, redis_cpu)
                by_path[path] = outcome
                log(
                    f"  round {number + 1} {path:<7}{outcome.tokens_per_s:>9,.0f} tok/s; "
                    f"cores busy: {outcome.cpu.cores()}, redis {redis_cpu / outcome.cpu.wall_s:.2f}"
                )
                if path != "direct":
                    await _wait_idle(services[path])
            ratios.append(by_path["redis"].tokens_per_s / by_path["memory"].tokens_per_s)
    paced_tokens = cfg.paced_sessions * cfg.paced_tokens
    for path in ("direct", "memory", "redis"):
        redis_before = cpu_seconds(redis.pid)
        if path == "direct":
            stats: LatencyStats = await paced_direct(services[path], cfg)
        else:
            stats = await paced_gateway(services[path], cfg)
            await _wait_idle(services[path])
        figures = paced[path]
        figures.rounds_tokens_per_s.append(paced_tokens / stats.cpu.wall_s)
        figures.tokens = paced_tokens
        figures.frames = stats.frames
        figures.cpu = stats.cpu
        figures.redis_cpu_s = cpu_seconds(redis.pid) - redis_before
        figures.latency_p50_ms, figures.latency_p99_ms = stats.p50_ms, stats.p99_ms
        log(f"  paced {path:<7} p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms")
    trouble = _redis_trouble(await gateway_metrics(services["redis"]), redis_gw)
    trouble = {k: v for k, v in trouble.items() if not k.startswith("gateway_resumes")}
    return ThroughputPhaseResult(cfg, unpaced, paced, ratios, trouble)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Every figure of one run."""

    mode: str
    environment: dict[str, Any]
    config: ResumeBenchConfig
    single: ResumePhaseResult
    replicas: ResumePhaseResult
    throughput: ThroughputPhaseResult

    @property
    def failures(self) -> int:
        """Exactness failures over both resume phases."""
        return self.single.failures + self.replicas.failures

    def to_json(self) -> dict[str, Any]:
        """Everything as a JSON-able dict."""
        data = asdict(self)
        data["failures"] = self.failures
        data["throughput"]["ratio_redis_memory"] = self.throughput.ratio
        return data

    def render(self) -> str:
        """The figure table."""
        env = self.environment
        lines = [
            f"trio-gateway resume benchmark ({self.mode}), {env['started']}: python "
            f"{env['python']}, {env['cpus']} CPUs, load average {env['loadavg_start']} at start, "
            f"{env['loadavg_end']} at end",
            f"gateway sources sha256 {env['gateway_sources_sha256'][:12]}"
            + ("" if env["sources_unchanged"] else "  (WARNING: they changed during the run)"),
            "phases took "
            + ", ".join(f"{k} {v:.0f} s" for k, v in env["phase_seconds"].items())
            + "; shared, noisy cores: compare within this run (ratios), not across runs.",
            "",
        ]
        titles = {
            "single": "1. Resume on the same replica (STATE_BACKEND=memory)",
            "replicas": "2. Resume on the other replica (STATE_BACKEND=redis, 2 gateways, 1 Redis)",
        }
        for phase in (self.single, self.replicas):
            lines += [titles[phase.name], *self._resume_lines(phase), ""]
        lines += self._throughput_lines()
        lines += [
            "",
            f"exactness failures: {self.failures} "
            f"({'PASS' if self.failures == 0 else 'FAIL'}: seq contiguous, tokens exact, "
            "no resync, no error, in every iteration)",
        ]
        return "\n".join(lines)

    def _resume_lines(self, phase: ResumePhaseResult) -> list[str]:
        lines = [
            "  ms from reconnect start (before TCP connect); 'next turn': follow-up turn, "
            "send -> first token",
            f"  {'turn':<17}{'n':>4}{'fail':>5}{'resync':>7}{'ready':>7}"
            f"{'first replayed frame':>24}{'resumed':>24}{'replayed frames':>17}"
            f"{'next turn':>24}",
            f"  {'':<17}{'':>4}{'':>5}{'':>7}{'p50':>7}{'p50 / p95 / max':>24}"
            f"{'p50 / p95 / max':>24}{'p50 / max':>17}{'p50 / p95 / max':>24}",
        ]
        for result in phase.variants:
            v = result.variant
            lines.append(
                f"  {v.content:<17}{len(result.samples):>4}{result.failures:>5}"
                f"{result.resyncs:>7}{result.ready.p50:>7.1f}{_spread(result.first_replayed):>24}"
                f"{_spread(result.resumed):>24}"
                f"{f'{result.replayed.p50:.0f} / {result.replayed.max:.0f}':>17}"
                f"{_spread(result.next_turn):>24}"
            )
        notes = []
        for result in phase.variants:
            v = result.variant
            if result.nothing_replayed:
                notes.append(
                    f"{v.content}: {result.nothing_replayed} iteration(s) had nothing to replay "
                    "(no first-replayed-frame time)"
                )
            in_flight = max(1, min(v.concurrency, len(result.samples)))
            notes.append(f"{v.content}: {in_flight} iteration(s) in flight at once")
        counters = ", ".join(
            f"{k.removeprefix('gateway_')} {v:.0f}"
            for k, v in sorted(phase.gateway_counters.items())
        )
        notes.append(f"gateway counters: {counters or 'none'}")
        return lines + [f"  {note}" for note in notes]

    def _throughput_lines(self) -> list[str]:
        tp, cfg = self.throughput, self.throughput.config
        lines = [
            "3. Throughput cost of the Redis backend (same workload, one run, rounds alternating)",
            f"  {'workload':<32}{'path':<8}{'tok/s':>10}{'vs memory':>11}"
            f"{'gateway CPU':>13}{'redis CPU':>11}{'runtime CPU':>13}{'p50/p99 ms':>14}",
            f"  {'':<32}{'':<8}{'(median)':>10}{'':>11}{'s/1000 tok':>13}{'s/1000 tok':>11}"
            f"{'s/1000 tok':>13}{'':>14}",
        ]
        workloads = (
            (f"{cfg.sessions} x bench {cfg.tokens}, {cfg.rounds} round(s)", tp.unpaced),
            (
                f"{cfg.paced_sessions} x bench {cfg.paced_tokens} {cfg.rate} (paced)",
                tp.paced,
            ),
        )
        for title, paths in workloads:
            memory = paths["memory"].median_tokens_per_s
            for number, path in enumerate(("direct", "memory", "redis")):
                fig = paths[path]
                gateway = "-" if path == "direct" else f"{fig.gateway_cpu_per_1000:.4f}"
                redis = f"{fig.redis_cpu_per_1000:.4f}" if path == "redis" else "-"
                latency = (
                    "-"
                    if math.isnan(fig.latency_p50_ms)
                    else f"{fig.latency_p50_ms:.1f}/{fig.latency_p99_ms:.1f}"
                )
                lines.append(
                    f"  {title if number == 0 else '':<32}{path:<8}"
                    f"{fig.median_tokens_per_s:>10,.0f}"
                    f"{fig.median_tokens_per_s / memory:>10.2f}x"
                    f"{gateway:>13}{redis:>11}{fig.per_1000_tokens(fig.cpu.runtime_s):>13.4f}"
                    f"{latency:>14}"
                )
        mem, red = tp.unpaced["memory"], tp.unpaced["redis"]
        paced_mem, paced_red = tp.paced["memory"], tp.paced["redis"]
        lines += [
            f"  unpaced tokens/s redis/memory: {tp.ratio:.2f} (medians); round by round: "
            + ", ".join(f"{r:.2f}" for r in tp.round_ratios),
            f"  gateway CPU per token redis/memory: unpaced "
            f"{red.gateway_cpu_per_1000 / mem.gateway_cpu_per_1000:.2f}x, paced "
            f"{paced_red.gateway_cpu_per_1000 / paced_mem.gateway_cpu_per_1000:.2f}x; "
            f"tokens per frame unpaced: memory {mem.tokens / max(mem.frames, 1):.1f}, "
            f"redis {red.tokens / max(red.frames, 1):.1f}",
        ]
        if any(
            value
            for key, value in tp.redis_trouble.items()
            if not key.startswith("gateway_resumes_total")
        ):
            lines.append(
                "  WARNING: the redis gateway had Redis trouble (appends skipped while Redis "
                "counts as down make its figures look better than they are): "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(tp.redis_trouble.items()))
            )
        else:
            lines.append("  redis gateway: no failed append, Redis never marked unavailable")
        return lines


def _spread(spread: Spread) -> str:
    if not spread.samples:
        return "-"
    return f"{spread.p50:.1f} / {spread.p95:.1f} / {spread.max:.1f}"


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _tails(children: Sequence[Child]) -> None:
    for child in children:
        log(f"--- {child.name} log tail ---\n{child.log_tail()}")


def run(cfg: ResumeBenchConfig, mode: str, seed: int, keep: Path | None = None) -> Report:
    """The three phases against one runtime and one redis-server, fresh gateways per phase."""
    digest = gateway_sources_digest()
    environment: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "gateway_sources_sha256": digest,
        "seed": seed,
    }
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="resume-bench-") as tmp:
        workdir = Path(tmp) if keep is None else keep
        workdir.mkdir(parents=True, exist_ok=True)
        with (
            redis_server(workdir) as redis,
            spawned("runtime", ["demo-runtime", "--instant"], child_env(key), workdir) as runtime,
        ):
            base = {**UNLIMITED_USER, "agent_url": runtime.url}
            shared = {
                **base,
                "state_backend": "redis",
                "redis_url": redis.url(),
                "redis_timeout": "5",  # a loaded machine must not look like a Redis outage
                "session_lease_seconds": "5",
            }
            phase_seconds: dict[str, float] = {}
            environment["phase_seconds"] = phase_seconds
            started = time.perf_counter()
            with spawned("gateway-memory", ["serve"], child_env(key, **base), workdir) as gw:
                try:
                    single = trio.run(resume_phase, "single", [gw], runtime, cfg, seed)
                except BaseException as error:
                    if not interrupted(error):
                        _tails([runtime, gw])
                    raise
            phase_seconds["single"] = time.perf_counter() - started
            started = time.perf_counter()
            replica_env = child_env(key, **shared)
            with (
                spawned("replica-a", ["serve"], replica_env, workdir) as a,
                spawned("replica-b", ["serve"], replica_env, workdir) as b,
            ):
                try:
                    replicas = trio.run(resume_phase, "replicas", [a, b], runtime, cfg, seed)
                except BaseException as error:
                    if not interrupted(error):
                        _tails([runtime, a, b])
                    raise
            phase_seconds["replicas"] = time.perf_counter() - started
            started = time.perf_counter()
            quick_grace = {"session_grace_seconds": str(THROUGHPUT_GRACE_SECONDS)}
            tp = cfg.throughput
            log(
                f"throughput: {tp.sessions} x bench {tp.tokens}, {tp.rounds} round(s); paced "
                f"{tp.paced_sessions} x bench {tp.paced_tokens} {tp.rate}"
            )
            with (
                spawned(
                    "gateway-memory-tp", ["serve"], child_env(key, **base, **quick_grace), workdir
                ) as memory_gw,
                spawned(
                    "gateway-redis-tp", ["serve"], child_env(key, **shared, **quick_grace), workdir
                ) as redis_gw,
            ):
                try:
                    throughput = trio.run(
                        throughput_phase, runtime, memory_gw, redis_gw, redis, tp, key
                    )
                except BaseException as error:
                    if not interrupted(error):
                        _tails([runtime, memory_gw, redis_gw])
                    raise
            phase_seconds["throughput"] = time.perf_counter() - started
    environment["loadavg_end"] = loadavg()
    environment["sources_unchanged"] = gateway_sources_digest() == digest
    return Report(mode, environment, cfg, single, replicas, throughput)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print; 0 when every resume was exact and nothing failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 30 s)")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="print the figures as JSON (or, with FILE, write them there and print the table)",
    )
    parser.add_argument("--iterations", type=int, help="resume iterations per turn shape")
    parser.add_argument("--paced-tokens", type=int, help="tokens of a paced resume turn")
    parser.add_argument("--unpaced-tokens", type=int, help="tokens of an unpaced resume turn")
    parser.add_argument("--sessions", type=int, help="throughput sessions")
    parser.add_argument("--tokens", type=int, help="tokens per throughput turn")
    parser.add_argument("--rounds", type=int, help="throughput rounds per path")
    parser.add_argument("--paced-sessions", type=int, help="paced throughput sessions")
    parser.add_argument("--paced-duration", type=float, help="seconds per paced throughput turn")
    parser.add_argument("--seed", type=int, default=20261127, help="cut points and stalls")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the children's logs (runtime, gateways, redis) in this directory",
    )
    args = parser.parse_args(argv)
    cfg = ResumeBenchConfig.quick() if args.quick else ResumeBenchConfig.full()
    paced, unpaced = cfg.variants
    if args.paced_tokens is not None:
        paced = replace(paced, tokens=args.paced_tokens)
    if args.unpaced_tokens is not None:
        unpaced = replace(unpaced, tokens=args.unpaced_tokens)
    paced = replace(paced, max_cut_tokens=min(paced.max_cut_tokens, max(1, paced.tokens // 2)))
    unpaced = replace(
        unpaced, max_cut_tokens=min(unpaced.max_cut_tokens, max(1, unpaced.tokens // 2))
    )
    throughput = cfg.throughput
    for name, attribute in (
        ("sessions", "sessions"),
        ("tokens", "tokens"),
        ("rounds", "rounds"),
        ("paced_sessions", "paced_sessions"),
        ("paced_duration", "duration"),
    ):
        value = getattr(args, name)
        if value is not None:
            throughput = replace(throughput, **{attribute: value})
    cfg = replace(
        cfg,
        iterations=args.iterations if args.iterations is not None else cfg.iterations,
        variants=(paced, unpaced),
        throughput=throughput,
    )

    # SIGTERM unwinds exactly like Ctrl-C, so the children are stopped by the same finally blocks.
    # A background job of a non-interactive shell starts with SIGINT ignored, which would make
    # both signals no-ops (and trio installs its handler only over the default one): restore it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: signal.raise_signal(signal.SIGINT))
    raise_fd_limit()
    try:
        report = run(cfg, "quick" if args.quick else "full", args.seed, args.workdir)
    except BaseException as error:
        if interrupted(error):
            print("resume_bench: interrupted", file=sys.stderr)
            return 130
        if isinstance(error, SystemExit):
            raise
        failures = "\n".join(f"  {describe(leaf)}" for leaf in leaves(error))
        print(f"resume_bench: FAILED\n{failures}", file=sys.stderr)
        return 1
    data = orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2)
    if args.json == "-":
        print(report.render(), file=sys.stderr, flush=True)
        sys.stdout.buffer.write(data + b"\n")
    else:
        print(report.render(), flush=True)
        if args.json is not None:
            Path(args.json).write_bytes(data)
            print(f"\nfigures written to {args.json}")
    return 0 if report.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
