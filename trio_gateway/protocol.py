"""The client-facing WebSocket protocol: inbound frame validation and outbound frame shapes.

Inbound frames are validated with pydantic but forwarded to the runtime *as the client sent
them* (every extra and null key preserved: the IDE sends 15 keys per frame, nulls included), so
the models only check what the gateway relies on and allow everything else.

See ``docs/protocol.md`` for the whole protocol, v1 and v2.
"""

from __future__ import annotations

import json
import re
from enum import IntEnum, StrEnum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SUBPROTOCOL_V2 = "codelab.v2"
# A session's WebSocket is WS_PATH/{session_id} (behind any path prefix of a reverse proxy).
WS_PATH = "/api/v1/ws"
# Frame types only protocol v2 clients receive (today's IDE renders unknown types as chat text).
V2_ONLY_TYPES: frozenset[str] = frozenset(
    {
        "session_ready", "turn_started", "turn_finished", "cancel_ack", "pong", "heartbeat",
        "resync_required", "auth_ok", "resumed",
    }
)  # fmt: skip
# Frames about the connection itself rather than the session's conversation: they carry no
# ``seq``, are not kept for replay and are never replayed to a later connection.
CONNECTION_FRAME_TYPES: frozenset[str] = frozenset(
    {"session_ready", "resumed", "resync_required", "heartbeat", "pong", "auth_ok"}
)
SESSION_ID_MAX_LENGTH = 256
# Deepest nesting of arrays/objects accepted in a client frame. orjson reads up to 1024 levels
# but writes at most 254, and a runtime-bound frame is written again (wrapped one level
# deeper) on its way to the runtime: without this bound a deep but parseable frame failed its
# turn with internal_error instead of being refused (found by tests/hostile/test_fuzz.py).
MAX_FRAME_DEPTH = 128
# orjson reads integers beyond 64 bits as floats: the frame would reach the runtime changed
# (18446744073709551616 -> 1.8446744073709552e+19). Frames with such integers are refused.
_LONG_DIGITS = re.compile(r"\d{19,}")


class ErrorCode(StrEnum):
    """Machine-readable ``code`` of every error frame the gateway itself sends."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNSUPPORTED_TYPE = "unsupported_type"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    BUSY = "busy"
    RUNTIME_UNAVAILABLE = "runtime_unavailable"
    RUNTIME_ERROR = "runtime_error"
    RUNTIME_TIMEOUT = "runtime_timeout"
    RUNTIME_STREAM_BROKEN = "runtime_stream_broken"
    CANCELLED = "cancelled"
    INTERNAL_ERROR = "internal_error"
    RATE_LIMITED = "rate_limited"
    INVALID_TOKEN = "invalid_token"
    ALREADY_ANSWERED = "already_answered"
    OUTPUT_DROPPED = "output_dropped"


class CloseCode(IntEnum):
    """WebSocket close codes the gateway uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    SESSION_REPLACED = 4409
    RATE_LIMITED = 4429


class TurnStatus(StrEnum):
    """``status`` of a v2 ``turn_finished`` frame."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


# --- inbound frames ---------------------------------------------------------------------------


class _ClientFrame(BaseModel):
    # extra="allow": the IDE sends every field of its model in every frame; a strict model
    # would break it. We validate what we depend on and forward the original object.
    model_config = ConfigDict(extra="allow", strict=True)


class UserMessage(_ClientFrame):
    type: Literal["user_message"]
    content: str = Field(max_length=4 * 1024 * 1024)
    role: Literal["user", "assistant", "system", "tool"] | None = None
    agent_type: str | None = Field(None, min_length=1, max_length=64)


class ToolResult(_ClientFrame):
    type: Literal["tool_result"]
    call_id: str = Field(min_length=1, max_length=256)
    result: Any = None
    error: str | None = None


class SwitchAgent(_ClientFrame):
    type: Literal["switch_agent"]
    agent_type: str = Field(min_length=1, max_length=64)
    content: str | None = None
    reason: str | None = None


class HitlDecision(_ClientFrame):
    type: Literal["hitl_decision"]
    call_id: str = Field(min_length=1, max_length=256)
    decision: Literal["approve", "edit", "reject"]
    modified_arguments: dict[str, Any] | None = None
    feedback: str | None = None


class Cancel(_ClientFrame):
    type: Literal["cancel"]


class Ping(_ClientFrame):
    type: Literal["ping"]


class Auth(_ClientFrame):
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=16 * 1024)


class Resume(_ClientFrame):
    type: Literal["resume"]
    last_seq: int = Field(ge=0, le=2**53)


RUNTIME_BOUND_TYPES: frozenset[str] = frozenset(
    {"user_message", "tool_result", "switch_agent", "hitl_decision"}
)
_MODELS: dict[str, TypeAdapter[Any]] = {
    "user_message": TypeAdapter(UserMessage),
    "tool_result": TypeAdapter(ToolResult),
    "switch_agent": TypeAdapter(SwitchAgent),
    "hitl_decision": TypeAdapter(HitlDecision),
    "cancel": TypeAdapter(Cancel),
    "ping": TypeAdapter(Ping),
    "auth": TypeAdapter(Auth),
    "resume": TypeAdapter(Resume),
}
# Answers to a tool call: each may reach the runtime once per call_id.
ANSWER_TYPES: frozenset[str] = frozenset({"tool_result", "hitl_decision"})
SUPPORTED_TYPES: tuple[str, ...] = tuple(_MODELS)


class FrameError(Exception):
    """An inbound frame the gateway refuses; becomes exactly one error frame to the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_client_frame(text: str) -> dict[str, Any]:
    """Parse and validate one inbound text frame; return the client's object unchanged.

    Raises :class:`FrameError` with a short human-readable explanation (never a raw
    validation dump, never the frame's content) when the frame is refused.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError(ErrorCode.INVALID_JSON, "Frame is not valid JSON") from None
    if not isinstance(value, dict):
        raise FrameError(
            ErrorCode.INVALID_MESSAGE,
            f"Frame must be a JSON object, got {_json_kind(value)}",
        )
    if _depth_exceeds(value, MAX_FRAME_DEPTH):
        raise FrameError(
            ErrorCode.INVALID_MESSAGE,
            f"Frame is nested too deeply (at most {MAX_FRAME_DEPTH} levels)",
        )
    if _LONG_DIGITS.search(text) is not None and _has_wide_integer(text):
        raise FrameError(
            ErrorCode.INVALID_MESSAGE, "Integers must fit in 64 bits; send larger ones as strings"
        )
    frame_type = value.get("type")
    if frame_type is None:
        raise FrameError(ErrorCode.INVALID_MESSAGE, "Frame has no 'type' field")
    if not isinstance(frame_type, str):
        raise FrameError(ErrorCode.INVALID_MESSAGE, "Field 'type' must be a string")
    adapter = _MODELS.get(frame_type)
    if adapter is None:
        shown = frame_type if len(frame_type) <= 40 and frame_type.isprintable() else "?"
        raise FrameError(
            ErrorCode.UNSUPPORTED_TYPE,
            f"Unsupported frame type '{shown}'; expected one of: {', '.join(SUPPORTED_TYPES)}",
        )
    try:
        adapter.validate_python(value)
    except ValidationError as error:
        raise FrameError(
            ErrorCode.INVALID_MESSAGE, summarize_validation_error(frame_type, error)
        ) from None
    return value


def _has_wide_integer(text: str) -> bool:
    """Whether an integer literal of ``text`` (valid JSON) lies outside orjson's 64-bit range.

    Only called when ``text`` has a run of 19+ digits, so the slower stdlib parser (the one
    that keeps integer literals apart from floats) runs on rare frames only.
    """
    wide = False

    def check(literal: str) -> int:
        nonlocal wide
        if not -(2**63) <= int(literal) < 2**64:
            wide = True
        return 0

    try:
        json.loads(text, parse_int=check)
    except (ValueError, RecursionError):
        return False
    return wide


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether arrays/objects in ``value`` nest deeper than ``limit`` (iterative: no recursion
    on hostile input)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend(
                (child, depth + 1) for child in item.values() if isinstance(child, dict | list)
            )
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, dict | list))
    return False


def summarize_validation_error(frame_type: str, error: ValidationError) -> str:
    """A one-line, human explanation of a schema violation that never echoes input values."""
    problems = []
    for item in error.errors()[:3]:
        field = ".".join(str(part) for part in item["loc"]) or "frame"
        kind = item["type"]
        if kind == "missing":
            problems.append(f"'{field}' is required")
        elif kind == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            problems.append(f"'{field}' must be one of {expected}")
        elif kind in ("string_too_short", "string_too_long"):
            problems.append(f"'{field}' has an invalid length")
        elif kind.endswith("_type"):
            problems.append(f"'{field}' must be of type {kind.removesuffix('_type')}")
        else:
            problems.append(f"'{field}' is invalid")
    more = len(error.errors()) - len(problems)
    suffix = f" (and {more} more)" if more > 0 else ""
    return f"Invalid {frame_type}: " + "; ".join(problems) + suffix


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


# --- outbound frames --------------------------------------------------------------------------


def error_frame(code: ErrorCode, text: str, *, is_final: bool, **extra: Any) -> dict[str, Any]:
    """The one shape of gateway error frames.

    ``error`` and ``content`` carry the same text because today's clients read one or the other.
    """
    frame: dict[str, Any] = {
        "type": "error",
        "code": code.value,
        "error": text,
        "content": text,
        "is_final": is_final,
    }
    frame.update(extra)
    return frame


def valid_session_id(session_id: str) -> bool:
    """Session ids: 1..256 characters, no control characters, no ``/``, not ``.`` or ``..``
    (URL normalisation would turn ``/sessions/.`` into ``/sessions`` upstream)."""
    if not 0 < len(session_id) <= SESSION_ID_MAX_LENGTH or "/" in session_id:
        return False
    if session_id in (".", ".."):
        return False
    return session_id.isprintable()
