"""The approval requests of one session and the answers already forwarded (sans-IO).

A human-approval request (a ``tool_call`` with ``requires_approval``) waits for the client's
``hitl_decision``; a client that resyncs after a gap gets the unanswered ones again. Every
``tool_result`` / ``hitl_decision`` forwarded to the runtime is remembered by ``call_id`` so a
second answer to the same call (two IDE windows, a retry after a reconnect) is refused
(``already_answered``) instead of reaching the runtime twice. Both are bounded: the oldest
entries go first.
"""

from __future__ import annotations

from typing import Any

# Unanswered approval requests kept for a client that resyncs, and answered call ids
# remembered to refuse a second answer, per session.
MAX_PENDING_APPROVALS = 64
MAX_REMEMBERED_ANSWERS = 1024

Frame = dict[str, Any]


class ApprovalBook:
    """Pending approval requests and forwarded answers of one session, oldest first."""

    # Slots and dicts made on first use: every idle session has one.
    __slots__ = ("_answered", "_pending")

    def __init__(self) -> None:
        self._pending: dict[str, Frame] | None = None  # call_id -> the tool_call frame
        self._answered: dict[tuple[str, str], None] | None = None  # (frame type, call_id)

    def note_request(self, chunk: Frame) -> None:
        """Keep an approval request (a copy: the writer adds ``seq`` to the original) until
        it is answered."""
        call_id = chunk.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            return
        if self._pending is None:
            self._pending = {}
        self._pending[call_id] = dict(chunk)
        if len(self._pending) > MAX_PENDING_APPROVALS:
            del self._pending[next(iter(self._pending))]

    def already_answered(self, kind: str, call_id: str) -> bool:
        """Whether a ``kind`` answer for ``call_id`` already went to the runtime."""
        return self._answered is not None and (kind, call_id) in self._answered

    def record_answer(self, kind: str, call_id: str) -> None:
        """A ``kind`` answer for ``call_id`` was forwarded: remember it, and the request it
        answers is no longer pending."""
        if self._answered is None:
            self._answered = {}
        self._answered[(kind, call_id)] = None
        if len(self._answered) > MAX_REMEMBERED_ANSWERS:
            del self._answered[next(iter(self._answered))]
        if self._pending is not None:
            self._pending.pop(call_id, None)

    def pending(self) -> list[Frame]:
        """Copies of the unanswered requests, oldest first."""
        return [dict(request) for request in (self._pending or {}).values()]
