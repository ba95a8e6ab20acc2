"""SIGTERM to a real ``trio-gateway serve`` with many sessions mid-turn (issue "Ship it").

The gateway and the demo runtime run as child processes of ``bench/drain.py``, which this test
runs as a child process itself, so the test and the benchmark prove the same thing. Every client
gets 1012, the short turns finish first, the process exits 0 after about the drain timeout, and
the runtime has no stream left open.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..support.processes import run_bench_script


async def drain_and_check(tmp_path: Path, sessions: int, drain_timeout: float) -> None:
    args = ["--sessions", str(sessions), "--drain-timeout", str(drain_timeout)]
    result = await run_bench_script("drain.py", args, tmp_path, timeout=300)
    assert result["got_1012"] == sessions, result["close_codes"]
    assert result["short_finished"] == result["short_turns"] > 0
    assert result["exit_status"] == 0
    assert result["runtime_after"]["active"] == 0
    # every long turn was cancelled at the runtime, every short one completed there
    assert result["runtime_after"]["cancelled"] == result["long_turns"]
    assert result["runtime_after"]["completed"] == result["short_turns"]


async def test_sigterm_with_100_sessions_mid_turn(tmp_path: Path) -> None:
    # The short turns last ~3 s from their start: the drain gives them twice that, so a loaded
    # CI machine does not turn "finished inside the drain" into a race.
    await drain_and_check(tmp_path, sessions=100, drain_timeout=6.0)


@pytest.mark.slow
async def test_sigterm_with_500_sessions_mid_turn(tmp_path: Path) -> None:
    await drain_and_check(tmp_path, sessions=500, drain_timeout=8.0)
