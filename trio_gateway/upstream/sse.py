"""Sans-IO incremental parser for Server-Sent Events (``text/event-stream``).

Follows the "interpreting an event stream" rules of the WHATWG HTML standard
(https://html.spec.whatwg.org/multipage/server-sent-events.html). Feed it the raw bytes of each
network read, in any split, and it returns the events completed by that read::

    decoder = SSEDecoder()
    async for chunk in response.aiter_bytes():
        for event in decoder.feed(chunk):
            relay(event)
    decoder.close()

Deliberate choices where the standard leaves room or says nothing:

* ``ServerSentEvent.id`` is the last event ID in force when the event was dispatched; it is
  ``None`` only if the stream never set one (``id:`` with an empty value sets it to ``""``, which
  per the standard means "no ID" for reconnection purposes).
* ``ServerSentEvent.retry`` is the valid ``retry`` value carried by the event's own block, if any.
  A ``retry`` field takes effect immediately per the standard, even in a block that dispatches no
  event, so the decoder also keeps the latest one in :attr:`SSEDecoder.retry`.
* :attr:`SSEDecoder.last_event_id` is the standard's "last event ID string": updated when a block
  ends with a blank line (even one that carries no data), not when an ``id`` line is read.
* A ``retry`` value too long for :class:`int` (Python's 4300-digit conversion limit) is ignored
  like any other invalid value.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "SSEDecoder",
    "SSEProtocolError",
    "SSESplitter",
    "ServerSentEvent",
]

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_CR = 0x0D


@dataclass(slots=True, frozen=True)
class ServerSentEvent:
    """One dispatched event."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


# Building events in the hot loop: a frozen dataclass's generated __init__ assigns every field
# through object.__setattr__, which made construction about half of the per-event cost. The loop
# instead allocates with object.__new__ and fills the slots through their member descriptors (the
# same storage __init__ writes, ~1.5x faster overall). This bypasses __init__, so the event class
# must stay free of __post_init__ and every field must be set here; tests/unit/test_sse.py checks
# that the field list is exactly these four.
_SLOTS = vars(ServerSentEvent)
_set_data: Callable[[ServerSentEvent, str], None] = _SLOTS["data"].__set__
_set_event: Callable[[ServerSentEvent, str], None] = _SLOTS["event"].__set__
_set_id: Callable[[ServerSentEvent, str | None], None] = _SLOTS["id"].__set__
_set_retry: Callable[[ServerSentEvent, int | None], None] = _SLOTS["retry"].__set__


class SSEProtocolError(ValueError):
    """The stream broke a hard limit (a line longer than ``max_line_bytes``).

    ``events`` holds the events completed *before* the offending line, which ``feed`` could not
    return because it raised; a relay may forward them before ending the stream.
    """

    def __init__(self, message: str, events: list[ServerSentEvent] | None = None) -> None:
        super().__init__(message)
        self.events: list[ServerSentEvent] = events if events is not None else []


class SSEDecoder:
    """Feed bytes in any split; get complete events out.

    Not thread-safe; use one decoder per response body.
    """

    __slots__ = (
        "_at_start",
        "_block_retry",
        "_closed",
        "_data",
        "_event_type",
        "_failed",
        "_id_buffer",
        "_last_event_id",
        "_max_line_bytes",
        "_pending",
        "_pending_len",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        """Create a decoder; ``feed`` raises :class:`SSEProtocolError` for longer lines."""
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self._max_line_bytes = max_line_bytes
        # Byte-level state.
        self._pending: list[bytes] = []  # pieces of the current, unterminated line
        self._pending_len = 0
        self._skip_lf = False  # the previous chunk ended with CR: a leading LF completes a CRLF
        self._at_start = True  # no complete line seen yet: a leading BOM is still to be skipped
        self._closed = False
        self._failed = False
        # Per-block state (reset by every blank line).
        self._data: list[str] = []
        self._event_type = ""
        self._block_retry: int | None = None
        # Stream-wide state.
        self._id_buffer: str | None = None
        self._last_event_id: str | None = None
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str | None:
        """The last event ID string as of the last dispatch (``None`` if never set)."""
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The latest valid ``retry`` value (reconnection time in ms), ``None`` if none yet."""
        return self._retry

    @property
    def buffered_bytes(self) -> int:
        """Bytes held waiting for a line terminator (bounded by ``max_line_bytes``)."""
        return self._pending_len

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume the next bytes of the stream and return the events they complete.

        Raises :class:`SSEProtocolError` if a line exceeds ``max_line_bytes`` (the decoder is
        unusable afterwards) and :class:`RuntimeError` if called after :meth:`close`.
        """
        if self._closed or self._failed:
            if self._failed:
                raise SSEProtocolError("decoder already failed on an over-long line")
            raise RuntimeError("feed() called after close()")
        if self._skip_lf:
            if not chunk:
                return []
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]

        # Why the fast path looks like this: the gateway's traffic is overwhelmingly LF-only
        # `data: {json}\n\n` blocks, many per read. So we do one C-level scan for CR per chunk;
        # without CR the complete lines are everything up to the last LF, which we decode with a
        # single `bytes.decode` (splitting UTF-8 at LF is safe: 0x0A never occurs inside a
        # multi-byte sequence, and the decoder ends an invalid sequence at any ASCII byte, so this
        # equals decoding each line separately) and a single `str.split`. Only the bytes after the
        # last terminator are buffered, as a list of pieces so a long line arriving in small reads
        # is joined once, not re-copied on every read. CR-containing chunks take a slower path that
        # first rewrites CRLF and lone CR to LF; everything after that is shared. Events are built
        # without the dataclass __init__ (see _set_data). Measured on CPython 3.11 with 100-byte
        # events in 4 KiB reads: ~1M events/s (LF), ~0.8M (CRLF); ~0.7M when using __init__.
        has_cr = b"\r" in chunk
        cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) if has_cr else chunk.rfind(b"\n")
        if cut < 0:  # no line end in this chunk: it all belongs to the pending line
            if chunk:
                self._pending.append(chunk)
                self._pending_len += len(chunk)
                if self._pending_len > self._max_line_bytes:
                    self._fail([])
            return []

        if self._pending:
            cut += self._pending_len
            self._pending.append(chunk)
            data = b"".join(self._pending)
            self._pending = []
            self._pending_len = 0
        else:
            data = chunk

        if has_cr:
            self._skip_lf = data[-1] == _CR
            # bytes.splitlines breaks at exactly LF, CRLF and CR (unlike str.splitlines).
            region = b"\n".join(data[: cut + 1].splitlines())
        else:
            region = data[:cut]
        rest = data[cut + 1 :]

        if len(region) > self._max_line_bytes:  # only then can a complete line be too long
            self._check_line_lengths(region)
        if self._at_start:
            self._at_start = False
            if region.startswith(_BOM):
                region = region[3:]
        events = self._process_lines(region.decode("utf-8", "replace").split("\n"))

        if rest:
            self._pending.append(rest)
            self._pending_len = len(rest)
            if self._pending_len > self._max_line_bytes:
                self._fail(events)
        return events

    def close(self) -> list[ServerSentEvent]:
        """Signal end of stream.

        A pending unterminated line is processed as a line first (it can update the ``retry``
        value but cannot complete an event); the unterminated final event is then discarded, as
        the standard requires, so this returns ``[]``. Idempotent; ``feed`` is refused afterwards.
        """
        if self._closed:
            return []
        self._closed = True
        events: list[ServerSentEvent] = []
        if self._pending and not self._failed:
            line = b"".join(self._pending)
            if self._at_start and line.startswith(_BOM):
                line = line[3:]
            events = self._process_lines([line.decode("utf-8", "replace")])
        self._pending = []
        self._pending_len = 0
        self._at_start = False
        self._data = []
        self._event_type = ""
        self._block_retry = None
        return events

    def _check_line_lengths(self, region: bytes) -> None:
        """Raise if any LF-separated line of ``region`` is too long, after processing the lines
        before it (their events go on the exception)."""
        lines = region.split(b"\n")
        for index, line in enumerate(lines):
            if len(line) > self._max_line_bytes:
                if self._at_start:
                    self._at_start = False
                    lines[0] = lines[0].removeprefix(_BOM)
                before = [item.decode("utf-8", "replace") for item in lines[:index]]
                self._fail(self._process_lines(before))

    def _fail(self, events: list[ServerSentEvent]) -> None:
        self._failed = True
        self._pending = []
        self._pending_len = 0
        raise SSEProtocolError(
            f"SSE line longer than max_line_bytes={self._max_line_bytes}", events
        )

    def _process_lines(self, lines: list[str]) -> list[ServerSentEvent]:
        """Apply the standard's per-line rules to complete, decoded lines."""
        events: list[ServerSentEvent] = []
        # Hot loop: state in locals, the `data: ` line and the blank line tested first.
        data = self._data
        event_type = self._event_type
        id_buffer = self._id_buffer
        last_event_id = self._last_event_id
        block_retry = self._block_retry
        new = object.__new__
        set_data = _set_data
        set_event = _set_event
        set_id = _set_id
        set_retry = _set_retry
        for line in lines:
            if not line:  # blank line: dispatch
                last_event_id = id_buffer
                if data:
                    event = new(ServerSentEvent)
                    set_data(event, "\n".join(data))
                    set_event(event, event_type or "message")
                    set_id(event, id_buffer)
                    set_retry(event, block_retry)
                    events.append(event)
                    data = []
                event_type = ""
                block_retry = None
                continue
            if line.startswith("data: "):
                data.append(line[6:])
                continue
            colon = line.find(":")
            if colon == 0:  # comment
                continue
            if colon > 0:
                name = line[:colon]
                value = line[colon + 1 :]
                if value.startswith(" "):
                    value = value[1:]
            else:
                name = line
                value = ""
            if name == "data":
                data.append(value)
            elif name == "event":
                event_type = value
            elif name == "id":
                if "\x00" not in value:
                    id_buffer = value
            elif name == "retry" and value.isascii() and value.isdigit():
                # int() refuses over sys.get_int_max_str_digits() digits: ignore like any invalid
                with suppress(ValueError):
                    block_retry = self._retry = int(value)
            # any other field name is ignored
        self._data = data
        self._event_type = event_type
        self._id_buffer = id_buffer
        self._last_event_id = last_event_id
        self._block_retry = block_retry
        return events


class SSESplitter:
    """Event payloads of one stream: a fast path for ``data: <payload>\\n\\n`` blocks, the full
    :class:`SSEDecoder` for everything else, with exactly the decoder's results.

    Today's runtime writes nothing but blocks of exactly ``data: <one JSON object>\\n\\n``. The
    fast path cuts such blocks out of the bytes with ``bytes.find`` and hands the payload bytes
    on undecoded (``orjson`` parses bytes). Whatever it does not recognise at a block boundary
    (a comment, ``event:``/``id:``/``retry:``, multi-line data, a CR anywhere, a leading BOM, a
    blank line too many, a line over ``max_line_bytes``) goes, from the start of that block, to
    an :class:`SSEDecoder` set to the state the decoder alone would be in there (no partial
    block, the last ``id`` in force, past the start of the stream). The fast path takes over
    again after a read that leaves the decoder at a clean block boundary. The property test in
    ``tests/unit/test_sse_split.py`` checks the split against the decoder alone for arbitrary byte
    streams cut at arbitrary points.
    """

    __slots__ = (
        "_decoded",
        "_decoder",
        "_id",
        "_max_line_bytes",
        "_pending",
        "_pending_len",
        "_started",
    )

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        """Create a splitter; it raises :class:`SSEProtocolError` where the decoder would."""
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self._max_line_bytes = max_line_bytes
        self._decoder: SSEDecoder | None = None  # set while the full decoder is in charge
        self._pending: list[bytes] = []  # bytes of the current, incomplete block (fast path)
        self._pending_len = 0
        self._started = False  # a block went through the fast path: the BOM chance is over
        self._id: str | None = None  # the last event ID in force (set by the decoder only)
        self._decoded = False  # the decoder produced (some of) the last feed's events

    def feed_data(self, chunk: bytes) -> list[bytes | str]:
        """The data of every event completed by ``chunk``: ``bytes`` from the fast path (UTF-8
        as sent; decode with ``errors="replace"`` to get the decoder's ``str``), ``str`` from
        the decoder. Event names and IDs are not reported (see :meth:`feed` for them)."""
        self._decoded = False
        items = self._feed(chunk)
        if not self._decoded:
            return items  # type: ignore[return-value]  # all bytes
        return [i.data if isinstance(i, ServerSentEvent) else i for i in items]

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The events completed by ``chunk``, exactly as :meth:`SSEDecoder.feed` returns them."""
        event_id = self._id  # fast-path events of this feed precede any ID change in it
        return self._as_events(self._feed(chunk), event_id)

    @staticmethod
    def _as_events(
        items: list[bytes | ServerSentEvent], event_id: str | None
    ) -> list[ServerSentEvent]:
        return [
            item
            if isinstance(item, ServerSentEvent)
            else ServerSentEvent(item.decode("utf-8", "replace"), id=event_id)
            for item in items
        ]

    def _feed(self, chunk: bytes) -> list[bytes | ServerSentEvent]:
        decoder = self._decoder
        if decoder is not None:
            return self._decode(decoder, chunk, [])
        if self._pending:
            self._pending.append(chunk)
            self._pending_len += len(chunk)
            if b"\n" not in chunk and b"\r" not in chunk:
                # Cannot end a line: keep it whole, join once a line end arrives.
                if self._pending_len > self._max_line_bytes:
                    return self._fall_back(self._take_pending(), [])
                return []
            data = self._take_pending()
        else:
            data = chunk
        if (not self._started and data[:1] == b"\xef") or b"\r" in data:
            return self._fall_back(data, [])  # a possible BOM, or CR line ends
        out: list[bytes | ServerSentEvent] = []
        find = data.find
        max_line = self._max_line_bytes
        pos = 0
        while True:
            end = find(b"\n\n", pos)
            if end < 0:
                break
            if (
                end - pos > max_line
                or not data.startswith(b"data: ", pos)
                or (find(b"\n", pos, end) >= 0)
            ):
                return self._fall_back(data[pos:], out)
            out.append(data[pos + 6 : end])
            pos = end + 2
            self._started = True
        if pos < len(data):
            rest = data[pos:] if pos else data
            if len(rest) > max_line:
                return self._fall_back(rest, out)
            self._pending = [rest]
            self._pending_len = len(rest)
        return out

    def _take_pending(self) -> bytes:
        data = b"".join(self._pending)
        self._pending = []
        self._pending_len = 0
        return data

    def _fall_back(
        self, data: bytes, out: list[bytes | ServerSentEvent]
    ) -> list[bytes | ServerSentEvent]:
        """Hand ``data`` (which starts at a block boundary) to a decoder in the state the
        decoder alone would be in at that boundary."""
        decoder = SSEDecoder(self._max_line_bytes)
        decoder._at_start = not self._started
        decoder._id_buffer = decoder._last_event_id = self._id
        self._decoder = decoder
        return self._decode(decoder, data, out)

    def _decode(
        self, decoder: SSEDecoder, data: bytes, out: list[bytes | ServerSentEvent]
    ) -> list[bytes | ServerSentEvent]:
        self._decoded = True
        try:
            events = decoder.feed(data)
        except SSEProtocolError as error:
            error.events = self._as_events(out, self._id) + error.events
            raise
        out.extend(events)
        # Back to the fast path only at a clean block boundary: nothing buffered, no field of a
        # block seen yet, no CRLF half-read, past the stream's start.
        if (
            not decoder._pending
            and not decoder._data
            and not decoder._event_type
            and decoder._block_retry is None
            and not decoder._skip_lf
            and not decoder._at_start
        ):
            self._decoder = None
            self._id = decoder._id_buffer
            self._started = True
        return out

    def close(self) -> list[ServerSentEvent]:
        """End of stream: an unterminated final event is discarded (see
        :meth:`SSEDecoder.close`); always ``[]``, like the decoder."""
        self._pending = []
        self._pending_len = 0
        if self._decoder is not None:
            return self._decoder.close()
        return []
