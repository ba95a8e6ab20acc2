"""Specification of the SSE decoder (WHATWG HTML, "interpreting an event stream").

Each test states one rule. The property tests at the end check the rules hold whatever way the
byte stream is split into reads, and against a slow, literal transcription of the standard.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gateway.upstream.sse import ServerSentEvent, SSEDecoder, SSEProtocolError

BOM = b"\xef\xbb\xbf"


def decode_all(*chunks: bytes, decoder: SSEDecoder | None = None) -> list[ServerSentEvent]:
    """Feed every chunk, then close; return all events."""
    decoder = decoder if decoder is not None else SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``stream`` at the given offsets (any order, duplicates allowed)."""
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# --- the event type -----------------------------------------------------------------------------


def test_event_defaults_are_message_type_no_id_no_retry() -> None:
    assert ServerSentEvent("x") == ServerSentEvent("x", "message", None, None)


def test_decoded_events_equal_constructed_ones_and_stay_frozen() -> None:
    # The decoder builds events without the dataclass __init__; it must set exactly these fields.
    assert [f.name for f in dataclasses.fields(ServerSentEvent)] == ["data", "event", "id", "retry"]
    (event,) = decode_all(b"event: e\nid: 1\nretry: 5\ndata: x\n\n")
    assert event == ServerSentEvent("x", "e", "1", 5)
    assert hash(event) == hash(ServerSentEvent("x", "e", "1", 5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "y"  # type: ignore[misc]


# --- line endings -------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr-only"])
def test_lf_crlf_and_cr_terminated_lines_form_an_event(newline: bytes) -> None:
    assert decode_all(b"data: hello" + newline + newline) == [ServerSentEvent("hello")]


def test_line_endings_may_be_mixed_within_a_stream() -> None:
    stream = b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\n\r"
    assert decode_all(stream) == [ServerSentEvent("a\nb\nc"), ServerSentEvent("d")]


def test_cr_then_lf_is_one_line_end_but_lf_then_cr_is_two() -> None:
    assert decode_all(b"data: a\r\ndata: b\n\n") == [ServerSentEvent("a\nb")]
    assert decode_all(b"data: a\n\rdata: b\n\n") == [ServerSentEvent("a"), ServerSentEvent("b")]


def test_cr_at_end_of_chunk_and_lf_at_start_of_next_are_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [ServerSentEvent("a\nb")]


def test_cr_at_end_of_chunk_then_blank_crlf_line_dispatches_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []  # completes the CRLF; not a blank line
    assert decoder.feed(b"\r") == [ServerSentEvent("a")]
    assert decoder.feed(b"\n") == []  # completes that CRLF; must not dispatch anything again
    assert decoder.feed(b"data: b\n\n") == [ServerSentEvent("b")]


def test_cr_at_end_of_chunk_followed_by_another_byte_is_a_complete_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [ServerSentEvent("a")]


def test_empty_chunks_between_cr_and_lf_do_not_break_the_pair() -> None:
    assert decode_all(b"data: a\r", b"", b"", b"\ndata: b\n\n") == [ServerSentEvent("a\nb")]


def test_empty_chunks_are_a_no_op() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: x\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [ServerSentEvent("x")]


def test_unicode_line_separators_are_not_line_ends() -> None:
    # Only CR and LF end lines; U+0085, U+2028, VT and FF are ordinary data characters.
    data = "a\x85b\u2028c\x0bd\x0ce\x1cf"
    assert decode_all(f"data: {data}\n\n".encode()) == [ServerSentEvent(data)]


# --- byte order mark and UTF-8 ------------------------------------------------------------------


def test_leading_utf8_bom_is_skipped() -> None:
    assert decode_all(BOM + b"data: x\n\n") == [ServerSentEvent("x")]


def test_leading_bom_split_across_chunks_is_skipped() -> None:
    assert decode_all(b"\xef", b"\xbb", b"\xbfdata: x\n\n") == [ServerSentEvent("x")]


def test_only_one_leading_bom_is_skipped() -> None:
    # The second BOM becomes part of the field name "\ufeffdata", an unknown field.
    assert decode_all(BOM + BOM + b"data: x\n\n") == []


def test_bom_after_the_start_of_the_stream_is_data() -> None:
    stream = b"data: x\n\n" + BOM + b"data: y\n\ndata: " + BOM + b"z\n\n"
    assert decode_all(stream) == [ServerSentEvent("x"), ServerSentEvent("\ufeffz")]


def test_multibyte_character_split_anywhere_across_chunks_is_decoded_whole() -> None:
    stream = "data: é€😀\n\n".encode()
    for cut in range(len(stream) + 1):
        assert decode_all(stream[:cut], stream[cut:]) == [ServerSentEvent("é€😀")], cut
    assert decode_all(*(stream[i : i + 1] for i in range(len(stream)))) == [ServerSentEvent("é€😀")]


def test_invalid_utf8_is_replaced_not_rejected() -> None:
    stream = b"data: a\xffb\xe2\x82\n" + b"data: \xc3\n\n"
    assert decode_all(stream) == [ServerSentEvent("a\ufffdb\ufffd\n\ufffd")]


# --- comments and fields ------------------------------------------------------------------------


def test_comment_lines_are_ignored() -> None:
    stream = b": keep-alive\ndata: a\n:another comment\ndata: b\n:\n\n"
    assert decode_all(stream) == [ServerSentEvent("a\nb")]


def test_a_stream_of_only_comments_yields_nothing() -> None:
    assert decode_all(b": ping\n\n: ping\n\n") == []


def test_multi_line_data_is_joined_with_newlines_and_final_newline_removed() -> None:
    assert decode_all(b"data: one\ndata: two\ndata: three\n\n") == [
        ServerSentEvent("one\ntwo\nthree")
    ]


def test_only_one_space_after_the_colon_is_stripped() -> None:
    assert decode_all(b"data:  two spaces\n\n") == [ServerSentEvent(" two spaces")]
    assert decode_all(b"data:\tx \n\n") == [ServerSentEvent("\tx ")]


def test_space_after_the_colon_is_optional() -> None:
    assert decode_all(b"data:x\n\n") == [ServerSentEvent("x")]


def test_value_keeps_any_further_colons() -> None:
    assert decode_all(b'data: {"a": "b:c"}\n\n') == [ServerSentEvent('{"a": "b:c"}')]


def test_line_without_colon_is_a_field_name_with_empty_value() -> None:
    assert decode_all(b"data\n\n") == [ServerSentEvent("")]
    assert decode_all(b"data\ndata\n\n") == [ServerSentEvent("\n")]
    assert decode_all(b"event\ndata: x\n\n") == [ServerSentEvent("x", "message")]


def test_field_names_are_case_sensitive() -> None:
    assert decode_all(b"Data: x\nDATA: y\n\n") == []


def test_unknown_fields_are_ignored() -> None:
    assert decode_all(b"foo: bar\ndata: x\nbaz\ndata : no\n\n") == [ServerSentEvent("x")]


def test_event_field_sets_the_type_of_the_next_event_only() -> None:
    stream = b"event: update\ndata: 1\n\ndata: 2\n\n"
    assert decode_all(stream) == [ServerSentEvent("1", "update"), ServerSentEvent("2", "message")]


def test_last_event_field_in_a_block_wins() -> None:
    assert decode_all(b"event: a\nevent: b\ndata: x\n\n") == [ServerSentEvent("x", "b")]


def test_empty_event_field_means_message() -> None:
    assert decode_all(b"event:\ndata: x\n\n") == [ServerSentEvent("x", "message")]


# --- dispatch -----------------------------------------------------------------------------------


def test_blank_line_without_data_dispatches_nothing_and_resets_event_type() -> None:
    stream = b"event: lost\n\ndata: x\n\n"
    assert decode_all(stream) == [ServerSentEvent("x", "message")]


def test_consecutive_blank_lines_dispatch_nothing_extra() -> None:
    assert decode_all(b"\n\n\ndata: x\n\n\n\n") == [ServerSentEvent("x")]


def test_data_field_with_empty_value_still_dispatches_an_empty_event() -> None:
    assert decode_all(b"data:\n\n") == [ServerSentEvent("")]


def test_many_events_in_one_chunk_are_all_returned_in_order() -> None:
    stream = b"".join(b"data: %d\n\n" % i for i in range(100))
    assert decode_all(stream) == [ServerSentEvent(str(i)) for i in range(100)]


# --- id -----------------------------------------------------------------------------------------


def test_id_is_attached_to_the_event_and_persists_across_later_events() -> None:
    decoder = SSEDecoder()
    assert decoder.last_event_id is None
    events = decoder.feed(b"data: a\n\nid: 7\ndata: b\n\ndata: c\n\nid: 8\ndata: d\n\n")
    assert [e.id for e in events] == [None, "7", "7", "8"]
    assert decoder.last_event_id == "8"


def test_id_containing_nul_is_ignored() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert [e.id for e in events] == ["1", "1"]
    assert decoder.last_event_id == "1"


def test_empty_id_resets_the_last_event_id_to_empty() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"id: 1\ndata: a\n\nid\ndata: b\n\n")
    assert [e.id for e in events] == ["1", ""]
    assert decoder.last_event_id == ""


def test_last_event_id_changes_only_when_a_block_ends() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\nid: 2\n")
    assert decoder.last_event_id == "1"
    decoder.feed(b"data: b\n\n")
    assert decoder.last_event_id == "2"


def test_id_in_a_block_without_data_still_updates_last_event_id() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 5\n\n") == []
    assert decoder.last_event_id == "5"
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent("x", id="5")]


# --- retry --------------------------------------------------------------------------------------


def test_retry_with_ascii_digits_is_attached_to_its_block_and_remembered() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 3000\ndata: a\n\ndata: b\n\n")
    assert [e.retry for e in events] == [3000, None]
    assert decoder.retry == 3000


@pytest.mark.parametrize(
    "value",
    [b"", b" 10", b"10 ", b"1.5", b"-1", b"+1", b"10ms", b"0x10", b"\xd9\xa1\xd9\xa2", b"\xc2\xb2"],
)
def test_retry_that_is_not_all_ascii_digits_is_ignored(value: bytes) -> None:
    # The last two are Arabic-Indic "12" and superscript "2": digits to str.isdigit, not ASCII.
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 100\n\nretry: " + value + b"\ndata: x\n\n")
    assert events == [ServerSentEvent("x")]
    assert decoder.retry == 100


def test_retry_with_leading_zeros_is_decimal() -> None:
    assert decode_all(b"retry: 0010\ndata: x\n\n") == [ServerSentEvent("x", retry=10)]


def test_retry_with_too_many_digits_for_int_is_ignored() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"retry: " + b"9" * 10_000 + b"\ndata: x\n\n") == [ServerSentEvent("x")]
    assert decoder.retry is None


def test_retry_in_a_block_without_data_still_sets_the_reconnection_time() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"retry: 2500\n\n") == []
    assert decoder.retry == 2500
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent("x")]


# --- end of stream ------------------------------------------------------------------------------


def test_close_discards_an_unterminated_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: incomplete\n") == [ServerSentEvent("a")]
    assert decoder.close() == []


def test_close_discards_an_unterminated_last_line() -> None:
    assert decode_all(b"data: a\n\ndata: b") == [ServerSentEvent("a")]


def test_close_processes_a_pending_line_before_discarding_the_event() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\nid: 9\nretry: 42")
    assert decoder.buffered_bytes == len(b"retry: 42")
    assert decoder.close() == []
    assert decoder.retry == 42
    assert decoder.last_event_id is None  # the block never ended
    assert decoder.buffered_bytes == 0


def test_close_is_idempotent_and_feed_after_close_is_refused() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n")
    assert decoder.close() == []
    assert decoder.close() == []
    with pytest.raises(RuntimeError):
        decoder.feed(b"\n")


# --- buffering and the line limit ---------------------------------------------------------------


def test_buffered_bytes_counts_the_pending_unterminated_line() -> None:
    decoder = SSEDecoder()
    assert decoder.buffered_bytes == 0
    decoder.feed(b"data: a\n\ndata: par")
    assert decoder.buffered_bytes == len(b"data: par")
    decoder.feed(b"tial")
    assert decoder.buffered_bytes == len(b"data: partial")
    decoder.feed(b"\n")
    assert decoder.buffered_bytes == 0


def test_max_line_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SSEDecoder(max_line_bytes=0)


def test_line_of_exactly_max_line_bytes_is_accepted() -> None:
    line = b"data: " + b"x" * 94
    decoder = SSEDecoder(max_line_bytes=100)
    assert decoder.feed(line[:50]) == []
    assert decoder.feed(line[50:]) == []
    assert decoder.feed(b"\n\n" + line + b"\n\n") == [ServerSentEvent("x" * 94)] * 2


def test_unterminated_line_growing_past_the_limit_raises() -> None:
    decoder = SSEDecoder(max_line_bytes=100)
    decoder.feed(b"data: " + b"x" * 90)
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"x" * 20)


def test_single_chunk_with_an_unterminated_line_past_the_limit_raises() -> None:
    with pytest.raises(SSEProtocolError):
        SSEDecoder(max_line_bytes=100).feed(b"data: " + b"x" * 200)


def test_unterminated_tail_past_the_limit_raises_after_the_events_before_it() -> None:
    with pytest.raises(SSEProtocolError) as info:
        SSEDecoder(max_line_bytes=100).feed(b"data: a\n\ndata: " + b"x" * 200)
    assert info.value.events == [ServerSentEvent("a")]


def test_complete_line_past_the_limit_raises_even_inside_one_chunk() -> None:
    with pytest.raises(SSEProtocolError):
        SSEDecoder(max_line_bytes=100).feed(b"data: " + b"x" * 200 + b"\n\n")


def test_protocol_error_is_a_value_error_carrying_the_events_completed_before_it() -> None:
    decoder = SSEDecoder(max_line_bytes=100)
    with pytest.raises(ValueError) as info:
        decoder.feed(b"data: a\n\ndata: b\n\ndata: " + b"x" * 200 + b"\n\ndata: c\n\n")
    assert isinstance(info.value, SSEProtocolError)
    assert info.value.events == [ServerSentEvent("a"), ServerSentEvent("b")]


def test_decoder_refuses_further_input_after_the_limit_was_hit() -> None:
    decoder = SSEDecoder(max_line_bytes=10)
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"x" * 11)
    assert decoder.buffered_bytes == 0
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"data: a\n\n")
    assert decoder.close() == []


# --- properties ---------------------------------------------------------------------------------


def reference_decode(stream: bytes) -> tuple[list[ServerSentEvent], str | None, int | None]:
    """A slow, literal transcription of the standard: returns (events, last_event_id, retry)."""
    if stream.startswith(BOM):
        stream = stream[3:]
    lines: list[bytes] = []
    start = i = 0
    while i < len(stream):
        if stream[i] in b"\r\n":
            lines.append(stream[start:i])
            if stream[i : i + 2] == b"\r\n":
                i += 1
            start = i + 1
        i += 1
    if start < len(stream):
        lines.append(stream[start:])  # the unterminated tail, processed at close (cannot dispatch)

    events: list[ServerSentEvent] = []
    data, event_type, id_buffer, last_id = "", "", None, None
    block_retry: int | None = None
    retry: int | None = None
    for raw in lines:
        line = raw.decode("utf-8", "replace")
        if line == "":
            last_id = id_buffer
            if data:
                events.append(
                    ServerSentEvent(data[:-1], event_type or "message", last_id, block_retry)
                )
            data, event_type, block_retry = "", "", None
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\x00" not in value:
            id_buffer = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            block_retry = retry = int(value)
    return events, last_id, retry


def run_decoder(chunks: list[bytes]) -> tuple[list[ServerSentEvent], str | None, int | None]:
    decoder = SSEDecoder()
    events = decode_all(*chunks, decoder=decoder)
    return events, decoder.last_event_id, decoder.retry


# Building blocks that hit the interesting cases: field names, separators, BOMs, NUL, ASCII and
# non-ASCII digits, and UTF-8 sequences that are valid, truncated or invalid. Streams are drawn as
# lines (mostly `name` + separator + value, some free-form), each with a random ending (which may
# be none, or several), so that fields, blank lines and every kind of line end are all common.
NAMES = [b"data", b"event", b"id", b"retry", b"", b"x", BOM + b"data"]
SEPARATORS = [b"", b":", b": ", b":  "]
VALUE_TOKENS = [
    b"x", b" ", b":", b"12", b"0", b"\x00", BOM, b"\xef", "é".encode(), "😀".encode(),
    "\u0661".encode(), b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\xff",
]  # fmt: skip
ENDINGS = [b"\n", b"\r\n", b"\r", b"", b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r"]
value_bytes = st.lists(st.sampled_from(VALUE_TOKENS) | st.binary(max_size=2), max_size=4).map(
    b"".join
)
field_line = st.tuples(st.sampled_from(NAMES), st.sampled_from(SEPARATORS), value_bytes).map(
    b"".join
)
soup_line = field_line | value_bytes
byte_soup = st.lists(st.tuples(soup_line, st.sampled_from(ENDINGS)), max_size=12).map(
    lambda pairs: b"".join(line + ending for line, ending in pairs)
)


def cuts_for(stream: bytes, data: st.DataObject) -> list[int]:
    """Random split points; half the time also one right after every CR, to split CRLF pairs."""
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    if data.draw(st.booleans()):
        cuts += [i + 1 for i, byte in enumerate(stream) if byte == 0x0D]
    return cuts


@settings(max_examples=300)
@given(byte_soup, st.data())
def test_any_stream_split_anywhere_decodes_like_the_literal_reading_of_the_standard(
    stream: bytes, data: st.DataObject
) -> None:
    assert run_decoder(split_at(stream, cuts_for(stream, data))) == reference_decode(stream)


@settings(max_examples=300)
@given(byte_soup)
def test_feeding_byte_by_byte_equals_feeding_all_at_once(stream: bytes) -> None:
    one_by_one = [stream[i : i + 1] for i in range(len(stream))]
    assert run_decoder(one_by_one) == run_decoder([stream])


line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)


@st.composite
def serialised_events(draw: st.DrawFn) -> tuple[bytes, list[ServerSentEvent]]:
    """Random events, and a byte stream that encodes them using every legal variation."""
    expected: list[ServerSentEvent] = []
    lines: list[str] = []
    current_id: str | None = None

    def field(name: str, value: str) -> str:
        forms = [f"{name}: {value}"]
        if not value.startswith(" "):
            forms.append(f"{name}:{value}")
        if value == "":
            forms.append(name)
        return draw(st.sampled_from(forms))

    def comments() -> list[str]:
        return [":" + c for c in draw(st.lists(line_text, max_size=2))]

    for _ in range(draw(st.integers(0, 5))):
        data = draw(st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=30))
        event_type = draw(st.none() | line_text)
        event_id = draw(st.none() | line_text.filter(lambda s: "\x00" not in s))
        retry = draw(st.none() | st.integers(0, 10**12))
        block = [field("data", part) for part in data.split("\n")]
        others = []
        if event_type is not None:
            others.append(field("event", event_type))
        if event_id is not None:
            others.append(field("id", event_id))
            current_id = event_id
        if retry is not None:
            others.append(field("retry", str(retry)))
        for line in others + comments():
            block.insert(draw(st.integers(0, len(block))), line)
        lines += comments() + block + [""]
        expected.append(ServerSentEvent(data, event_type or "message", current_id, retry))
    lines += comments()

    out = [BOM] if draw(st.booleans()) else []
    previous_ending = ""
    for line in lines:
        ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        if previous_ending == "\r" and line == "" and ending == "\n":
            ending = "\r\n"  # a lone LF right after a CR would merge with it into one CRLF
        out.append((line + ending).encode())
        previous_ending = ending
    return b"".join(out), expected


@given(serialised_events(), st.data())
def test_serialised_events_round_trip_through_any_split(
    case: tuple[bytes, list[ServerSentEvent]], data: st.DataObject
) -> None:
    stream, expected = case
    decoder = SSEDecoder()
    assert decode_all(*split_at(stream, cuts_for(stream, data)), decoder=decoder) == expected
    assert decoder.last_event_id == (expected[-1].id if expected else None)
    assert decoder.buffered_bytes == 0


def run_limited(chunks: list[bytes], limit: int) -> tuple[list[ServerSentEvent], bool]:
    """Decode with a line limit: (events obtained, whether the limit tripped)."""
    decoder = SSEDecoder(max_line_bytes=limit)
    events: list[ServerSentEvent] = []
    try:
        for chunk in chunks:
            events.extend(decoder.feed(chunk))
    except SSEProtocolError as error:
        return events + error.events, True
    return events + decoder.close(), False


@given(byte_soup, st.integers(1, 12), st.data())
def test_line_limit_trips_at_the_same_line_however_the_stream_is_split(
    stream: bytes, limit: int, data: st.DataObject
) -> None:
    assert run_limited(split_at(stream, cuts_for(stream, data)), limit) == run_limited(
        [stream], limit
    )
