"""The demo runtime's memory: its sessions, their histories and pending tool calls, the audit
log and the counters, every one of them bounded.

Nothing here speaks HTTP or streams: ``agent.py`` plays the turns against this state and
``app.py`` serves it. The bounds are module constants so that a test can lower them.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import trio

__all__ = [
    "AGENTS",
    "ApiError",
    "DemoRuntimeConfig",
    "PendingCall",
    "RuntimeState",
    "Session",
]

MAX_HISTORY_MESSAGES: Final = 500
MAX_AUDIT_EVENTS: Final = 1000
MAX_RECORDED_REQUESTS: Final = 1000
MAX_PENDING_CALLS: Final = 100
MAX_AGENT_HISTORY: Final = 100
MAX_SESSION_ID_LENGTH: Final = 256

#: The agents this runtime knows, in the shape of ``GET /agents``.
AGENTS: Final[dict[str, dict[str, Any]]] = {
    "orchestrator": {
        "name": "Orchestrator",
        "description": "Routes each request to the agent best suited for it.",
        "allowed_tools": ["switch_mode", "read_file", "list_files"],
        "has_file_restrictions": False,
    },
    "coder": {
        "name": "Coder",
        "description": "Writes and changes code.",
        "allowed_tools": ["read_file", "write_file", "list_files", "search_in_code", "run_command"],
        "has_file_restrictions": False,
    },
    "architect": {
        "name": "Architect",
        "description": "Plans designs and writes design documents (Markdown only).",
        "allowed_tools": ["read_file", "write_file", "list_files"],
        "has_file_restrictions": True,
    },
    "debug": {
        "name": "Debug",
        "description": "Finds the cause of failures and proposes fixes.",
        "allowed_tools": ["read_file", "list_files", "search_in_code", "run_command"],
        "has_file_restrictions": False,
    },
    "ask": {
        "name": "Ask",
        "description": "Answers questions without changing anything.",
        "allowed_tools": ["read_file", "list_files", "search_in_code"],
        "has_file_restrictions": False,
    },
    "universal": {
        "name": "Universal",
        "description": "One agent with every tool, for runtimes without routing.",
        "allowed_tools": [
            "read_file",
            "write_file",
            "list_files",
            "search_in_code",
            "run_command",
        ],
        "has_file_restrictions": False,
    },
}
DEFAULT_AGENT: Final = "orchestrator"


@dataclass(frozen=True)
class DemoRuntimeConfig:
    """Knobs of the demo runtime. The defaults give realistic pacing for interactive demos."""

    internal_api_key: str = "change-me-internal-key"
    token_delay: float = 0.03  # seconds between streamed words (realistic pacing)
    think_delay: float = 0.2  # pause before the first token of a turn
    instant: bool = False  # True: no sleeps at all (benchmarks); still checkpoints
    max_sessions: int = 10_000  # oldest session evicted beyond this
    max_bench_tokens: int = 1_000_000

    def __post_init__(self) -> None:
        # Fail at construction, not with a confusing behaviour later (an empty key would let a
        # request without the header through).
        if not self.internal_api_key:
            raise ValueError("internal_api_key must not be empty")
        if not (self.token_delay >= 0 and self.think_delay >= 0):
            raise ValueError("token_delay and think_delay must be >= 0")
        if self.max_sessions < 1 or self.max_bench_tokens < 1:
            raise ValueError("max_sessions and max_bench_tokens must be >= 1")


class ApiError(Exception):
    """An error answered as plain HTTP ``{"detail": ...}`` (raised by handlers and validators)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def now_iso() -> str:
    """The wall-clock time as the runtime writes it (ISO 8601, UTC)."""
    return datetime.now(UTC).isoformat()


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summarise(value: Any, limit: int = 500) -> str:
    """A bounded text form of a client-supplied JSON value, for history and audit entries."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return shorten(text, limit)


@dataclass
class PendingCall:
    """A tool call the runtime sent and waits on (``tool_result`` or ``hitl_decision``)."""

    call_id: str
    tool_name: str
    arguments: dict[str, Any]
    requires_approval: bool
    request_id: str
    created_at: str


@dataclass
class Session:
    """One runtime session: its agent, history, pending calls and turn lock."""

    id: str
    created_at: str
    last_activity: str
    title: str | None = None
    is_active: bool = True
    current_agent: str = DEFAULT_AGENT
    messages: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=MAX_HISTORY_MESSAGES)
    )
    agent_history: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=MAX_AGENT_HISTORY)
    )
    switch_count: int = 0
    pending: OrderedDict[str, PendingCall] = field(default_factory=OrderedDict)
    # One turn at a time per session (docs/compatibility.md §1.1): concurrent streams queue
    # here, FIFO.
    lock: trio.Lock = field(default_factory=trio.Lock)
    open_streams: int = 0  # streams holding or waiting for the lock: never evicted while > 0
    stats: Counter[str] = field(default_factory=Counter)


class RuntimeState:
    """Every session of one runtime (least recently active first), its audit log and counters.

    ``stream_requests`` / ``stream_headers`` / ``rest_headers`` record what reached the runtime
    (see :class:`~.app.DemoRuntime`).
    """

    def __init__(self, config: DemoRuntimeConfig) -> None:
        """Empty state for a runtime configured by ``config``."""
        self.config = config
        # Ordered by last activity: the first entry is the next to evict.
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.audit: deque[dict[str, Any]] = deque(maxlen=MAX_AUDIT_EVENTS)
        self.event_seq = 0
        self.events_by_type: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.started_at = time.monotonic()
        self.stream_requests: list[dict[str, Any]] = []
        self.stream_headers: list[dict[str, str]] = []
        self.rest_headers: deque[list[tuple[str, str]]] = deque(maxlen=MAX_RECORDED_REQUESTS)

    def remember_stream_request(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        """Record an accepted turn request (its body and headers), keeping the last few."""
        self.stream_requests.append(body)
        self.stream_headers.append(headers)
        for recorded in (self.stream_requests, self.stream_headers):
            if len(recorded) > MAX_RECORDED_REQUESTS:
                del recorded[: len(recorded) - MAX_RECORDED_REQUESTS]

    def uptime(self) -> float:
        """Seconds since the runtime started, rounded for the metrics routes."""
        return round(time.monotonic() - self.started_at, 3)

    def record(self, event_type: str, session_id: str | None, **data: Any) -> None:
        """Append one event to the (bounded) audit log."""
        self.event_seq += 1
        self.events_by_type[event_type] += 1
        self.audit.append(
            {
                "event_id": self.event_seq,
                "event_type": event_type,
                "session_id": session_id,
                "timestamp": now_iso(),
                "data": data,
            }
        )

    def touch(self, session: Session) -> None:
        """Mark ``session`` as the most recently active one."""
        session.last_activity = now_iso()
        # A session deleted or evicted while a turn ran stays gone.
        if self.sessions.get(session.id) is session:
            self.sessions.move_to_end(session.id)

    def new_session(self, session_id: str) -> Session:
        """Create ``session_id`` (evicting the least recently active beyond the limit)."""
        now = now_iso()
        session = Session(id=session_id, created_at=now, last_activity=now)
        self.sessions[session_id] = session
        self.stats["sessions_created"] += 1
        self.record("session_created", session_id)
        self.evict(keep=session)
        return session

    def evict(self, keep: Session) -> None:
        """Drop sessions beyond ``config.max_sessions``, never ``keep``."""
        while len(self.sessions) > self.config.max_sessions:
            # Least recently active first, but skip sessions with a turn running or queued:
            # evicting those would let a new stream for the same id bypass the session lock.
            others = (s for s in self.sessions.values() if s is not keep)
            idle = (s for s in self.sessions.values() if s is not keep and s.open_streams == 0)
            victim = next(idle, None) or next(others)
            del self.sessions[victim.id]
            self.record("session_evicted", victim.id)

    def get_or_create(self, session_id: str) -> Session:
        """The session ``session_id``, created on first use (as a turn or a switch does)."""
        session = self.sessions.get(session_id)
        return session if session is not None else self.new_session(session_id)

    def require(self, session_id: str) -> Session:
        """The session ``session_id``; :class:`ApiError` 404 when there is none."""
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, "Session not found")
        return session

    def add_message(self, session: Session, role: str, content: str) -> None:
        """Append a message to the session's (bounded) history."""
        session.messages.append({"role": role, "content": content, "timestamp": now_iso()})
        session.stats["messages"] += 1
        self.stats[f"messages_{role}"] += 1
        if role == "user" and session.title is None and content.strip():
            session.title = shorten(content, 60)
        self.touch(session)

    def switch(
        self, session: Session, to_agent: str, reason: str, confidence: float
    ) -> dict[str, Any]:
        """Switch the session's agent; returns the history entry (``agent_switched`` shows it)."""
        entry = {
            "from_agent": session.current_agent,
            "to_agent": to_agent,
            "reason": reason,
            "confidence": confidence,
            "timestamp": now_iso(),
        }
        session.current_agent = to_agent
        session.switch_count += 1
        session.agent_history.append(entry)
        session.stats["agent_switches"] += 1
        self.stats["agent_switches"] += 1
        self.record("agent_switched", session.id, **entry)
        self.touch(session)
        return entry

    def add_pending(self, session: Session, call: PendingCall) -> None:
        """Remember a tool call the runtime now waits on (oldest dropped beyond the limit)."""
        session.pending[call.call_id] = call
        while len(session.pending) > MAX_PENDING_CALLS:
            session.pending.popitem(last=False)
        session.stats["tool_calls"] += 1
        self.stats["tool_calls"] += 1
        if call.requires_approval:
            self.stats["approvals_requested"] += 1
        self.record(
            "tool_call_requested",
            session.id,
            call_id=call.call_id,
            tool_name=call.tool_name,
            requires_approval=call.requires_approval,
        )

    def session_summary(self, session: Session) -> dict[str, Any]:
        """A session as listed by ``GET /sessions``."""
        return {
            "id": session.id,
            "title": session.title,
            "message_count": len(session.messages),
            "last_activity": session.last_activity,
            "is_active": session.is_active,
            "current_agent": session.current_agent,
        }

    def session_detail(self, session: Session, *, include_messages: bool) -> dict[str, Any]:
        """A session as shown by ``GET /sessions/{id}``."""
        detail = {**self.session_summary(session), "created_at": session.created_at}
        if include_messages:
            detail["messages"] = list(session.messages)
        return detail

    def context(self, session: Session, *, include_history: bool) -> dict[str, Any]:
        """A session's agent context, as the ``/agents/{id}`` routes show it."""
        context: dict[str, Any] = {
            "session_id": session.id,
            "current_agent": session.current_agent,
            "switch_count": session.switch_count,
        }
        if include_history:
            context["agent_history"] = list(session.agent_history)
        return context

    def counters(self, active_streams: int) -> dict[str, Any]:
        """The runtime-wide counters of ``GET /events/metrics``."""
        stats = self.stats
        return {
            "streams": {
                "started": stats["streams_started"],
                "completed": stats["streams_completed"],
                "cancelled": stats["streams_cancelled"],
                "active": active_streams,
            },
            "messages": {
                "user": stats["messages_user"],
                "assistant": stats["messages_assistant"],
                "tool": stats["messages_tool"],
            },
            "tool_calls": {
                "requested": stats["tool_calls"],
                "results": stats["tool_results"],
                "approvals_requested": stats["approvals_requested"],
                "approved": stats["approvals_approved"],
                "rejected": stats["approvals_rejected"],
            },
            "agent_switches": stats["agent_switches"],
        }

    def session_metrics(self, session: Session) -> dict[str, Any]:
        """One session's counters, as the ``/events/metrics/session...`` routes show them."""
        return {
            "session_id": session.id,
            "message_count": len(session.messages),
            "streams": session.stats["streams"],
            "tool_calls": session.stats["tool_calls"],
            "agent_switches": session.stats["agent_switches"],
            "pending_approvals": sum(1 for c in session.pending.values() if c.requires_approval),
            "current_agent": session.current_agent,
            "is_active": session.is_active,
            "created_at": session.created_at,
            "last_activity": session.last_activity,
        }
