"""Profiling a gateway with py-spy while a benchmark runs, summarised as its hottest functions
(``--profile``). Optional: without py-spy the block just runs unprofiled."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

PROFILE_RATE = 100  # py-spy samples per second


def find_py_spy() -> str | None:
    """py-spy next to this interpreter or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@asynccontextmanager
async def profiled(pid: int, output: Path | None) -> AsyncIterator[None]:
    """Record ``pid`` with py-spy (collapsed stacks) into ``output`` while the block runs."""
    py_spy = find_py_spy() if output is not None else None
    if output is None or py_spy is None:
        yield
        return
    command = [py_spy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE)]
    command += ["--format", "raw", "--nolineno", "--nonblocking", "--output", str(output)]
    recorder = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes the file and exits
        with trio.CancelScope(shield=True):
            with trio.move_on_after(30):
                await recorder.wait()
            if recorder.returncode is None:
                recorder.kill()
                await recorder.wait()


def _package_of(frame: str) -> str:
    """``"f (httpcore/_async/http11.py)"`` -> ``"httpcore"``; stdlib modules keep their name."""
    _, _, where = frame.rpartition(" (")
    return where.rstrip(")").split("/")[0].removesuffix(".py") or "?"


def hottest_functions(collapsed: Path, top: int = 10) -> list[str]:
    """The functions with the most samples (inclusive and self) in a py-spy raw profile.

    Inclusive counts start below trio's run loop: the frames above it (the interpreter, the CLI,
    ``trio.run``) are on every stack and say nothing.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        loop = max((i for i, f in enumerate(frames) if f.startswith("unrolled_run ")), default=-1)
        total += int(count)
        own[frames[-1]] += int(count)
        packages[_package_of(frames[-1])] += int(count)
        for frame in set(frames[loop + 1 :]):
            inclusive[frame] += int(count)
    if not total:
        return ["(no samples)"]
    lines = [
        f"{total} samples; self time by package: "
        + ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in packages.most_common(8)),
        "inclusive (below trio's run loop):",
    ]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    lines.append("self:")
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return lines


def profile_summary(path: Path | None) -> list[str] | None:
    """The hottest functions of the profile at ``path`` (None when no profile was asked for)."""
    if path is None:
        return None
    if not path.exists():
        return ["(no profile: py-spy not found or it failed)"]
    return hottest_functions(path)
