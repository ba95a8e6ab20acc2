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

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_gateway.session.manager import SessionManager

from ..conftest import run_gateway, wait_for
from ..support.fuzz_budget import FUZZ_MODULE_TIMEOUT
from ..support.fuzzing_lockouts import (
    ATTACKER,
    ATTACKER_KEY,
    HONEST,
    HONEST_KEY,
    LIVE_CAP,
    flood,
    from_address,
)
from ..support.scripted_runtime import Script, ScriptedRuntime, chunk, sse
from .test_lockouts import lockout_settings

pytestmark = FUZZ_MODULE_TIMEOUT


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
    settings_ = lockout_settings(
        scripted_runtime.url,
        outbound_queue_max_bytes=per_session,
        detached_bytes_per_user=budget,
        ws_handshake_burst=1_000,
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
