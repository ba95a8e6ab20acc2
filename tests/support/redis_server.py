"""A private ``redis-server`` on loopback for the shared-state tests: start, kill, restart.

No persistence (``--save '' --appendonly no``), files in a temporary directory, an OS-chosen
free port. ``kill`` is SIGKILL (a crash, not a shutdown); ``restart`` comes back on the same
port with empty data, like a Redis without persistence after a crash. ``pause``/``resume``
(SIGSTOP/SIGCONT) make a Redis that accepts packets and never answers: a blackhole.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .ports import free_port
from .processes import die_with_parent, stop_process

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT = 10.0


def answers_ping(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers PING right now (one started with
    ``--requirepass`` answers ``-NOAUTH``: it is up too)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` child process; this object is the only one that signals it."""

    def __init__(
        self, directory: Path, port: int | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        """A server for ``directory`` (its files and log) on ``port`` (a free one by default),
        with ``extra_args`` appended to its command line; not started yet."""
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.directory = directory
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The running server's process id."""
        assert self.process is not None
        return self.process.pid

    def url(self, db: int = 0) -> str:
        """The server's redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start the server and wait (bounded) until it answers PING."""
        assert REDIS_SERVER is not None and self.process is None
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                *self.extra_args,
            ],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop it
            preexec_fn=die_with_parent(),  # a killed run leaves no server behind
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # in case it was paused
                process.kill()
            process.wait(timeout=START_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it does not go; reaped."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process)

    def restart(self) -> None:
        """Start again on the same port (empty: there is no persistence)."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a blackholed Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextmanager
def running_redis(directory: Path, extra_args: Sequence[str] = ()) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped (SIGTERM, then SIGKILL) when the block ends."""
    server = RedisServer(directory, extra_args=extra_args)
    server.start()
    try:
        yield server
    finally:
        server.stop()
