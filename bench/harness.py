"""The benchmarks' own infrastructure, written once: CPU, RSS, fds and run-queue waits of a
child from ``/proc``, the two servers' own figures (the gateway's ``/metrics``, the runtime's
stream counters), a demo runtime and a gateway as children (:func:`running_fleet`), a private
``redis-server``. The door to the rest of the bench modules too: it re-exports what every script
needs of :mod:`bench.runs` (exit status, environment, tables, ``--json``, ``--baseline``),
:mod:`bench.profiling` (py-spy) and :mod:`bench.stats` (percentiles).

Shared with the tests (and imported from there, never copied): free ports, child processes
(``tests/support/processes.py``), ``redis-server`` (``tests/support/redis_server.py``) and the raw
WebSocket client (``tests/support/rawws.py``).
Used by every script of ``bench/``; run as scripts, they put the checkout on ``sys.path`` first.
"""

from __future__ import annotations

import math
import os
import resource
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

from bench.profiling import find_py_spy, hottest_functions, profile_summary, profiled
from bench.runs import (
    ROOT,
    BenchError,
    add_json_option,
    baseline_tree,
    describe,
    environment_lines,
    failure_status,
    finish_environment,
    gateway_sources_digest,
    interrupted,
    leaves,
    loadavg,
    log,
    run_and_write_json,
    run_environment,
    sigterm_as_interrupt,
    table,
    write_json,
)
from bench.stats import percentile
from tests.support.ports import HOST, free_port
from tests.support.processes import Child, child_env, spawned
from tests.support.redis_server import REDIS_SERVER, RedisServer, running_redis

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
    "add_json_option",
    "baseline_tree",
    "child_env",
    "cpu_ns",
    "cpu_seconds",
    "describe",
    "environment_lines",
    "failure_status",
    "find_py_spy",
    "finish_environment",
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
    "port_of",
    "profile_summary",
    "profiled",
    "raise_fd_limit",
    "redis_server",
    "redis_trouble",
    "rss_kib",
    "run_and_write_json",
    "run_environment",
    "run_trio",
    "running_fleet",
    "runqueue_wait_seconds",
    "runtime_streams",
    "sched_ns",
    "self_cpu_seconds",
    "sigterm_as_interrupt",
    "spawned",
    "table",
    "wait_idle",
    "write_json",
]

WS_PATH = "/api/v1/ws/"
T = TypeVar("T")

IDLE_TIMEOUT = 20.0  # seconds for a gateway's sessions to end after a round (grace + margin)


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


def sched_ns(pid: int) -> tuple[int, int]:
    """Nanoseconds every thread of ``pid`` has spent on a CPU and runnable but waiting for one
    (``/proc/<pid>/task/*/schedstat`` fields 1 and 2)."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return run, wait


def cpu_ns(pid: int) -> int:
    """Nanoseconds every thread of ``pid`` has spent on a CPU (``schedstat`` field 1)."""
    return sched_ns(pid)[0]


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` holds open right now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


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

    @staticmethod
    def total(uses: Iterable[CpuUse]) -> CpuUse:
        """The sum of ``uses`` (zero when there is none)."""
        total = CpuUse(0.0, 0.0, 0.0, 0.0)
        for use in uses:
            total = total + use
        return total


def port_of(child: Child) -> int:
    """The loopback port ``child`` listens on."""
    return int(child.url.rsplit(":", 1)[1])


# ------------------------------------------------------------------------------------------------
# What the servers say about themselves; a fleet of children
# ------------------------------------------------------------------------------------------------


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


def run_trio(children: Sequence[Child], async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run(async_fn, *args)``; when it fails (not when interrupted), log the last lines of
    each of ``children``'s logs first: their last words help explain a failure."""
    try:
        return trio.run(async_fn, *args)
    except BaseException as error:
        if not interrupted(error):
            for child in children:
                log(f"--- {child.name} log tail ---\n{child.log_tail()}")
        raise


async def wait_idle(services: Services) -> None:
    """Until the gateway holds no session (closed sessions wait out a short grace period)."""
    with trio.move_on_after(IDLE_TIMEOUT):
        while True:
            metrics = await gateway_metrics(services)
            if not metrics.get("gateway_active_sessions"):
                return
            await trio.sleep(0.25)
    log(f"  warning: {services.gateway.name} still holds sessions after {IDLE_TIMEOUT:g} s")


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` (the tests' launcher) on a free loopback port, without
    persistence, refusing writes rather than evicting; stopped when the block ends."""
    if REDIS_SERVER is None:
        raise BenchError("redis-server is not installed")
    with running_redis(workdir, ["--maxmemory-policy", "noeviction"]) as server:
        yield server


def redis_trouble(metrics: dict[str, float], gateway: Child) -> dict[str, float]:
    """Resume outcomes, failed stream appends and Redis failures one gateway counted, and how
    often its log says it marked Redis unavailable (``state_down``)."""
    wanted = ("gateway_resumes_total", "gateway_state_backend_failures_total")
    found = {
        key: value
        for key, value in metrics.items()
        if key.startswith(wanted)
        or (key.startswith("gateway_limit_hits_total") and "stream_append_failed" in key)
    }
    try:
        text = gateway.log_path.read_text(errors="replace")
    except OSError:
        text = ""
    downs = text.count('"event":"state_down"')
    if downs:
        found["redis marked unavailable (state_down log events)"] = float(downs)
    return found
