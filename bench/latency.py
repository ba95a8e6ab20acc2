"""Added latency at a paced, uncoalescable load, gateway against direct in the same run.

Run ``python bench/latency.py`` (100 sessions x 20 tokens/s, 3 rounds of 10 s per path, about
two minutes) or ``--sessions 10 --rounds 1 --seconds 2`` for a smoke run; ``--compression``
picks the gateway(s): ``off`` (the default setting, never negotiates permessage-deflate),
``on``, or ``both`` (two gateways, one per setting, on the same runtime). ``--json FILE`` also
writes the figures.

What it measures
----------------
One demo runtime (``trio-gateway demo-runtime --instant``; the ``bench N R`` pace is honoured
even in instant mode) and one gateway per compression setting (``trio-gateway serve``, per-user
caps lifted, JWT off) run as child processes on free loopback ports. Every session streams
``bench R*D R``: ``R`` tokens/s for ``D`` seconds on the runtime's absolute schedule, each chunk
carrying its own ``metadata.emitted_ns`` (``time.time_ns()`` when the runtime sent it), so the
gateway can never merge two tokens into one frame (the report counts frames that carried more
than one token: 0 expected). Latency = ``time.time_ns()`` when the client's network read that
carried the frame (or, direct, the SSE event) returned, minus ``emitted_ns`` (same host, same
clock).

* **direct**: an httpx client reads each turn's SSE stream straight from the runtime (pool
  warmed with one ``bench 1`` turn per connection).
* **gateway**: raw wsproto clients that *offer permessage-deflate*, as browsers, VS Code and
  most client libraries do (trio-websocket does not offer it, so it is not used here), send the
  IDE's 15-key ``user_message`` frames, and read each turn to its final frame, checking ``seq``.
  The sockets are opened once and warmed with one ``bench 1`` turn each.

The paths take turns in rounds (direct, gateway(s), direct, ...), each round the full paced
load for ``D`` seconds with the session starts spread evenly over one token interval, so the
shared machine's drift hits every path alike; samples are pooled per path over the rounds.
Added latency = the gateway path's percentile minus the direct path's, over the same rounds.
Every turn's text is checked exact. Gateway CPU per frame is the gateway's
``/proc/<pid>/task/*/schedstat`` time over its rounds divided by the frames received.

Exit status: 0 when the measurement completed (target met or not), 1 when it failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

if __package__ in (None, ""):  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import (
    LiveClient,
    TurnResult,
    direct_client,
    direct_turn,
    expected_text,
    live_clients,
    warm_direct_pool,
)
from bench.harness import (
    UNLIMITED_USER,
    BenchError,
    Child,
    Services,
    add_json_option,
    child_env,
    hottest_functions,
    loadavg,
    profiled,
    raise_fd_limit,
    sched_ns,
    spawned,
)
from bench.relay_rounds import TARGET_ADDED_P99_MS
from bench.stats import sorted_percentile

TURN_TIMEOUT_MARGIN = 120.0  # seconds a paced round may take beyond its nominal length


@dataclass
class PathFigures:
    """What one path saw over all its rounds."""

    name: str
    latencies_ns: list[int] = field(default_factory=list)
    frames: int = 0
    multi_token_frames: int = 0
    wall_ns: int = 0  # summed over this path's rounds
    # process -> [ns on a CPU, ns runnable but waiting for one] over this path's rounds
    sched: dict[str, list[int]] = field(default_factory=dict)
    deflate: bool | None = None  # gateway paths: negotiated with every client

    def absorb(self, results: Sequence[TurnResult]) -> None:
        """Pool one round's turns."""
        for result in results:
            self.latencies_ns.extend(result.latencies_ns)
            self.frames += result.frames
            self.multi_token_frames += result.multi_token_frames

    def pct_ms(self, pct: float) -> float:
        """The ``pct`` percentile of the pooled latencies, in ms."""
        return sorted_percentile(sorted(self.latencies_ns), pct) / 1e6

    def summary(self) -> dict[str, Any]:
        """The figures as plain values."""
        return {
            "samples": len(self.latencies_ns),
            "p50_ms": self.pct_ms(50),
            "p99_ms": self.pct_ms(99),
            "max_ms": max(self.latencies_ns) / 1e6,
            "frames": self.frames,
            "multi_token_frames": self.multi_token_frames,
            "gateway_us_per_frame": self.sched.get("gateway", [0, 0])[0]
            / 1e3
            / max(1, self.frames),
            "runtime_us_per_event": self.sched["runtime"][0] / 1e3 / max(1, self.frames),
            "client_us_per_frame": self.sched["client"][0] / 1e3 / max(1, self.frames),
            "cores_busy": {name: run / self.wall_ns for name, (run, _) in self.sched.items()},
            "waiting_for_cpu": {
                name: wait / self.wall_ns for name, (_, wait) in self.sched.items()
            },
            "deflate_negotiated": self.deflate,
        }


@contextlib.contextmanager
def scheduled(figures: PathFigures, **pids: int) -> Iterator[None]:
    """Add each process's CPU and run-queue wait over the block (and the wall time) to
    ``figures``: CPU time is what a process got, the wait shows what it needed on top."""
    start = {name: sched_ns(pid) for name, pid in pids.items()}
    wall_start = time.perf_counter_ns()
    yield
    figures.wall_ns += time.perf_counter_ns() - wall_start
    for name, pid in pids.items():
        run, wait = sched_ns(pid)
        total = figures.sched.setdefault(name, [0, 0])
        total[0] += run - start[name][0]
        total[1] += wait - start[name][1]


async def _spread(index: int, sessions: int, rate: int) -> None:
    # Session starts evenly over one token interval: a smooth load, not every session's token
    # in lock-step every 1/R seconds.
    await trio.sleep(index / (sessions * rate))


@dataclass
class Bench:
    """The children and the sizes of one run."""

    runtime: Child
    gateways: dict[str, Child]
    internal_key: str
    sessions: int
    rate: int
    seconds: int
    rounds: int
    profile: Path | None = None  # py-spy raw profile of the first gateway, written here

    @property
    def content(self) -> str:
        """The paced turn every session sends."""
        return f"bench {self.rate * self.seconds} {self.rate}"

    async def round_direct(self, client: httpx.AsyncClient, figures: PathFigures) -> None:
        """One paced round straight from the runtime."""
        results = [TurnResult(measure_latency=True) for _ in range(self.sessions)]
        tag = secrets.token_hex(3)

        async def one(index: int) -> None:
            await _spread(index, self.sessions, self.rate)
            await direct_turn(client, f"direct-{tag}-{index}", self.content, results[index])

        with scheduled(figures, runtime=self.runtime.pid, client=os.getpid()):
            async with trio.open_nursery() as nursery:
                for index in range(self.sessions):
                    nursery.start_soon(one, index)
        self._verify(results, "direct")
        figures.absorb(results)

    async def round_gateway(
        self, name: str, clients: Sequence[LiveClient], figures: PathFigures
    ) -> None:
        """One paced round through gateway ``name``."""
        results = [TurnResult(measure_latency=True) for _ in range(self.sessions)]

        async def one(index: int, client: LiveClient) -> None:
            await _spread(index, self.sessions, self.rate)
            await client.turn(self.content, results[index])

        pids = {"gateway": self.gateways[name].pid, "runtime": self.runtime.pid}
        with scheduled(figures, **pids, client=os.getpid()):
            async with trio.open_nursery() as nursery:
                for index, client in enumerate(clients):
                    nursery.start_soon(one, index, client)
        self._verify(results, name)
        figures.absorb(results)

    def _verify(self, results: Sequence[TurnResult], where: str) -> None:
        expected = expected_text(self.rate * self.seconds)
        for index, result in enumerate(results):
            result.verify(expected, f"{where} session {index}")

    async def run(self) -> dict[str, PathFigures]:
        """Open and warm every path, then the alternating rounds."""
        await self.runtime.wait_healthy()
        figures = {"direct": PathFigures("direct")}
        clients: dict[str, list[LiveClient]] = {}
        async with contextlib.AsyncExitStack() as stack:
            for name, gateway in self.gateways.items():
                await gateway.wait_healthy()
                port = int(gateway.url.rsplit(":", 1)[1])
                tag = secrets.token_hex(3)
                paths = [f"/api/v1/ws/lat-{tag}-{i}" for i in range(self.sessions)]
                clients[name] = await stack.enter_async_context(live_clients(port, paths))
                warm = [TurnResult() for _ in clients[name]]
                async with trio.open_nursery() as nursery:
                    for client, result in zip(clients[name], warm, strict=True):
                        nursery.start_soon(client.turn, "bench 1", result)
                negotiated = all(c.client.extensions for c in clients[name])
                figures[name] = PathFigures(name, deflate=negotiated)
            services = Services(self.runtime, next(iter(self.gateways.values())), self.internal_key)
            async with direct_client(services, self.sessions) as http:
                await warm_direct_pool(http, self.sessions, f"warm-{secrets.token_hex(3)}")
                limit = self.rounds * (1 + len(self.gateways)) * self.seconds
                first = next(iter(self.gateways.values()))
                with trio.fail_after(limit + TURN_TIMEOUT_MARGIN * self.rounds):
                    # py-spy drops idle samples: this profiles the first gateway's own rounds.
                    async with profiled(first.pid, self.profile):
                        for number in range(self.rounds):
                            await self.round_direct(http, figures["direct"])
                            for name in self.gateways:
                                await self.round_gateway(name, clients[name], figures[name])
                            _log(f"round {number + 1}/{self.rounds}: " + _p99s(figures))
        return figures


def _p99s(figures: dict[str, PathFigures]) -> str:
    return ", ".join(f"{name} p99 {f.pct_ms(99):.1f} ms" for name, f in figures.items())


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def render(figures: dict[str, PathFigures], args: argparse.Namespace, load: str) -> str:
    """The figure table."""
    direct = figures["direct"]
    lines = [
        f"paced load: {args.sessions} sessions x {args.rate} uncoalescable tokens/s, "
        f"{args.rounds} round(s) of {args.seconds} s per path; load average {load}",
        f"{'path':<16}{'samples':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'merged':>8}{'gw us/frame':>13}{'rt us/event':>13}  deflate",
    ]
    for name, path in figures.items():
        s = path.summary()
        gw = f"{s['gateway_us_per_frame']:.0f}" if name != "direct" else "-"
        deflate = {None: "-", True: "negotiated", False: "offered, refused"}[path.deflate]
        lines.append(
            f"{name:<16}{s['samples']:>8}{s['p50_ms']:>9.1f}{s['p99_ms']:>9.1f}"
            f"{s['max_ms']:>9.1f}{s['multi_token_frames']:>8}{gw:>13}"
            f"{s['runtime_us_per_event']:>13.0f}  {deflate}"
        )
    lines.append("CPU per process over each path's rounds: cores busy / share of the time runnable")
    lines.append(
        "but waiting for a CPU (schedstat; the wait is CPU the process needed and lacked):"
    )
    for name, path in figures.items():
        s = path.summary()
        lines.append(
            f"  {name:<14}"
            + ", ".join(
                f"{proc} {s['cores_busy'][proc]:.2f} / {100 * s['waiting_for_cpu'][proc]:.0f}%"
                for proc in s["cores_busy"]
            )
            + f"; client {s['client_us_per_frame']:.0f} us/frame"
        )
    for name, path in figures.items():
        if name == "direct":
            continue
        added99 = path.pct_ms(99) - direct.pct_ms(99)
        verdict = "met" if added99 <= TARGET_ADDED_P99_MS else "NOT met"
        lines.append(
            f"added by {name}: p50 {path.pct_ms(50) - direct.pct_ms(50):.1f} ms, "
            f"p99 {added99:.1f} ms (target <= {TARGET_ADDED_P99_MS:g} ms: {verdict})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds and print the table; 0 when the measurement completed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--rate", type=int, default=20, help="tokens/s per session")
    parser.add_argument("--seconds", type=int, default=10, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per path")
    parser.add_argument("--compression", choices=("off", "on", "both"), default="off")
    add_json_option(parser)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="record the first gateway with py-spy (raw collapsed stacks) during the rounds",
    )
    args = parser.parse_args(argv)
    raise_fd_limit()
    settings = ("off", "on") if args.compression == "both" else (args.compression,)
    key = secrets.token_urlsafe(24)
    load_start = loadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="latency-") as tmp, ExitStack() as stack:
            workdir = Path(tmp)
            runtime = stack.enter_context(
                spawned("runtime", ["demo-runtime", "--instant"], child_env(key), workdir)
            )
            gateways = {}
            for setting in settings:
                env = child_env(
                    key, agent_url=runtime.url, ws_compression=setting, **UNLIMITED_USER
                )
                name = f"gateway-{setting}"
                gateways[name] = stack.enter_context(spawned(name, ["serve"], env, workdir))
            bench = Bench(
                runtime,
                gateways,
                key,
                args.sessions,
                args.rate,
                args.seconds,
                args.rounds,
                args.profile,
            )
            figures = trio.run(bench.run)
    except BenchError as error:
        print(f"latency bench failed: {error}", file=sys.stderr)
        return 1
    load = f"{load_start} at the start, {loadavg()} at the end"
    print(render(figures, args, load), flush=True)
    if args.profile is not None and args.profile.exists():
        # py-spy counts a thread blocked in epoll_wait as active: drop those stacks, so the
        # shares are of the time the gateway computed.
        busy = args.profile.with_suffix(".busy")
        lines = args.profile.read_text().splitlines()
        busy.write_text("\n".join(x for x in lines if "EpollIOManager.get_events" not in x))
        print(f"py-spy profile of {next(iter(gateways))}, epoll waits left out ({busy}):")
        print("\n".join(hottest_functions(busy, top=15)), flush=True)
    if args.json is not None:
        plain = vars(args) | {"json": None, "profile": str(args.profile)}
        summary = {name: path.summary() for name, path in figures.items()}
        args.json.write_bytes(orjson.dumps({"args": plain, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
