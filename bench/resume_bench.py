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
   (the baseline, as in ``bench/relay_bench.py``: the same rounds, from ``bench/relay_rounds.py``):
   ``S`` sessions x unpaced ``bench T`` (tokens/s from first send to last final chunk, v1
   clients as in relay_bench: every numbered frame is appended to the Redis stream whatever
   the protocol version), and ``C`` sessions x ``bench R*D R`` paced (CPU per token and relay
   latency; tokens/s is set by the pacing). CPU seconds per 1000 tokens of the gateway and of
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
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # run as a script: make ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import relay_rounds as relay
from bench.clients import direct_client, warm_direct_pool
from bench.harness import (
    UNLIMITED_USER,
    Child,
    CpuUse,
    Services,
    child_env,
    cpu_seconds,
    environment_lines,
    failure_status,
    finish_environment,
    gateway_metrics,
    log,
    raise_fd_limit,
    redis_server,
    redis_trouble,
    run_environment,
    run_trio,
    sigterm_as_interrupt,
    spawned,
    wait_idle,
)
from bench.resume_client import Variant, VariantResult, run_variant
from tests.support.redis_server import RedisServer

THROUGHPUT_GRACE_SECONDS = 1  # phase 3 gateways: closed sessions end quickly between rounds


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeBenchConfig:
    """Sizes of the three phases."""

    iterations: int
    variants: tuple[Variant, ...]
    throughput: relay.BenchConfig  # sessions, tokens, rounds; paced_sessions, rate, duration

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
            # The relay benchmark's sizes, with its 100 paced sessions halved; no memory phase.
            throughput=replace(
                relay.BenchConfig.full(), sessions=50, paced_sessions=50, idle_sessions=0
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
            throughput=replace(relay.BenchConfig.quick(), sessions=10, tokens=500, idle_sessions=0),
        )


# ------------------------------------------------------------------------------------------------
# Phases 1 and 2: resume iterations
# ------------------------------------------------------------------------------------------------


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
        found = redis_trouble(await gateway_metrics(Services(runtime, gateway, "")), gateway)
        for key, value in found.items():
            counters[key] = counters.get(key, 0.0) + value
    return ResumePhaseResult(name, results, counters)


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

    config: relay.BenchConfig
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


def _account(
    figures: PathFigures, outcome: relay.RoundResult, tokens: int, redis_cpu: float
) -> None:
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
    cfg: relay.BenchConfig,
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
        await relay.direct_round(http, services["direct"], warm, f"warm-direct-{tag}")
        for path in ("memory", "redis"):
            await relay.gateway_round(services[path], warm, f"warm-{path}-{tag}")
            await wait_idle(services[path])
        paths = ["direct", "memory", "redis"]
        for number in range(cfg.rounds):
            order = paths[number % 3 :] + paths[: number % 3]
            by_path: dict[str, relay.RoundResult] = {}
            for path in order:
                round_tag = f"tp{number}-{path}-{tag}"
                redis_before = cpu_seconds(redis.pid)
                if path == "direct":
                    outcome = await relay.direct_round(http, services[path], cfg, round_tag)
                else:
                    outcome = await relay.gateway_round(services[path], cfg, round_tag)
                redis_cpu = cpu_seconds(redis.pid) - redis_before
                _account(unpaced[path], outcome, tokens, redis_cpu)
                by_path[path] = outcome
                log(
                    f"  round {number + 1} {path:<7}{outcome.tokens_per_s:>9,.0f} tok/s; "
                    f"cores busy: {outcome.cpu.cores()}, redis {redis_cpu / outcome.cpu.wall_s:.2f}"
                )
                if path != "direct":
                    await wait_idle(services[path])
            ratios.append(by_path["redis"].tokens_per_s / by_path["memory"].tokens_per_s)
    paced_tokens = cfg.paced_sessions * cfg.paced_tokens
    for path in ("direct", "memory", "redis"):
        redis_before = cpu_seconds(redis.pid)
        if path == "direct":
            stats: relay.LatencyStats = await relay.paced_direct(services[path], cfg)
        else:
            stats = await relay.paced_gateway(services[path], cfg)
            await wait_idle(services[path])
        figures = paced[path]
        figures.rounds_tokens_per_s.append(paced_tokens / stats.cpu.wall_s)
        figures.tokens = paced_tokens
        figures.frames = stats.frames
        figures.cpu = stats.cpu
        figures.redis_cpu_s = cpu_seconds(redis.pid) - redis_before
        figures.latency_p50_ms, figures.latency_p99_ms = stats.p50_ms, stats.p99_ms
        log(f"  paced {path:<7} p50 {stats.p50_ms:.2f} ms, p99 {stats.p99_ms:.2f} ms")
    trouble = redis_trouble(await gateway_metrics(services["redis"]), redis_gw)
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
        title = f"trio-gateway resume benchmark ({self.mode}), {env['started']}: "
        lines = [
            *environment_lines(title, env),
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
                f"{result.resyncs:>7}{result.ready.p50:>7.1f}{result.first_replayed.render():>24}"
                f"{result.resumed.render():>24}"
                f"{f'{result.replayed.p50:.0f} / {result.replayed.max:.0f}':>17}"
                f"{result.next_turn.render():>24}"
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


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def run(cfg: ResumeBenchConfig, mode: str, seed: int, keep: Path | None = None) -> Report:
    """The three phases against one runtime and one redis-server, fresh gateways per phase."""
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    environment = {"started": started_at, **run_environment(seed=seed)}
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
                single = run_trio([runtime, gw], resume_phase, "single", [gw], runtime, cfg, seed)
            phase_seconds["single"] = time.perf_counter() - started
            started = time.perf_counter()
            replica_env = child_env(key, **shared)
            with (
                spawned("replica-a", ["serve"], replica_env, workdir) as a,
                spawned("replica-b", ["serve"], replica_env, workdir) as b,
            ):
                replicas = run_trio(
                    [runtime, a, b], resume_phase, "replicas", [a, b], runtime, cfg, seed
                )
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
                throughput = run_trio(
                    [runtime, memory_gw, redis_gw],
                    throughput_phase,
                    runtime,
                    memory_gw,
                    redis_gw,
                    redis,
                    tp,
                    key,
                )
            phase_seconds["throughput"] = time.perf_counter() - started
    finish_environment(environment)
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

    sigterm_as_interrupt()
    raise_fd_limit()
    try:
        report = run(cfg, "quick" if args.quick else "full", args.seed, args.workdir)
    except BaseException as error:
        return failure_status("resume_bench", error)
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
