"""Drain under load: SIGTERM to a real ``trio-gateway serve`` with many sessions mid-turn.

Run ``python bench/drain.py`` (500 sessions) or ``--sessions N --drain-timeout S``. The script
starts the demo runtime (``trio-gateway demo-runtime``, paced streams) and the gateway as child
processes on free loopback ports, opens N WebSocket sessions and starts one turn on each: a
short one (``bench 4 1``: about 3 s, it should finish inside the drain) on every
``--short-every``-th session, and one that would run for a day (``bench 100000 1``) on the
others. Once every session has its first token, the gateway gets SIGTERM. Then:

* every client must receive close **1012** (the short turns' last chunk first);
* the gateway process must exit with status 0, about ``--drain-timeout`` seconds later (the
  long turns are cancelled at the drain timeout);
* the runtime must have no stream left open (its ``/events/metrics`` ``streams.active``).

It prints the figures (time to exit, clients that got 1012, open streams at the runtime after)
and exits 0 when all three hold, 1 otherwise. ``tests/proof/test_drain_load.py`` runs the same code
with 100 sessions (and 500 under ``-m slow``).
"""

from __future__ import annotations

import argparse
import signal
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

from bench.harness import (
    Services,
    add_json_option,
    raise_fd_limit,
    running_fleet,
    runtime_streams,
    table,
    write_json,
)

SHORT_TURN = "bench 4 1"  # four tokens at 1/s: ends ~3 s after it starts
LONG_TURN = "bench 100000 1"  # would stream for a day: only the drain timeout ends it
CONNECT_CONCURRENCY = 50
PHASE_TIMEOUT = 120.0


@dataclass
class DrainConfig:
    """Sizes of one drain run."""

    sessions: int = 500
    drain_timeout: float = 8.0
    short_every: int = 4  # every 4th session runs a short turn that finishes inside the drain


@dataclass
class SessionOutcome:
    """What one client saw after the SIGTERM."""

    short: bool
    close_code: int | None = None
    final_seen: bool = False  # a frame with is_final true arrived before the close
    error_codes: list[str] = field(default_factory=list)


@dataclass
class DrainResult:
    """Figures of one drain run."""

    sessions: int
    drain_timeout: float
    close_codes: Counter[int | None]
    short_turns: int
    short_finished: int
    long_turns: int
    exit_status: int | None
    exit_seconds: float
    last_close_seconds: float
    runtime_after: dict[str, int]

    @property
    def got_1012(self) -> int:
        """Clients closed with 1012."""
        return self.close_codes.get(1012, 0)

    @property
    def ok(self) -> bool:
        """Every client got 1012, the process exited 0, no stream left at the runtime,
        every short turn finished before its close."""
        return (
            self.got_1012 == self.sessions
            and self.exit_status == 0
            and self.runtime_after.get("active", -1) == 0
            and self.short_finished == self.short_turns
        )

    def render(self) -> str:
        """The figure table."""
        codes = ", ".join(f"{code}: {count}" for code, count in sorted(self.close_codes.items()))
        rows = [
            ("sessions mid-turn at SIGTERM", f"{self.sessions}"),
            ("drain timeout", f"{self.drain_timeout:g} s"),
            ("clients that got 1012", f"{self.got_1012} / {self.sessions} ({codes})"),
            ("short turns finished before 1012", f"{self.short_finished} / {self.short_turns}"),
            ("long turns cancelled at the timeout", f"{self.long_turns}"),
            ("last client closed after SIGTERM", f"{self.last_close_seconds:.2f} s"),
            ("process exit status", f"{self.exit_status}"),
            ("time from SIGTERM to exit", f"{self.exit_seconds:.2f} s"),
            (
                "runtime streams after (active / cancelled / completed)",
                f"{self.runtime_after.get('active')} / {self.runtime_after.get('cancelled')} / "
                f"{self.runtime_after.get('completed')}",
            ),
            ("verdict", "PASS" if self.ok else "FAIL"),
        ]
        return table(rows)


async def _session(
    services: Services,
    index: int,
    outcome: SessionOutcome,
    started: trio.Semaphore,
    limiter: trio.CapacityLimiter,
    closed_at: list[float],
) -> None:
    """Connect, start a turn, release ``started`` at the first token, read until the close.

    A session that fails before its first token still releases ``started`` (its outcome then
    shows no 1012 and the error).
    """
    turn = SHORT_TURN if outcome.short else LONG_TURN
    first = True
    try:
        async with trio.open_nursery() as own:
            async with limiter:
                connection = await trio_websocket.connect_websocket_url(
                    own, services.ws_url(f"drain-{index}")
                )
            await connection.send_message(
                orjson.dumps({"type": "user_message", "content": turn}).decode()
            )
            try:
                while True:
                    frame = orjson.loads(await connection.get_message())
                    if first:
                        started.release()
                        first = False
                    if frame.get("type") == "error":
                        outcome.error_codes.append(str(frame.get("code")))
                    if frame.get("is_final") is True:
                        outcome.final_seen = True
            except trio_websocket.ConnectionClosed as closed:
                outcome.close_code = closed.reason.code if closed.reason is not None else None
                closed_at.append(time.perf_counter())
            own.cancel_scope.cancel()
    except* (OSError, trio_websocket.HandshakeError) as group:
        outcome.error_codes.append(f"connect: {group.exceptions[0]!r}")
    finally:
        if first:
            started.release()


async def run_drain(services: Services, cfg: DrainConfig) -> DrainResult:
    """Open the sessions, start their turns, SIGTERM the gateway, collect the figures."""
    await services.runtime.wait_healthy()
    await services.gateway.wait_healthy()
    outcomes = [SessionOutcome(short=index % cfg.short_every == 0) for index in range(cfg.sessions)]
    started = trio.Semaphore(0)
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    closed_at: list[float] = []
    exit_status: int | None = None
    exit_seconds = float("nan")
    sigterm_at = time.perf_counter()
    process = services.gateway.process
    with trio.fail_after(PHASE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for index, outcome in enumerate(outcomes):
                nursery.start_soon(_session, services, index, outcome, started, limiter, closed_at)
            for _ in outcomes:  # every session has its first token: all are mid-turn
                await started.acquire()
            services.check_alive()
            process.send_signal(signal.SIGTERM)
            sigterm_at = time.perf_counter()
            while process.poll() is None:  # noqa: ASYNC110 (a Popen child: poll it)
                await trio.sleep(0.02)
            exit_seconds = time.perf_counter() - sigterm_at
            exit_status = process.returncode
    # the runtime notices each closed request on its own schedule: give it a moment
    runtime_after = await runtime_streams(services)
    with trio.move_on_after(5):
        while runtime_after["active"]:
            await trio.sleep(0.1)
            runtime_after = await runtime_streams(services)
    shorts = [o for o in outcomes if o.short]
    longs = [o for o in outcomes if not o.short]
    return DrainResult(
        sessions=cfg.sessions,
        drain_timeout=cfg.drain_timeout,
        close_codes=Counter(o.close_code for o in outcomes),
        short_turns=len(shorts),
        short_finished=sum(o.final_seen for o in shorts),
        long_turns=len(longs),
        exit_status=exit_status,
        exit_seconds=exit_seconds,
        last_close_seconds=(max(closed_at) - sigterm_at) if closed_at else float("nan"),
        runtime_after=runtime_after,
    )


def drain_settings(cfg: DrainConfig) -> dict[str, str]:
    """Gateway settings for a drain run."""
    return {
        "drain_timeout": str(cfg.drain_timeout),
        "ws_close_timeout": "2",
        "max_connections": str(cfg.sessions + 100),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run one drain and print its figures; 0 when every check held."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=DrainConfig.sessions)
    parser.add_argument("--drain-timeout", type=float, default=DrainConfig.drain_timeout)
    parser.add_argument("--short-every", type=int, default=DrainConfig.short_every)
    add_json_option(parser)
    args = parser.parse_args(argv)
    cfg = DrainConfig(args.sessions, args.drain_timeout, max(1, args.short_every))
    raise_fd_limit()
    with running_fleet(drain_settings(cfg)) as services:
        result = trio.run(run_drain, services, cfg)
    print(result.render(), flush=True)
    write_json(args.json, result, got_1012=result.got_1012, ok=result.ok)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
