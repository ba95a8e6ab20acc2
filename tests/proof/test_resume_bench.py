"""Resume benchmark, smoke version (the real one is ``python bench/resume_bench.py``): the
script runs end to end with tiny sizes as a child process (its own runtime, gateways and
redis-server), prints its three tables, and every resume it measured was exact.

Figures are printed, never asserted: on shared machines they say nothing in a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from ..support.processes import BENCH_DIR, run_python

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)

ITERATIONS = 3
TINY = [
    "--quick",
    "--iterations", str(ITERATIONS),
    "--paced-tokens", "300",  # 1 s turns at 300 tokens/s
    "--unpaced-tokens", "1000",
    "--sessions", "4",
    "--tokens", "200",
    "--paced-sessions", "4",
    "--paced-duration", "0.5",
]  # fmt: skip


def failing(phase: dict[str, Any]) -> list[dict[str, Any]]:
    """The samples of a resume phase that were not exact."""
    return [
        sample
        for variant in phase["variants"]
        for sample in variant["samples"]
        if sample["problems"] or sample["resyncs"]
    ]


def run_bench(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """One run of the bench with tiny sizes: its output and its figures."""
    figures = tmp_path / "figures.json"
    figures.unlink(missing_ok=True)
    script = str(BENCH_DIR / "resume_bench.py")
    done = run_python(script, *TINY, "--json", str(figures), cwd=tmp_path, timeout=100)
    print(done.stdout)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: an exactness failure, below
    assert figures.exists(), done.stderr[-3000:]
    for title in (
        "1. Resume on the same replica",
        "2. Resume on the other replica",
        "3. Throughput cost of the Redis backend",
        "exactness failures:",
    ):
        assert title in done.stdout
    data = orjson.loads(figures.read_bytes())
    for name in ("single", "replicas"):
        for variant in data[name]["variants"]:
            assert len(variant["samples"]) == ITERATIONS
    return done, data


def test_the_resume_bench_runs_and_every_resume_is_exact(tmp_path: Path) -> None:
    done, data = run_bench(tmp_path)
    # The samples themselves on failure: their problems say what was not exact (a gap, a
    # duplicate, a resync, a timeout), and the bench's log lines around them (stdout) when.
    assert failing(data["single"]) == [], done.stdout[-3000:]
    assert failing(data["replicas"]) == [], done.stdout[-3000:]
    assert done.returncode == 0
    assert "exactness failures: 0 (PASS" in done.stdout
