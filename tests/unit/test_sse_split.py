"""The fast path of :class:`SSESplitter` plus its decoder fallback equals :class:`SSEDecoder`.

Today's runtime writes only ``data: <json>\\n\\n`` blocks, which the splitter cuts out with
``bytes.find``; anything else goes to the full decoder from the start of that block. The
property tests feed both the same arbitrary byte streams, cut at arbitrary points, and compare
every event (data, name, ID, retry), the over-long-line failure and the events handed over with
it.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gateway.upstream.sse import ServerSentEvent, SSEDecoder, SSEProtocolError, SSESplitter

from .test_sse import BOM, byte_soup, cuts_for, split_at

# Mostly runtime-shaped blocks (some with non-ASCII, invalid UTF-8, an empty payload), mixed with
# the decoder tests' byte soup (comments, fields, every line ending, BOMs, NUL).
payload = st.sampled_from([b"{}", b'{"a":1}', "é".encode(), b"\xff", b"", b"x" * 40, b":"])
runtime_block = payload.map(lambda p: b"data: " + p + b"\n\n")
# Lines that leave the decoder mid-block or at odd boundaries (where handing back to the fast
# path would be wrong), and CR-only endings that end a block without any LF.
odd_piece = st.sampled_from(
    [
        b"event: e\n", b"id: 1\n", b"id\n", b"retry: 5\n", b": c\n", b"data: x\r",
        b"data: y\r\r", b"\r", b"\n", b"\r\n", b"data: a\ndata: b\n\n", b"data:z\n\n",
        b"data: q\n", b"event: e\r\n\r\n",
    ]
)  # fmt: skip
mixed_stream = st.lists(runtime_block | odd_piece | byte_soup, max_size=12).map(b"".join)
streams = mixed_stream | byte_soup | st.binary(max_size=60)
starts = st.sampled_from([b"", BOM, b"\xef", b"\n", b"\r"])


def cuts_at_lines(stream: bytes, data: st.DataObject) -> list[int]:
    """Random cuts, plus (half the time) cuts after a random half of the line ends: reads that
    end exactly where the fast path and the decoder may hand over."""
    cuts = cuts_for(stream, data)
    if data.draw(st.booleans()):
        pick = data.draw(st.randoms(use_true_random=False))
        ends = [i + 1 for i, byte in enumerate(stream) if byte in (0x0A, 0x0D)]
        cuts += [end for end in ends if pick.random() < 0.5]
    return cuts


def outcome(
    feed: object, chunks: list[bytes]
) -> tuple[list[ServerSentEvent], list[ServerSentEvent] | None]:
    """Events until the end or the first SSEProtocolError (then also the events it carried)."""
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        try:
            events += feed(chunk)  # type: ignore[operator]
        except SSEProtocolError as error:
            return events, error.events
    return events, None


@settings(max_examples=600)
@given(starts, streams, st.data(), st.sampled_from([16 * 1024 * 1024, 12, 30]))
def test_split_equals_the_decoder_for_any_stream_cut_anywhere(
    start: bytes, stream: bytes, data: st.DataObject, max_line: int
) -> None:
    stream = start + stream
    chunks = split_at(stream, cuts_at_lines(stream, data))
    expected = outcome(SSEDecoder(max_line).feed, chunks)
    splitter = SSESplitter(max_line)
    assert outcome(splitter.feed, chunks) == expected
    if expected[1] is None:
        assert splitter.close() == []


@settings(max_examples=200)
@given(streams, st.data())
def test_feed_data_gives_the_data_of_the_same_events(stream: bytes, data: st.DataObject) -> None:
    chunks = split_at(stream, cuts_at_lines(stream, data))
    expected, failed = outcome(SSEDecoder().feed, chunks)
    splitter = SSESplitter()
    got: list[str] = []
    for chunk in chunks:
        got += [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else item
            for item in splitter.feed_data(chunk)
        ]
    assert failed is None
    assert got == [event.data for event in expected]


def test_runtime_blocks_stay_on_the_fast_path_as_undecoded_bytes() -> None:
    body = b"".join(b"data: " + orjson.dumps({"i": i}) + b"\n\n" for i in range(50))
    splitter = SSESplitter()
    items: list[bytes | str] = []
    for start in range(0, len(body), 7):
        items += splitter.feed_data(body[start : start + 7])
    assert all(type(item) is bytes for item in items)
    assert [orjson.loads(item)["i"] for item in items] == list(range(50))


def test_a_comment_switches_to_the_decoder_and_a_clean_boundary_switches_back() -> None:
    splitter = SSESplitter()
    assert splitter.feed_data(b"data: 1\n\n: ping\n\n") == [b"1"]
    assert splitter.feed_data(b"id: 7\ndata: 2\n\n") == ["2"]  # the decoder (ID set)
    assert splitter.feed_data(b"data: 3\n\n") == [b"3"]  # fast again
    assert splitter.feed(b"data: 4\n\n") == [ServerSentEvent("4", id="7")]


def test_an_over_long_line_fails_after_handing_over_the_complete_events() -> None:
    splitter = SSESplitter(max_line_bytes=20)
    with pytest.raises(SSEProtocolError) as info:
        splitter.feed(b"data: ok\n\ndata: " + b"x" * 30 + b"\n\n")
    assert info.value.events == [ServerSentEvent("ok")]


@pytest.mark.parametrize(
    "first",
    [
        b": c\n\nevent: e\n",
        b": c\n\nretry: 5\n",
        b": c\n\nid: 9\n",
        b": c\n\ndata: a\n",
        b": c\n\r",
    ],
)
def test_a_read_ending_mid_block_keeps_the_decoder_in_charge(first: bytes) -> None:
    """The decoder took over (a comment) and the read ended after a field line: the fast path
    must not take the next block."""
    chunks = [first, b"data: x\n\n", b"data: y\n\n"]
    assert outcome(SSESplitter().feed, chunks) == outcome(SSEDecoder().feed, chunks)
