"""The benchmarks' own infrastructure, written once: CPU, RSS, fds and run-queue waits of a
child from ``/proc``, the two servers' own figures (the gateway's ``/metrics``, the runtime's
stream counters), a demo runtime and a gateway as children (:func:`running_fleet`), py-spy
profiles, figure tables, the environment a run is tied to (load averages, the gateway sources'
digest) and ``--baseline REF`` unpacking.

Shared with the tests (and imported from there, never copied): free ports, child processes
(``tests/support/processes.py``) and the raw WebSocket client (``tests/support/rawws.py``).
Used by every script of ``bench/``; run as scripts, they put the checkout on ``sys.path`` first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import trio

from tests.support.ports import HOST, free_port
from tests.support.processes import Child, ChildError, child_env, spawned

__all__ = [
    "HOST",
    "ROOT",
    "UNLIMITED_USER",
    "WS_PATH",
    "BenchError",
    "Child",
    "CpuMeter",
    "CpuUse",
    "ProcSample",
    "Sampler",
    "Services",
    "baseline_tree",
    "child_env",
    "cpu_seconds",
    "describe",
    "find_py_spy",
    "free_port",
    "gateway_metrics",
    "gateway_sources_digest",
    "hottest_functions",
    "interrupted",
    "leaves",
    "loadavg",
    "log",
    "open_fds",
    "percentile",
    "profiled",
    "raise_fd_limit",
    "rss_kib",
    "running_fleet",
    "runqueue_wait_seconds",
    "runtime_streams",
    "self_cpu_seconds",
    "spawned",
    "table",
    "write_json",
]

ROOT = Path(__file__).resolve().parent.parent
WS_PATH = "/api/v1/ws/"
PROFILE_RATE = 100  # py-spy samples per second

# One exception for "the benchmark itself failed" (wrong text, an error frame, a timeout, a
# child that died or never became healthy): the child launcher shared with the tests raises
# ChildError, the benchmarks' own checks raise it under this name, and every handler of a
# benchmark catches both.
BenchError = ChildError


# ------------------------------------------------------------------------------------------------
# Processes: CPU, memory, file descriptors, run-queue waits
# ------------------------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # an unlimited hard limit cannot be the soft limit on Linux (nr_open)
    if soft != resource.RLIM_INFINITY and soft < hard:
        with suppress(ValueError, OSError):  # keep what we have; main() checks it is enough
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by process ``pid`` (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    """User + system CPU seconds of this (the client) process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds process ``pid``'s main thread has spent runnable but waiting for a CPU
    (``/proc/<pid>/schedstat``, field 2; 0 when the kernel does not expose it).

    CPU time alone reads as "idle" on a saturated machine: a process that got 40% of a core
    and waited 60% of the time for one is CPU-bound, not idle."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` holds open right now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class ProcSample:
    """One look at a process: when (perf_counter seconds), CPU seconds so far, RSS, fds, and
    seconds spent waiting for a CPU so far."""

    at: float
    cpu_s: float
    rss_kib: int
    fds: int
    wait_s: float = 0.0


def sample(pid: int) -> ProcSample:
    """Read ``/proc/<pid>/stat``, ``status``, ``schedstat`` and ``fd`` now."""
    return ProcSample(
        time.perf_counter(),
        cpu_seconds(pid),
        rss_kib(pid),
        open_fds(pid),
        runqueue_wait_seconds(pid),
    )


@dataclass
class Sampler:
    """Samples one process every ``interval`` seconds while :meth:`run` runs."""

    pid: int
    interval: float = 1.0
    samples: list[ProcSample] = field(default_factory=list)

    async def run(self) -> None:
        """Sample until cancelled (a process that has exited ends the sampling)."""
        while True:
            try:
                self.samples.append(sample(self.pid))
            except (OSError, BenchError):
                return
            await trio.sleep(self.interval)

    def cpu_percent(self) -> list[float]:
        """CPU use between consecutive samples, in percent of one core."""
        pairs = zip(self.samples, self.samples[1:], strict=False)
        return [100 * (b.cpu_s - a.cpu_s) / max(b.at - a.at, 1e-9) for a, b in pairs]

    def summary(self) -> dict[str, float]:
        """Mean and peak CPU %, first/peak/last RSS (MiB) and fds over the samples."""
        if not self.samples:
            return {}
        cpu = self.cpu_percent()
        first, last = self.samples[0], self.samples[-1]
        wall = max(last.at - first.at, 1e-9)
        return {
            "cpu_mean_pct": 100 * (last.cpu_s - first.cpu_s) / wall,
            "cpu_peak_pct": max(cpu) if cpu else float("nan"),
            "cpu_wait_pct": 100 * (last.wait_s - first.wait_s) / wall,
            "rss_first_mib": first.rss_kib / 1024,
            "rss_peak_mib": max(s.rss_kib for s in self.samples) / 1024,
            "rss_last_mib": last.rss_kib / 1024,
            "fds_peak": max(s.fds for s in self.samples),
            "samples": len(self.samples),
        }


# ------------------------------------------------------------------------------------------------
# Services: a runtime and a gateway, and what they say about themselves
# ------------------------------------------------------------------------------------------------


# Every client of these benchmarks is the same "anonymous" user at one address (JWT off), and
# the per-user caps (20 sockets; 5 messages/s, burst 30; 5 handshakes/s, burst 60; 100 live
# sessions) would refuse most of a few hundred sessions: lift them so that what is measured is
# the relay and the lifecycle, not the limiter.
UNLIMITED_USER = {
    "ws_messages_per_second": "10000",
    "ws_message_burst": "100000",
    "max_connections_per_user": "100000",
    "ws_handshakes_per_second": "100000",
    "ws_handshake_burst": "1000000",
    "max_live_sessions_per_user": "1000000",
}


@dataclass(frozen=True)
class Services:
    """A running runtime and gateway, and the internal key they share."""

    runtime: Child
    gateway: Child
    internal_key: str

    def ws_url(self, session_id: str) -> str:
        """The gateway's WebSocket URL for ``session_id``."""
        return self.gateway.url.replace("http://", "ws://", 1) + WS_PATH + session_id

    def check_alive(self) -> None:
        """Raise if either child has died."""
        self.runtime.check_alive()
        self.gateway.check_alive()


class CpuMeter:
    """CPU seconds of the gateway, the runtime and this client over one timed window."""

    def __init__(self, services: Services) -> None:
        """Read the starting values now."""
        self._services = services
        self._start = self._read()
        self._wall_start = time.perf_counter()

    def _read(self) -> tuple[float, float, float]:
        return (
            cpu_seconds(self._services.gateway.pid),
            cpu_seconds(self._services.runtime.pid),
            self_cpu_seconds(),
        )

    def elapsed(self) -> CpuUse:
        """CPU seconds of each process and wall seconds since construction."""
        end = self._read()
        return CpuUse(
            gateway_s=end[0] - self._start[0],
            runtime_s=end[1] - self._start[1],
            client_s=end[2] - self._start[2],
            wall_s=time.perf_counter() - self._wall_start,
        )


@dataclass
class CpuUse:
    """CPU seconds per process over a window of ``wall_s`` seconds."""

    gateway_s: float
    runtime_s: float
    client_s: float
    wall_s: float

    def __add__(self, other: CpuUse) -> CpuUse:
        return CpuUse(
            self.gateway_s + other.gateway_s,
            self.runtime_s + other.runtime_s,
            self.client_s + other.client_s,
            self.wall_s + other.wall_s,
        )

    def cores(self) -> str:
        """Average cores busy per process, e.g. ``gateway 0.97, runtime 0.51, client 0.40``."""
        wall = self.wall_s or math.nan
        return (
            f"gateway {self.gateway_s / wall:.2f}, runtime {self.runtime_s / wall:.2f}, "
            f"client {self.client_s / wall:.2f}"
        )


# ------------------------------------------------------------------------------------------------
# Profiling (optional): py-spy on the gateway, summarised as its hottest functions
# ------------------------------------------------------------------------------------------------


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


def parse_prometheus(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a Prometheus text exposition."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


async def gateway_metrics(services: Services) -> dict[str, float]:
    """The gateway's ``/metrics`` (open to loopback by default), parsed."""
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(services.gateway.url + "/metrics", timeout=10)
        response.raise_for_status()
    return parse_prometheus(response.text)


async def runtime_streams(services: Services) -> dict[str, int]:
    """The demo runtime's turn-stream counters: started, completed, cancelled, active."""
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(
            services.runtime.url + "/events/metrics",
            headers={"X-Internal-Auth": services.internal_key},
            timeout=10,
        )
        response.raise_for_status()
    streams = response.json()["streams"]
    return {key: int(value) for key, value in streams.items()}


@contextmanager
def running_fleet(
    gateway_settings: dict[str, str] | None = None,
    *,
    instant_runtime: bool = False,
    workdir: Path | None = None,
) -> Iterator[Services]:
    """A demo runtime and a gateway (``trio-gateway serve``) as children, on free loopback
    ports, stopped (SIGTERM, then SIGKILL) when the block ends. Wait for them to be healthy
    with ``await services.runtime.wait_healthy()`` / ``services.gateway.wait_healthy()``."""
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        where = workdir if workdir is not None else Path(tmp)
        runtime_args = ["demo-runtime", "--instant"] if instant_runtime else ["demo-runtime"]
        with spawned("runtime", runtime_args, child_env(key), where) as runtime:
            settings = {**UNLIMITED_USER, **(gateway_settings or {})}
            env = child_env(key, agent_url=runtime.url, **settings)
            with spawned("gateway", ["serve"], env, where) as gateway:
                yield Services(runtime, gateway, key)


# ------------------------------------------------------------------------------------------------
# Reports: tables, the environment of a run, errors
# ------------------------------------------------------------------------------------------------


def table(rows: Sequence[tuple[str, str]]) -> str:
    """Two columns, names padded to the longest: the figure tables every script prints."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def write_json(path: Path | None, result: object, **computed: object) -> None:
    """Write ``result`` (a dataclass) and its ``computed`` figures (its properties) to ``path``
    as JSON, when a path was given (``--json FILE``): what the short tests read back."""
    if path is None:
        return
    figures = orjson.loads(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS))
    figures.update(computed)
    path.write_bytes(orjson.dumps(figures, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2))


def log(text: str) -> None:
    """Progress to stderr (stdout carries the figures)."""
    print(text, file=sys.stderr, flush=True)


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as the kernel prints them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def gateway_sources_digest() -> str:
    """SHA-256 over the gateway package's ``.py`` files, to tie the figures to a code version
    (the package is installed editable; this script does not run git)."""
    spec = importlib.util.find_spec("trio_gateway")
    if spec is None or not spec.submodule_search_locations:
        return "unknown"
    package = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256()
    # Every subpackage too (session/, edge/...): a change anywhere changes the figures' tie.
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def leaves(error: BaseException) -> Iterator[BaseException]:
    """Every exception inside ``error``'s groups (``error`` itself when it is no group)."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


def interrupted(error: BaseException) -> bool:
    """Whether a Ctrl-C is among ``error``'s leaves."""
    return any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves(error))


def describe(leaf: BaseException) -> str:
    """One line for a failure: what it was and its message."""
    if isinstance(leaf, trio.TooSlowError):
        return "timed out (a trio.fail_after bound expired)"
    return f"{type(leaf).__name__}: {leaf}"


# ------------------------------------------------------------------------------------------------
# --baseline REF: another commit's gateway package
# ------------------------------------------------------------------------------------------------


@contextmanager
def baseline_tree(ref: str, prefix: str = "bench-base-") -> Iterator[Path]:
    """The ``trio_gateway`` package of commit ``ref``, unpacked into a temporary directory."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "trio_gateway"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)
