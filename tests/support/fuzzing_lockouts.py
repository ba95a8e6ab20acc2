"""Session floods, shared by ``tests/hostile/test_fuzz_lockouts.py`` and ``bench/fuzz.py``: one
client (the attacker, told apart by ``X-Forwarded-For`` from the trusted loopback proxy) opens
sockets as fast as it can, closes them, leaves garbage or runs a turn and leaves; then an honest
client must still get in and get its answer."""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

import trio
import trio_websocket

from trio_gateway.session.manager import SessionManager
from trio_gateway.tools.demo_runtime import (
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)

from .gateway import INTERNAL_KEY, gateway_settings, run_gateway, wait_for

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
