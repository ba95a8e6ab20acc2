"""hypothesis strategies of the fuzzing harnesses: client frames (valid, wrong-typed, unicode,
nested, mutated, huge, fragmented, terminal) gathered in a :class:`FrameBatch`, and raw
handshake requests (header names and values, path segments, percent-encoding)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from trio_gateway.protocol import SUBPROTOCOL_V2

from .fuzzing_wire import (
    MAX_MESSAGE_BYTES,
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    WireFrame,
    encode_frame,
    fragmented,
)

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
