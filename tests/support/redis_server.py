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
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT = 10.0


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def answers_ping(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers PING right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` child process; this object is the only one that signals it."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

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
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
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
