"""Hostile input, compressed: random permessage-deflate traffic against a gateway with
``WS_COMPRESSION=on`` and JWT on (issue 11, §1).

Bombs (up to 64 MiB inflated from 64 KB, whole or in fragments, with or without a token) must
close with 1009; honest compressed pings (fragmented, behind a compressed ``auth`` frame or not)
must each get their pong; corrupt deflate data and RSV1 where it is not allowed may drop the
socket, with a documented close code or none. Afterwards the gateway is whole (no crash, no
ERROR log, the control session's tokens exact, no leaked task) and this process's peak RSS (the
gateway runs in a thread here) has not grown by even one inflated bomb.

``-m slow`` runs the long version; ``FUZZ_EXAMPLES`` scales it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given

from ..support.fuzz_budget import FUZZ_MODULE_TIMEOUT, SLOW_EXAMPLES
from ..support.fuzzing_exchange import (
    BOMB_SIZES,
    CompressedCase,
    check_compressed,
    compressed_cases,
    exchange_compressed,
)
from ..support.fuzzing_gateway import FuzzGateway, fuzz_settings, peak_rss_bytes, settle, wait_quiet
from ..support.fuzzing_wire import compressed_frame, deflate_bomb, deflate_payload

pytestmark = FUZZ_MODULE_TIMEOUT
MiB = 1 << 20
_ids = itertools.count()
PEAK = {"before": 0}


@pytest.fixture(scope="module")
def compression_gateway() -> Iterator[FuzzGateway]:
    """One JWT-on gateway with compression on for the module, baseline taken when idle."""
    for size in BOMB_SIZES:
        deflate_bomb(size)  # built before the baseline: the client's bombs are not the gateway's
    with FuzzGateway(jwt=True, ws_compression="on") as gateway:
        gateway.baseline = settle(gateway)
        PEAK["before"] = peak_rss_bytes()
        yield gateway


def run_case(gateway: FuzzGateway, case: CompressedCase) -> None:
    session_id = f"deflate-{next(_ids)}"
    seen = trio.run(exchange_compressed, gateway.port, session_id, case, gateway.token("fuzz"))
    problems = check_compressed(case, seen)
    assert problems == [], problems
    assert gateway.alive, f"gateway died: {gateway.failure!r}"


@fuzz_settings(60)
@given(case=compressed_cases())
def test_random_compressed_frames(compression_gateway: FuzzGateway, case: CompressedCase) -> None:
    run_case(compression_gateway, case)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES)
@given(case=compressed_cases())
def test_random_compressed_frames_long(
    compression_gateway: FuzzGateway, case: CompressedCase
) -> None:
    run_case(compression_gateway, case)


def test_gateway_is_whole_after_the_compressed_fuzz(compression_gateway: FuzzGateway) -> None:
    """Runs last in this module."""
    gateway = compression_gateway
    assert gateway.alive, f"gateway died: {gateway.failure!r}"
    assert gateway.errors.records == [], gateway.errors.records[:5]
    assert gateway.control.problems == [], gateway.control.problems[:5]
    # Dozens of bombs of up to 64 MiB went in: the gateway inflated none of them whole.
    growth = peak_rss_bytes() - PEAK["before"]
    assert growth < 48 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB during the fuzz"
    # A fresh honest compressed session works.
    ping = compressed_frame(deflate_payload(b'{"type":"ping","id":0}'))
    run_case(gateway, CompressedCase("honest", "fresh", ping, pings=1, authed=True))
    gateway.pause_control(True)
    try:
        trio.run(wait_quiet, gateway, gateway.baseline)
    finally:
        gateway.pause_control(False)
