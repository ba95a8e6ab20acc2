"""The replay buffer (sans-IO): exact answers or an explicit gap, within count, bytes and age."""

from __future__ import annotations

import pytest

from trio_gateway.session.replay import ReplayBuffer, ReplayGap


def filled(count: int, *, max_frames: int = 100, max_bytes: int = 10_000) -> ReplayBuffer:
    buffer = ReplayBuffer(max_frames, max_bytes, max_age=30)
    for seq in range(1, count + 1):
        buffer.append(seq, f"frame-{seq}", now=0)
        buffer.delivered(seq)
    return buffer


def test_since_returns_every_later_frame_in_order() -> None:
    buffer = filled(5)
    assert buffer.since(2, now=0) == [(3, "frame-3"), (4, "frame-4"), (5, "frame-5")]
    assert buffer.since(5, now=0) == []
    assert buffer.since(0, now=0) == [(seq, f"frame-{seq}") for seq in range(1, 6)]


def test_a_client_ahead_of_the_buffer_gets_unknown_seq() -> None:
    assert filled(3).since(4, now=0) is ReplayGap.UNKNOWN_SEQ


def test_count_bound_evicts_the_oldest_and_an_evicted_start_is_a_gap_not_a_partial_replay() -> None:
    buffer = filled(10, max_frames=4)
    assert len(buffer) == 4 and buffer.first_seq == 7
    assert buffer.since(6, now=0) == [(s, f"frame-{s}") for s in range(7, 11)]
    assert buffer.since(5, now=0) is ReplayGap.EXPIRED


def test_byte_bound_evicts_the_oldest() -> None:
    buffer = filled(10, max_bytes=len("frame-10") * 3)
    assert buffer.size <= len("frame-10") * 3
    assert buffer.since(buffer.first_seq - 2, now=0) is ReplayGap.EXPIRED


def test_frames_older_than_the_age_bound_expire() -> None:
    buffer = ReplayBuffer(100, 10_000, max_age=30)
    buffer.append(1, "old", now=0)
    buffer.delivered(1)
    buffer.append(2, "new", now=40)
    buffer.delivered(2)
    assert buffer.since(1, now=40) == [(2, "new")]
    assert buffer.since(0, now=40) is ReplayGap.EXPIRED
    assert buffer.since(2, now=100) == []  # nothing to replay is still an exact answer


def test_undelivered_frames_are_never_evicted_even_with_resume_disabled() -> None:
    buffer = ReplayBuffer(0, 0, max_age=0)
    for seq in (1, 2, 3):
        buffer.append(seq, f"frame-{seq}", now=0)
    buffer.delivered(1)
    assert buffer.undelivered(now=5) == [(2, "frame-2"), (3, "frame-3")]
    buffer.delivered(3)
    buffer.trim(now=5)
    assert len(buffer) == 0 and buffer.size == 0


def test_seq_must_follow_the_last_one() -> None:
    buffer = filled(2)
    with pytest.raises(ValueError, match="does not follow"):
        buffer.append(4, "skipped one", now=0)
