"""``trio-gateway chat``, the sans-IO core frame by frame, without sockets: streaming, agent
switches, errors, tool-call approvals, Ctrl-C and end of input, seq bookkeeping across reconnects
and resyncs, escaping of server text, colour, and the URL and backoff helpers.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

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

from .chat_support import (
    chunk,
    private_issuer_file,  # noqa: F401 - autouse fixture
)

# ------------------------------------------------------------------------------------------------
# The core, without sockets
# ------------------------------------------------------------------------------------------------


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
