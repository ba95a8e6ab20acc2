"""Reading HTTP/1.1 by hand on a raw socket: what the edge tests need to see exactly what went
over the wire (no client library that would fix things up)."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def receive_until(
    stream: trio.abc.ReceiveStream, done: Callable[[bytes], bool], limit: int = 1 << 20
) -> bytes:
    """Bytes from ``stream`` until ``done(received)``, the peer closes (or resets), or ``limit``
    bytes have come; whatever was received. Unbounded in time: the caller bounds it."""
    received = b""
    while not done(received) and len(received) < limit:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not data:
            break
        received += data
    return received


def content_length(head: bytes) -> int:
    """The ``Content-Length`` of a response head (0 without one)."""
    length = 0
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length":
            length = int(value)
    return length
