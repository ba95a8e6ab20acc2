"""Load: thousands of concurrent sessions streaming turns through one gateway process.

Run ``python bench/load.py`` (2000 sessions for 180 s) or ``--quick`` (200 sessions for 20 s);
``--sessions``, ``--duration``, ``--tokens`` and ``--rate`` change the shape. The demo runtime
and the gateway run as child processes on free loopback ports (``bench/harness.py``); this
process drives every WebSocket under trio.

Each session opens its WebSocket (100 handshakes at a time), then until the duration is over:
sends ``bench T R`` (``T`` tokens paced at ``R`` tokens/s on the runtime's clock, each stamped
with the runtime's ``time.time_ns()``), reads frames until ``is_final``, checks that the
concatenated text is *exactly* ``t0 t1 ... t{T-1}`` and that ``seq`` never skips, and waits a
random think time (0-2 s). Session starts are spread over the first few seconds.

Figures: turns and tokens relayed (every one checked), time to first token (client send to the
first token frame's arrival, both on this process's ``time.time_ns()``; the runtime emits a
``bench`` turn's first token at once) p50/p99, relay latency (client receipt minus the
runtime's emit stamp; a coalesced frame counts once, with its first token's stamp) p50/p99/max,
gateway CPU (% of one core) and RSS sampled every second from ``/proc``, the share of time the
gateway and the runtime were runnable but waiting for a CPU (``/proc/<pid>/schedstat``: CPU %
is what a process *got*, not what it needed), the open sessions and sockets the gateway
reports, the offered load, and this client's own CPU (on a 2-core machine the client and
runtime share the cores with the gateway: read the latency as "under this total load").

Exit status 0 when every turn arrived exact and nothing failed; 1 otherwise.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio_websocket

if __package__ in (None, ""):  # run as a script: make ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import SocketGroup, TurnResult, expected_text, gateway_turn
from bench.harness import (
    BenchError,
    Sampler,
    Services,
    add_json_option,
    gateway_metrics,
    percentile,
    raise_fd_limit,
    running_fleet,
    self_cpu_seconds,
    table,
    write_json,
)

TURN_TIMEOUT_MARGIN = 60.0  # seconds a turn may take beyond its nominal length


@dataclass
class TimedTurn(TurnResult):
    """A turn that also notes when its first frame arrived."""

    first_frame_ns: int | None = None

    def absorb(self, chunk: Any, received_ns: int) -> bool:
        """Note the first frame's arrival, then account the chunk as usual."""
        if self.first_frame_ns is None:
            self.first_frame_ns = received_ns
        return super().absorb(chunk, received_ns)


@dataclass
class LoadConfig:
    """The shape of one load run."""

    sessions: int = 2000
    duration: float = 180.0
    tokens: int = 10  # per turn
    rate: float = 2.0  # tokens/s within a turn
    think: float = 2.0  # max seconds between turns (uniform 0..think)
    ramp: float = 10.0  # seconds over which session starts are spread

    def offered_tokens_per_second(self) -> float:
        """Tokens/s the sessions ask for when every turn streams on time: each session
        alternates a turn of ``tokens / rate`` seconds and a mean think of ``think / 2``."""
        return self.sessions * self.tokens / (self.tokens / self.rate + self.think / 2)

    @classmethod
    def quick(cls) -> LoadConfig:
        """About 20 s with 200 sessions."""
        return cls(sessions=200, duration=20.0, ramp=3.0)


@dataclass
class LoadResult:
    """What the clients and the samplers saw."""

    cfg: LoadConfig
    turns: int = 0
    tokens: int = 0
    frames: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    first_token_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    connect_s: float = 0.0
    client_cpu_s: float = 0.0
    gateway: dict[str, float] = field(default_factory=dict)
    runtime: dict[str, float] = field(default_factory=dict)
    peak_websockets: float = 0.0
    peak_sessions: float = 0.0
    after: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every turn exact, nothing failed, at least one turn per session."""
        return not self.failures and self.turns >= self.cfg.sessions

    def render(self) -> str:
        """The figure table."""
        cfg, lat, gw, rt = self.cfg, self.latencies_ms, self.gateway, self.runtime
        frames = max(1, self.frames)
        examples = f": {self.failures[:3]}" if self.failures else ""
        rows = [
            (
                "load",
                f"{cfg.sessions} sessions x {cfg.duration:g} s, turns of {cfg.tokens} tokens at "
                f"{cfg.rate:g} tokens/s, think 0-{cfg.think:g} s",
            ),
            ("sessions connected", f"{self.peak_websockets:.0f} sockets (peak, gateway gauge)"),
            ("connect time (all sessions)", f"{self.connect_s:.1f} s"),
            (
                "offered load (all turns on time)",
                f"{cfg.offered_tokens_per_second():.0f} tokens/s, "
                f"{cfg.offered_tokens_per_second() / cfg.tokens:.0f} turn starts/s",
            ),
            ("turns completed, text exact", f"{self.turns} ({self.turns / self.wall_s:.1f}/s)"),
            ("tokens relayed, in order", f"{self.tokens} ({self.tokens / self.wall_s:.0f}/s)"),
            (
                "frames (tokens per frame)",
                f"{self.frames} ({self.tokens / frames:.2f})",
            ),
            (
                "failures",
                f"{len(self.failures)}{examples}",
            ),
            (
                "time to first token p50 / p99 / max",
                f"{percentile(self.first_token_ms, 50):.1f} / "
                f"{percentile(self.first_token_ms, 99):.1f} / "
                f"{max(self.first_token_ms, default=float('nan')):.1f} ms",
            ),
            (
                "relay latency p50 / p99 / max",
                f"{percentile(lat, 50):.1f} / {percentile(lat, 99):.1f} / "
                f"{max(lat, default=float('nan')):.1f} ms",
            ),
            (
                "gateway CPU mean / peak (1 s samples)",
                f"{gw.get('cpu_mean_pct', 0):.0f}% / {gw.get('cpu_peak_pct', 0):.0f}% of a core",
            ),
            (
                "gateway RSS first / peak / last",
                f"{gw.get('rss_first_mib', 0):.0f} / {gw.get('rss_peak_mib', 0):.0f} / "
                f"{gw.get('rss_last_mib', 0):.0f} MiB",
            ),
            ("gateway open fds peak", f"{gw.get('fds_peak', 0):.0f}"),
            (
                "gateway waiting for a CPU (run queue)",
                f"{gw.get('cpu_wait_pct', 0):.0f}% of the time",
            ),
            ("runtime CPU mean", f"{rt.get('cpu_mean_pct', 0):.0f}% of a core"),
            (
                "runtime waiting for a CPU (run queue)",
                f"{rt.get('cpu_wait_pct', 0):.0f}% of the time",
            ),
            ("client CPU mean", f"{100 * self.client_cpu_s / self.wall_s:.0f}% of a core"),
            (
                "after close: sockets / sessions",
                f"{self.after.get('gateway_active_websockets', -1):.0f} / "
                f"{self.after.get('gateway_active_sessions', -1):.0f}",
            ),
            ("verdict", "PASS" if self.ok else "FAIL"),
        ]
        return table(rows)


async def _session_loop(
    ws: trio_websocket.WebSocketConnection,
    index: int,
    cfg: LoadConfig,
    deadline: float,
    result: LoadResult,
) -> None:
    """Turns back to back (with think time) until ``deadline`` (trio clock)."""
    rng = random.Random(index)
    await trio.sleep(rng.uniform(0, cfg.ramp))
    expected = expected_text(cfg.tokens)
    content = f"bench {cfg.tokens} {cfg.rate:g}"
    turn_timeout = cfg.tokens / cfg.rate + TURN_TIMEOUT_MARGIN
    while trio.current_time() < deadline:
        turn = TimedTurn(measure_latency=True)
        sent_ns = time.time_ns()
        try:
            with trio.fail_after(turn_timeout):
                await gateway_turn(ws, content, turn)
            turn.verify(expected, f"session {index} turn {result.turns}")
        except (BenchError, trio.TooSlowError, trio_websocket.ConnectionClosed) as error:
            result.failures.append(f"session {index}: {type(error).__name__}: {error}")
            return
        result.turns += 1
        result.tokens += cfg.tokens
        result.frames += turn.frames
        result.latencies_ms.extend(ns / 1e6 for ns in turn.latencies_ns)
        if turn.first_frame_ns is not None:
            result.first_token_ms.append((turn.first_frame_ns - sent_ns) / 1e6)
        await trio.sleep(rng.uniform(0, cfg.think))


async def _watch_gauges(services: Services, result: LoadResult) -> None:
    """Peak open sockets and sessions the gateway reports (every 2 s)."""
    while True:
        try:
            values = await gateway_metrics(services)
        except Exception:
            values = {}
        result.peak_websockets = max(
            result.peak_websockets, values.get("gateway_active_websockets", 0)
        )
        result.peak_sessions = max(result.peak_sessions, values.get("gateway_active_sessions", 0))
        await trio.sleep(2)


async def run_load(services: Services, cfg: LoadConfig) -> LoadResult:
    """Drive the load against running services and collect the figures."""
    await services.runtime.wait_healthy()
    await services.gateway.wait_healthy()
    result = LoadResult(cfg)
    gateway_sampler = Sampler(services.gateway.pid)
    runtime_sampler = Sampler(services.runtime.pid)
    cpu_before = self_cpu_seconds()
    async with trio.open_nursery() as watchers:
        watchers.start_soon(gateway_sampler.run)
        watchers.start_soon(runtime_sampler.run)
        watchers.start_soon(_watch_gauges, services, result)
        async with trio.open_nursery() as nursery:
            group = SocketGroup(nursery, services)
            started = time.perf_counter()
            sockets = await group.open([f"load-{index}" for index in range(cfg.sessions)])
            result.connect_s = time.perf_counter() - started
            if len(sockets) != cfg.sessions:
                raise BenchError(f"only {len(sockets)} of {cfg.sessions} sessions connected")
            started = time.perf_counter()
            deadline = trio.current_time() + cfg.duration
            async with trio.open_nursery() as sessions:
                for index, ws in enumerate(sockets):
                    sessions.start_soon(_session_loop, ws, index, cfg, deadline, result)
            result.wall_s = time.perf_counter() - started
            group.close_all()
        watchers.cancel_scope.cancel()
    result.client_cpu_s = self_cpu_seconds() - cpu_before
    result.gateway = gateway_sampler.summary()
    result.runtime = runtime_sampler.summary()
    with trio.move_on_after(15):  # closed sockets leave the gateway's gauges promptly
        while True:
            result.after = await gateway_metrics(services)
            if not result.after.get("gateway_active_websockets"):
                break
            await trio.sleep(0.5)
    return result


def load_settings(cfg: LoadConfig) -> dict[str, str]:
    """Gateway settings for a load run: room for every session, default everything else."""
    return {"max_connections": str(cfg.sessions + 100), "session_grace_seconds": "2"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load and print the figures; 0 when every turn arrived exact."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 sessions for 20 s")
    parser.add_argument("--sessions", type=int)
    parser.add_argument("--duration", type=float, help="seconds of load")
    parser.add_argument("--tokens", type=int, help="tokens per turn")
    parser.add_argument("--rate", type=float, help="tokens/s within a turn")
    parser.add_argument("--think", type=float, help="max seconds between turns")
    parser.add_argument("--ramp", type=float, help="seconds over which sessions start")
    add_json_option(parser)
    args = parser.parse_args(argv)
    cfg = LoadConfig.quick() if args.quick else LoadConfig()
    for name in ("sessions", "duration", "tokens", "rate", "think", "ramp"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    fd_limit = raise_fd_limit()
    needed = 2 * cfg.sessions + 512  # this process holds one socket per session
    if fd_limit < needed:
        print(f"load: RLIMIT_NOFILE is {fd_limit}, {needed} needed", file=sys.stderr)
        return 1
    print(
        f"load: {cfg.sessions} sessions for {cfg.duration:g} s "
        f"(fd limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})",
        file=sys.stderr,
        flush=True,
    )
    with running_fleet(load_settings(cfg)) as services:
        result = trio.run(run_load, services, cfg)
    print(result.render(), flush=True)
    write_json(args.json, result, ok=result.ok)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
