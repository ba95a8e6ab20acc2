"""REST proxy benchmark: the same wrk load on the runtime directly and through the gateway.

Run: ``python bench/rest_bench.py [--connections 20] [--duration 10] [--path /agents]``

It starts the demo runtime and the gateway as separate processes on loopback, then runs wrk
(Debian package ``wrk``) against ``GET /agents`` on the runtime and ``GET /api/v1/agents`` on
the gateway, alternating, and prints requests/s and p50/p99 latency for both and their ratio.
Shared, noisy 2-core machines make absolute numbers meaningless; the ratio within one run is
what the target is about (>= 0.35x the runtime's requests/s, <= 5 ms added p99).
Note that wrk, the gateway and the runtime share the two cores during the gateway rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from trio_gateway.tools.dev_auth import DevIssuer

if __package__ in (None, ""):  # run as a script: make ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.ports import free_port
from tests.support.processes import (
    clean_env,
    spawned,
    stop_process,
    wait_until_serving_sync,
)

KEY = "bench-internal-key-0123456789"


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    non_2xx: int


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    number, unit = match.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, connections: int, duration: int, headers: list[str]) -> WrkResult:
    """One wrk run; parses requests/s, the latency distribution and non-2xx answers."""
    command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration}s", "--latency"]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run(
        [*command, url], capture_output=True, text=True, check=True, timeout=duration + 60
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _milliseconds(re.search(r"^\s*50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _milliseconds(re.search(r"^\s*99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    non_2xx_match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return WrkResult(rps, p50, p99, int(non_2xx_match.group(1)) if non_2xx_match else 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--quick", action="store_true", help="2 s x 1 round (smoke run)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 2, 1
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2

    jwks_port = free_port()
    env = {"internal_api_key": KEY, "log_level": "WARNING"}
    # JWT verification on, as in production: a dev issuer's JWKS served as a static file.
    issuer = DevIssuer()
    token = issuer.mint("bench-user", lifetime=3600)
    jwks_dir = tempfile.mkdtemp(prefix="rest-bench-jwks-")
    with open(os.path.join(jwks_dir, "jwks.json"), "w") as handle:
        json.dump(issuer.jwks(), handle)
    with ExitStack() as children:
        jwks = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(jwks_port), "--bind", "127.0.0.1"],
            cwd=jwks_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        children.callback(stop_process, jwks)
        workdir = Path(jwks_dir)
        runtime_env = clean_env(**env)
        runtime = children.enter_context(
            spawned("runtime", ["demo-runtime", "--instant"], runtime_env, workdir)
        )
        gateway_env = clean_env(
            **env,
            agent_url=runtime.url,
            jwks_url=f"http://127.0.0.1:{jwks_port}/jwks.json",
            rest_requests_per_second="100000",
            rest_request_burst="1000000",
        )
        gateway = children.enter_context(spawned("gateway", ["serve"], gateway_env, workdir))
        gateway_auth = [f"Authorization: Bearer {token}"]
        wait_until_serving_sync(runtime.url)
        wait_until_serving_sync(gateway.url)
        direct_url = f"{runtime.url}/agents"
        gateway_url = f"{gateway.url}/api/v1/agents"
        # warm-up: connection pools, caches
        run_wrk(direct_url, args.connections, 1, [f"X-Internal-Auth: {KEY}"])
        run_wrk(gateway_url, args.connections, 1, gateway_auth)
        direct: list[WrkResult] = []
        through: list[WrkResult] = []
        for _ in range(args.rounds):
            direct.append(
                run_wrk(direct_url, args.connections, args.duration, [f"X-Internal-Auth: {KEY}"])
            )
            through.append(run_wrk(gateway_url, args.connections, args.duration, gateway_auth))

    def median(results: list[WrkResult], field: str) -> float:
        return statistics.median(getattr(r, field) for r in results)

    figures = {
        "connections": args.connections,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "direct_rps": median(direct, "requests_per_second"),
        "gateway_rps": median(through, "requests_per_second"),
        "direct_p50_ms": median(direct, "p50_ms"),
        "direct_p99_ms": median(direct, "p99_ms"),
        "gateway_p50_ms": median(through, "p50_ms"),
        "gateway_p99_ms": median(through, "p99_ms"),
        "non_2xx": sum(r.non_2xx for r in direct + through),
    }
    figures["ratio"] = figures["gateway_rps"] / figures["direct_rps"]
    figures["added_p99_ms"] = figures["gateway_p99_ms"] - figures["direct_p99_ms"]
    ok_ratio = figures["ratio"] >= 0.35
    ok_p99 = figures["added_p99_ms"] <= 5
    print(f"\nREST proxy, GET /agents, {args.connections} connections, "
          f"{args.rounds} x {args.duration} s rounds (median), wrk -t1, "
          "JWT verification on (rate limit raised out of the way)")  # fmt: skip
    print(f"{'':22}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'runtime directly':22}{figures['direct_rps']:>12.0f}"
          f"{figures['direct_p50_ms']:>10.2f}{figures['direct_p99_ms']:>10.2f}")  # fmt: skip
    print(f"{'through the gateway':22}{figures['gateway_rps']:>12.0f}"
          f"{figures['gateway_p50_ms']:>10.2f}{figures['gateway_p99_ms']:>10.2f}")  # fmt: skip
    print(f"ratio {figures['ratio']:.2f}x (target >= 0.35x: {'PASS' if ok_ratio else 'MISS'}); "
          f"added p99 {figures['added_p99_ms']:.2f} ms "
          f"(target <= 5 ms: {'PASS' if ok_p99 else 'MISS'})")  # fmt: skip
    if figures["non_2xx"]:
        print(f"WARNING: {figures['non_2xx']} non-2xx answers", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 1 if figures["non_2xx"] else 0


if __name__ == "__main__":
    sys.exit(main())
