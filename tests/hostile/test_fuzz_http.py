"""Hostile HTTP/1.1 at the edge: h2c upgrades, HTTP/2 prefaces, CL+TE smuggling, pipelining
and slow heads against one gateway (``HTTP_HEAD_TIMEOUT`` 1 s) with a control session streaming
exact turns the whole time. See ``tests/support/fuzzing_http.py`` for the classes and their checks.
``-m slow`` runs the long versions (``FUZZ_EXAMPLES`` scales them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ..support.fuzz_budget import FUZZ_MODULE_TIMEOUT, SLOW_EXAMPLES
from ..support.fuzzing_gateway import FuzzGateway, fuzz_settings
from ..support.fuzzing_http import (
    SLOW_HEADS,
    EdgeStats,
    check_h2c,
    check_pipeline,
    check_smuggling,
    converse,
    h2c_requests,
    pipeline_payload,
    pipelines,
    slow_head,
    smuggling_requests,
)

pytestmark = FUZZ_MODULE_TIMEOUT
HEAD_TIMEOUT = 1.0
STATS = EdgeStats()


@pytest.fixture(scope="module")
def edge_gateway() -> Iterator[FuzzGateway]:
    with FuzzGateway(http_head_timeout=HEAD_TIMEOUT) as gateway:
        yield gateway


def run_h2c(gateway: FuzzGateway, request: bytes) -> None:
    answer = trio.run(converse, gateway.port, request, 2)
    problems = check_h2c(answer)
    STATS.record("h2c", answer, problems)
    assert gateway.alive and not problems, (problems, request[:200])


def run_smuggling(gateway: FuzzGateway, request: bytes) -> None:
    answer = trio.run(converse, gateway.port, request, 2)
    problems = check_smuggling(answer)
    STATS.record("smuggling", answer, problems)
    assert gateway.alive and not problems, (problems, request[:200])


def run_pipeline(gateway: FuzzGateway, parts: list[str]) -> None:
    answer = trio.run(converse, gateway.port, pipeline_payload(parts), len(parts))
    problems = check_pipeline(parts, answer)
    STATS.record("pipeline", answer, problems)
    assert gateway.alive and not problems, (problems, parts, answer.statuses)


@fuzz_settings(40)
@given(request=h2c_requests())
def test_h2c_upgrades(edge_gateway: FuzzGateway, request: bytes) -> None:
    run_h2c(edge_gateway, request)


@fuzz_settings(30)
@given(request=smuggling_requests())
def test_content_length_and_transfer_encoding(edge_gateway: FuzzGateway, request: bytes) -> None:
    run_smuggling(edge_gateway, request)


@fuzz_settings(40)
@given(parts=pipelines)
def test_pipelined_requests(edge_gateway: FuzzGateway, parts: list[str]) -> None:
    run_pipeline(edge_gateway, parts)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES)
@given(request=h2c_requests(), smuggled=smuggling_requests(), parts=pipelines)
def test_http_edge_long(
    edge_gateway: FuzzGateway, request: bytes, smuggled: bytes, parts: list[str]
) -> None:
    run_h2c(edge_gateway, request)
    run_smuggling(edge_gateway, smuggled)
    run_pipeline(edge_gateway, parts)


@settings(max_examples=3, deadline=None)
@given(
    interval=st.floats(0.05, 0.3),
    keep_alive=st.booleans(),
)
def test_slow_heads_in_parallel(
    edge_gateway: FuzzGateway, interval: float, keep_alive: bool
) -> None:
    """A dozen slow heads at once (every kind): each is closed at the head timeout."""

    async def all_heads() -> list[str | None]:
        results: list[str | None] = []

        async def one(head: bytes) -> None:
            results.append(await slow_head(edge_gateway.port, head, interval, keep_alive))

        async with trio.open_nursery() as nursery:
            for head in SLOW_HEADS * 4:
                nursery.start_soon(one, head)
        return results

    results = trio.run(all_heads)
    problems = [r for r in results if r is not None]
    for _ in results:
        STATS.record("slow head", None, [])
    STATS.problems += problems[:3]
    assert not problems, problems


def test_the_edge_gateway_is_whole_afterwards(edge_gateway: FuzzGateway) -> None:
    """Runs last: no crash, no ERROR log, the control session's turns stayed exact."""
    assert edge_gateway.alive, f"gateway died: {edge_gateway.failure!r}"
    assert edge_gateway.errors.records == [], edge_gateway.errors.records[:5]
    assert edge_gateway.control.problems == [], edge_gateway.control.problems[:5]
    assert edge_gateway.control.turns >= 1
    assert STATS.server_errors == 0 and STATS.problems == []
    print(
        f"\nhttp edge fuzz: attempts={STATS.attempts} statuses={STATS.statuses} "
        f"closed={STATS.closed} 5xx={STATS.server_errors} "
        f"control_turns={edge_gateway.control.turns}"
    )
