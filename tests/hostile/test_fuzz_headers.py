"""Header smuggling: random hostile headers on REST requests never reach the runtime.

Hypothesis draws requests from the dangerous families
(``tests/support/smuggling.py``: forwarding and
address headers, method overrides, path rewrites, identity claims and the gateway's own headers
in any case and with underscores, hop-by-hop and ``Connection``-named headers) mixed with
allow-listed and random ones; one gateway in front of the demo runtime answers them all, and
the runtime's record of every header line it received is checked after each request. ``-m
slow`` runs the long version (``FUZZ_EXAMPLES`` examples).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from hypothesis import given

from ..support.fuzz_budget import FUZZ_MODULE_TIMEOUT, SLOW_EXAMPLES
from ..support.fuzzing_gateway import FuzzGateway, FuzzStats, fuzz_settings
from ..support.smuggling import (
    SmugglingRequest,
    check_smuggling,
    send_smuggling,
    smuggling_requests,
)

pytestmark = FUZZ_MODULE_TIMEOUT
STATS = FuzzStats()


@pytest.fixture(scope="module")
def smuggling_gateway() -> Iterator[FuzzGateway]:
    with FuzzGateway() as gateway:
        yield gateway


def run_smuggling(gateway: FuzzGateway, request: SmugglingRequest) -> None:
    answer = trio.run(send_smuggling, gateway, request)
    STATS.record_answer(answer)
    problems = check_smuggling(gateway, request, answer)
    STATS.problems += problems
    assert gateway.alive, f"gateway died: {gateway.failure!r}"
    assert not problems, (problems, request.method, request.path, request.headers)


@fuzz_settings(150)
@given(request=smuggling_requests())
def test_smuggled_headers_never_reach_the_runtime(
    smuggling_gateway: FuzzGateway, request: SmugglingRequest
) -> None:
    run_smuggling(smuggling_gateway, request)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES * 2)
@given(request=smuggling_requests())
def test_smuggled_headers_never_reach_the_runtime_long(
    smuggling_gateway: FuzzGateway, request: SmugglingRequest
) -> None:
    run_smuggling(smuggling_gateway, request)


def test_the_gateway_is_whole_after_the_smuggling(smuggling_gateway: FuzzGateway) -> None:
    """Runs last: no crash, no ERROR log, exact control turns, most requests reached the
    runtime (the check above is not vacuous)."""
    gateway = smuggling_gateway
    assert gateway.alive, f"gateway died: {gateway.failure!r}"
    assert gateway.errors.records == [], gateway.errors.records[:5]
    assert gateway.control.problems == [], gateway.control.problems[:5]
    assert STATS.server_errors == 0 and STATS.problems == []
    assert gateway.runtime is not None
    reached = gateway.run_sync_in_loop(lambda: len(gateway.runtime.rest_headers))  # type: ignore[union-attr]
    assert reached >= STATS.handshakes // 2, (reached, STATS.statuses)
    print(f"\nsmuggling figures: requests={STATS.handshakes} statuses={STATS.statuses}")
