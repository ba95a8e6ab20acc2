"""The approval book: what a resyncing client is asked again, what a second answer meets."""

from __future__ import annotations

from trio_gateway.session.approvals import (
    MAX_PENDING_APPROVALS,
    MAX_REMEMBERED_ANSWERS,
    ApprovalBook,
)


def request(call_id: str) -> dict[str, object]:
    return {"type": "tool_call", "call_id": call_id, "requires_approval": True}


def test_an_unanswered_request_is_pending_until_answered() -> None:
    book = ApprovalBook()
    book.note_request(request("a"))
    book.note_request(request("b"))
    assert [r["call_id"] for r in book.pending()] == ["a", "b"]
    book.record_answer("hitl_decision", "a")
    assert [r["call_id"] for r in book.pending()] == ["b"]


def test_pending_requests_are_copies() -> None:
    book = ApprovalBook()
    original = request("a")
    book.note_request(original)
    original["seq"] = 7  # the writer numbers the frame it sent
    book.pending()[0]["seq"] = 8
    assert "seq" not in book.pending()[0]


def test_a_request_without_a_usable_call_id_is_not_kept() -> None:
    book = ApprovalBook()
    book.note_request({"type": "tool_call"})
    book.note_request({"type": "tool_call", "call_id": ""})
    book.note_request({"type": "tool_call", "call_id": 5})
    assert book.pending() == []


def test_an_answer_is_remembered_per_kind_and_call() -> None:
    book = ApprovalBook()
    assert not book.already_answered("tool_result", "c1")
    book.record_answer("tool_result", "c1")
    assert book.already_answered("tool_result", "c1")
    assert not book.already_answered("hitl_decision", "c1")
    assert not book.already_answered("tool_result", "c2")


def test_both_records_are_bounded_oldest_first() -> None:
    book = ApprovalBook()
    for index in range(MAX_PENDING_APPROVALS + 1):
        book.note_request(request(f"p{index}"))
    pending = [r["call_id"] for r in book.pending()]
    assert len(pending) == MAX_PENDING_APPROVALS and pending[0] == "p1"
    for index in range(MAX_REMEMBERED_ANSWERS + 1):
        book.record_answer("tool_result", f"a{index}")
    assert not book.already_answered("tool_result", "a0")
    assert book.already_answered("tool_result", f"a{MAX_REMEMBERED_ANSWERS}")
