"""HTTP/1.1 hygiene at the edge, over raw sockets against a real gateway on loopback.

No HTTP/2 (neither an ``h2c`` upgrade nor the cleartext preface), ``Connection: close``
honoured, ``Content-Length`` with ``Transfer-Encoding`` refused, pipelined requests answered or
the connection closed, slow request heads cut at ``HTTP_HEAD_TIMEOUT``, no redirect built from
the ``Host`` header, text logs that a client cannot forge lines in, and ``/metrics`` behind a
proxy. Every wait is bounded only so that a hanging connection fails instead of hanging; the
gateways here have a read timeout (``2 x WS_HEARTBEAT_INTERVAL + 1``) far above those bounds, so
a connection that closes within them was closed on purpose, not by the read timeout.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import trio

from trio_gateway.observability import TextFormatter, configure_logging
from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import (
    INTERNAL_KEY,
    RunningGateway,
    gateway_settings,
    port_of,
    run_gateway,
    wait_for,
)

# Read timeout 2 * 60 + 1 s: nothing in this module waits anywhere near as long.
QUIET = {"ws_heartbeat_interval": 60.0}
EOF_BOUND = 10.0
H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
)


@pytest.fixture
async def edge(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> AsyncIterator[RunningGateway]:
    settings = gateway_settings(demo_runtime[1], **QUIET)
    async with run_gateway(nursery, settings) as running:
        yield running


class Conversation:
    """One raw TCP connection: send bytes, read whole responses, notice the close."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.eof = False

    async def _more(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    async def response(self, timeout: float = EOF_BOUND) -> tuple[bytes, bytes] | None:
        """The next response (head, body by Content-Length), or None if the server closed."""
        with trio.fail_after(timeout):
            while b"\r\n\r\n" not in self.buffer:
                if not await self._more():
                    return None
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.buffer = rest
            length = 0
            for line in head.lower().split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip() == b"content-length":
                    length = int(value)
            while len(self.buffer) < length:
                if not await self._more():
                    break
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            return head, body

    async def closed(self, timeout: float = EOF_BOUND) -> bool:
        """Whether the server closes the connection within ``timeout`` (no more answers)."""
        with trio.move_on_after(timeout):
            while await self._more():
                pass
            return True
        return False


async def open_conversation(gateway: RunningGateway) -> Conversation:
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(gateway.base_url))
    return Conversation(stream)


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


# --- HTTP/2 in cleartext ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/metrics", "/api/v1/ws/h2c"])
async def test_an_h2c_upgrade_is_plain_http_1_1(edge: RunningGateway, path: str) -> None:
    """Before the fix: 101 Switching Protocols and HTTP/2 on the connection from then on."""
    talk = await open_conversation(edge)
    async with talk.stream:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + H2C + b"\r\n"
        await talk.stream.send_all(request)
        answer = await talk.response()
        assert answer is not None
        head, _ = answer
        assert head.startswith(b"HTTP/1.1 ") and status_of(head) != 101, head
        assert header(head, b"upgrade") is None
        # Still HTTP/1.1 on this connection.
        await talk.stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        again = await talk.response()
        assert again is not None and status_of(again[0]) == 200


async def test_the_cleartext_http2_preface_is_refused_and_closed(edge: RunningGateway) -> None:
    """Before the fix: hypercorn took ``PRI * HTTP/2.0`` as prior knowledge and spoke HTTP/2."""
    talk = await open_conversation(edge)
    async with talk.stream:
        await talk.stream.send_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        )
        answer = await talk.response()
        assert answer is not None, "closed without an answer"
        head, body = answer
        assert head.startswith(b"HTTP/1.1 400"), head
        assert orjson.loads(body)["error"] == "invalid_request"
        assert await talk.closed()


# --- Connection: close, CL + TE, pipelining -------------------------------------------------

REQUESTS = {
    "get": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    "post": (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n"
    ),
    "not-found": b"POST /api/v1/no-such-route HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n",
}


@pytest.mark.parametrize("kind", sorted(REQUESTS))
async def test_connection_close_is_honoured(edge: RunningGateway, kind: str) -> None:
    """Before the fix: answered, then the socket stayed open until the read timeout (41 s in
    production): hypercorn's close ran in the app's task, which quart-trio had cancelled."""
    talk = await open_conversation(edge)
    async with talk.stream:
        body = b"{}" if kind != "get" else b""
        await talk.stream.send_all(REQUESTS[kind] + b"Connection: close\r\n\r\n" + body)
        answer = await talk.response()
        assert answer is not None
        assert await talk.closed(), "the connection stayed open after Connection: close"


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n",
    ],
)
async def test_content_length_with_transfer_encoding_is_refused_and_closed(
    edge: RunningGateway, framing: bytes
) -> None:
    """RFC 9112 6.3. Before the fix: h11 framed the body by Transfer-Encoding, the runtime
    created the session (201) and the smuggled request after it was answered too, while a
    proxy framing by Content-Length would have seen one request."""
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    talk = await open_conversation(edge)
    async with talk.stream:
        await talk.stream.send_all(
            b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n" + framing + b"\r\n2\r\n{}\r\n0\r\n\r\n" + smuggled
        )
        answer = await talk.response()
        assert answer is not None
        assert answer[0].startswith(b"HTTP/1.1 400"), answer[0]
        assert await talk.closed()
        assert b"HTTP/1.1" not in talk.buffer, "the smuggled request was answered"


PIPELINED_FIRST = {
    "post-with-body": REQUESTS["post"] + b"\r\n{}",
    "not-found-with-body": REQUESTS["not-found"] + b"\r\n{}",
    "too-large": (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n" + b" " * 1000
    ),
    "close": REQUESTS["get"] + b"Connection: close\r\n\r\n",
    "get": REQUESTS["get"] + b"\r\n",
}


@pytest.mark.parametrize("first", sorted(PIPELINED_FIRST))
async def test_pipelined_requests_are_answered_or_the_connection_closed(
    edge: RunningGateway, first: str
) -> None:
    """Two GETs pipelined behind a request (in the same write): each is answered, or the
    connection is closed; never an open connection that answers nothing. Before the fix a
    request answered before its body had fully arrived (a 413) left the rest hanging."""
    follow = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    talk = await open_conversation(edge)
    async with talk.stream:
        await talk.stream.send_all(PIPELINED_FIRST[first] + follow * 2)
        answers = []
        for _ in range(3):
            answer = await talk.response()
            if answer is None:
                break
            answers.append(status_of(answer[0]))
        assert answers, "no answer at all"
        if len(answers) < 3:
            assert talk.eof
        else:
            assert answers[1:] == [200, 200]
        if first in ("too-large", "close"):  # said Connection: close (413) or asked for it
            assert len(answers) == 1 and await talk.closed()


# --- slow request heads ------------------------------------------------------------------------


@pytest.fixture
async def head_timeout_gateway(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> AsyncIterator[RunningGateway]:
    settings = gateway_settings(demo_runtime[1], http_head_timeout=1.0, **QUIET)
    async with run_gateway(nursery, settings) as running:
        yield running


async def drip(talk: Conversation, data: bytes, interval: float) -> bool:
    """Send ``data`` a byte at a time; True if the server closed the connection meanwhile."""
    for index in range(len(data)):
        try:
            await talk.stream.send_all(data[index : index + 1])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        with trio.move_on_after(interval):
            if not await talk._more():
                return True
    return False


SLOW_HEADS = {
    "request": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 40,
    "websocket": (
        b"GET /api/v1/ws/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Slow: " + b"s" * 40
    ),
}


@pytest.mark.parametrize("keep_alive", [False, True])
@pytest.mark.parametrize("kind", sorted(SLOW_HEADS))
async def test_a_slow_request_head_is_cut_at_the_head_timeout(
    head_timeout_gateway: RunningGateway, kind: str, keep_alive: bool
) -> None:
    """One byte every 0.2 s (far inside the read timeout) never completes a head: the
    connection is closed at HTTP_HEAD_TIMEOUT (1 s here) long before the ~100 bytes are in.
    Before the fix this held for the second head on a keep-alive connection: the timer that
    bounds it was never re-armed after a request (its re-arming was cancelled with the app's
    task), so one byte every < 41 s held the connection for ever."""
    talk = await open_conversation(head_timeout_gateway)
    async with talk.stream:
        if keep_alive:
            await talk.stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await talk.response()
            assert answer is not None and status_of(answer[0]) == 200
        assert await drip(talk, SLOW_HEADS[kind], 0.2), "a slow head held the connection"
        assert b"HTTP/1.1 101" not in talk.buffer


async def test_the_head_timeout_never_cuts_a_served_request_or_a_websocket(
    head_timeout_gateway: RunningGateway,
) -> None:
    """The timer stops once a head is complete: a WebSocket quiet for longer than the head
    timeout, and a keep-alive connection reused within it, work as before."""
    async with head_timeout_gateway.connect("long-lived") as client:
        await trio.sleep(2.5)  # > HTTP_HEAD_TIMEOUT: ordering only, not a timing assertion
        await client.send({"type": "user_message", "content": "bench 2"})
        frames = await client.turn()
        assert "".join(f.get("token", "") for f in frames) == "t0 t1 "
    talk = await open_conversation(head_timeout_gateway)
    async with talk.stream:
        for _ in range(3):
            await talk.stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await talk.response()
            assert answer is not None and status_of(answer[0]) == 200
            await trio.sleep(0.5)


def test_the_head_timeout_is_hypercorns_keep_alive_timer() -> None:
    from trio_gateway.server import build_hypercorn_config

    settings = gateway_settings("http://127.0.0.1:1", http_head_timeout=7.5)
    assert build_hypercorn_config(settings).keep_alive_timeout == 7.5
    assert gateway_settings("http://127.0.0.1:1").http_head_timeout == 10.0


# --- no redirects, JSON errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/api/v1//sessions/x", "//health", "/api/v1/sessions//x", "/health/", "/api//v1/agents"],
)
async def test_no_redirect_is_built_from_the_host_header(edge: RunningGateway, path: str) -> None:
    """Before the fix: ``308 Location: http://evil.example/...`` (Werkzeug's slash merging)
    with an HTML body."""
    talk = await open_conversation(edge)
    async with talk.stream:
        await talk.stream.send_all(f"GET {path} HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
        answer = await talk.response()
    assert answer is not None
    head, body = answer
    # 404, or the route itself where Werkzeug ignores the leading slashes ("//health").
    assert status_of(head) in (200, 404), head
    assert header(head, b"location") is None
    assert header(head, b"content-type") == b"application/json"
    if status_of(head) == 404:
        assert set(orjson.loads(body)) == {"error", "error_description"}


# --- text logs -----------------------------------------------------------------------------------


def test_text_log_fields_escape_controls_and_line_separators() -> None:
    record = logging.LogRecord(
        "trio_gateway.x",
        logging.WARNING,
        __file__,
        1,
        "bad %s",
        ("a\nb\r\x1b[2J\x85\u2028\u202e\x7f",),
        None,
    )
    record.user = "u\nforged"
    line = TextFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert (
        "\u2028" not in line and "\x85" not in line and "\u202e" not in line and "\x7f" not in line
    )
    assert "a\\x0ab\\x0d\\x1b[2J\\x85\\u2028\\u202e\\x7f" in line
    assert "user=u\\x0aforged" in line


def test_a_traceback_keeps_its_lines_but_none_can_pass_for_a_log_line() -> None:
    try:
        raise ValueError("x\n12:00:00 INFO    forged: line\x1b[2J")
    except ValueError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = TextFormatter().format(record).split("\n")
    assert all(line.startswith("    ") for line in lines[1:])
    assert "\x1b" not in "".join(lines)


@pytest.fixture
def text_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("INFO", "text", stream)
    yield stream
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


async def test_a_request_line_cannot_forge_a_text_log_line(
    text_logs: io.StringIO, edge: RunningGateway
) -> None:
    """Before the fix: the percent-decoded path went into the line as is: ``%0a`` started a
    line of the client's making and ``%1b[2J`` cleared the operator's terminal."""
    forged = "/nope%0a12:00:00%20INFO%20%20%20%20trio_gateway.app:%20forged%1b[2J%e2%80%a8x"
    talk = await open_conversation(edge)
    async with talk.stream:
        await talk.stream.send_all(f"GET {forged} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert await talk.response() is not None
    await wait_for(lambda: "/nope" in text_logs.getvalue())  # written after the response
    lines = text_logs.getvalue().splitlines()
    # (hypercorn may log a request twice when the client closes as the answer ends.)
    access = [line for line in lines if "/nope" in line]
    assert access, lines
    assert all("/nope\\x0a12:00:00 INFO" in line for line in access)
    assert "\x1b" not in text_logs.getvalue() and "\u2028" not in text_logs.getvalue()
    assert not any(line.startswith("12:00:00") for line in lines)


# --- /metrics behind a proxy ---------------------------------------------------------------------


async def metrics_status(gateway: RunningGateway, **headers: Any) -> int:
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        return (await http.get("/metrics", headers=headers)).status_code


async def test_empty_metrics_allow_means_the_internal_key_only(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    settings = gateway_settings(demo_runtime[1], metrics_allow="")
    async with run_gateway(nursery, settings) as gw:
        assert await metrics_status(gw) == 403  # even from loopback
        assert await metrics_status(gw, **{"X-Internal-Auth": INTERNAL_KEY}) == 200
        assert await metrics_status(gw, **{"X-Internal-Auth": "nope"}) == 403


async def test_behind_a_trusted_proxy_metrics_checks_the_forwarded_client(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    """A proxy on the same host makes every peer 127.0.0.1. Before the fix the peer was
    checked, so any client through the proxy read /metrics."""
    settings = gateway_settings(
        demo_runtime[1], metrics_allow="127.0.0.1/32", trusted_proxies="127.0.0.1/32"
    )
    async with run_gateway(nursery, settings) as gw:
        assert await metrics_status(gw, **{"X-Forwarded-For": "203.0.113.9"}) == 403
        assert await metrics_status(gw, **{"X-Forwarded-For": "127.0.0.1"}) == 200
        assert await metrics_status(gw) == 200  # the proxy host itself
        key = {"X-Forwarded-For": "203.0.113.9", "X-Internal-Auth": INTERNAL_KEY}
        assert await metrics_status(gw, **key) == 200
