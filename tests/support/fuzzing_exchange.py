"""The client side of one fuzz example: open a session socket (raw WebSocket client), send a
drawn :class:`FrameBatch` or compressed case, read everything the gateway answers into an
:class:`Exchange`, and check it against the documented rules; plus :func:`raw_request` for
one raw HTTP request. The compressed cases (permessage-deflate on) are drawn here too, beside
their exchange and check: one section for one concern. Every exchange is bounded by
``trio.fail_after`` so that a wedged gateway fails the example instead of hanging it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio
from hypothesis import strategies as st
from wsproto import WSConnection
from wsproto.events import (
    CloseConnection,
    Ping,
    TextMessage,
)

from trio_gateway.protocol import (
    CONNECTION_FRAME_TYPES,
    SUBPROTOCOL_V2,
    V2_ONLY_TYPES,
    ErrorCode,
)

from .fuzzing_strategies import FrameBatch
from .fuzzing_wire import (
    DOCUMENTED_CLOSE_CODES,
    ERROR_CODES,
    INPUT_ERROR_CODES,
    MAX_MESSAGE_BYTES,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    compressed_frame,
    deflate_bomb,
    deflate_payload,
    encode_frame,
    split,
)
from .rawhttp import receive_until
from .rawws import RawWebSocket, Rejected

# --- the client side of one example -----------------------------------------------------------


@dataclass
class Exchange:
    """What one fuzz connection saw."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    eof: bool = False
    rejected_status: int | None = None
    extensions: list[str] = field(default_factory=list)  # negotiated in the handshake


@asynccontextmanager
async def _session_socket(
    port: int, session_id: str, into: Exchange, **options: Any
) -> AsyncIterator[RawWebSocket | None]:
    """The session socket of one exchange, opened with ``options`` (see
    :meth:`RawWebSocket.connect`) and closed when the block ends; None when the gateway
    refused the handshake (its status is then in ``into``)."""
    try:
        client = await RawWebSocket.connect(port, f"/api/v1/ws/{session_id}", **options)
    except Rejected as refusal:
        into.rejected_status = refusal.status
        client = None
    if client is None:
        yield None
        return
    into.extensions = [extension.name for extension in client.extensions]
    try:
        yield client
    finally:
        await client.stream.aclose()


async def _read_events(
    stream: trio.SocketStream,
    ws: WSConnection,
    into: Exchange,
    until: Callable[[], bool],
    *,
    answer_close: bool = False,
) -> None:
    """Read server frames into ``into`` until ``until()`` holds or EOF; a close frame ends the
    read too, unless ``answer_close``: then it is answered (so the gateway need not wait for
    our close) and the read goes on. Events already parsed (bytes that came with the 101
    answer) are taken first."""
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage):
                value = orjson.loads(event.data)
                assert isinstance(value, dict), f"server sent a non-object frame: {event.data!r}"
                into.frames.append(value)
            elif isinstance(event, CloseConnection):
                into.close_code = event.code
                if not answer_close:
                    return
                with contextlib.suppress(Exception):
                    await stream.send_all(ws.send(event.response()))
            elif isinstance(event, Ping):
                pass  # server pings need no answer here (the exchange is short)
        if until():
            return
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            into.eof = True
            return
        ws.receive_data(data)


async def exchange_frames(port: int, session_id: str, batch: FrameBatch) -> Exchange:
    """Open a session socket, send ``batch``, then a sentinel (unless terminal), close."""
    result = Exchange()
    with trio.fail_after(20):
        subprotocols = [SUBPROTOCOL_V2] if batch.v2 else []
        async with _session_socket(port, session_id, result, subprotocols=subprotocols) as client:
            if client is None:
                return result
            stream, ws = client.stream, client.ws
            expected = [f.expected_error for f in batch.frames]
            wanted = sum(code is not None for code in expected)

            sent_all = trio.Event()

            async def send_all_frames() -> None:
                for frame in batch.frames:
                    await stream.send_all(frame.data)
                if batch.terminal is not None:
                    await stream.send_all(batch.terminal.data)
                else:
                    # The sentinel: one more refused frame; its error is the last to arrive.
                    await stream.send_all(encode_frame(OP_TEXT, b'{"type":"sentinel"}'))
                sent_all.set()

            def seen_all() -> bool:
                codes = [f.get("code") for f in result.frames if f.get("type") == "error"]
                return sum(code in INPUT_ERROR_CODES for code in codes) >= wanted + 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all_frames)
                if batch.terminal is not None:
                    await _read_events(stream, ws, result, lambda: False)
                else:
                    await _read_events(stream, ws, result, seen_all)
                    if result.close_code is None and not result.eof:
                        # The answer to the sentinel can arrive before its send_all returns:
                        # one writer at a time on the stream.
                        await sent_all.wait()
                        await stream.send_all(encode_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
                        await _read_events(stream, ws, result, lambda: False)
    return result


def check_exchange(batch: FrameBatch, seen: Exchange) -> list[str]:
    """Everything wrong with what the gateway answered to ``batch`` (empty: all good)."""
    problems: list[str] = []
    if seen.rejected_status is not None:
        return [f"handshake refused with {seen.rejected_status}"]
    # The session's frames are numbered 1..n; frames about the connection itself
    # (session_ready, pong, heartbeat, ...) carry no seq (docs/protocol.md, "Resume").
    seqs = [f.get("seq") for f in seen.frames if f.get("type") not in CONNECTION_FRAME_TYPES]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"seq not 1..n: {seqs[:20]} first frames {seen.frames[:2]}")
    unnumbered = [f for f in seen.frames if f.get("type") in CONNECTION_FRAME_TYPES and "seq" in f]
    if unnumbered:
        problems.append(f"connection frames carry a seq: {unnumbered[:2]}")
    # (A terminal frame may close the socket before session_ready is written: no flush.)
    first = seen.frames[0].get("type") if seen.frames else None
    if batch.v2 and first != "session_ready" and (first is not None or batch.terminal is None):
        problems.append("v2: the first frame is not session_ready")
    for frame in seen.frames:
        kind = frame.get("type")
        if not batch.v2 and kind in V2_ONLY_TYPES:
            problems.append(f"v1 client got v2 frame {kind}")
        if kind == "error":
            code = frame.get("code")
            if code not in ERROR_CODES:
                problems.append(f"undocumented error code {code!r}")
            if code == ErrorCode.INTERNAL_ERROR.value:
                problems.append(f"internal_error frame: {frame}")
            if code in INPUT_ERROR_CODES and frame.get("is_final") is not False:
                problems.append(f"input error with is_final != false: {frame}")
    codes = [
        f["code"]
        for f in seen.frames
        if f.get("type") == "error" and f["code"] in INPUT_ERROR_CODES
    ]
    expected = [c for c in (f.expected_error for f in batch.frames) if c is not None]
    if batch.terminal is None:
        expected.append(ErrorCode.UNSUPPORTED_TYPE.value)  # the sentinel
        if codes != expected:
            problems.append(f"input errors {codes} != expected {expected}")
        if seen.close_code != 1000:
            problems.append(f"close code {seen.close_code} after a normal close (want 1000)")
    else:
        if codes != expected[: len(codes)]:
            problems.append(f"input errors {codes} not a prefix of {expected}")
        if seen.close_code not in (batch.terminal.close, None) or (
            seen.close_code is None and not seen.eof
        ):
            problems.append(
                f"{batch.terminal.label}: close code {seen.close_code}, want {batch.terminal.close}"
            )
    if seen.close_code is not None and seen.close_code not in DOCUMENTED_CLOSE_CODES:
        problems.append(f"undocumented close code {seen.close_code}")
    return problems


@dataclass
class HttpAnswer:
    """The status line of an answer (None: the server closed without answering)."""

    status: int | None
    head: bytes


async def raw_request(port: int, request: bytes) -> HttpAnswer:
    """Send ``request`` bytes over a fresh TCP connection; read the answer's head."""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            # The server may close before reading everything.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(request)
            head = await receive_until(stream, lambda got: b"\r\n\r\n" in got, 1 << 16)
            status = None
            if head.startswith(b"HTTP/"):
                status = int(head.split(b" ", 2)[1])
            if status == 101:
                # A real session socket: close it properly (masked close frame).
                with trio.move_on_after(5):
                    await stream.send_all(encode_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
                    while await stream.receive_some(65536):
                        pass
            return HttpAnswer(status, head[:200])
        finally:
            await stream.aclose()


# --- compressed frames (permessage-deflate on) -------------------------------------------------

# Inflated sizes of the bombs: just over the limit, then far over it. Each payload is built
# once per process (deflate_bomb is cached); 64 MiB is 64 KB on the wire.
BOMB_SIZES = [MAX_MESSAGE_BYTES + 1, 1 << 20, 16 << 20, 64 << 20]


class CompressedCase:
    """One connection's compressed traffic and what the gateway must answer.

    ``kind``: ``bomb`` (inflates past the limit: 1009), ``honest`` (v2 pings, compressed,
    maybe fragmented: one pong each, socket stays open), ``hostile`` (corrupt deflate data,
    RSV1 where it is not allowed: the socket may be dropped, with a documented code or none).
    ``authenticated``: token in the handshake; else the first frame is the case itself (bombs,
    hostile) or a compressed ``auth`` frame first (honest).
    """

    def __init__(self, kind: str, label: str, data: bytes, *, pings: int = 0, authed: bool) -> None:
        self.kind = kind
        self.label = label
        self.data = data
        self.pings = pings
        self.authenticated = authed

    def __repr__(self) -> str:
        auth = "token" if self.authenticated else "anonymous"
        return f"CompressedCase({self.kind}/{self.label}, {auth}, {len(self.data)} bytes)"


def _fragments(payload: bytes, cuts: list[int], opcode: int = OP_TEXT) -> bytes:
    """``payload`` (already deflated) as one compressed message in several frames: RSV1 on the
    first only (RFC 7692 section 6.1)."""
    pieces = split(payload, cuts)
    frames = [compressed_frame(pieces[0], opcode=opcode, fin=len(pieces) == 1)]
    for index, piece in enumerate(pieces[1:], start=1):
        frames.append(encode_frame(OP_CONT, piece, fin=index == len(pieces) - 1))
    return b"".join(frames)


@st.composite
def compressed_cases(draw: st.DrawFn) -> CompressedCase:
    """Compressed traffic for a gateway with ``WS_COMPRESSION=on``."""
    kind = draw(st.sampled_from(["bomb", "honest", "hostile"]))
    authed = draw(st.booleans())
    if kind == "bomb":
        size = draw(st.sampled_from(BOMB_SIZES))
        payload = deflate_bomb(size)
        cuts = draw(st.lists(st.integers(0, len(payload)), max_size=3))
        return CompressedCase(kind, f"{size}", _fragments(payload, cuts), authed=authed)
    if kind == "honest":
        pings = draw(st.integers(1, 4))
        frames = []
        for index in range(pings):
            filler = draw(st.text(max_size=200))
            text = orjson.dumps({"type": "ping", "id": index, "note": filler})
            payload = deflate_payload(text)
            cuts = draw(st.lists(st.integers(0, len(payload)), max_size=3))
            frames.append(_fragments(payload, cuts))
        return CompressedCase(kind, "pings", b"".join(frames), pings=pings, authed=authed)
    label = draw(
        st.sampled_from(["garbage", "truncated", "bad_utf8", "control_rsv1", "continuation_rsv1",
                         "binary", "bitflip"])
    )  # fmt: skip
    good = deflate_payload(b'{"type":"ping","id":1}')
    if label == "garbage":
        data = compressed_frame(draw(st.binary(min_size=1, max_size=300)))
    elif label == "truncated":
        data = compressed_frame(good[: draw(st.integers(0, len(good) - 1))])
    elif label == "bad_utf8":
        data = compressed_frame(deflate_payload(b'{"type":"ping","x":"\xff\xfe"}'))
    elif label == "control_rsv1":
        data = compressed_frame(deflate_payload(b"x"), opcode=OP_PING)
    elif label == "continuation_rsv1":
        data = compressed_frame(good, fin=False) + compressed_frame(good, opcode=OP_CONT)
    elif label == "binary":
        data = compressed_frame(good, opcode=OP_BINARY)
    else:
        flipped = bytearray(good)
        position = draw(st.integers(0, len(flipped) - 1))
        flipped[position] ^= 1 << draw(st.integers(0, 7))
        data = compressed_frame(bytes(flipped))
    return CompressedCase(kind, label, data, authed=authed)


async def exchange_compressed(
    port: int, session_id: str, case: CompressedCase, token: str
) -> Exchange:
    """Open a v2 session socket offering permessage-deflate, send ``case``, read the answer.

    Honest cases end with a polite close once every pong arrived; the others read until the
    gateway ends the connection (its close frame is answered, so the gateway need not wait)."""
    from wsproto.extensions import PerMessageDeflate

    result = Exchange()
    with trio.fail_after(30):
        async with _session_socket(
            port,
            session_id,
            result,
            subprotocols=[SUBPROTOCOL_V2],
            extensions=[PerMessageDeflate()],
            extra_headers=[(b"authorization", f"Bearer {token}".encode())]
            if case.authenticated
            else [],
        ) as client:
            if client is None:
                return result
            stream, ws = client.stream, client.ws
            first = b""
            if case.kind == "honest" and not case.authenticated:
                first = compressed_frame(
                    deflate_payload(orjson.dumps({"type": "auth", "token": token}))
                )
            # Dropped while we send: what we read next says how.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(first + case.data)

            def done() -> bool:
                # Only an honest case stops early: all its pongs, or a close (a failure).
                pongs = sum(frame.get("type") == "pong" for frame in result.frames)
                honest = case.kind == "honest"
                return honest and (pongs >= case.pings or result.close_code is not None)

            await _read_events(stream, ws, result, done, answer_close=True)
            if case.kind == "honest" and result.close_code is None:
                with contextlib.suppress(Exception):
                    await stream.send_all(ws.send(CloseConnection(code=1000)))
    return result


def check_compressed(case: CompressedCase, seen: Exchange) -> list[str]:
    """What is wrong with the gateway's answer to ``case`` (empty: nothing)."""
    problems: list[str] = []
    if seen.rejected_status is not None:
        return [f"{case!r}: handshake refused with {seen.rejected_status}"]
    if seen.extensions != ["permessage-deflate"]:
        problems.append(f"{case!r}: extension not negotiated: {seen.extensions}")
    if case.kind == "bomb" and seen.close_code != 1009:
        problems.append(f"{case!r}: closed with {seen.close_code}, want 1009")
    if case.kind == "honest":
        pongs = [frame.get("id") for frame in seen.frames if frame.get("type") == "pong"]
        if pongs != list(range(case.pings)) or seen.close_code is not None:
            problems.append(f"{case!r}: pongs {pongs}, close {seen.close_code}")
    if case.kind == "hostile" and seen.close_code not in DOCUMENTED_CLOSE_CODES | {
        None,
        1002,
        1007,
    }:
        problems.append(f"{case!r}: undocumented close {seen.close_code}")
    for frame in seen.frames:
        if frame.get("type") == "error" and frame.get("code") not in ERROR_CODES:
            problems.append(f"{case!r}: undocumented error frame {frame}")
    return problems
