"""``trio-gateway serve --workers N``: N gateway processes sharing one port.

One trio process uses one core. To use every core of a host, the supervisor here starts N
worker processes, each a complete ``trio-gateway serve`` (our drain, hypercorn patches and GC
tuning included), each with its own listening socket on the same address (``SO_REUSEPORT``):
the kernel spreads new connections evenly across the workers' accept queues, which one shared
socket would not do (a busy trio loop and an idle one would race for ``accept`` and the idle one
wins most). hypercorn's own ``-w N`` is not used because it terminates busy workers without a
drain and gives clients 1006 (docs/compatibility.md §6).

The supervisor binds the address first without listening: that reserves the port (port 0
resolves once, and nobody else can take the port while a worker restarts) but takes no share of
the connections, since only listening sockets are in the kernel's ``SO_REUSEPORT`` group.

Workers share nothing in memory, so resume, ownership, caps and rates must live in Redis
(``STATE_BACKEND=redis``), exactly as across replicas; :func:`check_worker_settings` refuses
anything else at startup. SIGTERM or SIGINT to the supervisor is passed to every worker, which
drains (clients get 1012) and exits; a worker that dies on its own is started again.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from .settings import Settings, SettingsError

logger = logging.getLogger("trio_gateway.server")

MAX_WORKERS = 64
# A worker that dies sooner than this after its start counts as a crash at startup; after
# CRASH_LOOP_LIMIT of those in a row the supervisor gives up instead of restarting forever.
STARTUP_GRACE_SECONDS = 10.0
CRASH_LOOP_LIMIT = 5
RESTART_DELAY_SECONDS = (0.5, 30.0)  # first delay, largest delay (doubling in between)
# After the drain timeout, how long workers get to close their sockets and exit before they
# are killed.
EXIT_GRACE_SECONDS = 10.0
WORKER_INDEX_ENV = "TRIO_GATEWAY_WORKER_INDEX"
SUPERVISOR_PID_ENV = "TRIO_GATEWAY_SUPERVISOR_PID"


def parse_worker_count(value: str) -> int:
    """``--workers``: a whole number from 1 to 64, or ``auto`` (the cores this process may use)."""
    if value == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    try:
        count = int(value)
    except ValueError:
        raise SettingsError(f"--workers must be a number or 'auto', got {value!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise SettingsError(f"--workers must be between 1 and {MAX_WORKERS}, got {count}")
    return count


def check_worker_settings(settings: Settings, workers: int) -> None:
    """Refuse several workers without shared state (they would each keep their own)."""
    if workers > 1 and settings.state_backend != "redis":
        raise SettingsError(
            f"--workers {workers} needs GATEWAY__STATE_BACKEND=redis (and GATEWAY__REDIS_URL): "
            "workers share nothing in memory, so without Redis a client resuming on another "
            "worker, session ownership, and per-user caps and rates would each be per worker"
        )


def reserve_address(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with ``SO_REUSEPORT`` but do not listen (see the module docstring).

    Raises ``OSError`` naming the address when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(error.errno, f"cannot bind {where}: {error.strerror}") from None
    return sock


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A worker's own listening-to-be socket on the shared address (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


class _WorkerTag(logging.Filter):
    """Adds ``worker`` (the worker's index) to every log record of a worker process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def tag_worker_logs() -> None:
    """In a worker started by the supervisor, tag every log line with the worker's index
    (JSON logs show it as ``"worker"``), so interleaved lines can be told apart."""
    index = os.environ.get(WORKER_INDEX_ENV)
    if index is None or not index.isdigit():
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(int(index)))


async def parent_gone(interval: float = 1.0) -> None:
    """Return once this process's parent (the supervisor) has gone: a worker must not outlive
    it, or its port and sessions would be orphaned.

    The supervisor's pid comes from the environment it started the worker with, not from
    ``getppid()`` at this point: a supervisor that died while the worker was still starting
    would otherwise leave ``init`` as the "parent" and the worker would serve forever."""
    given = os.environ.get(SUPERVISOR_PID_ENV, "")
    parent = int(given) if given.isdigit() else os.getppid()
    # Polling: nothing notifies a process portably when its parent dies (an orphan is
    # re-parented, which getppid() shows), and one cheap check a second is plenty.
    while os.getppid() == parent:  # noqa: ASYNC110
        await trio.sleep(interval)
    logger.warning("the supervisor is gone; draining")


@dataclass
class _Worker:
    index: int
    process: trio.Process | None = None
    started_at: float = 0.0
    quick_crashes: int = 0
    exits: list[int] = field(default_factory=list)
    # The wait for the current process; its deadline is set by Supervisor.stop.
    wait_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Supervisor:
    """Runs ``count`` workers on ``host:port`` until SIGTERM/SIGINT, restarting any that die."""

    def __init__(self, settings: Settings, host: str, port: int, count: int) -> None:
        """A supervisor for ``count`` workers; ``port`` must already be reserved."""
        self.settings = settings
        self.host = host
        self.port = port
        self.count = count
        self.stopping = False
        self.failed = False
        self._stopped = trio.Event()
        self._stop_deadline = math.inf
        self.workers = [_Worker(index) for index in range(count)]

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "trio_gateway.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--reuse-port",
        ]

    async def run(self) -> int:
        """Start the workers, keep them running, stop them all on a signal; the exit status."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_signal, signals)
                async with trio.open_nursery() as workers:
                    for worker in self.workers:
                        workers.start_soon(self._keep_running, worker)
                # Every worker has exited after stop(): no signal left to wait for.
                nursery.cancel_scope.cancel()
        if self.failed:
            return 1
        # A worker stopped by our SIGTERM before it had its handler (still starting) is a
        # clean stop too.
        clean = (0, -signal.SIGTERM)
        return 0 if all(w.exits and w.exits[-1] in clean for w in self.workers) else 1

    async def _stop_on_signal(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if not self.stopping:
                logger.info(
                    "received %s; draining %d workers (again to stop them at once)",
                    signal.Signals(signum).name,
                    self.count,
                    extra={"event": "workers_draining"},
                )
                self.stop()
                continue
            # A second signal: the operator does not want to wait for the drain.
            logger.warning("received %s again; killing the workers", signal.Signals(signum).name)
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()

    def stop(self) -> None:
        """Ask every worker to drain and exit (SIGTERM); none is restarted after this. Workers
        still running after the drain timeout plus a grace period are killed."""
        if self.stopping:
            return
        self.stopping = True
        self._stopped.set()
        self._stop_deadline = trio.current_time() + self.settings.drain_timeout + EXIT_GRACE_SECONDS
        for worker in self.workers:
            worker.wait_scope.deadline = self._stop_deadline
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)

    async def _keep_running(self, worker: _Worker) -> None:
        delay = RESTART_DELAY_SECONDS[0]
        while not self.stopping:
            env = {
                **os.environ,
                WORKER_INDEX_ENV: str(worker.index),
                SUPERVISOR_PID_ENV: str(os.getpid()),
            }
            # Own session: a terminal's Ctrl-C reaches the supervisor only, which then stops
            # the workers once, in order (a second signal would end a worker's drain).
            process = await trio.lowlevel.open_process(
                self._command(), env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
            worker.process = process
            worker.started_at = trio.current_time()
            logger.info(
                "worker %d started (pid %d)",
                worker.index,
                process.pid,
                extra={"event": "worker_started", "worker": worker.index, "pid": process.pid},
            )
            if self.stopping:  # a signal came while it started
                process.send_signal(signal.SIGTERM)
            code = await self._wait(worker, process)
            worker.exits.append(code)
            if self.stopping:
                return
            lived = trio.current_time() - worker.started_at
            worker.quick_crashes = worker.quick_crashes + 1 if lived < STARTUP_GRACE_SECONDS else 0
            logger.warning(
                "worker %d (pid %d) exited with %d; restarting",
                worker.index,
                process.pid,
                code,
                extra={"event": "worker_exited", "worker": worker.index, "exit_code": code},
            )
            if worker.quick_crashes >= CRASH_LOOP_LIMIT:
                logger.error(
                    "worker %d crashed %d times at startup; giving up",
                    worker.index,
                    worker.quick_crashes,
                    extra={"event": "workers_failed"},
                )
                self.failed = True
                self.stop()
                return
            if worker.quick_crashes:  # back off, unless told to stop meanwhile
                with trio.move_on_after(delay):
                    await self._stopped.wait()
                delay = min(delay * 2, RESTART_DELAY_SECONDS[1])
            else:
                delay = RESTART_DELAY_SECONDS[0]

    async def _wait(self, worker: _Worker, process: trio.Process) -> int:
        """The worker's exit status; killed when still running at the stop deadline."""
        worker.wait_scope = trio.CancelScope(deadline=self._stop_deadline)
        with worker.wait_scope:
            return await process.wait()
        logger.error(
            "worker %d (pid %d) did not exit after the drain; killing it",
            worker.index,
            process.pid,
            extra={"event": "worker_killed", "worker": worker.index},
        )
        process.kill()
        return await process.wait()
