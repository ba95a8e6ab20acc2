"""Shared pieces of the drain, load and soak proofs (``bench/drain.py``, ``bench/load.py``,
``bench/soak.py`` and their short tests): a demo runtime and a gateway as child processes, what
the operating system says about the gateway (CPU, RSS, open file descriptors), what the two
servers say about themselves (the gateway's ``/metrics``, the runtime's stream counters), and a
raw WebSocket client that can vanish without a close frame.

The process plumbing (children on free loopback ports that die with us, CPU and RSS from
``/proc``, the per-turn exactness check) is imported from ``bench/relay_bench.py``, not copied.
"""

from __future__ import annotations

import os
import secrets
import socket as stdlib_socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, RejectConnection, Request

if __package__ in (None, ""):  # run as a script: make ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.relay_bench import (
    HOST,
    UNLIMITED_USER,
    BenchError,
    Child,
    Services,
    child_env,
    cpu_seconds,
    rss_kib,
    spawned,
)

__all__ = [
    "HOST",
    "BenchError",
    "Child",
    "ProcSample",
    "RawClient",
    "Sampler",
    "Services",
    "gateway_metrics",
    "open_fds",
    "percentile",
    "running_fleet",
    "runqueue_wait_seconds",
    "runtime_streams",
]


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


class RawClient:
    """A WebSocket client on a bare socket that can leave without a close frame.

    ``vanish(reset=True)`` sends a TCP reset (SO_LINGER 0), ``reset=False`` a plain FIN: the
    two ways a laptop lid, a crashed IDE or a dropped link look to the gateway.
    """

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        """Wrap a connected, upgraded socket."""
        self.stream = stream
        self.ws = ws

    @classmethod
    async def connect(cls, port: int, path: str, subprotocols: Sequence[str] = ()) -> RawClient:
        """Open ``ws://127.0.0.1:port{path}`` (offering ``subprotocols``, e.g. ``codelab.v2``);
        raises ``ConnectionError`` when refused."""
        stream = await trio.open_tcp_stream(HOST, port)
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(host=f"{HOST}:{port}", target=path, subprotocols=list(subprotocols))
        await stream.send_all(ws.send(request))
        while True:
            data = await stream.receive_some(65536)
            if not data:
                await stream.aclose()
                raise ConnectionError("closed during the handshake")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return cls(stream, ws)
                if isinstance(event, RejectConnection):
                    await stream.aclose()
                    raise ConnectionError(f"handshake refused with HTTP {event.status_code}")

    async def send_json(self, frame: dict[str, object]) -> None:
        """Send one JSON text frame."""
        await self.stream.send_all(self.ws.send(Message(data=orjson.dumps(frame).decode())))

    async def read_some(self) -> bytes:
        """One network read (whatever the gateway sent; not parsed)."""
        return await self.stream.receive_some(65536)

    async def vanish(self, *, reset: bool) -> None:
        """Close the socket without a WebSocket close frame (with a TCP RST when ``reset``)."""
        if reset:
            self.stream.socket.setsockopt(
                stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        await self.stream.aclose()
