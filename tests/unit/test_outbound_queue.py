"""The outbound queue: token coalescing when the writer is behind, never losing anything."""

from __future__ import annotations

from trio_gateway.session.outbound import Frame, NumberedFrame, OutboundQueue, is_mergeable


def token(text: str, **extra: object) -> dict[str, object]:
    return {"type": "assistant_message", "token": text, "content": text, "is_final": False, **extra}


def dict_frames(queue: OutboundQueue) -> list[Frame]:
    """take_all(), for a queue that holds no NumberedFrame."""
    frames = queue.take_all()
    plain = [frame for frame in frames if isinstance(frame, dict)]
    assert len(plain) == len(frames)
    return plain


def test_a_writer_that_keeps_up_gets_each_chunk_on_its_own() -> None:
    queue = OutboundQueue(max_bytes=1000, max_control=10)
    queue.put_chunk(token("a"), 1)
    assert queue.take_all() == [token("a")]
    queue.put_chunk(token("b"), 1)
    assert queue.take_all() == [token("b")]


def test_consecutive_waiting_tokens_are_merged_into_one_frame() -> None:
    queue = OutboundQueue(max_bytes=1000, max_control=10)
    for piece in ["Hel", "lo", " world"]:
        queue.put_chunk(token(piece), 3)
    assert len(queue) == 1
    assert queue.take_all() == [token("Hello world")]
    assert queue.merged_chunks == 2


def test_final_chunks_and_other_types_are_never_merged() -> None:
    queue = OutboundQueue(max_bytes=1000, max_control=10)
    final = {"type": "assistant_message", "token": "!", "content": "!", "is_final": True}
    switch = {"type": "agent_switched", "content": "to coder", "is_final": False}
    queue.put_chunk(token("a"), 1)
    queue.put_chunk(switch, 1)
    queue.put_chunk(token("b"), 1)
    queue.put_chunk(final, 1)
    assert queue.take_all() == [token("a"), switch, token("b"), final]


def test_missing_is_final_is_not_mergeable_because_clients_read_it_as_true() -> None:
    assert not is_mergeable({"type": "assistant_message", "token": "x", "content": "x"})
    assert is_mergeable(token("x"))


def test_chunks_with_different_metadata_stay_apart_so_nothing_is_dropped() -> None:
    queue = OutboundQueue(max_bytes=1000, max_control=10)
    queue.put_chunk(token("a", metadata={"i": 1}), 1)
    queue.put_chunk(token("b", metadata={"i": 2}), 1)
    queue.put_chunk(token("c", metadata={"i": 2}), 1)
    assert queue.take_all() == [token("a", metadata={"i": 1}), token("bc", metadata={"i": 2})]


def test_missing_token_field_merges_as_empty_text() -> None:
    queue = OutboundQueue(max_bytes=1000, max_control=10)
    queue.put_chunk({"type": "assistant_message", "content": "a", "is_final": False}, 1)
    queue.put_chunk({"type": "assistant_message", "content": "b", "is_final": False}, 1)
    [merged] = dict_frames(queue)
    assert merged["content"] == "ab"


def test_control_frames_are_not_merge_targets() -> None:
    queue = OutboundQueue(max_bytes=1000, max_control=10)
    queue.put_chunk(token("a"), 1)
    queue.put_control({"type": "error", "code": "busy"})
    queue.put_chunk(token("b"), 1)
    assert [f.get("token") for f in dict_frames(queue)] == ["a", None, "b"]


def test_byte_budget_and_release() -> None:
    queue = OutboundQueue(max_bytes=10, max_control=10)
    queue.put_chunk(token("a"), 6)
    assert queue.has_space()
    queue.put_chunk(token("b"), 6)
    assert not queue.has_space()
    queue.take_all()
    assert queue.has_space() and queue.pending_bytes == 0


def test_control_overflow_is_reported_past_the_limit() -> None:
    queue = OutboundQueue(max_bytes=10, max_control=2)
    for _ in range(3):
        queue.put_control({"type": "error"})
    assert queue.control_overflow()


def test_numbered_frames_count_like_chunks_and_never_merge() -> None:
    # Frames another replica numbered (its shared stream) keep their place and their text.
    queue = OutboundQueue(max_bytes=10, max_control=10)
    numbered = NumberedFrame(7, '{"type":"assistant_message","seq":7}', "assistant_message")
    queue.put_chunk(token("a"), 1)
    queue.put_numbered(numbered, 6)
    queue.put_chunk(token("b"), 1)
    queue.put_chunk(token("c"), 1)
    assert len(queue) == 3 and queue.pending_bytes == 9 and queue.pending_control == 0
    assert queue.has_space()
    queue.put_numbered(numbered, 1)
    assert not queue.has_space()
    assert queue.take_all() == [token("a"), numbered, token("bc"), numbered]
    assert queue.merged_chunks == 1 and queue.pending_bytes == 0


# --- byte budget: oversized chunks, detached drops --------------------------------------------


def test_a_chunk_fits_within_the_budget_or_alone_in_an_empty_queue() -> None:
    queue = OutboundQueue(max_bytes=100, max_control=10)
    assert queue.fits(100) and queue.fits(10_000)  # empty: even an oversized chunk fits alone
    queue.put_chunk(token("a"), 60)
    assert queue.fits(40) and not queue.fits(41)
    assert not queue.fits(10_000)  # never on top of what waits
    queue.put_chunk(token("b"), 10_000)  # a caller that ignores fits() still counts it in full
    assert queue.pending_bytes == 10_060


def test_drop_relayed_keeps_gateway_frames_and_reports_a_dropped_final() -> None:
    queue = OutboundQueue(max_bytes=1000, max_control=10)
    queue.put_chunk(token("a"), 10)
    queue.put_control({"type": "turn_started"})
    queue.put_chunk(token("b"), 10)  # not merged into "a": a control frame sits between
    assert queue.drop_relayed() == (2, False)
    assert queue.pending_bytes == 0 and len(queue) == 1
    queue.put_chunk({"type": "assistant_message", "content": "x", "is_final": True}, 5)
    queue.put_chunk({"type": "tool_call", "call_id": "c"}, 5)  # no is_final: final for the IDE
    assert queue.drop_relayed() == (2, True)
    assert queue.take_all() == [{"type": "turn_started"}]
