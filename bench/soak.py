"""Soak: sessions connect, chat and disconnect at random (some abruptly) for a long time; after
the load stops, the gateway must be back where it started.

Run ``python bench/soak.py`` (one hour) or ``--duration SECONDS``; ``--workers`` sets how many
clients run at once (default 100). The demo runtime and the gateway run as child processes on
free loopback ports (``bench/harness.py``). Each worker loops, picking at random:

* **chat** (60%): a WebSocket session, 1-3 turns of ``bench 5 20``, each checked exact, close;
* **leave mid-turn** (15%): start a long turn, read one frame, close normally;
* **reset mid-turn** (10%) / **FIN mid-turn** (5%): start a long turn on a raw socket, read
  once, vanish with a TCP reset / a plain FIN and no close frame;
* **idle vanish** (5%): connect, vanish without a word (reset);
* **half a frame** (5%): connect, send half a text frame, close.

Checks, after the load stops and a settle period (``SETTLE`` seconds at most):

* open file descriptors of the gateway back to the idle baseline taken before any load, within
  ``FD_SLACK`` (2: a listener's accept backlog and the logging handler may hold one each);
* the gateway's gauges ``gateway_active_websockets`` and ``gateway_active_sessions`` back to 0,
  and ``gateway_trio_tasks`` back to its idle baseline (exactly);
* no memory leak: CPython keeps freed memory in its arenas, so the first minutes of load raise
  the RSS floor once, to a high-water mark set by how much is live at once; a leak keeps raising
  it. The RSS after the soak passes when it is within max(16 MiB, 20%) of the RSS measured idle
  after a warm-up that ran the same mix, *or* when it grew by at most max(4 MiB, 5%) over the
  second half of the soak (the mark was reached in the first half and stayed: a leak of even
  ~50 bytes per session would add more than that over the second half of an hour). It may never
  exceed twice the warm RSS.

Prints a figure table (sessions per kind, turns checked, failures, fds/RSS/tasks before, peak,
after) and exits 0 when every check held.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import trio
import trio_websocket

if __package__ in (None, ""):  # run as a script: make ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import TurnResult, expected_text, gateway_turn
from bench.harness import (
    BenchError,
    Sampler,
    Services,
    add_json_option,
    gateway_metrics,
    open_fds,
    raise_fd_limit,
    rss_kib,
    running_fleet,
    runtime_streams,
    table,
    write_json,
)
from tests.support.rawws import RawWebSocket

FD_SLACK = 2
RSS_TOLERANCE_MIB = 16.0
RSS_TOLERANCE_FRACTION = 0.20
SECOND_HALF_SLACK_MIB = 4.0
SECOND_HALF_SLACK_FRACTION = 0.05
RSS_CEILING_FACTOR = 2.0
SETTLE = 30.0  # seconds allowed for everything to return to baseline
KINDS = {
    "chat": 60,
    "leave-mid-turn": 15,
    "reset-mid-turn": 10,
    "fin-mid-turn": 5,
    "idle-vanish": 5,
    "half-frame": 5,
}
CHAT_TURN = "bench 5 20"
LONG_TURN = "bench 100000 10"
HALF_FRAME = bytes([0x81, 0x80 | 125]) + b"\x01\x02\x03\x04" + b"0123456789"
STEP_TIMEOUT = 30.0


@dataclass
class SoakConfig:
    """Shape of one soak run."""

    duration: float = 3600.0
    workers: int = 100
    warmup: float = 0.0  # 0: 10% of the duration, between 3 and 60 s

    @property
    def warmup_s(self) -> float:
        """Seconds of warm-up load before the RSS baseline."""
        return self.warmup or min(60.0, max(3.0, self.duration / 10))


@dataclass
class Snapshot:
    """The gateway's state at one moment."""

    fds: int
    rss_mib: float
    tasks: float
    websockets: float
    sessions: float

    def row(self) -> str:
        """One cell of the figure table."""
        return (
            f"fds {self.fds}, RSS {self.rss_mib:.1f} MiB, tasks {self.tasks:.0f}, "
            f"sockets {self.websockets:.0f}, sessions {self.sessions:.0f}"
        )


@dataclass
class SoakResult:
    """Figures of one soak run."""

    cfg: SoakConfig
    kinds: Counter[str] = field(default_factory=Counter)
    turns: int = 0
    failures: list[str] = field(default_factory=list)
    # trio-websocket 0.12 answers a server ping after it sent its own close frame; wsproto
    # refuses (LocalProtocolError) and open_websocket re-raises it as a stray Cancelled. A
    # client-library bug (RFC 6455 lets the server ping until it sends its close), counted.
    client_library_errors: int = 0
    idle: Snapshot | None = None  # before any load
    warm: Snapshot | None = None  # idle again after the warm-up
    after: Snapshot | None = None  # idle after the soak and the settle
    settle_s: float = 0.0
    gateway: dict[str, float] = field(default_factory=dict)
    # Gateway RSS (MiB) at each tenth of the soak: a leak climbs steadily, the allocator's
    # high-water mark climbs early and then stays.
    rss_trajectory: list[float] = field(default_factory=list)
    runtime_active_after: int = -1

    @property
    def rss_limit_mib(self) -> float:
        """The RSS the gateway may have after the soak."""
        assert self.warm is not None
        return self.warm.rss_mib + max(
            RSS_TOLERANCE_MIB, RSS_TOLERANCE_FRACTION * self.warm.rss_mib
        )

    @property
    def second_half_growth_mib(self) -> float | None:
        """RSS after the soak minus RSS half-way through it (None without a trajectory)."""
        if self.after is None or len(self.rss_trajectory) < 2:
            return None
        return self.after.rss_mib - self.rss_trajectory[len(self.rss_trajectory) // 2]

    def rss_problem(self) -> str | None:
        """Why the RSS after the soak looks like a leak (None: it does not)."""
        assert self.warm is not None and self.after is not None
        rss = self.after.rss_mib
        if rss > RSS_CEILING_FACTOR * self.warm.rss_mib:
            return f"RSS {rss:.1f} MiB > {RSS_CEILING_FACTOR:g} x the warm {self.warm.rss_mib:.1f}"
        if rss <= self.rss_limit_mib:
            return None
        growth = self.second_half_growth_mib
        if growth is not None:
            half = self.rss_trajectory[len(self.rss_trajectory) // 2]
            slack = max(SECOND_HALF_SLACK_MIB, SECOND_HALF_SLACK_FRACTION * half)
            if growth <= slack:
                return None  # a high-water mark reached in the first half, flat since
            return (
                f"RSS {rss:.1f} MiB > {self.rss_limit_mib:.1f} MiB and still rising: "
                f"+{growth:.1f} MiB over the second half (> {slack:.1f})"
            )
        return f"RSS {rss:.1f} MiB > {self.rss_limit_mib:.1f} MiB"

    def problems(self) -> list[str]:
        """Every check that failed (empty: PASS)."""
        if self.idle is None or self.warm is None or self.after is None:
            return ["the run did not complete"]
        found = [f"client failures: {self.failures[:3]}"] if self.failures else []
        if abs(self.after.fds - self.idle.fds) > FD_SLACK:
            found.append(f"fds {self.after.fds} vs baseline {self.idle.fds}")
        if self.after.websockets or self.after.sessions:
            found.append(
                f"left open: {self.after.websockets} sockets, {self.after.sessions} sessions"
            )
        if self.after.tasks != self.idle.tasks:
            found.append(f"tasks {self.after.tasks:.0f} vs baseline {self.idle.tasks:.0f}")
        rss_problem = self.rss_problem()
        if rss_problem is not None:
            found.append(rss_problem)
        if self.runtime_active_after != 0:
            found.append(f"{self.runtime_active_after} stream(s) still open at the runtime")
        return found

    def render(self) -> str:
        """The figure table."""
        gw = self.gateway
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.kinds.items()))
        rows = [
            ("soak", f"{self.cfg.duration:g} s, {self.cfg.workers} concurrent clients"),
            ("sessions by kind", f"{sum(self.kinds.values())} ({kinds})"),
            ("turns checked exact", f"{self.turns}"),
            ("client failures", f"{len(self.failures)}"),
            (
                "client library errors",
                f"{self.client_library_errors} (trio-websocket: pong after close)",
            ),
            ("idle before any load", self.idle.row() if self.idle else "-"),
            ("idle after the warm-up", self.warm.row() if self.warm else "-"),
            (
                "during the soak (peak)",
                f"fds {gw.get('fds_peak', 0):.0f}, RSS {gw.get('rss_peak_mib', 0):.1f} MiB, "
                f"CPU mean {gw.get('cpu_mean_pct', 0):.0f}% of a core",
            ),
            (
                "RSS at each tenth of the soak",
                " ".join(f"{mib:.1f}" for mib in self.rss_trajectory) + " MiB",
            ),
            ("idle after the soak", self.after.row() if self.after else "-"),
            ("settled after", f"{self.settle_s:.1f} s"),
            (
                "RSS growth over the second half",
                "-"
                if self.second_half_growth_mib is None
                else f"{self.second_half_growth_mib:+.1f} MiB",
            ),
            (
                "limits",
                f"fds baseline +/- {FD_SLACK}, tasks exact, RSS <= {self.rss_limit_mib:.1f} MiB "
                f"or flat (+<= max({SECOND_HALF_SLACK_MIB:g} MiB, "
                f"{SECOND_HALF_SLACK_FRACTION:.0%})) over the second half, and always <= "
                f"{RSS_CEILING_FACTOR:g} x warm"
                if self.warm
                else "-",
            ),
            ("runtime streams open after", f"{self.runtime_active_after}"),
            ("verdict", "PASS" if not self.problems() else f"FAIL: {self.problems()}"),
        ]
        return table(rows)


async def snapshot(services: Services) -> Snapshot:
    """The gateway's fds, RSS and self-reported gauges now."""
    values = await gateway_metrics(services)
    pid = services.gateway.pid
    return Snapshot(
        fds=open_fds(pid),
        rss_mib=rss_kib(pid) / 1024,
        tasks=values.get("gateway_trio_tasks", -1),
        websockets=values.get("gateway_active_websockets", -1),
        sessions=values.get("gateway_active_sessions", -1),
    )


async def _chat(
    services: Services, session_id: str, rng: random.Random, result: SoakResult
) -> None:
    async with trio_websocket.open_websocket_url(services.ws_url(session_id)) as ws:
        for _ in range(rng.randint(1, 3)):
            turn = TurnResult()
            await gateway_turn(ws, CHAT_TURN, turn)
            turn.verify(expected_text(5), session_id)
            result.turns += 1


async def _leave_mid_turn(services: Services, session_id: str) -> None:
    async with trio_websocket.open_websocket_url(services.ws_url(session_id)) as ws:
        message = {"type": "user_message", "content": LONG_TURN}
        await ws.send_message(orjson.dumps(message).decode())
        await ws.get_message()


async def _raw(services: Services, session_id: str, kind: str) -> None:
    port = int(services.gateway.url.rsplit(":", 1)[1])
    client = await RawWebSocket.connect(port, f"/api/v1/ws/{session_id}")
    if kind == "half-frame":
        await client.stream.send_all(HALF_FRAME)
        await client.vanish(reset=False)
        return
    if kind != "idle-vanish":
        await client.send_json({"type": "user_message", "content": LONG_TURN})
        await client.read_some()
    await client.vanish(reset=kind != "fin-mid-turn")


async def _step(
    services: Services, session_id: str, kind: str, rng: random.Random, result: SoakResult
) -> None:
    if kind == "chat":
        await _chat(services, session_id, rng, result)
    elif kind == "leave-mid-turn":
        await _leave_mid_turn(services, session_id)
    else:
        await _raw(services, session_id, kind)


async def _worker(
    services: Services, index: int, deadline: float, result: SoakResult, seed: int
) -> None:
    rng = random.Random(seed * 100_003 + index)
    kinds, weights = zip(*KINDS.items(), strict=True)
    serial = 0
    while trio.current_time() < deadline:
        kind = rng.choices(kinds, weights)[0]
        serial += 1
        session_id = f"soak-{seed}-{index}-{serial}"
        result.kinds[kind] += 1
        try:
            with trio.fail_after(STEP_TIMEOUT):
                # Its own nursery: the stray Cancelled trio-websocket can raise (see
                # client_library_errors) then ends this session only, not every worker.
                async with trio.open_nursery() as step:
                    step.start_soon(_step, services, session_id, kind, rng, result)
                if step.cancel_scope.cancelled_caught:
                    result.client_library_errors += 1
        except* (BenchError, OSError, trio.TooSlowError, trio_websocket.HandshakeError) as group:
            result.failures.append(f"{kind} {session_id}: {group.exceptions[0]!r}")
        except* trio_websocket.ConnectionClosed as group:
            result.failures.append(f"{kind} {session_id}: closed {group.exceptions[0]!r}")
        except* Exception as group:
            # Anything else a client hits is a failure of that session, never the end of the
            # soak: one escaping error used to cancel every worker and end the load phase
            # early while the summary still claimed the full duration.
            result.failures.append(f"{kind} {session_id}: {group.exceptions[0]!r}")
        await trio.sleep(rng.uniform(0, 0.5))


async def _load(
    services: Services, cfg: SoakConfig, seconds: float, result: SoakResult, seed: int
) -> None:
    deadline = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for index in range(cfg.workers):
            nursery.start_soon(_worker, services, index, deadline, result, seed)
    short = deadline - trio.current_time()
    if short > 1:  # the figures must cover the duration they claim
        result.failures.append(f"load phase ended {short:.1f} s before its {seconds:g} s")


async def _settled(services: Services, baseline: Snapshot) -> tuple[Snapshot, float]:
    """Wait (at most ``SETTLE`` s) until fds, gauges and tasks are back; the last snapshot."""
    started = time.perf_counter()
    current = await snapshot(services)
    with trio.move_on_after(SETTLE):
        while not (
            abs(current.fds - baseline.fds) <= FD_SLACK
            and current.websockets == 0
            and current.sessions == 0
            and current.tasks == baseline.tasks
        ):
            await trio.sleep(0.5)
            current = await snapshot(services)
    return current, time.perf_counter() - started


async def run_soak(services: Services, cfg: SoakConfig) -> SoakResult:
    """Warm up, take the baselines, soak, settle, compare."""
    await services.runtime.wait_healthy()
    await services.gateway.wait_healthy()
    result = SoakResult(cfg)
    await trio.sleep(1)
    result.idle = await snapshot(services)
    await _load(services, cfg, cfg.warmup_s, result, seed=0)
    result.warm, _ = await _settled(services, result.idle)
    sampler = Sampler(services.gateway.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run)
        await _load(services, cfg, cfg.duration, result, seed=1)
        nursery.cancel_scope.cancel()
    result.gateway = sampler.summary()
    step = max(1, len(sampler.samples) // 10)
    result.rss_trajectory = [sample.rss_kib / 1024 for sample in sampler.samples[::step]]
    result.after, result.settle_s = await _settled(services, result.idle)
    result.runtime_active_after = (await runtime_streams(services))["active"]
    return result


def soak_settings(cfg: SoakConfig) -> dict[str, str]:
    """Short grace and heartbeat so that abandoned sessions and ping tasks end quickly."""
    return {
        "session_grace_seconds": "1",
        "ws_heartbeat_interval": "2",
        "ws_close_timeout": "1",
        "max_connections": str(4 * cfg.workers + 100),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak and print the figures; 0 when the gateway came back to its baseline."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=SoakConfig.duration)
    parser.add_argument("--workers", type=int, default=SoakConfig.workers)
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds (0: automatic)")
    add_json_option(parser)
    args = parser.parse_args(argv)
    cfg = SoakConfig(args.duration, args.workers, args.warmup)
    raise_fd_limit()
    print(f"soak: {cfg.duration:g} s, {cfg.workers} workers", file=sys.stderr, flush=True)
    with running_fleet(soak_settings(cfg)) as services:
        result = trio.run(run_soak, services, cfg)
    print(result.render(), flush=True)
    write_json(args.json, result, problems=result.problems())
    return 0 if not result.problems() else 1


if __name__ == "__main__":
    sys.exit(main())
