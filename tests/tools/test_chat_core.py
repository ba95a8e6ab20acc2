"""``trio-gateway chat``: the core frame by frame, then the real command in a pseudo-terminal
against a real gateway + demo runtime, and against a fake v2 server that drops connections."""

from __future__ import annotations

import codecs
import io
import json
import os
import pty
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from trio_gateway.edge.ws_handshake import open_session_socket
from trio_gateway.session.transport import WebSocketConnection
from trio_gateway.tools.chat import (
    SIMULATED_RESULT,
    ChatCore,
    Reaction,
    backoff_delay,
    build_ws_url,
    pending_approvals_url,
    rest_base_url,
    session_ws_url,
    sessions_url,
    want_color,
)
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DEV_ISSUER_FILE_ENV, DevIssuer

from ..conftest import RunningGateway, gateway_settings, run_gateway, wait_for
from ..support.jwks_server import JWKSServer
from ..support.processes import cli_command, started
from .test_cli import banner_token, cli_env, ctrl_c, running_demo


@pytest.fixture(autouse=True)
def private_issuer_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No chat started here may read or write the user's own demo issuer file."""
    monkeypatch.setenv(DEV_ISSUER_FILE_ENV, str(tmp_path / "default-issuer.json"))


# ------------------------------------------------------------------------------------------------
# The core, without sockets
# ------------------------------------------------------------------------------------------------


def chunk(type_: str, seq: int | None = None, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": type_, **fields}
    if seq is not None:
        frame["seq"] = seq
    return frame


def connected(**kwargs: Any) -> ChatCore:
    core = ChatCore("s1", **kwargs)
    core.connection_opened(v2=True)
    return core


def test_tokens_stream_on_one_line_until_is_final() -> None:
    core = connected()
    out = [
        core.receive(chunk("assistant_message", 1, token="Hello ", is_final=False)).text,
        core.receive(chunk("assistant_message", 2, token="world", is_final=False)).text,
        core.receive(chunk("assistant_message", 3, token="", content="", is_final=True)).text,
    ]
    assert "".join(out) == "\nassistant> Hello world\n"  # "\n": the prompt line was open
    assert core.last_seq == 3


def test_a_final_chunk_repeating_the_whole_answer_is_not_printed_twice() -> None:
    core = connected()
    core.receive(chunk("assistant_message", 1, token="Hi there", is_final=False))
    assert core.receive(chunk("assistant_message", 2, content="Hi there")).text == "\n"
    # Today's runtime often sends the whole answer once, as a final chunk: shown as it is.
    text = core.receive(chunk("assistant_message", 3, content="All at once", is_final=True)).text
    assert text == "assistant> All at once\n"


def test_agent_switches_are_read_top_level_or_from_metadata() -> None:
    core = connected()
    meta = {"from_agent": "orchestrator", "to_agent": "coder", "reason": "code asked"}
    text = core.receive(chunk("agent_switched", 1, content="Switching", metadata=meta)).text
    assert "[agent] orchestrator → coder (code asked)\n" in text
    text = core.receive(chunk("agent_switched", 2, from_agent="coder", to_agent="debug")).text
    assert text == "[agent] coder → debug\n"


def test_errors_show_content_falling_back_to_error_with_the_code() -> None:
    core = connected()
    text = core.receive(chunk("error", 1, content="Too many", code="busy", is_final=False)).text
    assert "error> Too many [busy]\n" in text
    assert core.receive(chunk("error", 2, error="boom", is_final=True)).text == "error> boom\n"
    already = chunk("error", 3, code="already_answered", error="call_1 was already answered")
    assert "error> call_1 was already answered [already_answered]" in core.receive(already).text


def test_a_tool_call_without_approval_is_answered_with_a_simulated_result() -> None:
    core = connected()
    call = chunk(
        "tool_call", 1, call_id="c1", tool_name="read_file", arguments={"path": "README.md"}
    )
    reaction = core.receive({**call, "requires_approval": False, "is_final": True})
    assert reaction.send == (
        {"type": "tool_result", "call_id": "c1", "result": dict(SIMULATED_RESULT)},
    )
    assert SIMULATED_RESULT["simulated"] is True
    assert '[tool] read_file {"path": "README.md"}' in reaction.text
    assert core.busy  # the result starts the next turn


def approval_call(core: ChatCore, call_id: str = "c2", seq: int = 1) -> str:
    frame = chunk(
        "tool_call",
        seq,
        call_id=call_id,
        tool_name="write_file",
        arguments={"path": "hello.py", "content": "print('hi')\n"},
        requires_approval=True,
        is_final=True,
    )
    reaction = core.receive(frame)
    assert reaction.send == ()  # nothing happens before the user answers
    return reaction.text


def test_an_approval_is_asked_and_yes_sends_a_simulated_result() -> None:
    core = connected()
    text = approval_call(core)
    assert text.endswith(
        "[approve] run tool write_file with args "
        '{"path": "hello.py", "content": "print(\'hi\')\\n"}? [y/N] '
    )
    assert core.pending_approval == "c2"
    reaction = core.user_line("y")
    assert reaction.send == (
        {"type": "tool_result", "call_id": "c2", "result": dict(SIMULATED_RESULT)},
    )
    assert core.pending_approval is None
    assert "approved write_file" in reaction.text


def test_the_approval_question_is_asked_once_when_the_turn_then_finishes() -> None:
    core = connected()
    asked = approval_call(core)
    finished = core.receive(chunk("turn_finished", 2, turn_id=1, status="completed"))
    assert asked.count("[approve]") == 1
    assert "[approve]" not in finished.text, "seen in the demo: the question printed twice"


@pytest.mark.parametrize("answer", ["n", "No", ""])
def test_no_or_just_enter_rejects_the_tool_call(answer: str) -> None:
    core = connected()
    approval_call(core)
    reaction = core.user_line(answer)
    assert reaction.send == ({"type": "tool_result", "call_id": "c2", "error": "rejected by user"},)


def test_anything_else_asks_the_approval_question_again() -> None:
    core = connected()
    approval_call(core)
    reaction = core.user_line("maybe later")
    assert reaction.send == () and core.pending_approval == "c2"
    assert "please answer y or n" in reaction.text and reaction.text.endswith("[y/N] ")


def test_ctrl_c_at_the_approval_question_rejects_and_the_session_goes_on() -> None:
    core = connected()
    approval_call(core)
    core.receive(chunk("turn_finished", 2, turn_id=1, status="completed"))
    reaction = core.interrupt()
    # The IDE's rejection: a tool_result carrying error, never leaving the call pending.
    assert reaction.send == ({"type": "tool_result", "call_id": "c2", "error": "rejected by user"},)
    assert not reaction.quit and core.pending_approval is None
    assert "[tool] rejected write_file (Ctrl-C)" in reaction.text
    # The rejection starts a turn: Ctrl-C now cancels it, and quits only once idle.
    assert core.interrupt().send == ({"type": "cancel"},)


def test_pending_approvals_of_a_reopened_session_are_asked_again() -> None:
    core = connected()
    pending = [
        {"call_id": "c7", "tool_name": "write_file", "arguments": {"path": "a.py"}},
        {"call_id": "c8", "tool_name": "run_command", "arguments": {"cmd": "ls"}},
        {"call_id": ""},  # unusable entries are skipped
        "junk",
    ]
    reaction = core.restore_approvals(pending)
    assert "2 tool call(s) of this session wait for your approval" in reaction.text
    question = '[approve] run tool write_file with args {"path": "a.py"}? [y/N] '
    assert reaction.text.endswith(question)
    assert [call.call_id for call in core.approvals] == ["c7", "c8"]
    # The same list again (a reconnect), or the live tool_call frame: not asked twice.
    assert core.restore_approvals(pending) == Reaction()
    assert approval_call(core, call_id="c7", seq=3) == ""
    assert core.user_line("y").send[0]["call_id"] == "c7"
    assert core.user_line("n").send[0] == {
        "type": "tool_result", "call_id": "c8", "error": "rejected by user"
    }  # fmt: skip
    # Answered here but still listed by the runtime (the answer is on its way): not re-asked.
    assert core.restore_approvals(pending) == Reaction()
    assert core.restore_approvals(None) == Reaction()


def test_unreadable_pending_approvals_never_split_a_streaming_answer() -> None:
    core = connected()
    core.user_line("hi")
    assert core.receive(chunk("assistant_message", 1, token="half ", is_final=False)).text
    assert core.approvals_unknown("HTTP 400") == Reaction()
    text = core.receive(chunk("assistant_message", 2, token="whole", is_final=True)).text
    assert text == "whole\n[session] cannot read pending approvals (HTTP 400)\n"


def test_the_pending_approvals_url_is_on_the_sessions_gateway() -> None:
    assert (
        pending_approvals_url("ws://h:8000/api/v1/ws/a%20b", "a b")
        == "http://h:8000/api/v1/sessions/a%20b/pending-approvals"
    )
    assert (
        pending_approvals_url("wss://h/gw/api/v1/ws/s1?x=1", "s1")
        == "https://h/gw/api/v1/sessions/s1/pending-approvals"
    )


def test_a_typed_line_becomes_a_user_message_and_slash_quit_leaves() -> None:
    core = connected()
    reaction = core.user_line("hello there")
    assert reaction.send == ({"type": "user_message", "content": "hello there", "role": "user"},)
    assert core.busy
    assert core.user_line("   ").send == ()
    assert core.user_line("/quit").quit


def test_ctrl_c_cancels_a_running_turn_then_quits() -> None:
    core = connected()
    core.user_line("write something")
    core.receive(chunk("turn_started", 1, turn_id=1))
    first = core.interrupt()
    assert first.send == ({"type": "cancel"},) and not first.quit
    second = core.interrupt()  # the cancel has not been acknowledged: the user insists
    assert second.quit and second.send == ()


def test_ctrl_c_when_idle_quits_and_a_cancel_ack_makes_the_client_idle() -> None:
    core = connected()
    assert core.interrupt().quit
    core = connected()
    core.user_line("go")
    core.receive(chunk("turn_started", 1, turn_id=1))
    core.interrupt()
    ack = core.receive(chunk("cancel_ack", 2, turn_cancelled=True, dropped_messages=0))
    assert "[cancel] the gateway cancelled the turn" in ack.text
    finished = core.receive(chunk("turn_finished", 3, turn_id=1, status="cancelled"))
    assert "[turn] cancelled" in finished.text and finished.text.endswith("you> ")
    assert not core.busy and core.interrupt().quit


def test_end_of_input_waits_for_the_running_turn() -> None:
    core = connected()
    core.user_line("question")
    assert not core.end_of_input().quit
    assert not core.receive(chunk("turn_started", 1, turn_id=1)).quit
    assert not core.receive(chunk("assistant_message", 2, token="answer", is_final=True)).quit
    assert core.receive(chunk("turn_finished", 3, turn_id=1, status="completed")).quit
    idle = connected()
    assert idle.end_of_input().quit


def test_frames_at_or_below_the_last_seq_are_ignored() -> None:
    core = connected()
    core.receive(chunk("assistant_message", 5, token="a", is_final=False))
    assert core.receive(chunk("assistant_message", 5, token="a", is_final=False)).text == ""
    assert core.receive(chunk("assistant_message", 4, token="z", is_final=False)).text == ""
    assert core.receive(chunk("assistant_message", 6, token="b", is_final=False)).text == "b"
    # Unsequenced frames are never dropped, even when a gateway numbers them anyway.
    assert core.receive(chunk("cancel_ack", None, turn_cancelled=False)).text
    core.receive(chunk("heartbeat", 7))
    assert core.last_seq == 7


def test_a_reconnect_resumes_after_the_last_processed_seq() -> None:
    core = connected()
    core.receive(chunk("assistant_message", 3, token="x", is_final=False))
    reaction = core.connection_opened(v2=True)
    assert reaction.send == ({"type": "resume", "last_seq": 3},)
    assert core.resuming
    core.receive(chunk("session_ready", None, turn_running=True, last_seq=5))
    assert core.receive(chunk("assistant_message", 3, token="x", is_final=False)).text == ""
    assert "y" in core.receive(chunk("assistant_message", 4, token="y", is_final=False)).text
    core.receive(chunk("resumed", None, from_seq=4))
    assert not core.resuming


def test_resync_required_warns_and_accepts_the_next_seq_whatever_it_is() -> None:
    core = connected()
    core.receive(chunk("assistant_message", 9, token="x", is_final=False))
    core.connection_opened(v2=True)
    text = core.receive(chunk("resync_required", None, reason="frames_dropped")).text
    assert "some output may be missing (frames_dropped)" in text
    assert "/api/v1/sessions/s1/history" in text
    assert not core.resuming
    # The gateway's numbering may have restarted: a lower seq is live output, not a duplicate.
    assert "fresh" in core.receive(chunk("assistant_message", 2, token="fresh")).text
    assert core.last_seq == 2


def test_a_gateway_that_lost_its_state_is_one_gap_notice_then_the_prompt() -> None:
    core = connected()
    core.receive(chunk("turn_finished", 9, turn_id=1, status="completed"))
    core.connection_opened(v2=True)
    # A restarted gateway: its session_ready is behind us, then it refuses our resume.
    text = core.receive(chunk("session_ready", None, last_seq=0, turn_running=False)).text
    text += core.receive(chunk("resync_required", None, reason="unknown_seq")).text
    assert text.count("some output may be missing") == 1
    assert text.endswith("/history\nyou> ")  # the prompt the notices wrote over
    # The next connection announces its own loss again, once.
    core.connection_opened(v2=True)
    text = core.receive(chunk("resync_required", None, reason="frames_lost")).text
    assert text.count("some output may be missing") == 1


def test_after_a_resync_the_next_resume_starts_at_the_gateways_seq() -> None:
    core = connected()
    core.receive(chunk("turn_finished", 3, turn_id=1, status="completed"))
    core.connection_opened(v2=True)
    core.receive(chunk("session_ready", None, last_seq=7, turn_running=False))
    core.receive(chunk("resync_required", None, reason="frames_dropped_while_detached"))
    # Frames 4..7 are gone for good (announced once): asking for them again would only get
    # the same resync and the same notice at every reconnect.
    assert core.connection_opened(v2=True).send == ({"type": "resume", "last_seq": 7},)


def test_a_session_ready_behind_our_seq_means_the_gateway_lost_state() -> None:
    core = connected()
    core.receive(chunk("assistant_message", 9, token="x", is_final=False))
    core.connection_opened(v2=True)
    text = core.receive(chunk("session_ready", None, last_seq=1, turn_running=False)).text
    assert "some output may be missing" in text and core.last_seq == 1
    assert "new" in core.receive(chunk("assistant_message", 2, token="new")).text


def test_a_gateway_without_resume_refusing_the_frame_is_a_notice_not_an_error() -> None:
    core = connected()
    core.connection_opened(v2=True)
    refused = chunk("error", 4, code="unsupported_type", error="Unsupported type", is_final=False)
    text = core.receive(refused).text
    assert "cannot resume" in text and "error>" not in text and text.endswith("you> ")
    assert "error>" in core.receive({**refused, "seq": 5}).text  # later ones are real errors


def test_v1_gateways_end_turns_with_is_final() -> None:
    core = ChatCore("s1")
    core.connection_opened(v2=False)
    core.user_line("hi")
    assert core.busy
    text = core.receive(chunk("assistant_message", 1, token="hey", is_final=True)).text
    assert not core.busy and text.endswith("you> ")


def test_unknown_frames_are_shown_and_quiet_frames_are_not() -> None:
    core = connected()
    assert (
        "[plan_created] step one" in core.receive(chunk("plan_created", 1, content="step one")).text
    )
    assert core.receive(chunk("heartbeat", 2)).text == ""
    assert core.receive(chunk("pong", None, id=1)).text == ""
    assert "non-JSON" in core.receive_text("{nope").text


def test_escape_sequences_from_the_server_never_reach_the_terminal() -> None:
    core = connected()
    text = core.receive(chunk("assistant_message", 1, token="\x1b]0;pwned\x07ok\x1b[2J")).text
    assert "\x1b" not in text and "\x07" not in text and "ok" in text


def test_colour_only_when_asked() -> None:
    plain = connected()
    assert "\x1b[" not in plain.receive(chunk("error", 1, error="x")).text
    coloured = connected(color=True)
    assert "\x1b[1;31merror> x\x1b[0m" in coloured.receive(chunk("error", 1, error="x")).text


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_want_color_follows_the_terminal_plain_and_no_color() -> None:
    assert want_color(FakeTty(), plain=False, environ={})
    assert not want_color(io.StringIO(), plain=False, environ={})
    assert not want_color(FakeTty(), plain=True, environ={})
    assert not want_color(FakeTty(), plain=False, environ={"NO_COLOR": "1"})


def test_session_urls_are_built_from_a_base_or_taken_from_a_full_url() -> None:
    assert build_ws_url("ws://h:1", "abc") == ("ws://h:1/api/v1/ws/abc", "abc")
    assert build_ws_url("ws://h:1/", "a b") == ("ws://h:1/api/v1/ws/a%20b", "a b")
    assert build_ws_url("wss://h/proxy/api/v1/ws", "x") == ("wss://h/proxy/api/v1/ws/x", "x")
    assert build_ws_url("ws://h:1/api/v1/ws/mine", None) == ("ws://h:1/api/v1/ws/mine", "mine")
    # No id: the base itself (the session is created over REST, then named).
    assert build_ws_url("ws://h:1", None) == ("ws://h:1", None)
    assert build_ws_url("wss://h/gw/api/v1/ws/", None) == ("wss://h/gw", None)
    assert session_ws_url("wss://h/gw", "a/b") == "wss://h/gw/api/v1/ws/a%2Fb"
    for bad in ("http://h:1", "h:1", "ws://"):
        with pytest.raises(ValueError):
            build_ws_url(bad, "x")
    with pytest.raises(ValueError):
        build_ws_url("ws://h:1/api/v1/ws/mine", "other")


def test_the_rest_base_is_derived_from_any_form_of_the_websocket_url() -> None:
    assert rest_base_url("ws://h:8000") == "http://h:8000"
    assert rest_base_url("wss://h/gw/") == "https://h/gw"
    assert rest_base_url("wss://h/gw/api/v1/ws/s1?x=1") == "https://h/gw"
    assert rest_base_url("ws://h:1/api/v1/ws") == "http://h:1"
    assert sessions_url("wss://h/gw") == "https://h/gw/api/v1/sessions"
    assert sessions_url("ws://h:1/api/v1/ws/x", "a b") == "http://h:1/api/v1/sessions/a%20b"


def test_backoff_doubles_from_a_fifth_of_a_second_to_five_seconds() -> None:
    assert [backoff_delay(n) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


# ------------------------------------------------------------------------------------------------
# The command in a pseudo-terminal
# ------------------------------------------------------------------------------------------------

DEADLINE = 30  # a guard against a hung client, never a performance assertion


@dataclass
class Terminal:
    """The master side of a pty whose slave is a ``trio-gateway chat`` process's terminal."""

    process: trio.Process
    stream: trio.lowlevel.FdStream
    output: str = ""
    eof: bool = False
    _pos: int = 0
    _changed: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    async def pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # Linux answers EIO once the child has closed the terminal
            # The terminal turns "\n" into "\r\n": compare text as the user reads it.
            self.output += decoder.decode(data, final=not data).replace("\r", "")
            self._changed.unpark_all()
            if not data:
                self.eof = True
                return

    async def expect(self, pattern: str) -> re.Match[str]:
        """The next match of ``pattern`` in the output after the previous match."""
        regex = re.compile(pattern)
        with trio.move_on_after(DEADLINE):
            while True:
                match = regex.search(self.output, self._pos)
                if match is not None:
                    self._pos = match.end()
                    return match
                if self.eof:
                    break
                await self._changed.park()
        raise AssertionError(f"no {pattern!r} in the chat's output:\n{self.output}")

    async def type(self, text: str) -> None:
        await self.stream.send_all(text.encode())

    async def ask(self, line: str) -> None:
        """At the next prompt, type ``line`` and Enter."""
        await self.expect("you> ")
        await self.type(line + "\n")

    async def exit_code(self) -> int:
        with trio.fail_after(DEADLINE):
            return await self.process.wait()


@asynccontextmanager
async def chat(*args: str, cwd: Path, env: dict[str, str] | None = None) -> AsyncIterator[Terminal]:
    """``trio-gateway chat ARGS --plain`` on a fresh pty, killed at the end if still running."""
    master, slave = pty.openpty()
    async with trio.lowlevel.FdStream(master) as stream, AsyncExitStack() as stack:
        try:
            child = await stack.enter_async_context(
                started(
                    cli_command("chat", *args, "--plain"),
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=cwd,
                    env=cli_env(env),
                    stop_signal=signal.SIGKILL,
                )
            )
        finally:
            os.close(slave)  # the child has its own copy: EOF on the master when it exits
        terminal = Terminal(child.process, stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminal.pump)
            try:
                yield terminal
            finally:
                await child.stop(signal.SIGKILL)  # a chat still running; then the pump
                nursery.cancel_scope.cancel()


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


# ------------------------------------------------------------------------------------------------
# Reconnect and resume, against a fake v2 gateway that drops connections on purpose
# ------------------------------------------------------------------------------------------------

Script = Callable[["FakeConnection"], Awaitable[None]]


@dataclass
class FakeConnection:
    ws: trio_websocket.WebSocketConnection
    received: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, type_: str, seq: int | None = None, **fields: Any) -> None:
        await self.ws.send_message(json.dumps(chunk(type_, seq, **fields)))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(DEADLINE):
            frame = json.loads(await self.ws.get_message())
        assert isinstance(frame, dict)
        self.received.append(frame)
        return frame

    async def drop(self) -> None:
        # An abrupt TCP close without a close frame: what a crash or a network cut looks like.
        await self.ws._close_stream()

    async def until_closed(self) -> None:
        try:
            while True:
                await self.recv()
        except trio_websocket.ConnectionClosed:
            pass


@dataclass
class FakeGateway:
    """A trio-websocket server speaking v2; connection N runs ``scripts[N]``."""

    scripts: list[Script]
    connections: list[FakeConnection] = field(default_factory=list)
    port: int = 0

    @property
    def ws_url(self) -> str:
        """The URL a chat is given: session ``fake`` on this server."""
        return f"ws://127.0.0.1:{self.port}/api/v1/ws/fake"

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="codelab.v2")
        connection = FakeConnection(ws)
        index = len(self.connections)
        self.connections.append(connection)
        await self.scripts[index](connection)


@asynccontextmanager
async def fake_gateway(*scripts: Script) -> AsyncIterator[FakeGateway]:
    fake = FakeGateway(list(scripts))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                fake.handle,
                "127.0.0.1",
                0,
                None,
                handler_nursery=nursery,
            )
        )
        fake.port = server.port
        yield fake
        nursery.cancel_scope.cancel()


def ready(last_seq: int, *, turn_running: bool = False) -> dict[str, Any]:
    return {
        "session_id": "fake",
        "protocol": "codelab.v2",
        "turn_running": turn_running,
        "reattached": turn_running,
        "heartbeat_interval": 20.0,
        "max_message_bytes": 4194304,
        "last_seq": last_seq,
    }


async def first_turn_then(connection: FakeConnection, end: Callable[[], Awaitable[None]]) -> None:
    await connection.send("session_ready", **ready(0))
    await connection.recv()  # the user's message
    await connection.send("turn_started", 1, turn_id=1, message_type="user_message")
    await connection.send("assistant_message", 2, token="alpha ", is_final=False)
    await connection.send("assistant_message", 3, token="bravo ", is_final=False)
    await end()


async def test_a_dropped_connection_is_resumed_without_repeating_output(tmp_path: Path) -> None:
    async def dropped_mid_turn(connection: FakeConnection) -> None:
        await first_turn_then(connection, connection.drop)

    async def resumed(connection: FakeConnection) -> None:
        await connection.recv()  # the resume frame, checked below
        await connection.send("session_ready", **ready(5, turn_running=True))
        # The replay overlaps what the client already showed: it must skip seq 2 and 3.
        await connection.send("assistant_message", 2, token="alpha ", is_final=False)
        await connection.send("assistant_message", 3, token="bravo ", is_final=False)
        await connection.send("assistant_message", 4, token="charlie ", is_final=False)
        await connection.send("assistant_message", 5, token="delta ", is_final=False)
        await connection.send("resumed", from_seq=4)
        await connection.send("assistant_message", 6, token="echo", is_final=True)
        await connection.send("turn_finished", 7, turn_id=1, status="completed")
        await connection.until_closed()

    async with (
        fake_gateway(dropped_mid_turn, resumed) as fake,
        chat(fake.ws_url, cwd=tmp_path) as terminal,
    ):
        await terminal.ask("tell me")
        await terminal.expect(r"assistant> alpha bravo \n")
        await terminal.expect(r"connection lost \(close 1006\); reconnecting in 0\.2 s")
        await terminal.expect(r"\[session\] reconnected; resuming after seq 3\n")
        await terminal.expect(r"assistant> charlie delta echo\nyou> ")
        await terminal.type("/quit\n")
        assert await terminal.exit_code() == 0
    assert terminal.output.count("alpha") == 1 and terminal.output.count("bravo") == 1
    first, second = fake.connections
    assert first.received == [{"type": "user_message", "content": "tell me", "role": "user"}]
    assert second.received[0] == {"type": "resume", "last_seq": 3}


async def test_a_restarting_gateway_is_rejoined_and_lost_output_is_announced(
    tmp_path: Path,
) -> None:
    async def restarting(connection: FakeConnection) -> None:
        await first_turn_then(connection, partial(connection.ws.aclose, 1012, "restarting"))

    async def resync(connection: FakeConnection) -> None:
        await connection.recv()
        await connection.send("session_ready", **ready(9, turn_running=True))
        await connection.send("resync_required", reason="frames_dropped_while_detached")
        await connection.send("assistant_message", 10, token="omega", is_final=True)
        await connection.send("turn_finished", 11, turn_id=1, status="completed")
        await connection.until_closed()

    async with (
        fake_gateway(restarting, resync) as fake,
        chat(fake.ws_url, cwd=tmp_path) as terminal,
    ):
        await terminal.ask("tell me")
        await terminal.expect(r"the gateway is restarting \[close 1012\]\); reconnecting")
        await terminal.expect(r"some output may be missing \(frames_dropped_while_detached\)")
        await terminal.expect(r"assistant> omega\nyou> ")
        terminal.process.send_signal(signal.SIGINT)
        assert await terminal.exit_code() == 0
    assert fake.connections[1].received[0] == {"type": "resume", "last_seq": 3}


async def test_each_loss_is_announced_once_and_the_prompt_comes_back(tmp_path: Path) -> None:
    async def idle_then_dropped(connection: FakeConnection) -> None:
        async def finish_then_drop() -> None:
            await connection.send("assistant_message", 4, token="charlie", is_final=True)
            await connection.send("turn_finished", 5, turn_id=1, status="completed")
            await connection.drop()  # the client reads the frames before the drop

        await first_turn_then(connection, finish_then_drop)

    async def restarted(connection: FakeConnection) -> None:
        # What today's gateway does after a restart: a fresh session (seq 0) that cannot
        # replay what the client saw, so it greets behind the client and refuses its resume.
        await connection.recv()
        await connection.send("session_ready", **ready(0))
        await connection.send("resync_required", reason="unknown_seq")
        await connection.drop()

    async def frames_dropped(connection: FakeConnection) -> None:
        await connection.recv()
        await connection.send("session_ready", **ready(7))
        await connection.send("resync_required", reason="frames_dropped_while_detached")
        await connection.drop()

    async def resumes_exactly_from_seven(connection: FakeConnection) -> None:
        resume = await connection.recv()
        await connection.send("session_ready", **ready(7))
        if resume == {"type": "resume", "last_seq": 7}:
            await connection.send("resumed", from_seq=8, replayed=0)
        else:  # frames 1..7 are not held any more: the same loss again
            await connection.send("resync_required", reason="frames_dropped_while_detached")
        await connection.until_closed()

    scripts = (idle_then_dropped, restarted, frames_dropped, resumes_exactly_from_seven)
    async with fake_gateway(*scripts) as fake, chat(fake.ws_url, cwd=tmp_path) as terminal:
        await terminal.ask("tell me")
        await terminal.expect(r"charlie\n(?:.*\n)?you> ")  # (maybe: no pending approvals)
        await terminal.expect(r"reconnecting in 0\.2 s \(attempt 1/10\)\n")
        await terminal.expect(r"resuming after seq 5\n")
        await terminal.expect(r"some output may be missing \(the gateway lost the session's")
        await terminal.expect(r"/history\nyou> ")  # the prompt again, after the notice
        await terminal.expect(r"resuming after seq 0\n")
        await terminal.expect(r"some output may be missing \(frames_dropped_while_detached")
        await terminal.expect(r"/history\nyou> ")
        await terminal.expect(r"resuming after seq 7\nyou> ")
        await terminal.type("/quit\n")
        assert await terminal.exit_code() == 0
    assert terminal.output.count("some output may be missing") == 2, terminal.output
    assert fake.connections[3].received[0] == {"type": "resume", "last_seq": 7}


async def test_a_final_close_code_ends_the_chat_without_reconnecting(tmp_path: Path) -> None:
    async def replaced(connection: FakeConnection) -> None:
        await connection.send("session_ready", **ready(0))
        await connection.ws.aclose(4409, "replaced by a newer connection")

    async with fake_gateway(replaced) as fake, chat(fake.ws_url, cwd=tmp_path) as terminal:
        await terminal.expect(r"another connection to this session replaced this one")
        await terminal.expect(r"\[close 4409\]")
        assert await terminal.exit_code() == 1
    assert len(fake.connections) == 1


async def test_reconnecting_gives_up_after_the_allowed_attempts(tmp_path: Path) -> None:
    async def then_dropped(connection: FakeConnection) -> None:
        await connection.send("session_ready", **ready(0))
        await connection.drop()

    async def dies_at_once(connection: FakeConnection) -> None:
        await connection.drop()  # opens, says nothing: a failed attempt

    async with (
        fake_gateway(then_dropped, dies_at_once, dies_at_once) as fake,
        chat(fake.ws_url, "--reconnect-attempts", "2", cwd=tmp_path) as terminal,
    ):
        await terminal.expect(r"reconnecting in 0\.2 s \(attempt 1/2\)")
        await terminal.expect(r"reconnecting in 0\.4 s \(attempt 2/2\)")
        await terminal.expect(r"close 1006; giving up after 2 attempts")
        assert await terminal.exit_code() == 1
    assert len(fake.connections) == 3


class CuttableProxy:
    """A TCP relay in front of the gateway whose connections can be cut at once: the chat
    sees its connection drop without a close frame (a network blink)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._scopes: list[trio.CancelScope] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            with trio.CancelScope() as scope:
                self._scopes.append(scope)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._copy, client, server)
                    nursery.start_soon(self._copy, server, client)

    @staticmethod
    async def _copy(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()


async def test_the_chat_resumes_a_dropped_connection_against_the_real_gateway_exactly(
    nursery: trio.Nursery,
    gateway: RunningGateway,
    demo_runtime: tuple[DemoRuntime, str],
    tmp_path: Path,
) -> None:
    proxy = CuttableProxy(int(gateway.base_url.rsplit(":", 1)[1]))
    await nursery.start(proxy.serve)
    async with chat(f"ws://127.0.0.1:{proxy.port}", "--session", "chat-resume", cwd=tmp_path) as t:
        await t.ask("bench 400 200")  # paced: two seconds of streaming
        for cut in range(3):
            await t.expect(rf"t{100 * (cut + 1)} ")
            proxy.cut()
        await t.expect(r"t399 ")
        await t.type("/quit\n")
        assert await t.exit_code() == 0
    tokens = [int(n) for n in re.findall(r"\bt(\d+) ", t.output)]
    assert tokens == list(range(400)), "every token once, in order, through three drops"
    assert proxy.accepted >= 4
    assert demo_runtime[0].completed_streams == 1
