"""Soak, short version (the long one is ``python bench/soak.py``, an hour by default): clients
connect, chat and disconnect at random for ~20 s, a third of them abruptly (TCP reset, FIN
without a close frame, half a frame, leaving mid-turn). Afterwards the gateway process must be
back at its baseline: open fds within 2, trio tasks exactly, no socket or session left, RSS
within the documented tolerance of its warm idle level, no stream left at the runtime. The test
runs ``bench/soak.py`` itself as a child process."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..support.processes import run_bench_script


async def soak_and_check(tmp_path: Path, duration: float, workers: int, warmup: float) -> None:
    args = ["--duration", str(duration), "--workers", str(workers), "--warmup", str(warmup)]
    result = await run_bench_script("soak.py", args, tmp_path, timeout=duration + 300)
    assert sum(result["kinds"].values()) > workers
    assert result["turns"] > 0
    assert result["problems"] == []


async def test_a_20_second_soak_returns_to_baseline(tmp_path: Path) -> None:
    await soak_and_check(tmp_path, duration=15.0, workers=30, warmup=5.0)


@pytest.mark.slow
async def test_a_10_minute_soak_returns_to_baseline(tmp_path: Path) -> None:
    await soak_and_check(tmp_path, duration=600.0, workers=100, warmup=0.0)
