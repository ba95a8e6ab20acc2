"""Load, short version (the long one is ``python bench/load.py``): 100 concurrent sessions
streaming paced turns through one gateway process (a child process, as in production); every
turn's text must arrive exact and in order, and every socket must be gone from the gateway's
gauges afterwards. Figures are printed, never asserted."""

from __future__ import annotations

import pytest

from bench.fleet import running_fleet
from bench.load import LoadConfig, load_settings, run_load


async def load_and_check(cfg: LoadConfig) -> None:
    with running_fleet(load_settings(cfg)) as services:
        result = await run_load(services, cfg)
    print(result.render())
    assert not result.failures
    assert result.turns >= cfg.sessions  # every session completed at least one exact turn
    assert result.tokens == result.turns * cfg.tokens
    assert result.peak_websockets == cfg.sessions
    assert result.after["gateway_active_websockets"] == 0


async def test_100_sessions_every_token_exact_and_in_order() -> None:
    await load_and_check(
        LoadConfig(sessions=100, duration=4.0, tokens=20, rate=20.0, think=0.5, ramp=1.0)
    )


@pytest.mark.slow
async def test_2000_sessions_for_a_minute() -> None:
    await load_and_check(LoadConfig(sessions=2000, duration=60.0))
