"""Soak, short version (the long one is ``python bench/soak.py``, an hour by default): clients
connect, chat and disconnect at random for ~20 s, a third of them abruptly (TCP reset, FIN
without a close frame, half a frame, leaving mid-turn). Afterwards the gateway process must be
back at its baseline: open fds within 2, trio tasks exactly, no socket or session left, RSS
within the documented tolerance of its warm idle level, no stream left at the runtime."""

from __future__ import annotations

import pytest

from bench.fleet import running_fleet
from bench.soak import SoakConfig, run_soak, soak_settings


async def soak_and_check(cfg: SoakConfig) -> None:
    with running_fleet(soak_settings(cfg)) as services:
        result = await run_soak(services, cfg)
    print(result.render())
    assert sum(result.kinds.values()) > cfg.workers
    assert result.turns > 0
    assert result.problems() == []


async def test_a_20_second_soak_returns_to_baseline() -> None:
    await soak_and_check(SoakConfig(duration=15.0, workers=30, warmup=5.0))


@pytest.mark.slow
async def test_a_10_minute_soak_returns_to_baseline() -> None:
    await soak_and_check(SoakConfig(duration=600.0, workers=100))
