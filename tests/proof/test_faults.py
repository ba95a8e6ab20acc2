"""Fault matrix (issue "Ship it": proof under faults): every fault ends with a clear error frame
or close code, leaves no task, session or connection behind, and the next turn or session works.

What other modules already prove is referenced, not repeated:

* runtime 4xx/5xx before the stream, a validation dump, unreachable runtime, death mid-stream,
  a silent stream timing out, a non-JSON event: ``test_runtime_failures.py``;
* a client that stops reading (backpressure, slow-client timeout, shutdown not held up) and a
  flooding client: ``test_slow_clients.py``;
* a peer that never answers pings: ``test_heartbeat.py``; SIGTERM drains: ``test_drain.py`` and
  ``test_drain_load.py``; JWKS outage on a fresh gateway (503) and cached keys:
  ``test_security.py``.

Here: the runtime *process* killed (SIGKILL) or frozen (SIGSTOP) mid-turn and brought back; a
table of misbehaving runtime answers (slow, 5xx from a proxy, garbage bytes, broken HTTP, a
runaway line, a stream that never ends); the Auth Service's JWKS server really down (connection
refused) with sessions open, and back; clients that vanish without a close frame (TCP reset,
FIN, half a frame). After each case the gateway's own counters and this process's trio task
names must return to what they were before it.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import (
    INTERNAL_KEY,
    RunningGateway,
    WsClient,
    gateway_settings,
    port_of,
    run_gateway,
    task_names,
    wait_for,
)
from ..support.jwks_server import JWKSServer
from ..support.ports import free_port
from ..support.processes import Child, child_env, spawned
from ..support.rawws import RawWebSocket
from ..support.scripted_runtime import Script, ScriptedRuntime, chunk, sse

# Faults must be noticed quickly here: short grace, heartbeat and close budgets.
FAST = {
    "session_grace_seconds": 0.3,
    "ws_heartbeat_interval": 0.5,  # read timeout 2 x 0.5 + 1 = 2 s for a silent peer
    "ws_close_timeout": 0.5,
    "stream_idle_timeout": 1.0,
}


def token(text: str, **fields: Any) -> dict[str, Any]:
    """A non-final assistant token chunk."""
    return chunk(type="assistant_message", token=text, content=text, **fields)


FINAL = chunk(type="assistant_message", token="", content="", is_final=True)


def all_tasks() -> Counter[str]:
    """Every live task of this process, by name (the gateway runs in it)."""
    return Counter(task_names(lambda _name: True))


async def steady_tasks() -> Counter[str]:
    """The task names once servers have finished starting (two equal looks 0.1 s apart)."""
    previous = all_tasks()
    with trio.fail_after(5):
        while True:
            await trio.sleep(0.1)
            current = all_tasks()
            if current == previous:
                return current
            previous = current


async def settled(gw: RunningGateway, baseline: Counter[str], timeout: float = 8) -> None:
    """No connection, no session, and exactly the tasks of ``baseline`` (nothing stuck)."""
    sessions = gw.app.gateway.sessions
    assert sessions is not None

    def quiet() -> bool:
        return not sessions.connection_count and not sessions.sessions and all_tasks() == baseline

    try:
        await wait_for(quiet, timeout)
    except trio.TooSlowError:
        extra = all_tasks() - baseline
        raise AssertionError(
            f"not settled: {sessions.connection_count} connection(s), "
            f"{len(sessions.sessions)} session(s), extra tasks {dict(extra)}"
        ) from None


async def next_session_works(gw: RunningGateway, content: str = "anything") -> None:
    """A brand-new session completes a turn."""
    async with gw.connect("next-session") as client:
        await client.send({"type": "user_message", "content": content})
        frames = await client.turn()
    assert frames[-1]["type"] == "assistant_message", frames[-1]


async def metric(gw: RunningGateway, name: str) -> float:
    """One sample of the gateway's /metrics (``name`` with its labels, as exposed)."""
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# --- a table of misbehaving runtime answers -----------------------------------------------------


@dataclass
class RuntimeFault:
    """One way the runtime answers a turn, and what the client must see."""

    script: Script
    relayed: str  # text of the tokens that reach the client before the end
    code: str | None  # the error code of the last frame; None: the turn ends normally
    status: int | None = None  # the HTTP status the error frame carries
    settings: dict[str, Any] = field(default_factory=dict)


RUNTIME_FAULTS: dict[str, RuntimeFault] = {
    # silent for most of the idle timeout between every token, yet never past it
    "slow-but-alive": RuntimeFault(
        Script(body=[0.7, sse(token("a ")), 0.7, sse(token("b ")), 0.7, sse(FINAL)]),
        relayed="a b ",
        code=None,
    ),
    # an overloaded runtime behind a proxy: HTML, never shown to the client
    "502-html-from-a-proxy": RuntimeFault(
        Script(status=502, content_type="text/html", body=[b"<html>Bad Gateway</html>"]),
        relayed="",
        code="runtime_error",
        status=502,
    ),
    "503-with-retry-after": RuntimeFault(
        Script(
            status=503,
            content_type="application/json",
            headers={"Retry-After": "3"},
            body=[b'{"detail": "overloaded"}'],
        ),
        relayed="",
        code="runtime_error",
        status=503,
    ),
    # the runtime's own error chunk after some tokens (a 500 inside the stream): relayed
    "error-chunk-mid-stream": RuntimeFault(
        Script(body=[sse(token("a "), chunk(type="error", error="LLM exploded", is_final=True))]),
        relayed="a ",
        code=None,
    ),
    # bytes that are not SSE at all between two good events: skipped, the turn completes
    "binary-garbage-between-events": RuntimeFault(
        Script(body=[sse(token("a ")), b"\xff\xfe\x00\x9c garbage\x00\n\n", sse(FINAL)]),
        relayed="a ",
        code=None,
    ),
    # a line that never ends: the decoder's bound (16 MiB) fails the turn, memory stays bounded
    "runaway-line": RuntimeFault(
        Script(body=[sse(token("a ")), b"data: " + b"x" * (1 << 20), *[b"y" * (1 << 20)] * 16]),
        relayed="a ",
        code="runtime_stream_broken",
    ),
    # broken chunked framing after a good event
    "broken-chunked-encoding": RuntimeFault(
        Script(
            raw=b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(sse(token("a "))), sse(token("a ")))
            + b"zz-not-a-chunk-size\r\n\r\n"
        ),
        relayed="a ",
        code="runtime_stream_broken",
    ),
    # something that is not HTTP at all answering on the runtime's port
    "not-http": RuntimeFault(
        Script(raw=b"SSH-2.0-OpenSSH_9.6\r\n"), relayed="", code="runtime_stream_broken"
    ),
    # tokens, then the stream stays open and silent forever: the idle timeout ends it
    "never-ends-after-tokens": RuntimeFault(
        Script(body=[sse(token("a "), token("b "))], ending="hang"),
        relayed="a b ",
        code="runtime_timeout",
    ),
    # the response closes cleanly without a final chunk: the client still learns the turn ended
    # a clean end of stream without any final chunk: the gateway ends the turn for the client
    "ends-without-a-final-chunk": RuntimeFault(
        Script(body=[sse(token("a "))]), relayed="a ", code="runtime_stream_broken"
    ),
}


@pytest.mark.parametrize("name", list(RUNTIME_FAULTS))
async def test_a_misbehaving_runtime_answer(
    name: str, nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    fault = RUNTIME_FAULTS[name]
    scripted_runtime.scripts[name] = fault.script
    settings = gateway_settings(scripted_runtime.url, **{**FAST, **fault.settings})
    async with run_gateway(nursery, settings) as gw:
        baseline = await steady_tasks()
        async with gw.connect(f"fault-{name}") as client:
            await client.send({"type": "user_message", "content": name})
            frames = await client.turn(timeout=5 if fault.code is None else 15)
            text = "".join(f.get("token") or "" for f in frames if f["type"] == "assistant_message")
            assert text == fault.relayed, frames
            last = frames[-1]
            assert last["is_final"] is True
            if fault.code is None:
                assert last.get("code") is None, last
            else:
                assert (last["type"], last["code"]) == ("error", fault.code), last
                assert last.get("status") == fault.status
                assert "<html>" not in str(last) and "x" * 100 not in str(last)
            # the same session goes on
            await client.send({"type": "user_message", "content": "and now?"})
            assert (await client.turn())[-1]["token"] == "ok"
        await settled(gw, baseline)
        assert scripted_runtime.open_streams == 0
        await next_session_works(gw)


async def test_a_stream_that_never_ends_but_keeps_talking_is_ended_by_the_client(
    nursery: trio.Nursery, scripted_runtime: ScriptedRuntime
) -> None:
    """Keep-alive comments count as activity (an LLM may think for minutes), so the idle
    timeout never fires; the client's ``cancel`` is what ends such a turn, at once, and the
    runtime request is closed."""
    keep_alive: list[bytes | float] = [b": keep-alive\n\n", 0.2]
    scripted_runtime.scripts["chatty-forever"] = Script(body=[sse(token("a ")), *keep_alive * 500])
    async with run_gateway(nursery, gateway_settings(scripted_runtime.url, **FAST)) as gw:
        baseline = await steady_tasks()
        async with gw.connect("forever") as client:
            await client.send({"type": "user_message", "content": "chatty-forever"})
            assert (await client.recv())["token"] == "a "
            await trio.sleep(1.5)  # longer than the idle timeout: still running
            assert scripted_runtime.open_streams == 1
            await client.send({"type": "cancel"})
            frames = await client.turn()
            assert (frames[-1]["code"], frames[-1]["is_final"]) == ("cancelled", True)
        await wait_for(lambda: scripted_runtime.open_streams == 0)
        await settled(gw, baseline)
        await next_session_works(gw)


# --- the runtime process killed or frozen mid-turn ----------------------------------------------


@asynccontextmanager
async def runtime_process(port: int) -> AsyncIterator[Child]:
    """``trio-gateway demo-runtime --port PORT`` as a child process, healthy; killed on exit."""
    with tempfile.TemporaryDirectory(prefix="runtime-") as workdir:
        env = child_env(INTERNAL_KEY)
        with spawned("runtime", ["demo-runtime"], env, Path(workdir), port=port) as child:
            try:
                await child.wait_healthy(20)
                yield child
            finally:
                child.stop(signal.SIGKILL)  # thawed first: a frozen child must be able to die


@pytest.mark.parametrize(
    ("fault", "code"),
    [("SIGKILL", "runtime_stream_broken"), ("SIGSTOP", "runtime_timeout")],
)
async def test_the_runtime_process_dies_or_freezes_mid_turn_then_comes_back(
    fault: str, code: str, nursery: trio.Nursery
) -> None:
    port = free_port()
    runtime_url = f"http://127.0.0.1:{port}"
    async with run_gateway(nursery, gateway_settings(runtime_url, **FAST)) as gw:
        baseline = await steady_tasks()
        async with runtime_process(port) as first, gw.connect("victim") as client:
            await client.send({"type": "user_message", "content": "bench 1000 20"})
            frames = [await client.recv(), await client.recv()]
            assert [f["token"] for f in frames] == ["t0 ", "t1 "]
            os.kill(first.pid, getattr(signal, fault))
            frames = await client.turn()
            error = frames[-1]
            assert (error["type"], error["code"], error["is_final"]) == ("error", code, True)
            if fault == "SIGKILL":
                with trio.fail_after(5):
                    await first.wait_exit()
                # while it is down: a clear error at once, the session lives on
                await client.send({"type": "user_message", "content": "anyone?"})
                assert (await client.recv())["code"] == "runtime_unavailable"
            else:
                os.kill(first.pid, signal.SIGCONT)
            if fault == "SIGKILL":
                async with runtime_process(port):
                    await client.send({"type": "user_message", "content": "bench 3"})
                    assert "".join(f["token"] for f in await client.turn()) == "t0 t1 t2 "
                    await next_session_works(gw, "bench 2")
            else:
                await client.send({"type": "user_message", "content": "bench 3"})
                assert "".join(f["token"] for f in await client.turn()) == "t0 t1 t2 "
                await next_session_works(gw, "bench 2")
        await settled(gw, baseline)
        assert await metric(gw, "gateway_active_websockets") == 0
        assert await metric(gw, "gateway_active_sessions") == 0


# --- the Auth Service's JWKS server down --------------------------------------------------------


@asynccontextmanager
async def jwks_up(issuer: DevIssuer, port: int) -> AsyncIterator[JWKSServer]:
    """The issuer's key set served on ``127.0.0.1:port`` until the block ends (then: refused)."""
    server = JWKSServer(issuer.jwks())
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: server.serve(task_status=task_status, port=port))
        try:
            yield server
        finally:
            server.stop()


def jwt_settings(runtime_url: str, jwks_port: int) -> Any:
    return gateway_settings(
        runtime_url,
        use_jwt_auth=True,
        jwks_url=f"http://127.0.0.1:{jwks_port}/.well-known/jwks.json",
        jwks_refetch_cooldown=0.5,
        **FAST,
    )


def bearer(jwt: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {jwt}".encode())]


async def handshake_status(gw: RunningGateway, session_id: str, jwt: str) -> int:
    """101 when the handshake is accepted (the socket is closed again), else the HTTP status."""
    try:
        async with trio_websocket.open_websocket_url(
            gw.ws_url(session_id), extra_headers=bearer(jwt)
        ):
            return 101
    except trio_websocket.ConnectionRejected as rejected:
        return int(rejected.status_code)


async def test_jwks_down_keeps_sessions_refuses_clearly_and_recovers(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    issuer, stranger = DevIssuer(), DevIssuer(kid="rotated-key")
    port = free_port()
    alice = issuer.mint("alice")
    # 1. keys cached, then the Auth Service goes away (connection refused)
    async with run_gateway(nursery, jwt_settings(demo_runtime[1], port)) as gw:
        async with jwks_up(issuer, port):
            assert await handshake_status(gw, "warm", alice) == 101
        async with trio_websocket.open_websocket_url(
            gw.ws_url("alive"), extra_headers=bearer(alice)
        ) as ws:
            client = WsClient(ws)
            # the open session is unaffected
            await client.send({"type": "user_message", "content": "bench 3"})
            assert "".join(f["token"] for f in await client.turn()) == "t0 t1 t2 "
            # documented: the last good keys keep working, so known keys still get in ...
            assert await handshake_status(gw, "new", alice) == 101
            # ... a key the gateway never saw cannot be fetched: 401, not a hang
            assert await handshake_status(gw, "other", stranger.mint("bob")) == 401
            await client.send({"type": "user_message", "content": "bench 2"})
            assert "".join(f["token"] for f in await client.turn()) == "t0 t1 "
    # 2. a gateway that never had keys: 503 with Retry-After while down, fine once it is back
    async with run_gateway(nursery, jwt_settings(demo_runtime[1], port)) as gw:
        baseline = await steady_tasks()
        assert await handshake_status(gw, "down", alice) == 503
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            answer = await http.get("/api/v1/agents", headers={"Authorization": f"Bearer {alice}"})
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 1
        async with jwks_up(issuer, port):
            # recovery: the next fetch attempt after a failure is at most ~5 s away
            with trio.fail_after(10):
                while await handshake_status(gw, "back", alice) != 101:
                    await trio.sleep(0.25)
        await settled(gw, baseline)


# --- clients that vanish --------------------------------------------------------------------


async def vanish_reset(raw: RawWebSocket) -> None:
    """TCP reset: SO_LINGER 0, then close."""
    import socket
    import struct

    raw.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await raw.stream.aclose()


async def vanish_fin(raw: RawWebSocket) -> None:
    """The socket closed without a WebSocket close frame (a FIN)."""
    await raw.stream.aclose()


async def half_frame_then_fin(raw: RawWebSocket) -> None:
    """The first half of a text frame, then the socket closed."""
    await raw.stream.send_all(HALF_FRAME)
    await raw.stream.aclose()


async def half_frame_then_silence(raw: RawWebSocket) -> None:
    """The first half of a text frame, then nothing (no pongs either): the read timeout."""
    await raw.stream.send_all(HALF_FRAME)
    with trio.fail_after(10):
        while await raw.stream.receive_some(65536):
            pass  # the gateway's pings, unanswered, until it hangs up
    await raw.stream.aclose()


# FIN + text opcode, masked, 125-byte payload announced; only the mask and 10 bytes follow.
HALF_FRAME = bytes([0x81, 0x80 | 125]) + b"\x01\x02\x03\x04" + b"0123456789"

VANISHING = {
    "tcp-reset-mid-turn": (vanish_reset, True),
    "fin-without-close-frame-mid-turn": (vanish_fin, True),
    "tcp-reset-idle": (vanish_reset, False),
    "half-a-frame-then-fin-mid-turn": (half_frame_then_fin, True),
    "half-a-frame-then-silence": (half_frame_then_silence, False),
}


@pytest.mark.parametrize("name", list(VANISHING))
async def test_a_client_that_vanishes(
    name: str, nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    runtime, url = demo_runtime
    vanish, mid_turn = VANISHING[name]
    async with run_gateway(nursery, gateway_settings(url, **FAST)) as gw:
        baseline = await steady_tasks()
        cancelled_before = runtime.cancelled_streams
        raw = await RawWebSocket.connect(port_of(gw.base_url), f"/api/v1/ws/{name}")
        if mid_turn:
            await raw.send_json({"type": "user_message", "content": "bench 100000 20"})
            await wait_for(lambda: runtime.active_streams == 1)
        await vanish(raw)
        # the connection goes at once; the session after its grace period; a detached turn
        # is cancelled at the runtime at the end of the grace
        await settled(gw, baseline)
        assert runtime.active_streams == 0
        assert runtime.cancelled_streams == cancelled_before + (1 if mid_turn else 0)
        await next_session_works(gw, "bench 2")


def test_listen_backlogs_are_sized_for_a_reconnect_storm() -> None:
    """Regression (found by bench/load.py): hypercorn's default backlog of 100 made 600
    concurrent turns get connections reset by the demo runtime, and 2000 fail every turn
    with runtime_stream_broken; clients connecting at once waited out SYN retransmits."""
    from trio_gateway.server import LISTEN_BACKLOG, build_hypercorn_config

    assert build_hypercorn_config(gateway_settings("http://127.0.0.1:1")).backlog == LISTEN_BACKLOG
    assert LISTEN_BACKLOG >= 2048
