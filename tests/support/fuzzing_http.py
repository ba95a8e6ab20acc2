"""Hostile HTTP/1.1 at the edge, for ``tests/hostile/test_fuzz_http.py`` and ``bench/fuzz.py``.

Attack classes (issue 11): ``h2c`` upgrades and the cleartext HTTP/2 preface (never a 101,
never HTTP/2), ``Content-Length`` + ``Transfer-Encoding`` smuggling (400, connection closed,
the smuggled request never answered), pipelined requests (each answered, or the connection
closed: never an open connection that answers nothing), and slow request heads (closed at
``HTTP_HEAD_TIMEOUT``). hypothesis draws the requests; each example is a short ``trio.run``
over a real socket against a :class:`~tests.support.fuzzing_gateway.FuzzGateway`
(see ``tests/support/fuzzing_gateway.py``).
Waits are bounded only so that a hang fails instead of hanging.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import trio
from hypothesis import strategies as st

from .rawhttp import content_length

SESSION = "{s}"
PATHS = [
    "/health", "/metrics", "/api/v1/agents", "/api/v1/ws/{s}", "/api/v1/sessions",
    "/api/v1/sessions/{s}", "/nope", "/api/v1//sessions/{s}",
]  # fmt: skip
# Far above any honest answer here, and below the fuzz gateway's read timeout (2 x 5 + 1 s):
# a connection that is still open then was left open, not yet dropped as a dead peer.
HANG_BOUND = 8.0


@dataclass
class EdgeAnswer:
    """What one connection got: the status of each answer, in order, and whether it closed."""

    statuses: list[int] = field(default_factory=list)
    eof: bool = False
    hung: bool = False
    raw: bytes = b""


async def converse(port: int, payload: bytes, expected: int) -> EdgeAnswer:
    """Send ``payload`` on a fresh connection; read up to ``expected`` answers or the close."""
    answer = EdgeAnswer()
    buffer = b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(payload)

        async def more() -> bool:
            nonlocal buffer
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                answer.eof = True
                return False
            buffer += data
            answer.raw += data
            return True

        with trio.move_on_after(HANG_BOUND) as scope:
            while len(answer.statuses) < expected:
                while b"\r\n\r\n" not in buffer:
                    if not await more():
                        return answer
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else -1
                answer.statuses.append(status)
                if status == 101:
                    return answer  # a tunnel: the check reports it
                length = content_length(head)
                while len(buffer) < length:
                    if not await more():
                        return answer
                buffer = buffer[length:]
            # All answered: a connection that must close does so within the bound as well.
            if expected_close(payload):
                while await more():
                    pass
        answer.hung = scope.cancelled_caught
        return answer
    finally:
        await stream.aclose()


def expected_close(payload: bytes) -> bool:
    """Whether the client asked to close (``Connection: close`` anywhere in what it sent)."""
    return b"\r\nconnection: close\r\n" in payload.lower()


# --- h2c upgrades and the HTTP/2 preface ---------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@st.composite
def h2c_requests(draw: st.DrawFn) -> bytes:
    """An ``Upgrade: h2c`` request (any method, path, spelling, with or without a body), maybe
    followed by HTTP/2 bytes as a client would send after a 101; or the bare preface."""
    if draw(st.integers(0, 5)) == 0:
        return PREFACE + draw(st.binary(max_size=64))
    method = draw(st.sampled_from(["GET", "GET", "POST", "OPTIONS", "DELETE"]))
    path = draw(st.sampled_from(PATHS)).replace(SESSION, draw(st.sampled_from(["s1", "h2c"])))
    upgrade = draw(st.sampled_from(["h2c", "H2C", "h2c, websocket", "websocket, h2c", "h2"]))
    connection = draw(
        st.sampled_from(["Upgrade, HTTP2-Settings", "upgrade", "keep-alive, Upgrade"])
    )
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: {upgrade}\r\n"
    head += f"Connection: {connection}\r\n"
    if draw(st.booleans()):
        head += "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    body = b""
    if draw(st.booleans()):
        body = b"{}"
        head += "Content-Type: application/json\r\nContent-Length: 2\r\n"
    tail = PREFACE if draw(st.booleans()) else b""
    return head.encode() + b"\r\n" + body + tail


def check_h2c(answer: EdgeAnswer) -> list[str]:
    """No 101, no HTTP/2 bytes, no 5xx, no hang."""
    problems = []
    if 101 in answer.statuses:
        problems.append("h2c: 101 Switching Protocols")
    if answer.raw.startswith(b"\x00") or b"\x00\x00\x00\x04" in answer.raw[:64]:
        problems.append("h2c: HTTP/2 frames in the answer")
    problems += _common(answer, "h2c")
    return problems


# --- Content-Length + Transfer-Encoding ---------------------------------------------------------

SMUGGLED = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@st.composite
def smuggling_requests(draw: st.DrawFn) -> bytes:
    """A request with both framings (any order, spelling, lengths), a valid chunked body and a
    second request behind it that a proxy framing by the other header would not see."""
    method = draw(st.sampled_from(["POST", "POST", "PUT", "PATCH", "GET"]))
    path = draw(st.sampled_from(PATHS)).replace(SESSION, "s1")
    te_name = draw(st.sampled_from(["Transfer-Encoding", "transfer-encoding", "TRANSFER-ENCODING"]))
    te_value = draw(st.sampled_from(["chunked", "Chunked", "CHUNKED", " chunked"]))
    cl_name = draw(st.sampled_from(["Content-Length", "content-length"]))
    cl_value = draw(st.sampled_from(["0", "4", "7", "40", "100"]))
    framing = [f"{te_name}: {te_value}\r\n", f"{cl_name}: {cl_value}\r\n"]
    if draw(st.booleans()):
        framing.reverse()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return (head + "".join(framing)).encode() + b"\r\n2\r\n{}\r\n0\r\n\r\n" + SMUGGLED


def check_smuggling(answer: EdgeAnswer) -> list[str]:
    """Exactly one answer (a 400), then the connection closed."""
    problems = _common(answer, "smuggling")
    if answer.statuses[:1] != [400]:
        problems.append(f"smuggling: first answer {answer.statuses[:1]}, want [400]")
    if len(answer.statuses) > 1:
        problems.append("smuggling: the smuggled request was answered")
    if not answer.eof:
        problems.append("smuggling: the connection stayed open")
    return problems


# --- pipelining ---------------------------------------------------------------------------------

PIPELINE_PARTS = {
    "get": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "rest": b"GET /api/v1/agents HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "post": (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    ),
    "post-404": b"POST /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc",
    "chunked": (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
        b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "options": b"OPTIONS /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "close": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    "too-large": (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n\r\n"
        + b" " * 512
    ),
    "slashes": b"GET /api/v1//sessions/x HTTP/1.1\r\nHost: evil.example\r\n\r\n",
}

pipelines = st.lists(st.sampled_from(sorted(PIPELINE_PARTS)), min_size=2, max_size=5)


def pipeline_payload(parts: list[str]) -> bytes:
    """The requests of ``parts`` back to back, in one write."""
    return b"".join(PIPELINE_PARTS[part] for part in parts)


def check_pipeline(parts: list[str], answer: EdgeAnswer) -> list[str]:
    """Every request answered, or the connection closed after those answered; a request that
    asked to close (or a 413, sent before its body) is the last one answered."""
    problems = _common(answer, "pipeline")
    answered = len(answer.statuses)
    if answered < len(parts) and not answer.eof:
        problems.append(f"pipeline: {answered} of {len(parts)} answered, connection left open")
    for index, part in enumerate(parts[:answered]):
        if part in ("close", "too-large") and answered > index + 1:
            problems.append(f"pipeline: answered after {part} at {index}")
    if answered == 0:
        problems.append("pipeline: no answer at all")
    return problems


# --- slow heads ---------------------------------------------------------------------------------

SLOW_HEADS = [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
    b"GET /api/v1/ws/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Slow: ",
    b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
]


async def slow_head(port: int, head: bytes, interval: float, keep_alive: bool) -> str | None:
    """Drip ``head`` (padded to ~10x the head timeout's worth of bytes) one byte per
    ``interval``, after one complete request when ``keep_alive``; a problem, or None when
    the server closed the connection before the head could complete."""
    data = head + b"s" * 200
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with trio.move_on_after(HANG_BOUND):
            if keep_alive:
                await stream.send_all(PIPELINE_PARTS["get"])
                received = b""
                while b"}" not in received:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return "slow head: closed before the first answer"
                    received += chunk
            for index in range(len(data)):
                try:
                    await stream.send_all(data[index : index + 1])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                with trio.move_on_after(interval):
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return None
                    if not chunk:
                        return None
                    if chunk.startswith(b"HTTP/1.1 101"):
                        return "slow head: 101"
            return "slow head: the whole head was dripped in and the connection is open"
        return "slow head: hung"


# --- shared -------------------------------------------------------------------------------------


def _common(answer: EdgeAnswer, label: str) -> list[str]:
    problems = []
    if answer.hung:
        problems.append(f"{label}: no answer and no close within {HANG_BOUND} s")
    if any(status >= 500 for status in answer.statuses):
        problems.append(f"{label}: 5xx {answer.statuses}")
    if -1 in answer.statuses:
        problems.append(f"{label}: not an HTTP/1.1 answer: {answer.raw[:80]!r}")
    return problems


@dataclass
class EdgeStats:
    """Figures of the HTTP edge phases."""

    attempts: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    closed: int = 0
    server_errors: int = 0
    problems: list[str] = field(default_factory=list)

    def record(self, label: str, answer: EdgeAnswer | None, problems: list[str]) -> None:
        """Account for one attempt of class ``label``."""
        self.attempts[label] = self.attempts.get(label, 0) + 1
        if answer is not None:
            for status in answer.statuses:
                self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
                self.server_errors += status >= 500
            self.closed += answer.eof
        self.problems += problems[:3]
