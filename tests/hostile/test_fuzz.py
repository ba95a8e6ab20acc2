"""Hostile input: thousands of random and mutated frames and handshakes against one gateway.

See ``tests/support/fuzzing_gateway.py`` for the harness and why hypothesis drives sync tests here.
One gateway
(with a control session streaming exact ``bench`` turns the whole time) serves every example of
this module; the last test checks that it is still whole: no crash, no ERROR log, the control
session's tokens were exact, a fresh session works, and its tasks and gauges are back to where
they were before the fuzz.

Default run: a few hundred frames and about a hundred handshakes (seconds). ``-m slow`` runs the
long versions; ``FUZZ_EXAMPLES`` scales them (hypothesis examples per slow test).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given

from trio_gateway.protocol import SUPPORTED_TYPES, ErrorCode, FrameError, parse_client_frame

from ..support.fuzz_budget import FUZZ_MODULE_TIMEOUT, SLOW_EXAMPLES
from ..support.fuzzing_exchange import exchange_frames, raw_request
from ..support.fuzzing_gateway import FuzzGateway, FuzzStats, fuzz_settings, settle, wait_quiet
from ..support.fuzzing_strategies import (
    FrameBatch,
    dumps,
    edge_text,
    frame_batches,
    handshake_requests,
    json_values,
    message_texts,
    valid_frames,
)

pytestmark = FUZZ_MODULE_TIMEOUT


STATS = FuzzStats()
_session_ids = itertools.count()


@pytest.fixture(scope="module")
def fuzz_gateway() -> Iterator[FuzzGateway]:
    """One gateway for the whole module, with its baseline taken once the control is idle."""
    with FuzzGateway() as gateway:
        gateway.baseline = settle(gateway)
        yield gateway


# --- the parser alone: fast, many examples ----------------------------------------------------


@fuzz_settings(200)
@given(text=message_texts)
def test_parser_refuses_with_one_code_and_never_echoes(text: str) -> None:
    """Any text: either the client's object back unchanged or one FrameError whose message
    carries no validation dump and none of the frame's content."""
    try:
        value = parse_client_frame(text)
    except FrameError as refused:
        assert refused.code in ErrorCode
        assert "\n" not in refused.message and "validation error" not in refused.message
        assert "pydantic" not in refused.message
        # Field names and a short printable type are named back (protocol.md); values never.
        kind = _type_of(text)
        for piece in _string_values(text):
            if len(piece) >= 12 and piece != kind:
                assert piece not in refused.message
    else:
        assert isinstance(value, dict) and value.get("type") in SUPPORTED_TYPES


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _type_of(text: str) -> object:
    value = _loads(text)
    return value.get("type") if isinstance(value, dict) else None


def _string_values(text: str) -> list[str]:
    """Every string value (not key) in ``text``'s JSON, if it is JSON."""
    found: list[str] = []
    stack = [_loads(text)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@fuzz_settings(100)
@given(
    value=json_values.filter(lambda v: not isinstance(v, dict)),
    kind=edge_text.filter(lambda t: t not in SUPPORTED_TYPES),
    frame=valid_frames(),
)
def test_parser_verdicts_match_the_documented_classes(
    value: object, kind: str, frame: dict[str, object]
) -> None:
    """protocol.md: not an object / no type -> invalid_message; unknown type ->
    unsupported_type; the documented frames with documented fields -> accepted as sent."""
    for text, code in (
        (dumps(value), ErrorCode.INVALID_MESSAGE),
        (dumps({"content": "x"}), ErrorCode.INVALID_MESSAGE),
        (dumps({"type": 1}), ErrorCode.INVALID_MESSAGE),
        (dumps({"type": kind}), ErrorCode.UNSUPPORTED_TYPE),
        ("{" + dumps(kind), ErrorCode.INVALID_JSON),
    ):
        with pytest.raises(FrameError) as refused:
            parse_client_frame(text)
        assert refused.value.code is code, text
    assert parse_client_frame(dumps(frame)) == frame


# --- frames over real sockets ----------------------------------------------------------------


def run_batch(gateway: FuzzGateway, batch: FrameBatch) -> None:
    """Send one batch on a fresh session and check every answer."""
    session_id = f"fuzz-{next(_session_ids)}"
    seen = trio.run(exchange_frames, gateway.port, session_id, batch)
    problems = STATS.record_exchange(batch, seen)
    assert gateway.alive, f"gateway died: {gateway.failure!r}"
    assert not problems, (
        problems,
        [(f.label, (f.text or "")[:80]) for f in batch.frames],
        batch.terminal,
    )


@fuzz_settings(60)
@given(batch=frame_batches)
def test_random_frames(fuzz_gateway: FuzzGateway, batch: FrameBatch) -> None:
    run_batch(fuzz_gateway, batch)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES)
@given(batch=frame_batches)
def test_random_frames_long(fuzz_gateway: FuzzGateway, batch: FrameBatch) -> None:
    run_batch(fuzz_gateway, batch)


# --- handshakes and raw HTTP -----------------------------------------------------------------


def run_handshake(gateway: FuzzGateway, request: bytes) -> None:
    """One random request over raw TCP: never a 5xx (no cap is hit in this run)."""
    answer = trio.run(raw_request, gateway.port, request)
    problem = STATS.record_answer(answer)
    assert gateway.alive, f"gateway died: {gateway.failure!r}"
    assert not problem, problem


@fuzz_settings(100)
@given(request=handshake_requests())
def test_random_handshakes(fuzz_gateway: FuzzGateway, request: bytes) -> None:
    run_handshake(fuzz_gateway, request)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES * 2)
@given(request=handshake_requests())
def test_random_handshakes_long(fuzz_gateway: FuzzGateway, request: bytes) -> None:
    run_handshake(fuzz_gateway, request)


# --- afterwards: the gateway is whole --------------------------------------------------------


def test_gateway_is_whole_after_the_fuzz(fuzz_gateway: FuzzGateway) -> None:
    """Runs last in this module: everything above must have left no trace."""
    gateway = fuzz_gateway
    assert gateway.alive, f"gateway died: {gateway.failure!r}"
    assert gateway.errors.records == [], gateway.errors.records[:5]
    assert gateway.control.problems == [], gateway.control.problems[:5]
    assert gateway.control.turns >= 1
    # A fresh session works (and gets exact tokens).
    batch = FrameBatch([], None, v2=True)
    seen = trio.run(exchange_frames, gateway.port, "fresh-after-fuzz", batch)
    assert [f["code"] for f in seen.frames if f.get("type") == "error"] == ["unsupported_type"]
    # Nothing leaked: same number of tasks as before the fuzz, one socket, one session.
    gateway.pause_control(True)
    try:
        trio.run(wait_quiet, gateway, gateway.baseline)
    finally:
        gateway.pause_control(False)
    turns = gateway.control.turns
    trio.run(_wait_for_turn, gateway, turns)
    print(
        f"\nfuzz figures: connections={STATS.connections} frames={STATS.frames_sent} "
        f"handshakes={STATS.handshakes} 5xx={STATS.server_errors} crashes=0 "
        f"control_turns={gateway.control.turns} statuses={STATS.statuses} "
        f"contained_hypercorn_races={len(gateway.errors.contained)} "
        f"close_codes={STATS.close_codes}"
    )


async def _wait_for_turn(gateway: FuzzGateway, turns: int) -> None:
    with trio.fail_after(30):
        while gateway.control.turns <= turns:
            await trio.sleep(0.01)
    assert gateway.control.problems == []


def test_fuzz_stats_are_consistent() -> None:
    """The figures printed above add up (guards the accounting of bench/fuzz.py too)."""
    assert STATS.server_errors == 0
    assert STATS.problems == []
    assert sum(STATS.close_codes.values()) == STATS.connections
    assert sum(STATS.statuses.values()) == STATS.handshakes
