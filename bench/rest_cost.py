"""Gateway CPU per proxied ``GET /api/v1/agents`` (JWT on): this tree, a baseline commit and a
minimal raw-ASGI + h11-pool proxy (the floor), side by side, paired.

Run ``python bench/rest_cost.py`` (5 rounds, about a minute) or ``--rounds 1 --seconds 3`` for
a smoke run; ``--baseline REF`` picks the git commit of the baseline gateway (default ``main``),
``--json FILE`` also writes the figures.

What it measures
----------------
One demo runtime (``trio-gateway demo-runtime --instant``, this tree) serves three proxies:

- ``tree``: this tree's gateway (``python -m trio_gateway.cli serve``: the PID started is the
  process that serves, one worker);
- ``baseline``: the same command on the ``trio_gateway`` package of ``--baseline`` (``git
  archive``, first on ``PYTHONPATH``, as ``frame_cost.py`` does);
- ``floor``: ``bench/floors.py``'s REST floor: a plain ASGI app on hypercorn's trio worker
  that checks the bearer token with PyJWT (RS256, ``aud``, ``iss``, ``exp``; verified tokens
  cached by their text, as the gateway does), sends ``GET /agents`` over this tree's
  ``ConnectionPool`` (h11, keep-alive) and relays status, content type and body. What any
  proxy on this stack must do, and nothing else: no header policy, limits, metrics or logs.

JWT verification is on for all three (one token, a dev issuer's JWKS served by a static file
server). Clients are keep-alive HTTP/1.1 connections on raw sockets, like an IDE's, sending an
``Authorization`` header; ``--connections`` per proxy, each in a closed loop (next request when
the answer is in). In each round the three proxies are loaded at the same time, for the same
window, so whatever else the shared machine does hits all alike; the figure is each proxy
process's CPU time over the window (``/proc/<pid>/task/*/schedstat`` field 1, every thread)
divided by the requests it answered. Ratios within a round are the steady figures; absolute
microseconds depend on the machine and its load.

Exit status: 0 when the measurement completed, 1 when the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):  # run as a script: make ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.floors import spawned_floor
from bench.harness import (
    HOST,
    BenchError,
    Child,
    add_json_option,
    baseline_tree,
    child_env,
    cpu_ns,
    free_port,
    run_and_write_json,
    spawned,
)

PATH = "/api/v1/agents"
VARIANTS = ("baseline", "tree", "floor")


# --- the load -------------------------------------------------------------------------------


@dataclass
class Run:
    """One proxy's figures in one round."""

    variant: str
    requests: int
    cpu_s: float
    wall_s: float

    @property
    def us_per_request(self) -> float:
        return 1e6 * self.cpu_s / self.requests


async def _client(port: int, request: bytes, until: float, counts: list[int]) -> None:
    """One keep-alive connection in a closed loop until ``until``; counts 200 answers."""
    stream = await trio.open_tcp_stream(HOST, port)
    buffer = b""
    async with stream:
        while trio.current_time() < until:
            await stream.send_all(request)
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    raise BenchError("the proxy closed a keep-alive connection")
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"answer {head[:200]!r}")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                data = await stream.receive_some(65536)
                if not data:
                    raise BenchError("the proxy closed mid-answer")
                buffer += data
            buffer = buffer[length:]
            counts[0] += 1


async def measure(proxies: dict[str, Child], token: str, args: argparse.Namespace) -> list[Run]:
    """Load every proxy in the same window; CPU per answered request of each."""
    for proxy in proxies.values():
        await proxy.wait_healthy()
    counts = {variant: [0] for variant in proxies}

    async def load(seconds: float) -> None:
        until = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            for variant, proxy in proxies.items():
                port = int(proxy.url.rsplit(":", 1)[1])
                request = (
                    f"GET {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                    f"Authorization: Bearer {token}\r\nUser-Agent: rest-cost\r\n\r\n"
                ).encode()
                for _ in range(args.connections):
                    nursery.start_soon(_client, port, request, until, counts[variant])

    await load(1.0)  # warm-up: pools, token caches, the interpreters
    for count in counts.values():
        count[0] = 0
    start = {variant: cpu_ns(proxy.pid) for variant, proxy in proxies.items()}
    wall_start = trio.current_time()
    await load(args.seconds)
    wall = trio.current_time() - wall_start
    return [
        Run(variant, counts[variant][0], (cpu_ns(proxy.pid) - start[variant]) / 1e9, wall)
        for variant, proxy in proxies.items()
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from trio_gateway.tools.dev_auth import DevIssuer

    key = secrets.token_urlsafe(24)
    issuer = DevIssuer()
    token = issuer.mint("bench-user", lifetime=3600)
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="rest-cost-") as tmp,
        baseline_tree(args.baseline) as base,
        spawned("runtime", ["demo-runtime", "--instant"], child_env(key), Path(tmp)) as runtime,
        ExitStack() as stack,
    ):
        jwks_file = Path(tmp) / "jwks.json"
        jwks_file.write_text(json.dumps(issuer.jwks()))
        jwks_port = free_port()
        jwks = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(jwks_port), "--bind", HOST],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(jwks.wait, 10)
        stack.callback(jwks.terminate)
        settings = {
            "agent_url": runtime.url,
            "use_jwt_auth": "true",
            "jwks_url": f"http://{HOST}:{jwks_port}/jwks.json",
            # The rate limit out of the way (what is measured is the proxy, not the limiter).
            "rest_requests_per_second": "100000",
            "rest_request_burst": "1000000",
        }
        proxies: dict[str, Child] = {}
        for variant in ("baseline", "tree"):
            env = child_env(key, **settings)
            if variant == "baseline":
                env["PYTHONPATH"] = os.pathsep.join(
                    filter(None, [str(base), env.get("PYTHONPATH")])
                )
            proxies[variant] = stack.enter_context(
                spawned(f"gateway-{variant}", ["serve"], env, Path(tmp))
            )
        proxies["floor"] = stack.enter_context(
            spawned_floor("rest", [runtime.url, str(jwks_file), key], Path(tmp))
        )
        trio.run(_wait_runtime, runtime)
        for index in range(args.rounds):
            results = trio.run(measure, proxies, token, args)
            runs += results
            by = {r.variant: r for r in results}
            print(
                f"round {index + 1}: "
                + ", ".join(f"{r.variant} {r.us_per_request:6.0f} us" for r in results)
                + f"; tree/baseline {by['tree'].us_per_request / by['baseline'].us_per_request:.3f}"
                + f", tree/floor {by['tree'].us_per_request / by['floor'].us_per_request:.3f}"
                + f" ({by['tree'].requests} tree requests)",
                flush=True,
            )
    return report(runs, args)


async def _wait_runtime(runtime: Child) -> None:
    await runtime.wait_healthy()


def report(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    per = {v: [r.us_per_request for r in runs if r.variant == v] for v in VARIANTS}
    rounds = len(per["tree"])
    to_base = [per["tree"][i] / per["baseline"][i] for i in range(rounds)]
    to_floor = [per["tree"][i] / per["floor"][i] for i in range(rounds)]
    summary = {
        "baseline_ref": args.baseline,
        "connections": args.connections,
        "seconds": args.seconds,
        **{f"{v}_us_per_request_median": statistics.median(per[v]) for v in VARIANTS},
        "tree_over_baseline_median": statistics.median(to_base),
        "tree_over_floor_median": statistics.median(to_floor),
        "tree_over_baseline": to_base,
        "tree_over_floor": to_floor,
        "runs": [asdict(r) | {"us_per_request": r.us_per_request} for r in runs],
        "loadavg": os.getloadavg(),
    }
    print()
    print(f"proxy CPU per GET {PATH}, JWT on, {args.connections} keep-alive connections per")
    print(f"proxy, {args.seconds} s x {rounds} rounds (medians):")
    print(f"  baseline ({args.baseline}): {summary['baseline_us_per_request_median']:.0f} us")
    print(f"  this tree:        {summary['tree_us_per_request_median']:.0f} us")
    print(f"  floor:            {summary['floor_us_per_request_median']:.0f} us")
    print(f"  tree / baseline:  {summary['tree_over_baseline_median']:.3f}")
    print(f"  tree / floor:     {summary['tree_over_floor_median']:.3f}")
    print(f"  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="git ref of the baseline gateway")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4, help="per proxy")
    parser.add_argument("--seconds", type=float, default=8.0, help="per round")
    add_json_option(parser)
    args = parser.parse_args(argv)
    return run_and_write_json(lambda: run(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
