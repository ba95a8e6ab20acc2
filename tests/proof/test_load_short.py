"""Load, short version (the long one is ``python bench/load.py``): 100 concurrent sessions
streaming paced turns through one gateway process (a child process, as in production); every
turn's text must arrive exact and in order, and every socket must be gone from the gateway's
gauges afterwards. Figures are printed, never asserted. The test runs ``bench/load.py`` itself
as a child process."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..support.processes import run_bench_script


async def load_and_check(tmp_path: Path, sessions: int, tokens: int, *args: str) -> None:
    command = ["--sessions", str(sessions), "--tokens", str(tokens), *args]
    result = await run_bench_script("load.py", command, tmp_path, timeout=600)
    assert not result["failures"]
    assert result["turns"] >= sessions  # every session completed at least one exact turn
    assert result["tokens"] == result["turns"] * tokens
    assert result["peak_websockets"] == sessions
    assert result["after"]["gateway_active_websockets"] == 0


async def test_100_sessions_every_token_exact_and_in_order(tmp_path: Path) -> None:
    await load_and_check(
        tmp_path, 100, 20, "--duration", "4", "--rate", "20", "--think", "0.5", "--ramp", "1"
    )


@pytest.mark.slow
async def test_2000_sessions_for_a_minute(tmp_path: Path) -> None:
    await load_and_check(tmp_path, 2000, 10, "--duration", "60")
