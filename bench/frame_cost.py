"""Gateway CPU per uncoalescable frame: this tree's gateway against a baseline gateway, paired.

Run ``python bench/frame_cost.py`` (5 pairs, about 2 minutes) or ``--pairs 1 --seconds 3`` for a
smoke run; ``--baseline REF`` picks the git commit the baseline gateway is built from (default
``main``), ``--json FILE`` also writes the figures.

What it measures
----------------
One demo runtime (``trio-gateway demo-runtime``, this tree) serves both gateways. Each run
starts a fresh gateway (``python -m trio_gateway.cli serve``, one process, the app in it), opens
``S`` WebSocket sessions with raw wsproto clients that offer permessage-deflate (as browsers, VS
Code and most client libraries do; the gateway negotiates it only with
``GATEWAY__WS_COMPRESSION=on``, which ``--compression on`` sets for this tree's gateway; an
older baseline always did) and sends the IDE's
15-key ``user_message`` frames, nulls included. After one untimed ``bench 1`` turn per session
(warm-up: the gateway's runtime connections, the interpreters), every session streams
``bench N R``: N tokens at R tokens/s on the runtime's own schedule, each chunk carrying its own
``metadata`` (its emit time), so the gateway can never coalesce two tokens into one frame: one
runtime event in, one WebSocket frame out. The figure is the gateway process's CPU time over
that window (the sum of field 1, time on a CPU in ns, of ``/proc/<pid>/task/*/schedstat``,
every thread) divided by the frames the clients received.

With ``--requests N`` (default 2000; 0 skips it) each pair also times REST after the frames:
``N`` ``GET /api/v1/agents`` per gateway (proxied to the runtime), over ``--connections``
keep-alive HTTP/1.1 connections per gateway opened and warmed (one GET each) beforehand, both
gateways at once; the figure is the gateway's CPU time over that window per request.

Each pair runs the baseline gateway and this tree's gateway side by side, in the same timed
window, each with its own ``S`` sessions on the same runtime: whatever else the shared machine
does at that moment (other processes, frequency changes) hits both alike. Measured one after
the other instead, the runtime's own CPU per event (same code in both runs) moved by +-20%
between runs, which buried a difference of a few percent. The report gives each pair's figures
and ratio and the medians; absolute microseconds depend on the machine and its load, the ratio
within a pair is the steadier figure. The baseline gateway runs the baseline commit's
``trio_gateway`` package (``git archive`` into a temporary directory, first on ``PYTHONPATH``)
with the same settings.

The floor: unless ``--no-floor``, each pair also runs ``bench/floors.py`` in the same
window with its own ``S`` sessions: the leanest relay this stack allows (raw ASGI on hypercorn's
trio worker, the gateway's h11 pool to the runtime, SSE cut on blank lines, orjson, a ``seq``
per frame, a bounded replay deque, one text frame per event; nothing else), with the same
compression setting as this tree's gateway. The report adds its CPU per frame and the ratio
tree / floor per pair.

Exit status: 0 when the measurement completed, 1 when the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from wsproto.extensions import PerMessageDeflate

if __package__ in (None, ""):  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import RestConnection
from bench.floors import spawned_floor
from bench.harness import (
    UNLIMITED_USER,
    BenchError,
    Child,
    add_json_option,
    baseline_tree,
    child_env,
    cpu_ns,
    run_and_write_json,
    spawned,
)
from tests.support.frames import ide_frame
from tests.support.rawws import RawWebSocket

ROOT = Path(__file__).resolve().parent.parent
TURN_TIMEOUT = 120.0
REST_PATH = "/api/v1/agents"


async def read_turn(client: RawWebSocket) -> int:
    """Read frames up to the final one; return how many arrived."""
    frames = 0
    try:
        with trio.fail_after(TURN_TIMEOUT):
            while True:
                frame = await client.recv_json(TURN_TIMEOUT)
                frames += 1
                if frame.get("type") == "error":
                    raise BenchError(f"error frame: {frame}")
                if frame.get("is_final") is True:
                    return frames
    except ConnectionError as error:
        raise BenchError(f"gateway closed the socket mid-turn: {error}") from None


async def rest_window(gateways: dict[str, Child], args: argparse.Namespace) -> dict[str, float]:
    """``args.requests`` GETs per gateway, both gateways at once, on connections opened and
    warmed beforehand; each gateway's CPU seconds over the window."""
    per_connection = max(1, args.requests // args.connections)
    connections: dict[str, list[RestConnection]] = {}
    try:
        for variant, gateway in gateways.items():
            if variant == "floor":
                continue  # a relay only: no REST
            port = int(gateway.url.rsplit(":", 1)[1])
            connections[variant] = [
                await RestConnection.open(port) for _ in range(args.connections)
            ]

        async def many(connection: RestConnection, count: int) -> None:
            for _ in range(count):
                if (status := await connection.get(REST_PATH)) != 200:
                    raise BenchError(f"GET {REST_PATH} answered {status}")

        async def everywhere(count: int) -> None:
            async with trio.open_nursery() as nursery:
                for group in connections.values():
                    for connection in group:
                        nursery.start_soon(many, connection, count)

        with trio.fail_after(TURN_TIMEOUT):
            await everywhere(1)
            start = {variant: cpu_ns(gateways[variant].pid) for variant in connections}
            await everywhere(per_connection)
        return {v: (cpu_ns(g.pid) - start[v]) / 1e9 for v, g in gateways.items() if v in start}
    finally:
        for group in connections.values():
            for connection in group:
                await connection.stream.aclose()


@dataclass
class Run:
    """One timed window against one gateway."""

    variant: str
    frames: int
    gateway_cpu_s: float
    runtime_cpu_s: float
    wall_s: float
    deflate: bool
    requests: int = 0
    rest_cpu_s: float = 0.0

    @property
    def us_per_frame(self) -> float:
        return 1e6 * self.gateway_cpu_s / self.frames

    @property
    def us_per_request(self) -> float:
        return 1e6 * self.rest_cpu_s / self.requests if self.requests else float("nan")


async def open_clients(gateway: Child, count: int) -> list[RawWebSocket]:
    """``count`` sessions on ``gateway`` (distinct ids)."""
    port = int(gateway.url.rsplit(":", 1)[1])
    tag = secrets.token_hex(4)
    # One PerMessageDeflate per socket: the object holds that connection's compressor state
    # (a shared one corrupts every stream once the gateway negotiates compression).
    return [
        await RawWebSocket.connect(port, f"/api/v1/ws/{tag}-{i}", extensions=[PerMessageDeflate()])
        for i in range(count)
    ]


async def turn_all(clients: list[RawWebSocket], content: str, rate: int) -> int:
    """Send ``content`` on every session (starts spread over one token interval) and read
    every turn to its end; return the frames received."""
    counts: list[int] = []

    async def one(client: RawWebSocket, delay: float) -> None:
        await trio.sleep(delay)
        await client.send_json(ide_frame(content))
        counts.append(await read_turn(client))

    async with trio.open_nursery() as nursery:
        for index, client in enumerate(clients):
            nursery.start_soon(one, client, index / len(clients) / rate)
    return sum(counts)


async def measure(
    gateways: dict[str, Child], runtime: Child, args: argparse.Namespace
) -> list[Run]:
    """Both gateways in the same window: open the sessions, warm up, then time ``bench N R``
    on every session of both at once, so whatever else the machine does hits both alike."""
    await runtime.wait_healthy()
    clients: dict[str, list[RawWebSocket]] = {}
    try:
        for variant, gateway in gateways.items():
            await gateway.wait_healthy()
            clients[variant] = await open_clients(gateway, args.sessions)
        frames: dict[str, int] = {}

        async def all_turns(content: str) -> None:
            async def one(variant: str) -> None:
                frames[variant] = await turn_all(clients[variant], content, args.rate)

            async with trio.open_nursery() as nursery:
                for variant in gateways:
                    nursery.start_soon(one, variant)

        await all_turns("bench 1")
        start = {variant: cpu_ns(gateway.pid) for variant, gateway in gateways.items()}
        runtime_start = cpu_ns(runtime.pid)
        wall_start = trio.current_time()
        await all_turns(f"bench {args.rate * args.seconds} {args.rate}")
        wall = trio.current_time() - wall_start
        runtime_cpu = (cpu_ns(runtime.pid) - runtime_start) / 1e9
        expected = args.sessions * (args.rate * args.seconds + 1)
        runs = []
        for variant, gateway in gateways.items():
            if frames[variant] != expected:
                raise BenchError(f"{variant}: {frames[variant]} frames, expected {expected}")
            runs.append(
                Run(
                    variant,
                    frames[variant],
                    (cpu_ns(gateway.pid) - start[variant]) / 1e9,
                    runtime_cpu / len(gateways),
                    wall,
                    all(c.extensions for c in clients[variant]),
                )
            )
        if args.requests:
            rest_cpu = await rest_window(gateways, args)
            requests = args.connections * max(1, args.requests // args.connections)
            for result in runs:
                if result.variant in rest_cpu:
                    result.requests, result.rest_cpu_s = requests, rest_cpu[result.variant]
        return runs
    finally:
        for group in clients.values():
            for client in group:
                await client.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    key = secrets.token_urlsafe(24)
    runs: list[Run] = []
    settings = {**UNLIMITED_USER}
    with (
        tempfile.TemporaryDirectory(prefix="frame-cost-") as tmp,
        baseline_tree(args.baseline, "frame-cost-base-") as base,
        spawned("runtime", ["demo-runtime"], child_env(key), Path(tmp)) as runtime,
    ):
        for pair in range(args.pairs):
            with ExitStack() as stack:
                gateways: dict[str, Child] = {}
                for variant in ("baseline", "tree"):
                    env = child_env(key, agent_url=runtime.url, **settings)
                    if variant == "tree" and args.compression is not None:
                        env["GATEWAY__WS_COMPRESSION"] = args.compression
                    if variant == "baseline":
                        paths = [str(base), env.get("PYTHONPATH", "")]
                        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
                    gateways[variant] = stack.enter_context(
                        spawned(f"gateway-{variant}", ["serve"], env, Path(tmp))
                    )
                if args.floor:
                    compression = "on" if args.compression == "on" else "off"
                    gateways["floor"] = stack.enter_context(
                        spawned_floor("relay", [runtime.url, key, compression], Path(tmp))
                    )
                results = trio.run(measure, gateways, runtime, args)
            runs += results
            line = ", ".join(
                f"{r.variant} {r.us_per_frame:6.1f} us/frame{'' if r.deflate else ' (NO deflate)'}"
                for r in results
            )
            ratio = results[1].us_per_frame / results[0].us_per_frame
            to_floor = (
                f", tree/floor {results[1].us_per_frame / results[2].us_per_frame:.3f}"
                if args.floor
                else ""
            )
            print(
                f"pair {pair + 1}: {line}; ratio {ratio:.3f}{to_floor} ({results[0].frames} "
                f"frames each, runtime {1e6 * results[0].runtime_cpu_s / results[0].frames:.0f} "
                "us/frame)",
                flush=True,
            )
            if args.requests:
                line = ", ".join(
                    f"{r.variant} {r.us_per_request:6.1f} us/request"
                    for r in results
                    if r.variant != "floor"
                )
                ratio = results[1].us_per_request / results[0].us_per_request
                print(f"        REST: {line}; ratio {ratio:.3f}", flush=True)
    return report(runs, args)


def report(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    tree = [r.us_per_frame for r in runs if r.variant == "tree"]
    base = [r.us_per_frame for r in runs if r.variant == "baseline"]
    ratios = [t / b for t, b in zip(tree, base, strict=True)]
    summary = {
        "baseline_ref": args.baseline,
        "sessions": args.sessions,
        "rate": args.rate,
        "seconds": args.seconds,
        "baseline_us_per_frame_median": statistics.median(base),
        "tree_us_per_frame_median": statistics.median(tree),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "runs": [
            asdict(r) | {"us_per_frame": r.us_per_frame, "us_per_request": r.us_per_request}
            for r in runs
        ],
        "loadavg": os.getloadavg(),
    }
    print()
    print(f"gateway CPU per uncoalescable frame ({args.sessions} sessions x {args.rate} tokens/s")
    print(f"x {args.seconds} s, permessage-deflate, IDE frames), medians of {len(ratios)} pairs:")
    print(f"  baseline ({args.baseline}): {summary['baseline_us_per_frame_median']:.1f} us")
    print(f"  this tree:        {summary['tree_us_per_frame_median']:.1f} us")
    spread = f"{min(ratios):.3f}..{max(ratios):.3f}"
    print(f"  tree / baseline:  {summary['ratio_median']:.3f} (pairs {spread})")
    if args.floor:
        floor = [r.us_per_frame for r in runs if r.variant == "floor"]
        to_floor = [t / f for t, f in zip(tree, floor, strict=True)]
        summary |= {
            "floor_us_per_frame_median": statistics.median(floor),
            "tree_over_floor_median": statistics.median(to_floor),
            "tree_over_floor": to_floor,
        }
        print(f"  floor relay:      {summary['floor_us_per_frame_median']:.1f} us")
        spread = f"{min(to_floor):.3f}..{max(to_floor):.3f}"
        print(f"  tree / floor:     {summary['tree_over_floor_median']:.3f} (pairs {spread})")
    if args.requests:
        tree_rest = [r.us_per_request for r in runs if r.variant == "tree"]
        base_rest = [r.us_per_request for r in runs if r.variant == "baseline"]
        rest_ratios = [t / b for t, b in zip(tree_rest, base_rest, strict=True)]
        summary |= {
            "requests": args.requests,
            "connections": args.connections,
            "baseline_us_per_request_median": statistics.median(base_rest),
            "tree_us_per_request_median": statistics.median(tree_rest),
            "rest_ratio_median": statistics.median(rest_ratios),
            "rest_ratios": rest_ratios,
        }
        print(f"gateway CPU per REST request (GET {REST_PATH}, {args.connections} keep-alive")
        print(f"connections per gateway), medians of {len(rest_ratios)} pairs:")
        print(f"  baseline ({args.baseline}): {summary['baseline_us_per_request_median']:.1f} us")
        print(f"  this tree:        {summary['tree_us_per_request_median']:.1f} us")
        spread = f"{min(rest_ratios):.3f}..{max(rest_ratios):.3f}"
        print(f"  tree / baseline:  {summary['rest_ratio_median']:.3f} (pairs {spread})")
    print(f"  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="git ref of the baseline gateway")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=30, help="sessions per gateway")
    parser.add_argument("--rate", type=int, default=20, help="tokens/s per session")
    parser.add_argument("--seconds", type=int, default=8, help="seconds per timed turn")
    parser.add_argument(
        "--compression",
        choices=("off", "on"),
        help="GATEWAY__WS_COMPRESSION of this tree's gateway (default: its default, off)",
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="REST GETs per gateway per pair (0: none)"
    )
    parser.add_argument(
        "--connections", type=int, default=20, help="keep-alive REST connections per gateway"
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="leave out the floor relay (bench/floors.py)",
    )
    add_json_option(parser)
    args = parser.parse_args(argv)
    return run_and_write_json(lambda: run(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
