"""Long hostile-input fuzz run with figures: every attack class against real gateways.

Run ``python bench/fuzz.py`` (about 2,000 frame connections, 2,000 handshakes, 500 token
attempts, 500 compressed-frame connections, 2,000 header-smuggling requests, session floods,
and 500 each of h2c upgrades, CL+TE smuggling attempts and pipelines plus rounds of 30 slow
heads at once; several minutes on two shared cores) or ``--examples N`` to scale, ``--quick``
for a smoke run. The same harness as the tests (``tests/support/fuzzing_*.py``,
``tests/support/smuggling.py``): gateways in front of the
demo runtime (JWT
on with a real JWKS server for tokens and compressed frames; a 1 s head timeout for the HTTP
edge) on ``127.0.0.1`` with OS-chosen ports, a control session streaming exact ``bench`` turns
for the whole run, hypothesis generating every input. Prints one table; exits 1 if anything was
wrong (a crash, a 5xx, an undocumented answer, an ERROR log, a control-session problem, RSS
growth from compressed frames).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.fuzzing_exchange import (
    BOMB_SIZES,
    CompressedCase,
    check_compressed,
    compressed_cases,
    exchange_compressed,
    exchange_frames,
    raw_request,
)
from tests.support.fuzzing_gateway import FuzzGateway, FuzzStats, peak_rss_bytes
from tests.support.fuzzing_http import (
    SLOW_HEADS,
    EdgeStats,
    check_h2c,
    check_pipeline,
    converse,
    h2c_requests,
    pipeline_payload,
    pipelines,
    slow_head,
)
from tests.support.fuzzing_http import check_smuggling as check_cl_te
from tests.support.fuzzing_http import smuggling_requests as cl_te_requests
from tests.support.fuzzing_lockouts import LIVE_CAP, flood
from tests.support.fuzzing_strategies import FrameBatch, frame_batches, handshake_requests
from tests.support.fuzzing_tokens import DOORS, bad_tokens, check_token
from tests.support.fuzzing_wire import deflate_bomb
from tests.support.smuggling import (
    SmugglingRequest,
    check_smuggling,
    send_smuggling,
    smuggling_requests,
)


def hypothesis_settings(examples: int) -> settings:
    """Many examples, no deadline, no shrinking database (a benchmark run is not a test)."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _outcome(gateway: FuzzGateway, **figures: Any) -> dict[str, Any]:
    """What every phase reports of its gateway: alive, its ERROR records and what its control
    client saw (exact turns, problems), then the phase's own ``figures``."""
    return {
        "alive": gateway.alive,
        "error_logs": list(gateway.errors.records),
        "control_turns": gateway.control.turns,
        "control_problems": list(gateway.control.problems),
        **figures,
    }


def fuzz_frames_and_handshakes(examples: int, handshakes: int, stats: FuzzStats) -> dict[str, Any]:
    """Frames and handshakes against one JWT-off gateway; returns what the gateway reported."""
    ids = itertools.count()
    with FuzzGateway() as gateway:

        @hypothesis_settings(examples)
        @given(batch=frame_batches)
        def frames(batch: FrameBatch) -> None:
            seen = trio.run(exchange_frames, gateway.port, f"bench-{next(ids)}", batch)
            stats.record_exchange(batch, seen)

        @hypothesis_settings(handshakes)
        @given(request=handshake_requests())
        def requests(request: bytes) -> None:
            stats.record_answer(trio.run(raw_request, gateway.port, request))

        frames()
        requests()
        return _outcome(gateway, contained=len(gateway.errors.contained))


def fuzz_tokens(examples: int, stats: FuzzStats) -> dict[str, Any]:
    """Refused tokens on every door of a JWT-on gateway."""
    failures: list[str] = []
    with FuzzGateway(jwt=True) as gateway:
        issuer = gateway.issuer
        assert issuer is not None

        @hypothesis_settings(examples)
        @given(data=st.data(), door=DOORS)
        def tokens(data: st.DataObject, door: str) -> None:
            token, unscoped = data.draw(bad_tokens(issuer))
            try:
                check_token(gateway, token, unscoped, door, stats)
            except AssertionError as error:
                failures.append(str(error)[:200])

        tokens()
        return _outcome(gateway, failures=failures)


def fuzz_compressed_frames(examples: int, stats: FuzzStats) -> dict[str, Any]:
    """Compressed frames (bombs, honest fragmented messages, corrupt deflate data) against a
    JWT-on gateway with ``WS_COMPRESSION=on``; also the peak RSS this process (the gateway
    runs in a thread of it) gained during the phase, which bounds what the gateway kept."""
    for size in BOMB_SIZES:
        deflate_bomb(size)  # built before the baseline: the client's bombs are not the gateway's
    failures: list[str] = []
    ids = itertools.count()
    with FuzzGateway(jwt=True, ws_compression="on") as gateway:
        token = gateway.token("fuzz")
        before = peak_rss_bytes()

        @hypothesis_settings(examples)
        @given(case=compressed_cases())
        def cases(case: CompressedCase) -> None:
            seen = trio.run(exchange_compressed, gateway.port, f"deflate-{next(ids)}", case, token)
            stats.connections += 1
            stats.frames_sent += 1 + case.pings
            stats.count(stats.close_codes, seen.close_code if seen.close_code else "eof")
            if seen.rejected_status is not None:
                stats.count(stats.statuses, seen.rejected_status)
            failures.extend(check_compressed(case, seen)[:3])

        cases()
        return _outcome(
            gateway, failures=failures, rss_growth_mib=(peak_rss_bytes() - before) / (1 << 20)
        )


def fuzz_header_smuggling(examples: int, stats: FuzzStats) -> dict[str, Any]:
    """REST requests with hostile headers (tests/support/smuggling.py) against a JWT-off
    gateway: what
    reached the demo runtime is checked after each one; leaks are problems."""
    with FuzzGateway() as gateway:

        @hypothesis_settings(examples)
        @given(request=smuggling_requests())
        def smuggle(request: SmugglingRequest) -> None:
            answer = trio.run(send_smuggling, gateway, request)
            stats.record_answer(answer)
            stats.problems += check_smuggling(gateway, request, answer)

        smuggle()
        return _outcome(gateway)


def fuzz_lockouts(examples: int) -> dict[str, Any]:
    """Open/close floods of one client (a fresh gateway per flood, small MAX_SESSIONS): it
    must never fill the gateway (no 503), hold more than its live-session cap, or keep
    another client out (``tests/hostile/test_fuzz_lockouts.py``)."""
    outcomes: collections.Counter[Any] = collections.Counter()
    problems: list[str] = []
    peak = 0

    @hypothesis_settings(examples)
    @given(
        plan=st.lists(
            st.sampled_from(["close", "close", "garbage", "turn"]), min_size=30, max_size=150
        ),
        workers=st.integers(1, 8),
    )
    def floods(plan: list[str], workers: int) -> None:
        nonlocal peak
        seen, flood_peak, flood_problems = trio.run(flood, plan, workers)
        outcomes.update(seen)
        peak = max(peak, flood_peak)
        problems.extend(flood_problems)
        if 503 in seen:
            problems.append(f"a flood of {len(plan)} filled the gateway: {dict(seen)}")
        if flood_peak > LIVE_CAP:
            problems.append(f"one client held {flood_peak} live sessions (cap {LIVE_CAP})")

    floods()
    return {"outcomes": outcomes, "peak": peak, "problems": problems}


def fuzz_http_edge(examples: int, stats: EdgeStats) -> dict[str, Any]:
    """Hostile HTTP/1.1: h2c upgrades and HTTP/2 prefaces, Content-Length +
    Transfer-Encoding smuggling, pipelined requests, and slow heads (many at once) against one
    gateway with a 1 s HTTP_HEAD_TIMEOUT. The checks are tests/support/fuzzing_http.py's."""
    with FuzzGateway(http_head_timeout=1.0) as gateway:

        @hypothesis_settings(examples)
        @given(request=h2c_requests())
        def h2c(request: bytes) -> None:
            answer = trio.run(converse, gateway.port, request, 2)
            stats.record("h2c", answer, check_h2c(answer))

        @hypothesis_settings(examples)
        @given(request=cl_te_requests())
        def smuggling(request: bytes) -> None:
            answer = trio.run(converse, gateway.port, request, 2)
            stats.record("smuggling", answer, check_cl_te(answer))

        @hypothesis_settings(examples)
        @given(parts=pipelines)
        def pipelined(parts: list[str]) -> None:
            answer = trio.run(converse, gateway.port, pipeline_payload(parts), len(parts))
            stats.record("pipeline", answer, check_pipeline(parts, answer))

        async def slow_heads(rounds: int) -> None:
            for index in range(rounds):

                async def one(head: bytes, keep_alive: bool) -> None:
                    problem = await slow_head(gateway.port, head, 0.1, keep_alive)
                    stats.record("slow head", None, [problem] if problem else [])

                async with trio.open_nursery() as nursery:
                    for head in SLOW_HEADS * 10:  # 30 at once
                        nursery.start_soon(one, head, index % 2 == 1)

        h2c()
        smuggling()
        pipelined()
        trio.run(slow_heads, max(2, examples // 100))
        return _outcome(gateway)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="frame connections")
    parser.add_argument("--quick", action="store_true", help="a smoke run (100 of each)")
    args = parser.parse_args()
    examples = 100 if args.quick else args.examples
    logging.basicConfig(level=logging.CRITICAL)  # the harness counts ERROR records itself

    started = time.monotonic()
    stats = FuzzStats()
    plain = fuzz_frames_and_handshakes(examples, examples, stats)
    token_stats = FuzzStats()
    secure = fuzz_tokens(max(examples // 4, 50), token_stats)
    deflate_stats = FuzzStats()
    deflate = fuzz_compressed_frames(max(examples // 4, 50), deflate_stats)
    lockouts = fuzz_lockouts(max(examples // 100, 5))
    smuggling_stats = FuzzStats()
    smuggling = fuzz_header_smuggling(examples, smuggling_stats)
    edge_stats = EdgeStats()
    edge = fuzz_http_edge(max(examples // 4, 50), edge_stats)
    duration = time.monotonic() - started

    # Bombs of up to 64 MiB each went in: the gateway must have inflated none of them whole.
    rss_bounded = deflate["rss_growth_mib"] < 48
    crashes = (
        int(not plain["alive"])
        + int(not secure["alive"])
        + int(not deflate["alive"])
        + int(not smuggling["alive"])
        + int(not edge["alive"])
    )
    problems = (
        stats.problems
        + token_stats.problems
        + plain["error_logs"]
        + secure["error_logs"]
        + plain["control_problems"]
        + secure["control_problems"]
        + secure["failures"]
        + deflate["error_logs"]
        + deflate["control_problems"]
        + deflate["failures"]
        + ([] if rss_bounded else [f"peak RSS grew {deflate['rss_growth_mib']:.0f} MiB"])
        + lockouts["problems"]
        + smuggling_stats.problems
        + smuggling["error_logs"]
        + smuggling["control_problems"]
        + edge_stats.problems
        + edge["error_logs"]
        + edge["control_problems"]
    )
    rows = [
        ("frame connections", stats.connections),
        ("frames sent", stats.frames_sent),
        ("close codes", dict(sorted(stats.close_codes.items()))),
        ("handshakes / raw HTTP requests", stats.handshakes),
        ("answer statuses", dict(sorted(stats.statuses.items()))),
        ("token attempts (JWT on)", token_stats.handshakes),
        ("token answers", dict(sorted(token_stats.statuses.items()))),
        ("first-frame auth closes", dict(sorted(token_stats.close_codes.items()))),
        ("compressed-frame connections", deflate_stats.connections),
        ("compressed close codes", dict(sorted(deflate_stats.close_codes.items()))),
        ("peak RSS growth, compressed phase", f"{deflate['rss_growth_mib']:.1f} MiB"),
        (
            "control turns (exact tokens)",
            plain["control_turns"]
            + secure["control_turns"]
            + deflate["control_turns"]
            + smuggling["control_turns"]
            + edge["control_turns"],
        ),
        ("header smuggling requests", smuggling_stats.handshakes),
        ("smuggling answers", dict(sorted(smuggling_stats.statuses.items()))),
        ("HTTP edge attempts", dict(sorted(edge_stats.attempts.items()))),
        (
            "HTTP edge answers (closed)",
            f"{dict(sorted(edge_stats.statuses.items()))} ({edge_stats.closed})",
        ),
        ("session floods: handshakes", dict(sorted(lockouts["outcomes"].items(), key=str))),
        ("session floods: peak live sessions", f"{lockouts['peak']} (cap {LIVE_CAP})"),
        ("contained hypercorn races", plain["contained"]),
        ("crashes", crashes),
        (
            "5xx",
            stats.server_errors
            + token_stats.server_errors
            + deflate_stats.server_errors
            + smuggling_stats.server_errors
            + edge_stats.server_errors,
        ),
        ("problems", len(problems)),
        ("duration", f"{duration:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for problem in problems[:20]:
        print("PROBLEM:", problem)
    return 1 if crashes or problems else 0


if __name__ == "__main__":
    sys.exit(main())
