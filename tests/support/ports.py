"""Loopback ports: the one ``free_port`` of the tests and the benchmarks."""

from __future__ import annotations

import socket

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
