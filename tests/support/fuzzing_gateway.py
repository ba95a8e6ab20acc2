"""Hostile-input fuzzing harness, shared by ``tests/hostile/test_fuzz.py`` and ``bench/fuzz.py``.

How hypothesis and trio fit together here (and why):

- hypothesis drives the generation (``@given`` on *sync* test functions), so every input is
  drawn, shrunk on failure and replayable from hypothesis' example database like any other
  property test. ``strategy.example()`` is not used: it is meant for the REPL, draws without
  shrinking and warns.
- The gateway under test is started **once per fuzz run** by :class:`FuzzGateway`: a background
  thread runs its own ``trio.run`` with the demo runtime, the gateway (and, in JWT mode, a real
  JWKS server) on ``127.0.0.1`` with OS-chosen ports, plus a *control session* that streams
  ``bench`` turns and checks every token for the whole run.
- Each hypothesis example runs its client side with a short ``trio.run`` in the test's own
  thread, over real sockets. The client is therefore independent of the gateway's event loop:
  a gateway that wedges its loop makes the example's ``fail_after`` fire instead of hanging.
- Inspection of the gateway's state (live tasks, gauges) happens inside its loop through
  ``trio.from_thread.run_sync``.

Nothing here asserts on time: every wait is bounded (``fail_after``) only so that a wedged
server fails instead of hanging.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import orjson
import trio
import trio_websocket
from hypothesis import HealthCheck, settings
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
    FrameError,
    parse_client_frame,
)
from trio_gateway.server import serve
from trio_gateway.settings import Settings
from trio_gateway.tools.demo_runtime import (
    DemoRuntime,
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)
from trio_gateway.tools.dev_auth import DevIssuer

from .jwks_server import JWKSServer
from .rawhttp import receive_until
from .rawws import RawWebSocket, Rejected
from .task_tree import format_task_tree, task_names

T = TypeVar("T")

INTERNAL_KEY = "fuzz-internal-key-0123456789"
# Small enough that "huge" and "just over the limit" frames are cheap to build and send.
MAX_MESSAGE_BYTES = 64 * 1024
CONTROL_TOKENS = 40
EXPECTED_CONTROL_TEXT = "".join(f"t{i} " for i in range(CONTROL_TOKENS))
# Error codes that answer a refused client frame (protocol.md, "Bad input never ends the session").
INPUT_ERROR_CODES = frozenset({"invalid_json", "invalid_message", "unsupported_type"}) | {
    "binary_not_supported"
}
ERROR_CODES = frozenset(code.value for code in ErrorCode)
# Close codes documented in protocol.md. Malformed framing and invalid UTF-8 get no close frame
# at all: hypercorn drops the TCP connection (documented there too; 1006 in browser terms).
DOCUMENTED_CLOSE_CODES = frozenset(
    {1000, 1001, 1008, 1009, 1011, 1012, 1013, 4401, 4403, 4409, 4429}
)

# --- WebSocket frames on the wire -------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x0, 0x1, 0x2, 0x8, 0x9
_MASK = b"\x5a\xc3\x17\x88"


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """One client-to-server WebSocket frame (RFC 6455 section 5.2), anything allowed."""
    first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    mask_bit = 0x80 if mask else 0
    size = len(payload)
    if size < 126:
        header = bytes([first, mask_bit | size])
    elif size < 1 << 16:
        header = bytes([first, mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + size.to_bytes(8, "big")
    if not mask:
        return header + payload
    key = (_MASK * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
    return header + _MASK + masked


def deflate_payload(data: bytes) -> bytes:
    """``data`` as a permessage-deflate message payload (RFC 7692: raw deflate, sync flush,
    the trailing ``00 00 ff ff`` removed), from a fresh context."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return payload[:-4]


@functools.cache
def deflate_bomb(inflated_bytes: int) -> bytes:
    """A permessage-deflate payload that inflates to ``inflated_bytes`` spaces (~1030:1: a
    256 MiB message in 255 KB), built in 1 MiB steps so it never exists inflated here."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    step = b" " * (1 << 20)
    parts = []
    left = inflated_bytes
    while left > 0:
        parts.append(compressor.compress(step[: min(left, len(step))]))
        left -= len(step)
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[:-4]


def compressed_frame(payload: bytes, *, opcode: int = OP_TEXT, fin: bool = True) -> bytes:
    """A client frame with RSV1 set: "this message is compressed" (permessage-deflate)."""
    return encode_frame(opcode, payload, fin=fin, rsv=4)


class WireFrame:
    """One client message as it goes on the wire, and what the gateway must answer.

    ``terminal`` frames end the connection at the WebSocket layer (``close`` is the only close
    code allowed for them); the others must each get the documented answer and leave the
    session usable. A plain class, not a dataclass: hypothesis pretty-prints dataclasses field
    by field (64 KiB frames!), but uses a class's own ``__repr__``.
    """

    def __init__(
        self,
        label: str,
        data: bytes,
        *,
        text: str | None = None,
        binary: bool = False,
        terminal: bool = False,
        close: int | None = None,
    ) -> None:
        self.label = label
        self.data = data  # the encoded frame(s)
        self.text = text  # the message text, for text messages
        self.binary = binary
        self.terminal = terminal
        self.close = close

    def __repr__(self) -> str:
        # Short: hypothesis prints failing examples, and frames can be 64 KiB.
        shown = repr(self.text[:80]) if self.text is not None else f"{len(self.data)} bytes"
        return f"WireFrame({self.label}, {shown})"

    @property
    def expected_error(self) -> str | None:
        """The input-error code this message must get (None: accepted)."""
        if self.terminal:
            return None
        if self.binary:
            return ErrorCode.BINARY_NOT_SUPPORTED.value
        if self.text is None:
            return None  # a client ping: answered by the WebSocket layer
        return reference_verdict(self.text)


def reference_verdict(text: str) -> str | None:
    """The code of the error frame ``text`` must get, or None when it is accepted.

    The parser's own verdict: the session-level fuzz checks that the engine delivers exactly
    that answer, once, in order, and survives; ``test_parser_*`` in ``test_fuzz.py`` checks the
    parser's verdicts against the documented rules for inputs whose class is known.
    """
    try:
        parse_client_frame(text)
    except FrameError as refused:
        return refused.code.value
    return None


def split(payload: bytes, cuts: list[int]) -> list[bytes]:
    """``payload`` cut at the (sorted, deduplicated) positions ``cuts``."""
    points = sorted({c % (len(payload) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(payload[start:point])
        start = point
    pieces.append(payload[start:])
    return pieces


def fragmented(opcode: int, payload: bytes, cuts: list[int], ping_between: bool) -> bytes:
    """A message in several frames (first frame ``opcode``, then continuations)."""
    pieces = split(payload, cuts)
    out = b""
    for index, piece in enumerate(pieces):
        out += encode_frame(opcode if index == 0 else OP_CONT, piece, fin=index == len(pieces) - 1)
        if ping_between and index == 0 and len(pieces) > 1:
            out += encode_frame(OP_PING, b"between")  # control frames may interleave
    return out


# --- strategies: client frames ----------------------------------------------------------------

# Unicode that tends to break things: NUL, RTL/LTR marks and overrides, BOM, zero-width
# joiners, non-characters, astral planes, combining marks, line separators.
EDGE_CHARS = [
    "\x00", "\u200f", "\u202e", "\u202d", "\u2066", "\ufeff", "\u200d", "\ufffe", "\uffff",
    "\U0010ffff", "\U0001f4a9", "\u0301", "\u2028", "\u2029", "\x7f", "\x1b", "\r", "\n", "\t",
    '"', "\\", "'", "<", "%", "\u0130", "\u00df",
]  # fmt: skip
# JSON escapes that decode to surrogates or NUL: lone high, lone low, reversed pair, valid pair.
SURROGATE_ESCAPES = [
    "\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\udc00\\ud800", "\\ud83d\\udca9", "\\u0000",
]  # fmt: skip

edge_text = st.text(
    alphabet=st.one_of(st.sampled_from(EDGE_CHARS), st.characters(codec="utf-8")), max_size=40
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    edge_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(edge_text, inner, max_size=4)
    ),
    max_leaves=12,
)
# Values the gateway must forward exactly as sent (integers within 64 bits; wider ones are
# refused by design, see protocol.py).
safe_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        edge_text,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(edge_text, inner, max_size=4)
    ),
    max_leaves=12,
)
AGENTS = ["orchestrator", "coder", "architect", "debug", "ask", "universal"]


@st.composite
def valid_frames(draw: st.DrawFn) -> dict[str, Any]:
    """Frames of every documented type, with documented fields (some with edge values)."""
    kind = draw(
        st.sampled_from(
            ["user_message", "ide_message", "tool_result", "switch_agent", "hitl_decision",
             "cancel", "ping", "auth"]
        )
    )  # fmt: skip
    frame: dict[str, Any]
    if kind in ("user_message", "ide_message"):
        frame = {"type": "user_message", "content": draw(edge_text)}
        if draw(st.booleans()):
            frame["role"] = draw(st.sampled_from(["user", "assistant", "system", "tool"]))
        if draw(st.booleans()):
            frame["agent_type"] = draw(st.sampled_from(AGENTS))
        if kind == "ide_message":  # the IDE's 15 keys, nulls included
            for key in (
                "is_final", "call_id", "tool_name", "arguments", "requires_approval", "result",
                "error", "from_agent", "to_agent", "reason", "metadata",
            ):  # fmt: skip
                frame.setdefault(key, None)
            frame.setdefault("role", None)
            frame.setdefault("agent_type", None)
    elif kind == "tool_result":
        frame = {"type": "tool_result", "call_id": draw(edge_text.filter(bool))}
        if draw(st.booleans()):
            frame["result"] = draw(safe_json_values)
        else:
            frame["error"] = draw(edge_text)
    elif kind == "switch_agent":
        frame = {
            "type": "switch_agent",
            "agent_type": draw(st.one_of(st.sampled_from(AGENTS), edge_text.filter(bool))),
        }
        if draw(st.booleans()):
            frame["content"] = draw(edge_text)
    elif kind == "hitl_decision":
        frame = {
            "type": "hitl_decision",
            "call_id": draw(edge_text.filter(bool)),
            "decision": draw(st.sampled_from(["approve", "edit", "reject"])),
        }
        if draw(st.booleans()):
            frame["modified_arguments"] = draw(
                st.dictionaries(edge_text, safe_json_values, max_size=3)
            )
    elif kind == "ping":
        frame = {"type": "ping"}
        if draw(st.booleans()):
            frame["id"] = draw(safe_json_values)
    elif kind == "auth":
        frame = {"type": "auth", "token": draw(edge_text.filter(bool))}
    else:
        frame = {"type": kind}
    documented_type = frame["type"]
    # Extra keys, never a documented one: an undocumented key is forwarded as sent, while a
    # documented one has a type (a generated {"error": []} on a tool_result is rightly refused).
    extra = draw(st.dictionaries(st.text(max_size=8), safe_json_values, max_size=2))
    frame.update({f"x-{key}": value for key, value in extra.items()})
    frame["type"] = documented_type
    return frame


def dumps(value: Any) -> str:
    """JSON text for any value of the strategies (integers beyond 64 bits included, which
    orjson cannot write but a hostile client can)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@st.composite
def wrong_type_frames(draw: st.DrawFn) -> str:
    """A valid frame with one field (maybe ``type``) replaced by a value of another type."""
    frame = draw(valid_frames())
    key = draw(st.sampled_from(sorted(frame)))
    frame[key] = draw(json_values)
    return dumps(frame)


@st.composite
def unicode_frames(draw: st.DrawFn) -> str:
    """Frames whose strings carry JSON escapes for lone surrogates and NUL, raw NUL, BOMs..."""
    escape = draw(st.sampled_from(SURROGATE_ESCAPES))
    where = draw(st.sampled_from(["content", "type", "key", "bom", "raw_nul"]))
    if where == "content":
        return '{"type":"user_message","content":"a' + escape + 'b"}'
    if where == "type":
        return '{"type":"user_' + escape + 'message","content":"x"}'
    if where == "key":
        return '{"type":"user_message","content":"x","' + escape + '":1}'
    if where == "bom":
        return '\ufeff{"type":"ping"}'
    return '{"type":"user_message","content":"a\x00b"}'


@st.composite
def nested_frames(draw: st.DrawFn) -> str:
    """Deeply nested JSON, bare or inside a valid frame's ``metadata``."""
    depth = draw(st.integers(min_value=1, max_value=3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "1" + closer * depth
    if draw(st.booleans()):
        return nested
    return '{"type":"user_message","content":"deep","metadata":' + nested + "}"


@st.composite
def mutated_frames(draw: st.DrawFn) -> str:
    """A valid frame's JSON text with a few character-level mutations."""
    text = dumps(draw(valid_frames()))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if not text:
            break
        pos = draw(st.integers(min_value=0, max_value=len(text) - 1))
        op = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "duplicate"]))
        char = draw(st.sampled_from([*EDGE_CHARS, "{", "}", "[", "]", ",", ":", "0", "e"]))
        if op == "delete":
            text = text[:pos] + text[pos + 1 :]
        elif op == "insert":
            text = text[:pos] + char + text[pos:]
        elif op == "replace":
            text = text[:pos] + char + text[pos + 1 :]
        elif op == "truncate":
            text = text[:pos]
        else:
            text = text[:pos] + text[pos:] + text[pos:]
    return text


def big_frame(size: int) -> str:
    """A valid ``user_message`` of exactly ``size`` bytes of UTF-8."""
    head = '{"type":"user_message","content":"'
    tail = '"}'
    return head + "x" * (size - len(head) - len(tail)) + tail


message_texts = st.one_of(
    valid_frames().map(dumps),
    wrong_type_frames(),
    unicode_frames(),
    nested_frames(),
    mutated_frames(),
    st.text(max_size=60),  # mostly not JSON at all
    json_values.filter(lambda v: not isinstance(v, dict)).map(dumps),  # JSON, not an object
    st.dictionaries(edge_text, json_values, max_size=3).map(dumps),  # objects, maybe no type
    st.integers(min_value=MAX_MESSAGE_BYTES - 200, max_value=MAX_MESSAGE_BYTES).map(big_frame),
)


@st.composite
def wire_frames(draw: st.DrawFn) -> WireFrame:
    """One non-terminal client message: text (whole or fragmented), binary, or a client ping."""
    kind = draw(st.sampled_from(["text", "text", "text", "fragmented", "binary", "ping"]))
    if kind == "binary":
        payload = draw(st.binary(max_size=200))
        return WireFrame("binary", encode_frame(OP_BINARY, payload), binary=True)
    if kind == "ping":
        return WireFrame("ping", encode_frame(OP_PING, draw(st.binary(max_size=125))))
    text = draw(message_texts)
    payload = text.encode()
    if kind == "fragmented":
        cuts = draw(st.lists(st.integers(min_value=0), min_size=1, max_size=4))
        data = fragmented(OP_TEXT, payload, cuts, draw(st.booleans()))
        return WireFrame("fragmented", data, text=text)
    return WireFrame("text", encode_frame(OP_TEXT, payload), text=text)


@st.composite
def terminal_frames(draw: st.DrawFn) -> WireFrame:
    """A message the WebSocket layer must refuse by closing: too big, bad UTF-8, bad framing."""
    kind = draw(st.sampled_from(["oversize", "oversize_fragmented", "bad_utf8", "protocol"]))
    if kind.startswith("oversize"):
        size = MAX_MESSAGE_BYTES + draw(st.integers(min_value=1, max_value=64))
        payload = big_frame(size).encode()
        if kind == "oversize":
            data = encode_frame(OP_TEXT, payload)
        else:
            data = fragmented(OP_TEXT, payload, [len(payload) // 3, 2 * len(payload) // 3], False)
        return WireFrame(kind, data, terminal=True, close=1009)
    if kind == "bad_utf8":
        good = draw(st.text(max_size=20)).encode()
        bad = draw(
            st.sampled_from(
                [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]
            )
        )  # fmt: skip
        payload = good + bad + draw(st.text(max_size=20)).encode()
        return WireFrame(kind, encode_frame(OP_TEXT, payload), terminal=True, close=None)
    violation = draw(
        st.sampled_from(
            ["rsv", "opcode", "unmasked", "orphan_continuation", "fragmented_control",
             "long_control", "text_inside_fragments"]
        )
    )  # fmt: skip
    body = b'{"type":"ping"}'
    data = {
        "rsv": lambda: encode_frame(OP_TEXT, body, rsv=draw(st.integers(1, 7))),
        "opcode": lambda: encode_frame(
            draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])), body
        ),
        "unmasked": lambda: encode_frame(OP_TEXT, body, mask=False),
        "orphan_continuation": lambda: encode_frame(OP_CONT, body),
        "fragmented_control": lambda: encode_frame(OP_PING, b"x", fin=False),
        "long_control": lambda: encode_frame(OP_PING, b"x" * 126),
        "text_inside_fragments": lambda: (
            encode_frame(OP_TEXT, body[:5], fin=False) + encode_frame(OP_TEXT, body[5:])
        ),
    }[violation]()
    return WireFrame(f"protocol_{violation}", data, terminal=True, close=None)


@dataclass(frozen=True)
class FrameBatch:
    """What one fuzz connection sends: a few messages, maybe a terminal one, over v1 or v2."""

    frames: list[WireFrame]
    terminal: WireFrame | None
    v2: bool


frame_batches = st.builds(
    FrameBatch,
    frames=st.lists(wire_frames(), min_size=1, max_size=10),
    terminal=st.one_of(st.none(), st.none(), terminal_frames()),
    v2=st.booleans(),
)


# --- strategies: handshakes -------------------------------------------------------------------

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
header_names = st.text(alphabet=_TCHAR, min_size=1, max_size=20)
# Header values as bytes: latin-1 text without CR/LF, sometimes with odd octets.
header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60),
    st.binary(max_size=40).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").decode("latin-1")
    ),
)
path_segments = st.one_of(
    # First (hypothesis favours it): ids that pass, so upgrades reach the session engine.
    st.from_regex(r"[A-Za-z0-9._~-]{1,40}", fullmatch=True).filter(lambda t: t not in (".", "..")),
    st.text(max_size=30),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "%2F",
            "a%2Fb",
            "%00",
            "%ff",
            "%",
            "%zz",
            "a b",
            "\x00",
            "..%2F..",
            "x" * 300,
        ]
    ),
)


def percent_encode(text: str, *, raw: bool) -> str:
    """``text`` for a request target: escaped (``raw`` False) or mostly as is."""
    from urllib.parse import quote

    if raw:
        return "".join(c if 0x21 <= ord(c) < 0x7F else quote(c, safe="") for c in text)
    return quote(text, safe="%")


@st.composite
def handshake_requests(draw: st.DrawFn) -> bytes:
    """A random HTTP request, usually a WebSocket upgrade, sometimes plain garbage bytes."""
    shape = draw(st.sampled_from(["upgrade", "upgrade", "upgrade", "http", "garbage"]))
    if shape == "garbage":
        return draw(
            st.one_of(
                st.binary(min_size=1, max_size=300),
                st.text(max_size=200).map(lambda t: (t + "\r\n\r\n").encode()),
            )
        )
    method = draw(
        st.one_of(
            st.sampled_from(["GET"] * 8 + ["POST", "PUT", "DELETE", "HEAD", "OPTIONS",
                             "PATCH", "CONNECT", "TRACE"]),
            st.text(alphabet=_TCHAR, min_size=1, max_size=10),
        )
    )  # fmt: skip
    segment = percent_encode(draw(path_segments), raw=draw(st.booleans()))
    path = draw(
        st.sampled_from(
            ["/api/v1/ws/{s}", "/api/v1/ws/{s}", "/api/v1/ws/{s}", "/api/v1/ws/{s}/x",
             "/api/v1/ws/", "/api/v1/ws", "/{s}", "/api/v1/sessions/{s}",
             "/api/v1/sessions/{s}/history", "/health", "/api/v1/health", "/metrics",
             "/openapi.json", "*", "http://evil/{s}", "//{s}"]
        )
    ).replace("{s}", segment)  # fmt: skip
    if draw(st.booleans()):
        path += "?" + percent_encode(draw(st.text(max_size=40)), raw=draw(st.booleans()))
    host = draw(st.sampled_from(["127.0.0.1", "127.0.0.1", "127.0.0.1", "", "x" * 300]))
    headers: list[tuple[str, str]] = [("Host", host)]
    if shape == "upgrade":
        key = base64.b64encode(b"0123456789abcdef").decode()
        upgrade = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ]
        if draw(st.integers(0, 2)) == 0:  # a third of them: broken upgrade headers
            upgrade = [
                ("Upgrade", draw(st.sampled_from(["websocket", "WebSocket", "h2c", "", "x, y"]))),
                ("Connection", draw(st.sampled_from(["Upgrade", "upgrade, keep-alive", "close"]))),
                ("Sec-WebSocket-Key", draw(st.one_of(st.just(key), header_values))),
                ("Sec-WebSocket-Version", draw(st.sampled_from(["13", "8", "", "13, 8", "x"]))),
            ]
        headers += upgrade
        if draw(st.booleans()):
            protocols = draw(
                st.lists(
                    st.one_of(
                        st.sampled_from([SUBPROTOCOL_V2, "bearer.abc", "bearer.", "", ",", "v1"]),
                        header_values,
                    ),
                    max_size=4,
                )
            )
            headers.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
    if draw(st.booleans()):
        headers.append(
            ("Authorization", draw(st.one_of(st.sampled_from(["Bearer", "Bearer ", "Basic x"]),
                                             header_values.map(lambda v: "Bearer " + v),
                                             header_values)))
        )  # fmt: skip
    if draw(st.booleans()):
        headers.append(
            ("Origin", draw(st.one_of(st.sampled_from(["null", "https://evil.example", ""]),
                                      header_values)))
        )  # fmt: skip
    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    body = b""
    if draw(st.booleans()):
        body = draw(st.binary(max_size=100))
        headers.append(("Content-Length", str(len(body))))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/9"]))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    try:
        encoded = head.encode("latin-1")
    except UnicodeEncodeError:
        encoded = head.encode("utf-8")  # non-latin-1 bytes in the request line: also hostile
    return encoded + b"\r\n" + body


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


# --- the gateway under test -------------------------------------------------------------------


class ErrorLogCounter(logging.Handler):
    """Counts log records at ERROR or above (an unhandled exception in a handler logs one)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []
        # hypercorn's own per-connection race (its 400 for an upgrade request carrying a body
        # versus the app's answer: h11 LocalProtocolError), logged by hypercorn and contained
        # to that one connection. Counted, reported, not a failure.
        self.contained: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            lines = traceback.format_exception(record.exc_info[1])
            text += " | " + " ".join(line.strip() for line in lines if "Error" in line)[-600:]
        if record.name == "hypercorn.error" and "LocalProtocolError" in text:
            self.contained.append(text)
        else:
            self.records.append(text)


@dataclass
class ControlReport:
    """What the control session saw while the fuzzer ran."""

    turns: int = 0
    problems: list[str] = field(default_factory=list)
    closed: int | None = None


def count_tasks() -> int:
    """Live tasks in the calling trio run."""
    return len(task_names(lambda _: True))


async def control_turn(ws: trio_websocket.WebSocketConnection, tokens: int) -> str | None:
    """One ``bench`` turn on a v2 socket; returns a problem, or None when the text is exact."""
    await ws.send_message(dumps({"type": "user_message", "content": f"bench {tokens}"}))
    text = ""
    with trio.fail_after(30):
        while True:
            frame = orjson.loads(await ws.get_message())
            kind = frame.get("type")
            if kind == "assistant_message":
                text += frame.get("token") or ""
            elif kind == "turn_finished":
                if frame.get("status") != "completed":
                    return f"turn status {frame.get('status')}"
                break
            elif kind not in ("turn_started", "heartbeat", "session_ready"):
                return f"unexpected frame {frame}"
    expected = "".join(f"t{i} " for i in range(tokens))
    return None if text == expected else f"tokens differ: {text[:60]!r}..."


class FuzzGateway:
    """Demo runtime + gateway (+ JWKS server in JWT mode) + control session, in a thread.

    Use as a context manager; :attr:`port` is the gateway's port.
    """

    def __init__(self, *, jwt: bool = False, **overrides: Any) -> None:
        self.jwt = jwt
        self.overrides = overrides
        self.issuer: DevIssuer | None = DevIssuer(kid="fuzz-main") if jwt else None
        self.port = 0
        self.baseline = 0  # task count with only the control session open
        self.baseline_names: dict[str, int] = {}  # and the tasks by name, to explain a diff
        self.control = ControlReport()
        self.errors = ErrorLogCounter()
        self.failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fuzz-gateway", daemon=True)
        self._paused = False
        self._idle = False
        self.settings: Settings | None = None
        self.app: Any = None
        self.runtime: DemoRuntime | None = None  # what reached it: tests/support/smuggling.py

    def __enter__(self) -> FuzzGateway:
        logging.getLogger().addHandler(self.errors)
        self._thread.start()
        if not self._ready.wait(60) or self.failure is not None:
            raise RuntimeError(f"fuzz gateway did not start: {self.failure!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._token is not None and self._stop is not None:
                stop = self._stop
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(stop.set, trio_token=self._token)
            self._thread.join(60)
        finally:
            logging.getLogger().removeHandler(self.errors)

    @property
    def alive(self) -> bool:
        """The gateway's event loop is still running (no crash)."""
        return self._thread.is_alive() and self.failure is None

    def token(self, sub: str = "fuzz", **kwargs: Any) -> str:
        """A valid access token of the JWT-mode issuer."""
        assert self.issuer is not None
        return self.issuer.mint(sub, **kwargs)

    def run_sync_in_loop(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` inside the gateway's event loop (to read its state consistently)."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def run_in_loop(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run async ``fn`` inside the gateway's event loop."""
        assert self._token is not None
        return trio.from_thread.run(fn, trio_token=self._token)

    def gauges(self) -> tuple[int, int, int]:
        """(tasks, open sockets, live sessions) as seen inside the gateway's loop."""
        assert self.app is not None
        metrics = self.app.gateway.metrics

        def read() -> tuple[int, int, int]:
            sockets = metrics.registry.get_sample_value("gateway_active_websockets") or 0
            sessions = metrics.registry.get_sample_value("gateway_active_sessions") or 0
            return count_tasks(), int(sockets), int(sessions)

        return self.run_sync_in_loop(read)

    def pause_control(self, paused: bool) -> None:
        """Hold the control session between turns (True), e.g. to count tasks, or resume."""

        def flip() -> None:
            self._paused = paused

        self.run_sync_in_loop(flip)

    @property
    def control_idle(self) -> bool:
        """The control session is paused between turns."""
        return self._idle

    def task_names(self) -> dict[str, int]:
        """Live tasks of the gateway's loop by name (to say what leaked)."""

        def read() -> dict[str, int]:
            names: dict[str, int] = {}

            def walk(task: trio.lowlevel.Task, server: str) -> None:
                if task.name.endswith(("demo_runtime.app.serve_demo_runtime", "server.serve")):
                    server = task.name.rsplit(".", 1)[-1]
                name = f"{server}: {task.name}" if server else task.name
                names[name] = names.get(name, 0) + 1
                for nursery in task.child_nurseries:
                    for child in nursery.child_tasks:
                        walk(child, server)

            root = trio.lowlevel.current_root_task()
            assert root is not None
            walk(root, "")
            return names

        return self.run_sync_in_loop(read)

    def task_tree(self) -> str:
        """The gateway loop's task tree with where each task waits (tests/support/task_tree.py)."""
        return self.run_sync_in_loop(partial(format_task_tree, skip=("serve_demo_runtime",)))

    def _main(self) -> None:
        try:
            trio.run(self._serve_all)
        except BaseException as error:  # reported through self.failure
            self.failure = error
        finally:
            self._ready.set()

    async def _serve_all(self) -> None:
        from trio_gateway.app import create_app

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            runtime = create_demo_runtime(
                DemoRuntimeConfig(
                    internal_api_key=INTERNAL_KEY,
                    token_delay=0.0,
                    think_delay=0.0,
                    max_bench_tokens=2000,
                )
            )
            self.runtime = runtime
            runtime_binds = await nursery.start(
                partial(
                    serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=self._stop.wait
                )
            )
            values: dict[str, Any] = {
                "agent_url": runtime_binds[0],
                "internal_api_key": INTERNAL_KEY,
                "log_level": "INFO",
                "ws_heartbeat_interval": 5.0,
                "session_grace_seconds": 1.0,
                "drain_timeout": 3.0,
                "ws_close_timeout": 0.5,
                "ws_auth_timeout": 1.0,
                "use_jwt_auth": self.jwt,
                "ws_max_message_bytes": MAX_MESSAGE_BYTES,
                # One anonymous user (JWT off) sends everything: lift the per-user rates so the
                # fuzz measures input handling, not the rate limiter (test_limits.py does).
                "ws_messages_per_second": 10_000,
                "ws_message_burst": 100_000,
                "rest_requests_per_second": 100_000,
                "rest_request_burst": 1_000_000,
                "max_connections_per_user": 10_000,
                "ws_handshakes_per_second": 100_000,
                "ws_handshake_burst": 1_000_000,
                "max_live_sessions_per_user": 100_000,
                "state_backend": "memory",  # nothing kept between fuzz runs
            }
            jwks: JWKSServer | None = None
            if self.jwt:
                assert self.issuer is not None
                jwks = JWKSServer(self.issuer.jwks())
                values["jwks_url"] = await nursery.start(jwks.serve)
                values["jwks_refetch_cooldown"] = 0.5
            values.update(self.overrides)
            self.settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
            self.app = create_app(self.settings)
            gateway_stop = trio.Event()
            gateway_binds = await nursery.start(
                partial(
                    serve,
                    self.app,
                    self.settings,
                    host="127.0.0.1",
                    port=0,
                    shutdown_trigger=gateway_stop.wait,
                )
            )
            self.port = int(gateway_binds[0].rsplit(":", 1)[1])
            control_started = trio.Event()
            nursery.start_soon(self._control, control_started)
            await control_started.wait()
            self._ready.set()
            await self._stop.wait()
            gateway_stop.set()
            if jwks is not None:
                jwks.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 30

    async def _control(self, started: trio.Event) -> None:
        """The control session: exact ``bench`` turns, back to back, until the run stops."""
        headers = None
        if self.jwt:
            headers = [(b"Authorization", f"Bearer {self.token('control')}".encode())]
        url = f"ws://127.0.0.1:{self.port}/api/v1/ws/control-session"
        assert self._stop is not None
        try:
            async with trio_websocket.open_websocket_url(
                url, subprotocols=[SUBPROTOCOL_V2], extra_headers=headers
            ) as ws:
                ready = orjson.loads(await ws.get_message())
                if ready.get("type") != "session_ready":
                    self.control.problems.append(f"first frame {ready}")
                started.set()
                while not self._stop.is_set():
                    while self._paused and not self._stop.is_set():
                        self._idle = True
                        # Keep reading while paused: v2 heartbeat frames fill trio-websocket's
                        # queue otherwise, its reader stops answering pings, and the gateway
                        # rightly drops the control session as a dead peer.
                        with trio.move_on_after(0.05):
                            frame = orjson.loads(await ws.get_message())
                            if frame.get("type") != "heartbeat":
                                self.control.problems.append(f"while paused: {frame}")
                    self._idle = False
                    problem = await control_turn(ws, CONTROL_TOKENS)
                    if problem is not None:
                        self.control.problems.append(problem)
                    else:
                        self.control.turns += 1
                    await trio.sleep(0.005)  # leave the CPU to the fuzzer between turns
        except trio_websocket.ConnectionClosed as closed:
            if not self._stop.is_set():
                self.control.closed = closed.reason.code if closed.reason else -1
                self.control.problems.append(f"control session closed: {closed.reason}")
        except BaseException as error:
            self.control.problems.append(f"control session failed: {error!r}")
            raise
        finally:
            started.set()


@dataclass
class FuzzStats:
    """Figures of a fuzz run (printed by the tests at the end and by ``bench/fuzz.py``)."""

    connections: int = 0
    frames_sent: int = 0
    handshakes: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    close_codes: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    problems: list[str] = field(default_factory=list)

    def count(self, table: dict[str, int], key: object) -> None:
        """Add one to ``table[str(key)]``."""
        table[str(key)] = table.get(str(key), 0) + 1

    def record_exchange(self, batch: FrameBatch, seen: Exchange) -> list[str]:
        """Account for one frame-fuzz connection; returns its problems."""
        self.connections += 1
        self.frames_sent += len(batch.frames) + 1
        self.count(self.close_codes, seen.close_code if seen.close_code else "eof")
        problems = check_exchange(batch, seen)
        self.problems += problems[:3]
        return problems

    def record_answer(self, answer: HttpAnswer, *, allowed: frozenset[int] | None = None) -> str:
        """Account for one handshake answer; returns a problem, or '' when it is acceptable."""
        self.handshakes += 1
        self.count(self.statuses, answer.status)
        problem = ""
        if answer.status is not None and answer.status >= 500:
            self.server_errors += 1
            problem = f"5xx answer: {answer.head!r}"
        elif allowed is not None and answer.status not in allowed:
            problem = f"status {answer.status} not in {sorted(allowed)}: {answer.head!r}"
        if problem:
            self.problems.append(problem)
        return problem


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


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM) in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# --- running fuzz tests against one FuzzGateway ------------------------------------------------


def fuzz_settings(examples: int) -> settings:
    """Settings of every fuzz test: ``examples`` examples, no deadline (real sockets on a
    shared machine), generation of big inputs allowed."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def settle(gateway: FuzzGateway) -> int:
    """Pause the control session, wait until only it is open; the gateway's task count then."""
    gateway.pause_control(True)
    try:
        trio.run(wait_quiet, gateway)
        gateway.baseline_names = gateway.task_names()
        return gateway_tasks(gateway.baseline_names)
    finally:
        gateway.pause_control(False)


def gateway_tasks(names: dict[str, int]) -> int:
    """Tasks of the loop that are not the demo runtime's. The runtime shares the loop and
    keeps an idle task per keep-alive connection the gateway's pools hold to it, and how
    many of those are pooled depends on timing (each is bounded by the pool's limits)."""
    return sum(count for name, count in names.items() if not name.startswith(RUNTIME_TASKS))


RUNTIME_TASKS = "serve_demo_runtime: "


async def wait_quiet(gateway: FuzzGateway, baseline: int | None = None) -> None:
    """Wait until only the control session is open (and, given a ``baseline``, no more
    gateway tasks than that), or fail with the task tree."""
    # Closed sockets finish their grace period and hypercorn's ping task wakes up once more
    # (at most a heartbeat interval): poll the real server until it is quiet, bounded.
    gauges = (0, 0, 0)
    names: dict[str, int] = {}
    with trio.move_on_after(30):
        while True:
            gauges = await trio.to_thread.run_sync(gateway.gauges)
            _, sockets, sessions = gauges
            quiet = gateway.control_idle and sockets == 1 and sessions == 1
            if quiet:
                if baseline is None:
                    return
                names = await trio.to_thread.run_sync(gateway.task_names)
                if gateway_tasks(names) <= baseline:
                    return
            await trio.sleep(0.05)
    names = names or await trio.to_thread.run_sync(gateway.task_names)
    more = {n: c - gateway.baseline_names.get(n, 0) for n, c in names.items()}
    # Where each task waits says why it is still there (tests/support/task_tree.py).
    tree = await trio.to_thread.run_sync(gateway.task_tree)
    raise AssertionError(
        f"not quiet: (tasks, sockets, sessions)={gauges}, baseline gateway tasks={baseline}, "
        f"control idle={gateway.control_idle}; tasks beyond the baseline: "
        f"{ {n: d for n, d in more.items() if d > 0} }; all tasks: {names}\n"
        f"task tree:\n{tree}"
    )
