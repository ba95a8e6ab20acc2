"""Paced latency benchmark, smoke version (the real one is ``python bench/latency.py``): the
script runs end to end with tiny sizes as a child process (its own runtime and gateway),
prints its table, and every paced token arrived in its own frame.

Figures are printed, never asserted: on shared machines they say nothing in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from ..support.processes import BENCH_DIR, run_python

TINY = ["--sessions", "4", "--rate", "10", "--seconds", "1", "--rounds", "1"]


def test_latency_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    script = str(BENCH_DIR / "latency.py")
    done = run_python(script, *TINY, "--json", str(figures), cwd=tmp_path, timeout=100)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "added by gateway-off: p50" in done.stdout
    result = orjson.loads(figures.read_bytes())
    for path in ("direct", "gateway-off"):
        assert result[path]["samples"] == 4 * 10  # every token, each in its own frame
        assert result[path]["multi_token_frames"] == 0
    assert result["gateway-off"]["deflate_negotiated"] is False  # offered, default is off
