"""Inbound frame validation: what is accepted, what is refused, and how refusals read."""

from __future__ import annotations

import orjson
import pytest

from trio_gateway.protocol import (
    ErrorCode,
    FrameError,
    error_frame,
    parse_client_frame,
    valid_session_id,
)

from ..support.frames import ide_frame

IDE_FRAME = ide_frame("Create a widget")


def refusal(text: str) -> FrameError:
    with pytest.raises(FrameError) as caught:
        parse_client_frame(text)
    return caught.value


def test_the_ides_fifteen_keys_with_nulls_are_accepted_and_returned_unchanged() -> None:
    assert parse_client_frame(orjson.dumps(IDE_FRAME).decode()) == IDE_FRAME


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "user_message", "content": "hi", "role": "user"},
        {"type": "user_message", "content": "hi", "agent_type": "coder", "x": [1]},
        {"type": "tool_result", "call_id": "call_1", "result": {"ok": True}},
        {"type": "tool_result", "call_id": "call_1", "error": "User rejected"},
        {"type": "switch_agent", "agent_type": "coder", "content": "Implement it"},
        {
            "type": "hitl_decision",
            "call_id": "c",
            "decision": "edit",
            "modified_arguments": {"a": 1},
            "feedback": "f",
        },
        {"type": "cancel"},
        {"type": "ping", "id": 7},
    ],
)
def test_every_documented_frame_is_accepted(frame: dict[str, object]) -> None:
    assert parse_client_frame(orjson.dumps(frame).decode()) == frame


def test_invalid_json() -> None:
    assert refusal("{nope").code is ErrorCode.INVALID_JSON


@pytest.mark.parametrize("text", ["[1,2]", '"text"', "42", "null", "true"])
def test_a_json_value_that_is_not_an_object(text: str) -> None:
    error = refusal(text)
    assert error.code is ErrorCode.INVALID_MESSAGE
    assert "JSON object" in error.message


def test_missing_type() -> None:
    assert refusal('{"content": "hi"}').code is ErrorCode.INVALID_MESSAGE


def test_unknown_type_names_the_supported_ones() -> None:
    error = refusal('{"type": "launch_rockets"}')
    assert error.code is ErrorCode.UNSUPPORTED_TYPE
    assert "user_message" in error.message


def test_unknown_type_is_not_echoed_when_it_is_huge_or_unprintable() -> None:
    error = refusal(orjson.dumps({"type": "x" * 500}).decode())
    assert "x" * 50 not in error.message


@pytest.mark.parametrize(
    ("frame", "hint"),
    [
        ({"type": "tool_result"}, "'call_id' is required"),
        ({"type": "tool_result", "call_id": ""}, "'call_id'"),
        ({"type": "user_message", "content": 5}, "'content' must be of type string"),
        ({"type": "user_message", "content": "x", "role": "wizard"}, "'role' must be one of"),
        ({"type": "hitl_decision", "call_id": "c", "decision": "maybe"}, "'decision'"),
        ({"type": "switch_agent"}, "'agent_type' is required"),
    ],
)
def test_schema_violations_are_explained_without_a_validation_dump(
    frame: dict[str, object], hint: str
) -> None:
    error = refusal(orjson.dumps(frame).decode())
    assert error.code is ErrorCode.INVALID_MESSAGE
    assert hint in error.message
    assert "pydantic" not in error.message and "input_value" not in error.message


def test_secret_looking_content_is_never_echoed_in_a_refusal() -> None:
    error = refusal(
        orjson.dumps({"type": "user_message", "content": 1, "role": "sk-SECRET"}).decode()
    )
    assert "sk-SECRET" not in error.message


def test_error_frames_have_one_shape() -> None:
    frame = error_frame(ErrorCode.BUSY, "wait", is_final=False)
    assert frame == {
        "type": "error",
        "code": "busy",
        "error": "wait",
        "content": "wait",
        "is_final": False,
    }


@pytest.mark.parametrize(
    ("session_id", "ok"),
    [
        ("abc", True),
        ("a b-c_d.e:f", True),
        ("x" * 256, True),
        ("", False),
        ("x" * 257, False),
        ("a/b", False),
        ("a\x00b", False),
        ("a\nb", False),
        ("tab\t", False),
        ("ünï", True),
    ],
)
def test_session_id_rules(session_id: str, ok: bool) -> None:
    assert valid_session_id(session_id) is ok
