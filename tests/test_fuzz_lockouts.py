"""Hostile-input proofs for lockouts (issue 11 §3): floods of sessions and detached memory.

Attack classes, each run against a real gateway on loopback:

* **Open/close flood**: one client opens sockets as fast as it can, closes them at once, leaves
  garbage, or runs a turn and leaves (a session that stays for its grace period). hypothesis
  draws the mix and the concurrency. Whatever it does, it holds at most its own share of live
  sessions, is refused only with 429 (never the 503 of a full gateway), and another client
  still gets in and gets its answer.
* **Detached memory**: one client opens many sessions, asks for long answers and leaves before
  they arrive. What its detached sessions hold stays within its per-user budget, while another
  client's detached session keeps every frame for its resume.

With JWT auth off the per-user caps count per client address; the attacker and the honest
client are told apart by ``X-Forwarded-For`` from the trusted loopback proxy.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_gateway.session.manager import SessionManager
from trio_gateway.tools.demo_runtime import (
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)

from .conftest import INTERNAL_KEY, gateway_settings, run_gateway, wait_for
from .support.scripted_runtime import Script, ScriptedRuntime, chunk, sse

ATTACKER, HONEST = "10.6.6.6", "10.0.0.7"
ATTACKER_KEY, HONEST_KEY = f"anonymous@{ATTACKER}", f"anonymous@{HONEST}"
LIVE_CAP = 6
MAX_SESSIONS = 20  # well above the attacker's share, far below the number of handshakes


def from_address(address: str) -> list[tuple[bytes, bytes]]:
    return [(b"X-Forwarded-For", address.encode())]


async def flood(plan: list[str], workers: int) -> tuple[Counter[Any], int, list[str]]:
    """Run the attacker's ``plan`` with ``workers`` tasks, then the honest client; returns the
    attacker's outcomes, its peak of live sessions, and what went wrong."""
    outcomes: Counter[Any] = Counter()
    problems: list[str] = []
    peak = 0
    async with trio.open_nursery() as nursery:
        runtime = create_demo_runtime(
            DemoRuntimeConfig(internal_api_key=INTERNAL_KEY, token_delay=0.0, think_delay=0.0)
        )
        stop_runtime = trio.Event()
        binds = await nursery.start(
            partial(serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=stop_runtime.wait)
        )
        settings_ = gateway_settings(
            binds[0],
            log_level="WARNING",
            trusted_proxies="127.0.0.1/32",
            session_grace_seconds=30.0,
            max_sessions=MAX_SESSIONS,
            max_live_sessions_per_user=LIVE_CAP,
            ws_handshakes_per_second=50.0,
            ws_handshake_burst=40,
            max_connections_per_user=1_000,
        )
        async with run_gateway(nursery, settings_) as gw:
            manager = gw.app.gateway.sessions
            assert isinstance(manager, SessionManager)
            actions = iter(enumerate(plan))

            async def attack() -> None:
                nonlocal peak
                for n, action in actions:
                    try:
                        async with gw.connect(
                            f"flood-{n}", extra_headers=from_address(ATTACKER)
                        ) as client:
                            outcomes["opened"] += 1
                            if action == "garbage":
                                await client.send("{not json")
                                await client.recv()
                            elif action == "turn":
                                await client.send({"type": "user_message", "content": "bench 2"})
                                await client.turn()
                    except trio_websocket.ConnectionRejected as rejected:
                        outcomes[rejected.status_code] += 1
                        headers = dict(rejected.headers or [])
                        if rejected.status_code != 429 or b"retry-after" not in headers:
                            problems.append(f"refused with {rejected.status_code}: {headers}")
                    peak = max(peak, manager.live_sessions.get(ATTACKER_KEY, 0))

            async with trio.open_nursery() as attackers:
                for _ in range(workers):
                    attackers.start_soon(attack)
            # Sessions that never ran a turn are gone; those that did count against the cap.
            await wait_for(lambda: all(s.turn_count for s in manager.sessions.values()))
            if len(manager.sessions) > LIVE_CAP:
                problems.append(f"{len(manager.sessions)} live sessions after the flood")
            async with gw.connect("honest", extra_headers=from_address(HONEST)) as client:
                await client.send({"type": "user_message", "content": "bench 3"})
                tokens = "".join(f.get("token", "") for f in await client.turn())
                if tokens != "t0 t1 t2 ":
                    problems.append(f"honest client got {tokens!r}")
        stop_runtime.set()
    return outcomes, peak, problems


@settings(
    max_examples=8,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    plan=st.lists(st.sampled_from(["close", "close", "garbage", "turn"]), min_size=30, max_size=90),
    workers=st.integers(1, 6),
)
def test_an_open_close_flood_never_locks_out_another_client(plan: list[str], workers: int) -> None:
    outcomes, peak, problems = trio.run(flood, plan, workers)
    assert not problems, problems
    assert 503 not in outcomes  # the gateway never filled up
    assert peak <= LIVE_CAP
    assert outcomes["opened"] >= min(len(plan), LIVE_CAP)


async def test_many_detached_sessions_pin_at_most_the_per_user_budget(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    """Before the fix: 20 sessions left during long answers held 20 x the per-session budget
    (plus one oversized chunk each) for the grace period."""
    budget, per_session = 300_000, 100_000
    gate = trio.Event()
    pieces: list[bytes | float | trio.Event] = [gate]
    pieces += [sse(chunk(type="assistant_message", token="x" * 30_000)) for _ in range(6)]
    pieces.append(sse(chunk(type="assistant_message", token="y" * 400_000)))  # oversized
    pieces.append(sse(chunk(type="assistant_message", content="end", is_final=True)))
    scripted_runtime.scripts["long"] = Script(body=pieces)
    honest_gate = trio.Event()
    scripted_runtime.scripts["short"] = Script(
        body=[
            honest_gate,
            sse(chunk(type="assistant_message", token="a ")),
            sse(chunk(type="assistant_message", token="b ", content="a b", is_final=True)),
        ]
    )
    settings_ = gateway_settings(
        scripted_runtime.url,
        trusted_proxies="127.0.0.1/32",
        session_grace_seconds=30.0,
        outbound_queue_max_bytes=per_session,
        detached_bytes_per_user=budget,
        ws_handshake_burst=1_000,
        max_connections_per_user=1_000,
    )
    async with run_gateway(nursery, settings_) as gw:
        manager = gw.app.gateway.sessions
        assert isinstance(manager, SessionManager)

        async def leave(session_id: str, content: str, address: str) -> int:
            async with gw.connect(
                session_id, v2=True, extra_headers=from_address(address)
            ) as client:
                await client.recv()  # session_ready
                await client.send({"type": "user_message", "content": content})
                started = await client.recv()
                seq: int = started["seq"]
                return seq

        async with trio.open_nursery() as attackers:
            for n in range(20):
                attackers.start_soon(leave, f"pin-{n}", "long", ATTACKER)
        honest_seq = await leave("honest", "short", HONEST)
        await wait_for(lambda: all(s.connection is None for s in manager.sessions.values()))
        gate.set()
        honest_gate.set()
        await wait_for(
            lambda: (
                scripted_runtime.open_streams == 0
                and not any(s.turn_running for s in manager.sessions.values())
            ),
            timeout=20,
        )
        pinned = sum(
            s.outbound.pending_bytes
            for s in manager.sessions.values()
            if s.limit_key == ATTACKER_KEY
        )
        assert pinned <= budget  # without the budget: about 20 x 100 KB
        assert manager.detached.held(ATTACKER_KEY) == pinned
        assert manager.detached.total == pinned + manager.detached.held(HONEST_KEY)
        async with gw.connect("honest", v2=True) as client:
            assert (await client.recv())["type"] == "session_ready"
            await client.send({"type": "resume", "last_seq": honest_seq})
            frames = await client.recv_until(lambda f: f["type"] == "turn_finished")
        assert frames[0]["type"] == "resumed"
        assert "".join(f.get("token", "") for f in frames) == "a b "
