"""WebSocket frames on the wire for the fuzzing harnesses: client frames encoded by hand (any
opcode, RSV bits, masking, fragmentation), permessage-deflate payloads and bombs, the
:class:`WireFrame` a strategy draws, and the reference verdicts (the error code or close code
the gateway must answer with)."""

from __future__ import annotations

import functools
import zlib

from trio_gateway.protocol import (
    ErrorCode,
    FrameError,
    parse_client_frame,
)

# Small enough that "huge" and "just over the limit" frames are cheap to build and send.
MAX_MESSAGE_BYTES = 64 * 1024
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
