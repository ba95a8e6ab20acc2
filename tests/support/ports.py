"""Loopback ports: the one ``free_port`` of the tests and the benchmarks."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Self

import trio

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port the OS considers free on 127.0.0.1 right now (closed again before returning).

    For children that must be told their port on the command line; servers in this process
    bind port 0 instead and report what they got, which cannot race.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class LoopbackServer:
    """A TCP server of this process on 127.0.0.1, on a port the OS chooses, until
    :meth:`stop`: subclasses answer each connection in :meth:`_handle`."""

    def __init__(self) -> None:
        """Not serving yet: ``nursery.start(server.serve)``."""
        self.port = 0
        self._scope = trio.CancelScope()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started (``port`` is set), serve until :meth:`stop`."""
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        with self._scope:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners)

    def stop(self) -> None:
        """Stop listening and drop every connection."""
        self._scope.cancel()

    @asynccontextmanager
    async def serving(self, nursery: trio.Nursery) -> AsyncIterator[Self]:
        """Serve in ``nursery`` until the block ends (what a fixture yields)."""
        await nursery.start(self.serve)
        try:
            yield self
        finally:
            self.stop()

    async def _handle(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError
