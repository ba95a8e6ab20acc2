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
import resource
import secrets
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import orjson
import trio

if __package__ in (None, ""):  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import SocketGroup, direct_client, warm_direct_pool
from bench.harness import (
    UNLIMITED_USER,
    BenchError,
    Child,
    CpuUse,
    Services,
    add_json_option,
    child_env,
    environment_lines,
    failure_status,
    find_py_spy,
    finish_environment,
    loadavg,
    log,
    profile_summary,
    profiled,
    raise_fd_limit,
    rss_kib,
    run_environment,
    run_trio,
    sigterm_as_interrupt,
    spawned,
)
from bench.relay_rounds import (
    TARGET_ADDED_P99_MS,
    BenchConfig,
    LatencyStats,
    RoundResult,
    direct_round,
    gateway_round,
    paced_direct,
    paced_gateway,
    pipeline_us,
)

TARGET_THROUGHPUT_RATIO = 0.9  # gateway tokens/s >= 0.9 x direct
TARGET_IDLE_SESSION_KIB = 40.0  # RSS per idle WebSocket session

MEMORY_PHASE_TIMEOUT = 300.0
WARMUP_SESSIONS = 50
SETTLE_SECONDS = 2.0

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# Phase 1: throughput
# ------------------------------------------------------------------------------------------------


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
    gateway_cpu = CpuUse.total(r.cpu for r in gateway)
    gateway_frames = sum(r.frames for r in gateway)
    gateway_tokens = cfg.sessions * cfg.tokens * len(gateway)
    return ThroughputResult(
        sessions=cfg.sessions,
        tokens=cfg.tokens,
        rounds=rounds,
        direct_median=direct_median,
        gateway_median=gateway_median,
        ratio=gateway_median / direct_median,
        direct_cpu=CpuUse.total(r.cpu for r in direct),
        gateway_cpu=gateway_cpu,
        gateway_cpu_us_per_token=gateway_cpu.gateway_s / gateway_tokens * 1e6,
        gateway_frames=gateway_frames,
        gateway_tokens=gateway_tokens,
        tokens_per_frame=gateway_tokens / gateway_frames if gateway_frames else math.nan,
        pair_ratios=[g.tokens_per_s / d.tokens_per_s for d, g in zip(direct, gateway, strict=True)],
        pipeline_us_per_token_direct=pipeline_us(direct, cfg),
        pipeline_us_per_token_gateway=pipeline_us(gateway, cfg),
        profile=profile_summary(profile_path),
    )


# ------------------------------------------------------------------------------------------------
# Phase 2: latency at a paced load
# ------------------------------------------------------------------------------------------------


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
        profile=profile_summary(profile_path),
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
            *environment_lines(f"trio-gateway relay benchmark ({self.mode}): ", env),
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

        return run_trio([runtime, gateway], body)


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
    environment = run_environment(
        fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0], profiled=profile_dir is not None
    )
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
    finish_environment(environment)
    return Report(mode, cfg, environment, throughput, latency, memory)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table; 0 unless the benchmark failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    add_json_option(parser)
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

    sigterm_as_interrupt()
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
        return failure_status("relay_bench", error)
    print(report.render(), flush=True)
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
        print(f"\nfigures written to {args.json}")
    return 0


def _main_memory_only(cfg: BenchConfig, json_path: Path | None) -> int:
    try:
        memory = run_memory_only(cfg)
    except BaseException as error:
        return failure_status("relay_bench", error)
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
