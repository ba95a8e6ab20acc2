"""Frames as the real clients and runtime send them (docs/compatibility.md), shared by the tests."""

from __future__ import annotations

from typing import Any

# The Flutter IDE sends every field of its model in every frame, nulls included (15 keys).
IDE_FIELDS = (
    "type", "content", "role", "is_final", "call_id", "tool_name", "arguments",
    "requires_approval", "result", "error", "agent_type", "from_agent", "to_agent", "reason",
    "metadata",
)  # fmt: skip

# Today's runtime sends every chunk field, nulls included.
CHUNK_FIELDS = (
    "type", "content", "token", "is_final", "call_id", "tool_name", "arguments",
    "requires_approval", "error", "metadata",
)  # fmt: skip


def ide_frame(content: str, **fields: Any) -> dict[str, Any]:
    """A ``user_message`` exactly as the IDE sends it."""
    frame: dict[str, Any] = dict.fromkeys(IDE_FIELDS)
    frame.update(type="user_message", content=content, role="user", **fields)
    return frame
