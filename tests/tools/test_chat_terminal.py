"""``trio-gateway chat``, the real command in a pseudo-terminal against a real gateway + demo
runtime: a whole coding turn with approvals, rejection, Ctrl-C, reopened sessions, end of input,
the demo issuer's token, a missing gateway, session creation over REST and a gateway needing a JWT.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_gateway.edge.ws_handshake import open_session_socket
from trio_gateway.session.transport import WebSocketConnection
from trio_gateway.tools.chat import (
    SIMULATED_RESULT,
)
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DEV_ISSUER_FILE_ENV, DevIssuer

from ..conftest import RunningGateway, gateway_settings, run_gateway, wait_for
from ..support.jwks_server import JWKSServer
from .chat_support import (
    Terminal,
    chat,
    private_issuer_file,  # noqa: F401 - autouse fixture
)
from .test_cli import banner_token, ctrl_c, running_demo

# ------------------------------------------------------------------------------------------------
# The command in a pseudo-terminal
# ------------------------------------------------------------------------------------------------


def runtime_messages(runtime: DemoRuntime, session_id: str) -> list[dict[str, Any]]:
    """The messages the runtime received for a session, in order."""
    return [r["message"] for r in runtime.stream_requests if r.get("session_id") == session_id]


CODING = "write a hello world in python"
APPROVAL = r"\[approve\] run tool write_file with args \{\"path\": \"hello\.py\".*\? \[y/N\] "


async def coding_turn_until_approval(terminal: Terminal) -> None:
    await terminal.expect(r"connected, protocol codelab\.v2")
    await terminal.ask(CODING)
    await terminal.expect(r"\[agent\] orchestrator → coder \(The request asks for code\)")
    await terminal.expect(r"assistant> I will read README\.md first to see how the project")
    await terminal.expect(r'\[tool\] read_file \{"path": "README\.md"\} → simulated result sent')
    await terminal.expect(r"assistant> Thanks, README\.md is read\. Now I will write hello\.py")
    await terminal.expect(APPROVAL)


async def test_a_chat_streams_switches_agent_and_approves_without_touching_files(
    gateway: RunningGateway, demo_runtime: tuple[DemoRuntime, str], tmp_path: Path
) -> None:
    runtime = demo_runtime[0]
    async with chat(gateway.ws_base, "--session", "pty-yes", cwd=tmp_path) as terminal:
        await terminal.expect(r"\[session\] pty-yes \(come back to it with --session pty-yes\)")
        await coding_turn_until_approval(terminal)
        await terminal.type("y\n")
        await terminal.expect(r"approved write_file: simulated result sent")
        await terminal.expect(r"assistant> Done: wrote hello\.py with a hello-world program\.")
        await terminal.ask("/quit")
        assert await terminal.exit_code() == 0
    messages = runtime_messages(runtime, "pty-yes")
    assert [m["type"] for m in messages] == ["user_message", "tool_result", "tool_result"]
    assert messages[0] == {"type": "user_message", "content": CODING, "role": "user"}
    assert messages[1]["result"] == SIMULATED_RESULT and "error" not in messages[1]
    assert messages[2]["result"] == SIMULATED_RESULT
    # The approved write_file call wrote nothing: the client only pretends to run tools.
    assert os.listdir(tmp_path) == []


async def test_rejecting_an_approval_sends_the_rejection_to_the_runtime(
    gateway: RunningGateway, demo_runtime: tuple[DemoRuntime, str], tmp_path: Path
) -> None:
    async with chat(gateway.ws_url("pty-no"), cwd=tmp_path) as terminal:
        await coding_turn_until_approval(terminal)
        await terminal.type("n\n")
        await terminal.expect(r"\[tool\] rejected write_file")
        await terminal.expect(r"assistant> Understood, I did not write hello\.py \(rejected by")
        await terminal.expect("you> ")
        await terminal.type("\x04")  # Ctrl-D: end of input
        assert await terminal.exit_code() == 0
    last = runtime_messages(demo_runtime[0], "pty-no")[-1]
    assert last["type"] == "tool_result" and last["error"] == "rejected by user"
    assert "result" not in last
    assert os.listdir(tmp_path) == []


async def test_ctrl_c_at_the_approval_question_rejects_the_call_and_keeps_the_session(
    gateway: RunningGateway, demo_runtime: tuple[DemoRuntime, str], tmp_path: Path
) -> None:
    runtime = demo_runtime[0]
    async with chat(gateway.ws_base, "--session", "pty-ctrl-c", cwd=tmp_path) as terminal:
        await coding_turn_until_approval(terminal)
        terminal.process.send_signal(signal.SIGINT)  # what the terminal does on Ctrl-C
        await terminal.expect(r"\[tool\] rejected write_file \(Ctrl-C\)")
        await terminal.expect(r"assistant> Understood, I did not write hello\.py \(rejected by")
        await terminal.expect("you> ")
        assert terminal.process.returncode is None  # still chatting
        await terminal.type("what next?\n")
        await terminal.expect(r'assistant> You asked: "what next\?"')
        await terminal.ask("/quit")
        assert await terminal.exit_code() == 0
    messages = runtime_messages(runtime, "pty-ctrl-c")
    assert messages[2] == {
        "type": "tool_result", "call_id": messages[2]["call_id"], "error": "rejected by user"
    }  # fmt: skip
    assert messages[3]["type"] == "user_message"


async def test_a_reopened_session_asks_its_pending_approval_again(
    gateway: RunningGateway, demo_runtime: tuple[DemoRuntime, str], tmp_path: Path
) -> None:
    runtime = demo_runtime[0]
    async with chat(gateway.ws_base, "--session", "pty-reopen", cwd=tmp_path) as terminal:
        await coding_turn_until_approval(terminal)
        await terminal.type("/quit\n")  # leave without answering: the call stays pending
        assert await terminal.exit_code() == 0
    (pending,) = [
        c for c in runtime._sessions["pty-reopen"].pending.values() if c.requires_approval
    ]
    async with chat(gateway.ws_base, "--session", "pty-reopen", cwd=tmp_path) as terminal:
        await terminal.expect(r"1 tool call\(s\) of this session wait for your approval")
        await terminal.expect(APPROVAL)
        await terminal.type("y\n")
        await terminal.expect(r"approved write_file: simulated result sent")
        await terminal.expect(r"assistant> Done: wrote hello\.py with a hello-world program\.")
        await terminal.expect("you> ")
        assert "[approve]" not in terminal.output.split("approved write_file")[1]
        await terminal.type("/quit\n")
        assert await terminal.exit_code() == 0
    last = runtime_messages(runtime, "pty-reopen")[-1]
    assert last == {"type": "tool_result", "call_id": pending.call_id, "result": SIMULATED_RESULT}
    assert os.listdir(tmp_path) == []


async def test_ctrl_c_cancels_a_running_turn_and_ctrl_c_when_idle_quits(
    gateway: RunningGateway, demo_runtime: tuple[DemoRuntime, str], tmp_path: Path
) -> None:
    runtime = demo_runtime[0]
    async with chat(gateway.ws_base, "--session", "pty-cancel", cwd=tmp_path) as terminal:
        await terminal.ask("bench 100000 50")  # a long, paced turn
        await terminal.expect(r"assistant> t0 t1 t2 ")
        terminal.process.send_signal(signal.SIGINT)  # what the terminal does on Ctrl-C
        await terminal.expect(r"\[cancel\] cancelling the turn \(Ctrl-C again to quit\)")
        await terminal.expect(r"\[cancel\] the gateway cancelled the turn")
        await terminal.expect(r"\[turn\] cancelled\nyou> ")
        await wait_for(lambda: runtime.cancelled_streams == 1)
        terminal.process.send_signal(signal.SIGINT)
        assert await terminal.exit_code() == 0
        await terminal.expect(r"\[session\] bye")


async def test_end_of_input_waits_for_the_answer_then_exits(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    async with chat(gateway.ws_base, cwd=tmp_path) as terminal:
        await terminal.expect("you> ")
        await terminal.type("what is trio?\n\x04")
        await terminal.expect(r'assistant> You asked: "what is trio\?"\. I am the demo Agent')
        assert await terminal.exit_code() == 0


async def test_the_real_demo_with_a_token_from_the_demo_issuer(tmp_path: Path) -> None:
    issuer_file = tmp_path / "issuer" / "demo-issuer.json"
    env = {DEV_ISSUER_FILE_ENV: str(issuer_file)}
    work = tmp_path / "work"
    work.mkdir()
    async with running_demo(issuer_file) as (demo, port, banner):
        assert f" chat ws://127.0.0.1:{port} --token-from-demo" in banner
        base = f"ws://127.0.0.1:{port}"
        async with chat(base, "--token-from-demo", cwd=work, env=env) as terminal:
            await coding_turn_until_approval(terminal)
            await terminal.type("y\n")
            await terminal.expect(r"assistant> Done: wrote hello\.py")
            await terminal.ask("/quit")
            assert await terminal.exit_code() == 0
        assert os.listdir(work) == []
        # A bad token is refused by the REST create, with the gateway's own words...
        async with chat(base, "--token", "not-a-jwt", cwd=work) as terminal:
            await terminal.expect(r"cannot create a session: HTTP 401 invalid_token: .*refused")
            assert await terminal.exit_code() == 1
        # ... and at the handshake of a named session: final, no reconnect loop.
        async with chat(base, "--session", "s1", "--token", "not-a-jwt", cwd=work) as terminal:
            await terminal.expect(r"refused the connection: HTTP 401")
            assert await terminal.exit_code() == 1
        # The banner's own token works as --token.
        async with chat(base, "--token", banner_token(banner), cwd=work) as terminal:
            await terminal.ask("/quit")
            assert await terminal.exit_code() == 0
        assert await ctrl_c(demo) == 0


async def test_token_from_demo_without_a_demo_is_a_usage_error(tmp_path: Path) -> None:
    env = {DEV_ISSUER_FILE_ENV: str(tmp_path / "missing.json")}
    async with chat("ws://127.0.0.1:9", "--token-from-demo", cwd=tmp_path, env=env) as terminal:
        await terminal.expect(r"trio-gateway chat: no demo issuer at .*run `trio-gateway demo`")
        assert await terminal.exit_code() == 2


async def test_a_gateway_that_is_not_there_fails_at_once(tmp_path: Path) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # a port nobody listens on
    async with chat(f"ws://127.0.0.1:{port}", cwd=tmp_path) as terminal:
        await terminal.expect(r"\[session\] cannot connect")
        assert await terminal.exit_code() == 1


async def test_without_a_session_the_chat_creates_one_over_rest_and_opens_that_one(
    gateway: RunningGateway, demo_runtime: tuple[DemoRuntime, str], tmp_path: Path
) -> None:
    runtime = demo_runtime[0]
    async with chat(gateway.ws_base, cwd=tmp_path) as terminal:
        await terminal.expect(rf"creating a session: POST {gateway.base_url}/api/v1/sessions\n")
        created = (
            await terminal.expect(r"\[session\] created (\S+) \(come back to it with")
        ).group(1)
        await terminal.expect(rf"--session {re.escape(created)}\)")
        await terminal.expect(rf"connecting to {gateway.ws_base}/api/v1/ws/{re.escape(created)}\n")
        await terminal.expect("you> ")
        # The runtime knew the session before any message reached it: the real runtime answers
        # "session not found" to a message on an id it did not create.
        async with httpx.AsyncClient() as http:
            known = await http.get(f"{gateway.base_url}/api/v1/sessions/{created}")
        assert known.status_code == 200 and runtime_messages(runtime, created) == []
        await terminal.type("hello\n")
        await terminal.expect(r'assistant> You asked: "hello"')
        await terminal.type("/quit\n")
        assert await terminal.exit_code() == 0
    # The printed id is the one the socket used.
    assert [m["content"] for m in runtime_messages(runtime, created)] == ["hello"]


@dataclass
class JwtGateway:
    gateway: RunningGateway
    issuer: DevIssuer
    #: The path of every WebSocket that reached the gateway, handshake refused or not.
    sockets: list[str]


@pytest.fixture
async def jwt_gateway(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[JwtGateway]:
    """A gateway with JWT on (a JWKS server playing the Auth Service) counting its sockets."""
    issuer = DevIssuer()
    jwks = JWKSServer(issuer.jwks())
    await nursery.start(jwks.serve)
    sockets: list[str] = []

    async def counting(gateway: Any, ws: WebSocketConnection) -> None:
        sockets.append(ws.scope["path"])
        await open_session_socket(gateway, ws)

    monkeypatch.setattr("trio_gateway.app.open_session_socket", counting)
    settings = gateway_settings(demo_runtime[1], use_jwt_auth=True, jwks_url=jwks.url)
    async with run_gateway(nursery, settings) as running:
        yield JwtGateway(running, issuer, sockets)
    jwks.stop()


NEEDS_TOKEN = r"HTTP 401 .*; the gateway needs a token: --token or --token-from-demo\n"


async def test_a_jwt_gateway_without_a_token_is_told_before_any_socket_opens(
    jwt_gateway: JwtGateway, tmp_path: Path
) -> None:
    base = jwt_gateway.gateway.ws_base
    async with chat(base, cwd=tmp_path) as terminal:
        await terminal.expect(r"\[session\] cannot create a session: " + NEEDS_TOKEN)
        assert await terminal.exit_code() == 1
    # A named session is probed over REST first (the socket would be accepted, wait for a
    # first-frame auth, then close with 4401 after "connected").
    async with chat(base, "--session", "mine", cwd=tmp_path) as terminal:
        await terminal.expect(r"\[session\] " + NEEDS_TOKEN)
        assert await terminal.exit_code() == 1
    assert "connected" not in terminal.output
    assert jwt_gateway.sockets == []
    # With a token: created over REST, owned by the token's user, and that id is the socket's.
    token = jwt_gateway.issuer.mint("alice")
    async with chat(base, "--token", token, cwd=tmp_path) as terminal:
        created = (await terminal.expect(r"\[session\] created (\S+) ")).group(1)
        await terminal.ask("/quit")
        assert await terminal.exit_code() == 0
    owner = await jwt_gateway.gateway.app.gateway.security.ownership.owner(created)
    assert owner == "alice"
    assert jwt_gateway.sockets == [f"/api/v1/ws/{created}"]
