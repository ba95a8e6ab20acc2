"""One resume iteration as a v2 client lives it, written once: stream a long turn, stop
reading for a random stall, reset the TCP connection, reconnect (to the same replica or the other
one) with ``{"type":"resume"}``, time what comes back, finish the turn, send a follow-up turn and
check that nothing was lost or sent twice (:func:`resume_iteration`); many iterations of one turn
shape, a few at a time, summarised (:func:`run_variant`). Used by ``resume_bench.py``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
import trio

from bench.clients import expected_text, short
from bench.harness import BenchError, Child, describe, log, port_of
from bench.stats import Spread
from tests.support.resume import ResumingClient

STALLS = (0.0, 0.0, 0.01, 0.05, 0.2)  # seconds the client stops reading before the reset
FOLLOW_UP_TOKENS = 3
ITERATION_MARGIN = 60.0  # seconds one iteration may take beyond its turn's nominal length


@dataclass(frozen=True)
class Variant:
    """One turn shape for the resume iterations."""

    name: str
    tokens: int
    rate: float | None  # tokens/s, or None for unpaced
    concurrency: int  # iterations in flight at once (staggered over one turn)
    max_cut_tokens: int  # the client processes 1..this many tokens before the cut

    @property
    def content(self) -> str:
        """The ``bench`` message of the turn."""
        return f"bench {self.tokens}" + (f" {self.rate:g}" if self.rate else "")

    @property
    def nominal_s(self) -> float:
        """How long the runtime takes to stream the turn when nothing is slow."""
        return self.tokens / self.rate if self.rate else 0.0


@dataclass
class ResumeSample:
    """One iteration: where it was cut and what the reconnect took (milliseconds)."""

    iteration: int
    route: str  # e.g. "A->B"
    cut_after_tokens: int
    stall_ms: float
    cut_seq: int = 0
    ready_ms: float = math.nan  # reconnect start -> session_ready
    first_replayed_ms: float | None = None  # -> first replayed frame (None: nothing replayed)
    resumed_ms: float = math.nan  # -> resumed
    replayed: int = 0
    next_turn_ms: float = math.nan  # follow-up turn: send -> first token
    resyncs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exact: nothing lost, nothing twice, no resync, no error."""
        return not self.problems and not self.resyncs


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def resume_iteration(
    variant: Variant, index: int, ports: tuple[int, int], route: str, tag: str, seed: int
) -> ResumeSample:
    """One session: stream, cut, resume on ``ports[1]``, finish, follow-up turn, check."""
    rng = random.Random(seed * 100_003 + index)
    sample = ResumeSample(
        iteration=index,
        route=route,
        cut_after_tokens=rng.randint(1, variant.max_cut_tokens),
        stall_ms=rng.choice(STALLS) * 1000,
    )
    session_id = f"{tag}-{variant.name}-{index}"
    # Not strict: every violation is recorded and the iteration goes on to the end of its turn.
    client = ResumingClient(ports[0], session_id, strict=False, frame_timeout=math.inf)
    try:
        with trio.fail_after(variant.nominal_s + ITERATION_MARGIN):
            await client.connect(resume=False)
            await client.send({"type": "user_message", "content": variant.content})
            while client.token_count < sample.cut_after_tokens:
                frame = await client.next()
                if frame.get("type") == "turn_finished":
                    raise BenchError("the turn ended before the cut (cut later than the turn)")
            await trio.sleep(sample.stall_ms / 1000)  # frames keep arriving, unread
            sample.cut_seq = client.last_seq
            await client.cut()

            started = time.perf_counter()
            client.port = ports[1]
            await client.connect(resume=True)
            sample.ready_ms = _ms_since(started)
            replayed = 0
            while True:
                frame = await client.next()
                if "seq" in frame:
                    replayed += 1
                    if sample.first_replayed_ms is None:
                        sample.first_replayed_ms = _ms_since(started)
                elif frame.get("type") == "resumed":
                    sample.resumed_ms = _ms_since(started)
                    expected = {
                        "type": "resumed",
                        "from_seq": sample.cut_seq + 1,
                        "replayed": replayed,
                    }
                    if frame != expected:
                        sample.problems.append(f"{short(frame, 200)}, expected {expected}")
                    break
                elif frame.get("type") == "resync_required":
                    sample.first_replayed_ms = None
                    break
            sample.replayed = replayed
            await client.until_turns_finished(1)

            sent = time.perf_counter()
            await client.send({"type": "user_message", "content": f"bench {FOLLOW_UP_TOKENS}"})
            while True:
                frame = await client.next()
                if frame.get("type") == "assistant_message":
                    sample.next_turn_ms = _ms_since(sent)
                    break
            await client.until_turns_finished(2)
            await client.close()
        text = client.text()
        expected_tokens = expected_text(variant.tokens) + expected_text(FOLLOW_UP_TOKENS)
        if text != expected_tokens:
            at = next(
                (i for i, (a, b) in enumerate(zip(text, expected_tokens, strict=False)) if a != b),
                min(len(text), len(expected_tokens)),
            )
            sample.problems.append(
                f"wrong text ({len(text)} chars, expected {len(expected_tokens)}); first "
                f"difference at {at}: {text[at : at + 30]!r} vs {expected_tokens[at : at + 30]!r}"
            )
        if client.finals != 2 or client.turn_statuses != ["completed", "completed"]:
            sample.problems.append(
                f"{client.finals} final chunk(s), turn statuses {client.turn_statuses}"
            )
    except (BenchError, trio.TooSlowError, OSError, orjson.JSONDecodeError) as error:
        sample.problems.append(describe(error))
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await client.cut()
    sample.problems[:0] = client.problems
    sample.resyncs = client.resyncs
    return sample


@dataclass
class VariantResult:
    """Every iteration of one turn shape in one phase, and their spreads."""

    variant: Variant
    samples: list[ResumeSample]
    ready: Spread
    first_replayed: Spread
    resumed: Spread
    replayed: Spread
    next_turn: Spread
    failures: int
    resyncs: int
    nothing_replayed: int  # iterations where every missed frame came live (none to replay)

    @classmethod
    def of(cls, variant: Variant, samples: list[ResumeSample]) -> VariantResult:
        """Summarise ``samples``."""
        return cls(
            variant=variant,
            samples=samples,
            ready=Spread.of([s.ready_ms for s in samples]),
            first_replayed=Spread.of(
                [s.first_replayed_ms for s in samples if s.first_replayed_ms is not None]
            ),
            resumed=Spread.of([s.resumed_ms for s in samples]),
            replayed=Spread.of([float(s.replayed) for s in samples]),
            next_turn=Spread.of([s.next_turn_ms for s in samples]),
            failures=sum(not s.ok for s in samples),
            resyncs=sum(bool(s.resyncs) for s in samples),
            nothing_replayed=sum(s.first_replayed_ms is None and not s.resyncs for s in samples),
        )


async def run_variant(
    variant: Variant,
    iterations: int,
    gateways: Sequence[Child],
    tag: str,
    seed: int,
) -> VariantResult:
    """``iterations`` iterations, ``variant.concurrency`` at a time (staggered). With two
    gateways, iteration i starts on gateway i % 2 and resumes on the other one."""
    ports = [port_of(g) for g in gateways]
    names = "AB"
    samples: list[ResumeSample] = []
    indices = iter(range(iterations))
    workers = max(1, min(variant.concurrency, iterations))

    async def worker(number: int) -> None:
        await trio.sleep(number * variant.nominal_s / workers)
        for index in indices:  # shared: each index goes to exactly one worker
            first = index % len(ports)
            second = (first + 1) % len(ports)
            route = f"{names[first]}->{names[second]}"
            pair = (ports[first], ports[second])
            sample = await resume_iteration(variant, index, pair, route, tag, seed)
            samples.append(sample)
            if not sample.ok:
                log(f"  {variant.name} iteration {index} NOT EXACT: {sample.problems[:3]} "
                     f"resyncs {sample.resyncs}")  # fmt: skip
            for gateway in gateways:
                gateway.check_alive()

    async with trio.open_nursery() as nursery:
        for number in range(workers):
            nursery.start_soon(worker, number)
    samples.sort(key=lambda s: s.iteration)
    return VariantResult.of(variant, samples)
