"""Lockouts (issue 11 §3): one user, or one anonymous client, must not use up what all share.

Against a real gateway on loopback: live sessions per user, turnless sessions ending with their
connection, the handshake rate, and the per-user budget of bytes held by detached sessions.
With JWT auth off every caller is the anonymous user; these caps then count per client
address, which the tests set with ``X-Forwarded-For`` from a trusted proxy (the loopback peer).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from trio_gateway.session.manager import SessionManager
from trio_gateway.session.session import Session
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import RunningGateway, WsClient, close_code, gateway_settings, run_gateway, wait_for
from ..support.fuzzing_lockouts import from_address
from ..support.gateway import jwt_settings
from ..support.scripted_runtime import Script, ScriptedRuntime, chunk, sse

ALICE, BOB = "10.0.0.1", "10.0.0.2"
ALICE_KEY, BOB_KEY = f"anonymous@{ALICE}", f"anonymous@{BOB}"


def lockout_settings(agent_url: str, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "trusted_proxies": "127.0.0.1/32",
        "session_grace_seconds": 30.0,
        # These tests open many sockets from one address on purpose; the handshake rate has
        # its own test.
        "ws_handshake_burst": 10_000,
        "max_connections_per_user": 1_000,
    }
    values.update(overrides)
    return gateway_settings(agent_url, **values)


def manager_of(gw: RunningGateway) -> SessionManager:
    sessions = gw.app.gateway.sessions
    assert sessions is not None
    return sessions


async def chat(client: WsClient) -> list[dict[str, Any]]:
    await client.send({"type": "user_message", "content": "bench 2"})
    return await client.turn()


def rejection_body(rejected: trio_websocket.ConnectionRejected) -> dict[str, Any]:
    assert rejected.body is not None
    body = orjson.loads(rejected.body)
    assert isinstance(body, dict)
    return body


def header(rejected: trio_websocket.ConnectionRejected, name: bytes) -> str:
    for key, value in rejected.headers or []:
        if key.lower() == name:
            return bytes(value).decode()
    raise AssertionError(f"no {name!r} header")


# --- live sessions ------------------------------------------------------------------------------


async def test_an_open_close_flood_no_longer_fills_max_sessions(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    """Before the fix every closed session lived on for the grace period: ten sockets opened
    and closed filled MAX_SESSIONS and everyone else got 503."""
    async with run_gateway(nursery, lockout_settings(demo_runtime[1], max_sessions=10)) as gw:
        manager = manager_of(gw)
        for n in range(40):
            async with gw.connect(f"flood-{n}", extra_headers=from_address(ALICE)):
                pass
        await wait_for(lambda: not manager.sessions, timeout=5)  # well before the 30 s grace
        assert manager.live_sessions == {}
        async with gw.connect("honest", extra_headers=from_address(BOB)) as client:
            assert len(await chat(client)) == 3


async def test_the_101st_live_session_of_one_user_gets_429_while_another_user_gets_in(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    settings = lockout_settings(demo_runtime[1])
    assert settings.max_live_sessions_per_user == 100  # the default
    async with run_gateway(nursery, settings) as gw, AsyncExitStack() as stack:
        for n in range(100):
            await stack.enter_async_context(
                gw.connect(f"live-{n}", extra_headers=from_address(ALICE))
            )
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with gw.connect("live-100", extra_headers=from_address(ALICE)):
                pass
        assert rejected.value.status_code == 429
        assert rejection_body(rejected.value)["error"] == "too_many_sessions"
        assert int(header(rejected.value, b"retry-after")) >= 1
        assert "live-100" not in manager_of(gw).sessions
        # Another client is not affected, and re-attaching to a live session is no new one.
        async with gw.connect("bob-1", extra_headers=from_address(BOB)) as client:
            assert len(await chat(client)) == 3
        async with gw.connect("live-7", extra_headers=from_address(ALICE)) as client:
            assert len(await chat(client)) == 3
        assert manager_of(gw).live_sessions[ALICE_KEY] == 100


async def test_sessions_in_their_grace_period_count_as_live(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    settings = lockout_settings(demo_runtime[1], max_live_sessions_per_user=3)
    async with run_gateway(nursery, settings) as gw:
        manager = manager_of(gw)
        for n in range(3):  # each runs a turn, so it stays for a reconnect after the close
            async with gw.connect(f"grace-{n}", extra_headers=from_address(ALICE)) as client:
                await chat(client)
        await wait_for(lambda: all(s.connection is None for s in manager.sessions.values()))
        assert manager.live_sessions[ALICE_KEY] == 3
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with gw.connect("grace-3", extra_headers=from_address(ALICE)):
                pass
        assert rejected.value.status_code == 429
        async with gw.connect("grace-0", extra_headers=from_address(ALICE)) as client:
            assert len(await chat(client)) == 3  # coming back to one of them is fine
        manager.sessions["grace-1"].end()  # one ends (as its grace period would): room again
        await wait_for(lambda: manager.live_sessions[ALICE_KEY] == 2)
        async with gw.connect("grace-3", extra_headers=from_address(ALICE)) as client:
            assert len(await chat(client)) == 3


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    """The ``Authorization`` header of a handshake carrying ``token``."""
    return [(b"Authorization", f"Bearer {token}".encode())]


async def first_frame_auth_closed(
    gw: RunningGateway, session_id: str, token: str
) -> trio_websocket.ConnectionClosed:
    """A socket opened without a token sends ``token`` as its first frame and is closed: how."""
    async with gw.connect(session_id) as client:
        await client.send({"type": "auth", "token": token})
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await client.recv()
    return closed.value


async def first_frame_auth_chats(gw: RunningGateway, session_id: str, token: str) -> None:
    """A socket authenticated by its first frame runs a whole turn."""
    async with gw.connect(session_id) as client:
        await client.send({"type": "auth", "token": token})
        assert len(await chat(client)) == 3


async def test_first_frame_auth_over_the_live_session_cap_closes_4429(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str], issuer: tuple[DevIssuer, str]
) -> None:
    settings = jwt_settings(
        demo_runtime[1], issuer[1], session_grace_seconds=30.0, max_live_sessions_per_user=2
    )
    alice, bob = issuer[0].mint("alice"), issuer[0].mint("bob")
    async with run_gateway(nursery, settings) as gw:
        async with (
            gw.connect("a-1", extra_headers=bearer(alice)),
            gw.connect("a-2", extra_headers=bearer(alice)),
        ):
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with gw.connect("a-3", extra_headers=bearer(alice)):
                    pass
            assert rejected.value.status_code == 429
            closed = await first_frame_auth_closed(gw, "a-3", alice)  # no token in the header
            assert close_code(closed) == 4429
            assert closed.reason is not None
            assert "live sessions" in (closed.reason.reason or "")
            await first_frame_auth_chats(gw, "b-1", bob)


async def test_first_frame_auth_over_the_handshake_rate_closes_4429(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str], issuer: tuple[DevIssuer, str]
) -> None:
    settings = jwt_settings(
        demo_runtime[1], issuer[1], ws_handshakes_per_second=0.01, ws_handshake_burst=1
    )
    alice, bob = issuer[0].mint("alice"), issuer[0].mint("bob")
    async with run_gateway(nursery, settings) as gw:
        async with gw.connect("r-1", extra_headers=bearer(alice)):
            pass
        assert close_code(await first_frame_auth_closed(gw, "r-2", alice)) == 4429
        await first_frame_auth_chats(gw, "r-bob", bob)


# --- turnless sessions ------------------------------------------------------------------------


async def test_a_turnless_session_ends_with_its_connection_one_with_a_turn_stays_for_resume(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    async with run_gateway(nursery, lockout_settings(demo_runtime[1])) as gw:
        manager = manager_of(gw)
        async with gw.connect("no-turn", v2=True) as client:
            await client.recv()  # session_ready
            await client.send({"type": "nonsense"})  # an error frame is not a turn
            assert (await client.recv())["code"] == "unsupported_type"
        await wait_for(lambda: "no-turn" not in manager.sessions, timeout=5)
        async with gw.connect("with-turn", v2=True) as client:
            await client.recv()
            await client.send({"type": "user_message", "content": "bench 2"})
            frames = await client.recv_until(lambda f: f["type"] == "turn_finished")
        last_seq = frames[-1]["seq"]
        await trio.sleep(0.5)
        assert "with-turn" in manager.sessions  # in its grace period, for the client's return
        async with gw.connect("with-turn", v2=True) as client:
            ready = await client.recv()
            assert ready["last_seq"] == last_seq
            await client.send({"type": "resume", "last_seq": last_seq})
            assert await client.recv() == {
                "type": "resumed",
                "from_seq": last_seq + 1,
                "replayed": 0,
            }


# --- handshake rate -----------------------------------------------------------------------------


async def test_handshakes_are_rate_limited_per_client(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    settings = lockout_settings(
        demo_runtime[1], ws_handshakes_per_second=0.01, ws_handshake_burst=3
    )
    async with run_gateway(nursery, settings) as gw:
        for n in range(3):
            async with gw.connect(f"rate-{n}", extra_headers=from_address(ALICE)):
                pass
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with gw.connect("rate-0", extra_headers=from_address(ALICE)):
                pass
        assert rejected.value.status_code == 429
        assert rejection_body(rejected.value)["error"] == "rate_limited"
        assert int(header(rejected.value, b"retry-after")) > 10  # ~100 s for one token
        async with gw.connect("rate-bob", extra_headers=from_address(BOB)) as client:
            assert len(await chat(client)) == 3
        hits = gw.app.gateway.metrics.registry.get_sample_value(
            "gateway_limit_hits_total", {"limit": "ws_handshake_rate"}
        )
        assert hits == 1


# --- detached sessions' bytes -------------------------------------------------------------------


def tokens(count: int, size: int) -> list[bytes | float | trio.Event]:
    """``count`` streamed (non-final) chunks of ``size`` characters each, one event each."""
    return [sse(chunk(type="assistant_message", token=str(n % 10) * size)) for n in range(count)]


FINAL = sse(chunk(type="assistant_message", content="done", token="done", is_final=True))


async def leave_during_turn(gw: RunningGateway, session_id: str, content: str, address: str) -> int:
    """Start a turn on a v2 session, then vanish: returns the last seq the client saw."""
    async with gw.connect(session_id, v2=True, extra_headers=from_address(address)) as client:
        await client.recv()  # session_ready
        await client.send({"type": "user_message", "content": content})
        started = await client.recv()
        assert started["type"] == "turn_started"
        seq: int = started["seq"]
    return seq


async def come_back(gw: RunningGateway, session_id: str, last_seq: int) -> list[dict[str, Any]]:
    """Re-attach with resume; every frame up to the end of the turn."""
    async with gw.connect(session_id, v2=True) as client:
        assert (await client.recv())["type"] == "session_ready"
        await client.send({"type": "resume", "last_seq": last_seq})
        return await client.recv_until(lambda f: f["type"] == "turn_finished")


def sessions_of(manager: SessionManager, key: str) -> list[Session]:
    return [s for s in manager.sessions.values() if s.limit_key == key]


async def test_detached_sessions_of_one_user_hold_at_most_the_per_user_budget(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    """Before the fix each detached session held its own 1 MiB (plus one chunk of any size)
    for the grace period, however many sessions a user left behind."""
    gate = trio.Event()
    scripted_runtime.scripts["big"] = Script(body=[gate, *tokens(10, 20_000), FINAL])
    bob_gate = trio.Event()
    scripted_runtime.scripts["small"] = Script(body=[bob_gate, *tokens(3, 100), FINAL])
    settings = lockout_settings(
        scripted_runtime.url, outbound_queue_max_bytes=100_000, detached_bytes_per_user=250_000
    )
    async with run_gateway(nursery, settings) as gw:
        manager = manager_of(gw)
        seen = {f"det-{n}": await leave_during_turn(gw, f"det-{n}", "big", ALICE) for n in range(5)}
        await wait_for(lambda: all(s.connection is None for s in manager.sessions.values()))
        gate.set()
        await wait_for(
            lambda: (
                scripted_runtime.open_streams == 0
                and not any(s.turn_running for s in manager.sessions.values())
            )
        )
        alices = sessions_of(manager, ALICE_KEY)
        held = sum(s.outbound.pending_bytes for s in alices)
        assert 200_000 <= held <= 250_000  # without the budget: 5 x ~80 KB
        assert manager.detached.held(ALICE_KEY) == held  # the ledger is the queues' content
        metrics = gw.app.gateway.metrics.registry
        assert metrics.get_sample_value("gateway_detached_bytes") == held
        lossy = [s.id for s in alices if s.lost_frames]
        assert lossy  # what did not fit was dropped, and counted
        # Another user's detached session keeps every frame although Alice's budget is full.
        bob_seq = await leave_during_turn(gw, "det-bob", "small", BOB)
        bob_gate.set()
        await wait_for(lambda: not manager.sessions["det-bob"].turn_running)
        assert manager.detached.held(BOB_KEY) > 0
        bob_frames = await come_back(gw, "det-bob", bob_seq)
        assert bob_frames[0] == {"type": "resumed", "from_seq": bob_seq + 1, "replayed": 0}
        assert "".join(f.get("token", "") for f in bob_frames[1:-1]) == (
            "0" * 100 + "1" * 100 + "2" * 100 + "done"
        )
        assert manager.detached.held(BOB_KEY) == 0  # attached again: nothing held for Bob
        # A resuming client of a session that lost frames is told so.
        frames = await come_back(gw, lossy[0], seen[lossy[0]])
        assert {"type": "resync_required", "reason": "frames_dropped_while_detached"} in frames
        assert frames[-1]["status"] == "completed"
        assert manager.detached.held(ALICE_KEY) < held  # that session's share was given back


async def test_an_oversized_chunk_is_counted_in_full_and_never_rides_on_a_full_queue(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    """Before the fix a chunk was admitted whenever the queue was under its budget, whatever
    its size: 90 KB queued plus a 500 KB chunk made 590 KB in a 100 KB budget."""
    gates = [trio.Event() for _ in range(3)]
    scripted_runtime.scripts["rides"] = Script(
        body=[gates[0], *tokens(1, 90_000), *tokens(1, 500_000), FINAL]
    )
    scripted_runtime.scripts["alone"] = Script(body=[gates[1], *tokens(1, 500_000), FINAL])
    huge_final = sse(chunk(type="assistant_message", content="x" * 2_000_000, is_final=True))
    scripted_runtime.scripts["huge-final"] = Script(body=[gates[2], huge_final])
    settings = lockout_settings(
        scripted_runtime.url, outbound_queue_max_bytes=100_000, detached_bytes_per_user=1_000_000
    )
    async with run_gateway(nursery, settings) as gw:
        manager = manager_of(gw)
        budget = manager.detached

        async def detached_turn(session_id: str, content: str, gate: trio.Event) -> int:
            seq = await leave_during_turn(gw, session_id, content, ALICE)
            await wait_for(lambda: manager.sessions[session_id].connection is None)
            gate.set()
            await wait_for(lambda: not manager.sessions[session_id].turn_running)
            return seq

        rides_seq = await detached_turn("rides", "rides", gates[0])
        rides = manager.sessions["rides"]
        assert rides.outbound.pending_bytes <= 100_000
        assert rides.lost_frames == 1  # the 500 KB chunk did not fit behind the 90 KB one
        assert budget.held(ALICE_KEY) == rides.outbound.pending_bytes
        before = budget.held(ALICE_KEY)
        await detached_turn("alone", "alone", gates[1])
        alone = manager.sessions["alone"]
        assert alone.lost_frames == 0  # alone in an empty queue it fits, counted in full
        assert alone.outbound.pending_bytes > 500_000
        assert budget.held(ALICE_KEY) == before + alone.outbound.pending_bytes
        # A final chunk larger than what is left: a small stand-in ends the turn instead.
        final_seq = await detached_turn("huge-final", "huge-final", gates[2])
        assert manager.sessions["huge-final"].outbound.pending_bytes == 0
        assert budget.held(ALICE_KEY) <= 1_000_000
        frames = await come_back(gw, "huge-final", final_seq)
        kinds = [f["type"] for f in frames]
        assert kinds == ["resync_required", "error", "turn_finished"], frames
        assert frames[1]["code"] == "output_dropped" and frames[1]["is_final"] is True
        frames = await come_back(gw, "rides", rides_seq)
        assert {"type": "resync_required", "reason": "frames_dropped_while_detached"} in frames
        assert "".join(f.get("token", "") for f in frames) == "0" * 90_000 + "done"


# --- anonymous callers: the existing per-user caps count per client address too ------------------


async def test_with_jwt_off_each_client_address_has_its_own_socket_cap_and_message_rate(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    """Before: every anonymous client was the one user 'anonymous', so one client holding
    MAX_CONNECTIONS_PER_USER sockets, or spending the message burst, locked out all others."""
    settings = lockout_settings(
        demo_runtime[1], max_connections_per_user=2, ws_messages_per_second=0.01, ws_message_burst=2
    )
    async with run_gateway(nursery, settings) as gw:
        alice = from_address(ALICE)
        async with (
            gw.connect("a-1", extra_headers=alice) as first,
            gw.connect("a-2", extra_headers=alice),
        ):
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with gw.connect("a-3", extra_headers=alice):
                    pass
            assert rejected.value.status_code == 429
            assert rejection_body(rejected.value)["error"] == "too_many_connections"
            for _ in range(3):  # the third of a burst of 2
                await first.send({"type": "cancel"})
            assert (await first.recv())["code"] == "rate_limited"
            async with gw.connect("b-1", extra_headers=from_address(BOB)) as client:
                assert len(await chat(client)) == 3  # Bob has his own sockets and messages
