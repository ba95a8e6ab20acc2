"""``serve --workers 2`` against ``--workers 1``: does each worker serve its share, and what does
a request cost the gateway in each?

Run ``python bench/workers_bench.py`` (3 rounds, about two minutes) or ``--rounds 1
--connections 10 --sessions 10`` for a smoke run; ``--json FILE`` also writes the figures.
Needs ``redis-server`` (``serve --workers N`` refuses to run without shared state).

What it measures
----------------
One ``redis-server``, one demo runtime (``--instant``) and two gateways run as child processes
on free loopback ports: ``trio-gateway serve --workers 1`` (one process) and ``serve --workers
2`` (a supervisor and two worker processes sharing the port with ``SO_REUSEPORT``), both with
``STATE_BACKEND=redis`` and the same settings (JWT off, per-user caps lifted). The same load goes
to each, the two alternating round by round so the shared machine's drift hits both alike:

* **REST**: ``C`` fresh TCP connections (20 at a time), each sending ``K`` keep-alive
  ``GET /api/v1/agents`` (proxied to the runtime) and checking every answer is 200.
* **WebSocket**: ``S`` sessions (raw wsproto clients offering permessage-deflate, IDE frames),
  each streaming ``T`` turns of ``bench N R`` (``N`` tokens at ``R`` tokens/s, every chunk with
  its own metadata: one frame per token whatever the load, so CPU per turn compares like with
  like; an unpaced turn would be coalesced more by a busier gateway and look cheaper). Every
  turn's text is checked exact.

Which worker served a connection is read from the operating system, not from the gateway:
while the client's connection is open, its server-side socket is found in ``/proc/net/tcp``
(local port = the gateway's, remote port = the client's) and its inode in the worker's
``/proc/<pid>/fd``. A worker's requests are the requests sent on the connections it accepted.
The workers are the supervisor's children (``/proc/<pid>/task/<pid>/children``). Gateway CPU is
the sum over the workers (the supervisor, idle, is not counted) of every thread's on-CPU time
(``/proc/<pid>/task/*/schedstat`` field 1) over the phase, divided by the requests (REST) or
turns (WebSocket) of that phase.

With ``--half-load`` (the default) the one-worker gateway also gets a third load per round,
half the connections and sessions: what each of the two workers carries. CPU per unit rises
as the load on a process falls (fewer events per wake-up of the event loop to share its fixed
costs), so comparing two workers with one worker at half load separates a cost of running
several workers from a cost of less load per process.

Targets: with two workers, each serves at least a third of the requests and of the sessions;
CPU per request stays within 10% of one worker's (medians over the rounds).

Exit status: 0 when the measurement completed (targets met or not), 1 when it failed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import trio

if __package__ in (None, ""):  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import LiveClient, RestConnection, TurnResult, expected_text, live_clients
from bench.harness import (
    UNLIMITED_USER,
    BenchError,
    Child,
    add_json_option,
    child_env,
    cpu_ns,
    loadavg,
    raise_fd_limit,
    spawned,
)
from tests.support.redis_server import REDIS_SERVER, RedisServer

REST_PATH = "/api/v1/agents"
REST_CONCURRENCY = 20
PHASE_TIMEOUT = 300.0
READY_TIMEOUT = 30.0
TARGET_SHARE = 1 / 3
TARGET_CPU_RATIO = 1.10


# ------------------------------------------------------------------------------------------------
# Which process owns a connection
# ------------------------------------------------------------------------------------------------


def worker_pids(gateway: Child, workers: int) -> list[int]:
    """The processes that serve: the gateway itself for one worker, else its children."""
    if workers == 1:
        return [gateway.pid]
    text = Path(f"/proc/{gateway.pid}/task/{gateway.pid}/children").read_text()
    return [int(pid) for pid in text.split()]


def socket_inodes(pids: Sequence[int]) -> dict[int, int]:
    """``socket inode -> pid`` for every socket the processes hold open."""
    owners: dict[int, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                owners[int(target[8:-1])] = pid
    return owners


def server_side_inodes(server_port: int) -> dict[int, int]:
    """``client port -> inode`` of the server-side sockets of connections to ``server_port``."""
    found: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, inode = parts[1], parts[2], int(parts[9])
            if int(local.rsplit(":", 1)[1], 16) == server_port and inode:
                found[int(remote.rsplit(":", 1)[1], 16)] = inode
    return found


def owners_of(client_ports: Sequence[int], server_port: int, pids: Sequence[int]) -> list[int]:
    """The pid serving each client connection (all still open); raises if one is not found."""
    inodes = server_side_inodes(server_port)
    owners = socket_inodes(pids)
    result = []
    for port in client_ports:
        pid = owners.get(inodes.get(port, -1))
        if pid is None:
            raise BenchError(f"no worker holds the connection from client port {port}")
        result.append(pid)
    return result


# ------------------------------------------------------------------------------------------------
# Clients
# ------------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    """One gateway (``serve --workers N``) and its workers."""

    name: str
    workers: int
    gateway: Child
    load: float = 1.0  # share of the round's connections and sessions sent to it
    pids: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The shared port."""
        return int(self.gateway.url.rsplit(":", 1)[1])

    def cpu_ns(self) -> int:
        """On-CPU nanoseconds of every worker, summed."""
        return sum(cpu_ns(pid) for pid in self.pids)

    def timeslices(self) -> int:
        """Times the workers' threads were put on a CPU (``schedstat`` field 3), summed: about
        one per wake-up of an event loop, so per frame it shows how much work each wake-up
        found to share its fixed costs."""
        total = 0
        for pid in self.pids:
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    total += int((task / "schedstat").read_text().split()[2])
                except (OSError, IndexError, ValueError):
                    continue  # a thread that just ended
        return total

    async def ready(self) -> None:
        """Wait until every worker has answered ``/health`` on a fresh connection."""
        await self.gateway.wait_healthy()
        with trio.fail_after(READY_TIMEOUT):
            while True:
                self.gateway.check_alive()
                self.pids = worker_pids(self.gateway, self.workers)
                if len(self.pids) == self.workers:
                    answered: set[int] = set()
                    for _ in range(20 * self.workers):
                        connection = await RestConnection.open(self.port)
                        try:
                            if await connection.get("/health") == 200:
                                owner = owners_of([connection.local_port], self.port, self.pids)
                                answered.add(owner[0])
                        finally:
                            await connection.stream.aclose()
                    if answered == set(self.pids):
                        return
                await trio.sleep(0.2)


# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One phase on one deployment: units (requests or turns) per worker pid, CPU."""

    units: Counter[int] = field(default_factory=Counter)
    connections: Counter[int] = field(default_factory=Counter)
    frames: int = 0  # WebSocket: token frames received
    timeslices: int = 0  # WebSocket: times the workers were put on a CPU
    cpu_ns: int = 0

    @property
    def us_per_unit(self) -> float:
        """Gateway CPU per request / turn."""
        return self.cpu_ns / 1e3 / max(1, sum(self.units.values()))


async def rest_phase(deployment: Deployment, args: argparse.Namespace) -> Phase:
    """``C`` connections (``REST_CONCURRENCY`` at a time) x ``K`` GETs."""
    phase = Phase()
    limiter = trio.CapacityLimiter(REST_CONCURRENCY)

    async def one() -> None:
        async with limiter:
            connection = await RestConnection.open(deployment.port)
            try:
                for _ in range(args.requests):
                    status = await connection.get(REST_PATH)
                    if status != 200:
                        raise BenchError(f"GET {REST_PATH} answered {status}")
                [owner] = owners_of([connection.local_port], deployment.port, deployment.pids)
            finally:
                await connection.stream.aclose()
        phase.units[owner] += args.requests
        phase.connections[owner] += 1

    start = deployment.cpu_ns()
    with trio.fail_after(PHASE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(round(args.connections * deployment.load)):
                nursery.start_soon(one)
    phase.cpu_ns = deployment.cpu_ns() - start
    return phase


async def ws_phase(deployment: Deployment, args: argparse.Namespace) -> Phase:
    """``S`` sessions x ``T`` paced turns of ``bench N R``, every text checked."""
    phase = Phase()
    tag = secrets.token_hex(3)
    expected = expected_text(args.tokens)
    sessions = round(args.sessions * deployment.load)
    paths = [f"/api/v1/ws/{deployment.name}-{tag}-{index}" for index in range(sessions)]
    with trio.fail_after(PHASE_TIMEOUT):
        async with live_clients(deployment.port, paths) as clients:
            ports = [client.local_port for client in clients]
            owners = owners_of(ports, deployment.port, deployment.pids)
            phase.connections.update(owners)

            async def one(client: LiveClient, owner: int) -> None:
                for number in range(args.turns):
                    result = TurnResult()
                    await client.turn(f"bench {args.tokens} {args.rate}", result)
                    result.verify(expected, f"{deployment.name} turn {number}")
                    phase.units[owner] += 1
                    phase.frames += result.frames

            start, slices = deployment.cpu_ns(), deployment.timeslices()
            async with trio.open_nursery() as nursery:
                for client, owner in zip(clients, owners, strict=True):
                    nursery.start_soon(one, client, owner)
            phase.cpu_ns = deployment.cpu_ns() - start
            phase.timeslices = deployment.timeslices() - slices
    return phase


async def measure(deployments: list[Deployment], args: argparse.Namespace) -> dict[str, Any]:
    """Alternate the deployments round by round; collect each round's phases."""
    for deployment in deployments:
        await deployment.ready()
        _log(f"{deployment.name}: workers {deployment.pids}")
    rounds: dict[str, list[tuple[Phase, Phase]]] = {d.name: [] for d in deployments}
    for number in range(args.rounds):
        for deployment in deployments:
            rest = await rest_phase(deployment, args)
            ws = await ws_phase(deployment, args)
            rounds[deployment.name].append((rest, ws))
            _log(
                f"round {number + 1} {deployment.name}: REST {rest.us_per_unit:.0f} us/request "
                f"{_shares(rest.units, deployment.pids)}, WS {ws.us_per_unit:.0f} us/turn "
                f"{_shares(ws.connections, deployment.pids)}"
            )
    return {"deployments": deployments, "rounds": rounds}


def _shares(counts: Counter[int], pids: Sequence[int]) -> str:
    total = max(1, sum(counts.values()))
    return "(" + ", ".join(f"{100 * counts[pid] / total:.0f}%" for pid in pids) + ")"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def summarise(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Totals per worker over the rounds, median CPU per unit, the targets."""
    summary: dict[str, Any] = {"args": vars(args) | {"json": None}, "loadavg": loadavg()}
    for deployment in result["deployments"]:
        phases = result["rounds"][deployment.name]
        requests: Counter[int] = Counter()
        sessions: Counter[int] = Counter()
        turns: Counter[int] = Counter()
        for rest, ws in phases:
            requests.update(rest.units)
            sessions.update(ws.connections)
            turns.update(ws.units)
        summary[deployment.name] = {
            "pids": deployment.pids,
            "requests": [requests[pid] for pid in deployment.pids],
            "sessions": [sessions[pid] for pid in deployment.pids],
            "turns": [turns[pid] for pid in deployment.pids],
            "rest_us_per_request": [rest.us_per_unit for rest, _ in phases],
            "ws_us_per_turn": [ws.us_per_unit for _, ws in phases],
            "rest_us_per_request_median": statistics.median(r.us_per_unit for r, _ in phases),
            "ws_us_per_turn_median": statistics.median(w.us_per_unit for _, w in phases),
            "ws_us_per_frame_median": statistics.median(
                w.cpu_ns / 1e3 / max(1, w.frames) for _, w in phases
            ),
            "ws_timeslices_per_frame": sum(w.timeslices for _, w in phases)
            / max(1, sum(w.frames for _, w in phases)),
            "ws_tokens_per_frame": sum(turns.values())
            * args.tokens
            / max(1, sum(w.frames for _, w in phases)),
        }
    return summary


def render(summary: dict[str, Any]) -> str:
    """The figure table and the verdicts."""
    args = summary["args"]
    lines = [
        f"load per round and deployment: REST {args['connections']} connections x "
        f"{args['requests']} GET {REST_PATH}; WebSocket {args['sessions']} sessions x "
        f"{args['turns']} turns of bench {args['tokens']} {args['rate']}; "
        f"{args['rounds']} round(s); load average at the end {summary['loadavg']}",
    ]
    for name in ("workers-1", "workers-2", "workers-1-half"):
        if name not in summary:
            continue
        d = summary[name]
        rest = ", ".join(f"{x:.0f}" for x in d["rest_us_per_request"])
        ws = ", ".join(f"{x:.0f}" for x in d["ws_us_per_turn"])
        lines.append(
            f"{name}: requests per worker {d['requests']}, sessions per worker {d['sessions']}, "
            f"turns per worker {d['turns']}"
        )
        lines.append(
            f"  gateway CPU per REST request {d['rest_us_per_request_median']:.0f} us "
            f"(rounds {rest}); per turn {d['ws_us_per_turn_median']:.0f} us (rounds {ws}), "
            f"per frame {d['ws_us_per_frame_median']:.0f} us, "
            f"{d['ws_timeslices_per_frame']:.2f} CPU timeslices per frame, "
            f"{d['ws_tokens_per_frame']:.2f} tokens per frame"
        )
    one, two = summary["workers-1"], summary["workers-2"]
    request_shares = [n / max(1, sum(two["requests"])) for n in two["requests"]]
    session_shares = [n / max(1, sum(two["sessions"])) for n in two["sessions"]]
    rest_ratio = two["rest_us_per_request_median"] / one["rest_us_per_request_median"]
    ws_ratio = two["ws_us_per_turn_median"] / one["ws_us_per_turn_median"]
    shares_met = min(request_shares + session_shares) >= TARGET_SHARE
    cpu_met = rest_ratio <= TARGET_CPU_RATIO and ws_ratio <= TARGET_CPU_RATIO
    summary["verdict"] = {
        "request_shares": request_shares,
        "session_shares": session_shares,
        "rest_cpu_ratio": rest_ratio,
        "ws_cpu_ratio": ws_ratio,
        "shares_met": shares_met,
        "cpu_met": cpu_met,
    }
    lines.append(
        "workers-2 shares: requests "
        + ", ".join(f"{100 * s:.0f}%" for s in request_shares)
        + "; sessions "
        + ", ".join(f"{100 * s:.0f}%" for s in session_shares)
        + f" (target each >= 33%: {'met' if shares_met else 'NOT met'})"
    )
    lines.append(
        f"CPU 2 workers / 1 worker: per REST request {rest_ratio:.3f}, per turn {ws_ratio:.3f} "
        f"(target <= {TARGET_CPU_RATIO:.2f}: {'met' if cpu_met else 'NOT met'})"
    )
    if "workers-1-half" in summary:
        half = summary["workers-1-half"]
        summary["verdict"]["ws_cpu_ratio_to_half_load"] = (
            two["ws_us_per_turn_median"] / half["ws_us_per_turn_median"]
        )
        lines.append(
            "CPU per turn, 2 workers / 1 worker carrying half the load (what each of the two "
            f"carries): {summary['verdict']['ws_cpu_ratio_to_half_load']:.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Start redis, the runtime and both gateways, measure, print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=100, help="REST connections")
    parser.add_argument("--requests", type=int, default=10, help="GETs per connection")
    parser.add_argument("--sessions", type=int, default=100, help="WebSocket sessions")
    parser.add_argument("--turns", type=int, default=3, help="turns per session")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per turn")
    parser.add_argument("--rate", type=int, default=20, help="tokens/s within a turn")
    parser.add_argument(
        "--half-load",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also load the one worker with half the connections and sessions (the load each "
        "of two workers carries), to tell a cost of several workers from a cost of less load "
        "per process",
    )
    add_json_option(parser)
    args = parser.parse_args(argv)
    if REDIS_SERVER is None:
        print("workers bench: redis-server is not installed", file=sys.stderr)
        return 1
    raise_fd_limit()
    key = secrets.token_urlsafe(24)
    try:
        with tempfile.TemporaryDirectory(prefix="workers-") as tmp, ExitStack() as stack:
            workdir = Path(tmp)
            redis = RedisServer(workdir)
            redis.start()
            stack.callback(redis.kill)
            runtime = stack.enter_context(
                spawned("runtime", ["demo-runtime", "--instant"], child_env(key), workdir)
            )
            deployments = []
            for workers in (1, 2):
                env = child_env(
                    key,
                    agent_url=runtime.url,
                    state_backend="redis",
                    redis_url=redis.url(workers),
                    max_connections=str(4 * args.sessions + 200),
                    **UNLIMITED_USER,
                )
                name = f"workers-{workers}"
                command = ["serve", "--workers", str(workers)]
                gateway = stack.enter_context(spawned(name, command, env, workdir))
                deployments.append(Deployment(name, workers, gateway))
                if workers == 1 and args.half_load:
                    deployments.append(Deployment("workers-1-half", 1, gateway, load=0.5))
            result = trio.run(measure, deployments, args)
    except BenchError as error:
        print(f"workers bench failed: {error}", file=sys.stderr)
        return 1
    summary = summarise(result, args)
    print(render(summary), flush=True)
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
