"""An in-memory Agent Runtime that speaks the real contract (docs/compatibility.md §1).

The gateway, its tests, its benchmark and ``trio-gateway demo`` talk to this runtime over real
HTTP, so it implements the whole upstream surface: the SSE turn stream
(``POST /agent/message/stream``) with every chunk field present, the coding flow with tool calls
and human approval, agent switching, a ``bench N [R]`` mode for throughput measurements, and the
REST routes for sessions, agents and metrics.

Design notes:

* No module-level mutable state. Everything lives on a :class:`DemoRuntime`, one per app, so
  tests can run many runtimes side by side.
* A turn is a *plan*: a plain (synchronous) generator of steps, either an encoded SSE event or a
  pause. One small async driver turns the plan into the response body. Keeping the scripted logic
  synchronous means no nested async generators whose finalisation trio would have to chase when a
  client disconnects, and state changes (a call becoming pending) happen exactly when the chunk
  announcing them is produced.
* Everything is bounded: sessions (least recently active evicted), history per session, pending
  calls per session, the audit log and the recorded stream requests.
"""

from __future__ import annotations

import hmac
import importlib
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeGuard

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioResponse
from werkzeug.exceptions import HTTPException

__all__ = [
    "AGENTS",
    "DemoRuntime",
    "DemoRuntimeConfig",
    "create_demo_runtime",
    "serve_demo_runtime",
]

logger = logging.getLogger("trio_gateway.demo_runtime")


def _client_gone_errors() -> tuple[type[Exception], ...]:
    # Quart >= 0.23 (quart-trio 0.13, Python >= 3.13) raises ClientDisconnectedError when the
    # client has gone away; Quart 0.22 only cancels the handler. Looked up dynamically so the
    # module type-checks against both pins.
    base = importlib.import_module("quart.wrappers.base")
    error = getattr(base, "ClientDisconnectedError", None)
    return (error,) if isinstance(error, type) and issubclass(error, Exception) else ()


_CLIENT_GONE: Final = _client_gone_errors()

VERSION: Final = "demo"
MAX_HISTORY_MESSAGES: Final = 500
MAX_AUDIT_EVENTS: Final = 1000
MAX_RECORDED_REQUESTS: Final = 1000
MAX_PENDING_CALLS: Final = 100
MAX_AGENT_HISTORY: Final = 100
MAX_SESSION_ID_LENGTH: Final = 256
MAX_PAGE_LIMIT: Final = 1000
#: Seconds hypercorn waits for the first (and each next) request on a connection; see
#: :func:`serve_demo_runtime`.
DEMO_KEEP_ALIVE_TIMEOUT: Final = 120.0

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
# Agents that write code themselves: a coding request sent to any other agent switches to coder.
CODING_AGENTS: Final = frozenset({"coder", "universal"})
MESSAGE_TYPES: Final = frozenset({"user_message", "tool_result", "switch_agent", "hitl_decision"})
HITL_DECISIONS: Final = frozenset({"approve", "edit", "reject"})

CODING_REQUEST = re.compile(
    r"\b(write|create|implement|code|fix|refactor|function|class|script|build)\b", re.IGNORECASE
)
HELLO_PATH: Final = "hello.py"
HELLO_CONTENT: Final = 'print("Hello, world!")\n'


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


class _QuietDisconnects:
    """ASGI wrapper: a client that went away is routine for a streaming server, not an error.

    On quart-trio 0.13 a disconnect that lands between the view returning and the response
    starting surfaces as ``ClientDisconnectedError`` and hypercorn would log it as "Error in ASGI
    Framework" with a traceback. Only that error is swallowed; everything else propagates.
    """

    def __init__(self, asgi_app: Callable[[Any, Any, Any], Awaitable[None]]) -> None:
        self._asgi_app = asgi_app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not _CLIENT_GONE:
            await self._asgi_app(scope, receive, send)
            return
        try:
            await self._asgi_app(scope, receive, send)
        except* _CLIENT_GONE:
            logger.debug("client went away before its response was sent")


# --------------------------------------------------------------------------------------------
# Turn plans: what a turn streams, as a synchronous generator of steps.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pause:
    """Wait this long (a bare checkpoint in instant mode or for zero)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class _Until:
    """Wait until this ``trio.current_time()`` (rate-paced bench; honoured even when instant)."""

    deadline: float


_Step = bytes | _Pause | _Until
_Plan = Generator[_Step, None, None]


def encode_chunk(
    type_: str,
    *,
    content: str | None = None,
    token: str | None = None,
    is_final: bool = False,
    call_id: str | None = None,
    tool_name: str | None = None,
    arguments: dict[str, Any] | None = None,
    requires_approval: bool = False,
    error: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """Encode one stream chunk as an SSE event, every field present (today's runtime does so)."""
    return (
        b"data: "
        + orjson.dumps(
            {
                "type": type_,
                "content": content,
                "token": token,
                "is_final": is_final,
                "call_id": call_id,
                "tool_name": tool_name,
                "arguments": arguments,
                "requires_approval": requires_approval,
                "error": error,
                "metadata": metadata,
            }
        )
        + b"\n\n"
    )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _summarise(value: Any, limit: int = 500) -> str:
    """A bounded text form of a client-supplied JSON value, for history and audit entries."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return _shorten(text, limit)


@dataclass
class _PendingCall:
    call_id: str
    tool_name: str
    arguments: dict[str, Any]
    requires_approval: bool
    request_id: str
    created_at: str


@dataclass
class _Session:
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
    pending: OrderedDict[str, _PendingCall] = field(default_factory=OrderedDict)
    # One turn at a time per session (docs/compatibility.md §1.1): concurrent streams queue
    # here, FIFO.
    lock: trio.Lock = field(default_factory=trio.Lock)
    open_streams: int = 0  # streams holding or waiting for the lock: never evicted while > 0
    stats: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class _Turn:
    """A validated stream request, ready to run once the session lock is held."""

    kind: str
    message: dict[str, Any]
    bench: tuple[int, float | None] | None = None


# --------------------------------------------------------------------------------------------
# Request parsing helpers (they raise ApiError, turned into {"detail": ...} by the app).
# --------------------------------------------------------------------------------------------


async def _json_body(*, optional: bool = False) -> Any:
    data = await request.get_data()
    if not data.strip():
        if optional:
            return None
        raise ApiError(422, "Request body must be a JSON object")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ApiError(422, "Request body is not valid JSON") from None


def _query_int(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}")
    return value


def _query_bool(name: str) -> bool:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return False
    lowered = raw.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ApiError(400, f"{name} must be true or false")


def _json_response(data: Any, status: int = 200) -> TrioResponse:
    return TrioResponse(orjson.dumps(data), status=status, content_type="application/json")


def _valid_session_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_SESSION_ID_LENGTH


def _is_agent(value: object) -> TypeGuard[str]:
    # isinstance first: an unhashable value (a list from a sloppy client) must be a 400, not a
    # TypeError from the dict lookup.
    return isinstance(value, str) and value in AGENTS


def _parse_bench(content: str, max_tokens: int) -> tuple[int, float | None]:
    """``bench N`` or ``bench N R`` → (N, R); 400 on anything else."""
    parts = content.split()
    usage = f"usage: bench N [R] with 1 <= N <= {max_tokens} tokens and R > 0 tokens/s"
    if len(parts) not in (2, 3):
        raise ApiError(400, usage)
    try:
        count = int(parts[1])
        rate = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise ApiError(400, usage) from None
    if not 1 <= count <= max_tokens:
        raise ApiError(400, usage)
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ApiError(400, usage)
    return count, rate


class DemoRuntime:
    """One in-memory Agent Runtime: its ASGI ``app`` plus all of its state and counters.

    Public attributes, read by tests and the benchmark:

    * ``app``: the :class:`quart_trio.QuartTrio` ASGI app (serve it with
      :func:`serve_demo_runtime` or any hypercorn trio worker).
    * ``active_streams``: turn streams currently open (running or queued on a session lock).
    * ``cancelled_streams``: streams whose client went away before the turn finished.
    * ``completed_streams``: streams that ran to their final chunk.
    * ``stream_requests`` / ``stream_headers``: the JSON body and lower-cased headers of every
      accepted ``POST /agent/message/stream`` (JSON objects only), oldest first, last 1000.
    * ``rest_headers``: every header line (lower-cased name, value) of each other request, as
      received, oldest first, last 1000 (the hostile-input proofs check what reached it).
    """

    def __init__(self, config: DemoRuntimeConfig) -> None:
        """Build the app and empty state; nothing is started until the app is served."""
        self.config = config
        self._key = config.internal_api_key.encode("utf-8")
        self.active_streams = 0
        self.cancelled_streams = 0
        self.completed_streams = 0
        self.stream_requests: list[dict[str, Any]] = []
        self.stream_headers: list[dict[str, str]] = []
        self.rest_headers: deque[list[tuple[str, str]]] = deque(maxlen=MAX_RECORDED_REQUESTS)
        # Ordered by last activity: the first entry is the next to evict.
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._audit: deque[dict[str, Any]] = deque(maxlen=MAX_AUDIT_EVENTS)
        self._event_seq = 0
        self._events_by_type: Counter[str] = Counter()
        self._stats: Counter[str] = Counter()
        self._started_at = time.monotonic()
        self.app: QuartTrio = self._build_app()

    # ---------------------------------------------------------------------------------------
    # App wiring
    # ---------------------------------------------------------------------------------------

    def _build_app(self) -> QuartTrio:
        # The name is the app's logger name, kept stable wherever this module lives; the root
        # path is given so that Quart does not look for it (nor for a static folder) in the cwd.
        app = QuartTrio("trio_gateway.demo_runtime", root_path=os.path.dirname(__file__))
        app.before_request(self._read_body)
        app.before_request(self._check_auth)
        app.register_error_handler(ApiError, self._api_error)
        app.register_error_handler(HTTPException, self._http_error)
        for error_class in _CLIENT_GONE:
            # Reading the body of a request whose client left: answer nobody, log nothing.
            app.register_error_handler(error_class, self._client_gone)
        app.asgi_app = _QuietDisconnects(app.asgi_app)  # type: ignore[method-assign]
        routes: list[tuple[str, Callable[..., Awaitable[TrioResponse]], list[str]]] = [
            ("/health", self._health, ["GET"]),
            ("/agent/message/stream", self._stream_message, ["POST"]),
            ("/sessions", self._list_sessions, ["GET"]),
            ("/sessions", self._create_session, ["POST"]),
            ("/sessions/<session_id>", self._get_session, ["GET"]),
            ("/sessions/<session_id>", self._patch_session, ["PATCH"]),
            ("/sessions/<session_id>", self._delete_session, ["DELETE"]),
            ("/sessions/<session_id>/history", self._history, ["GET"]),
            ("/sessions/<session_id>/pending-approvals", self._pending_approvals, ["GET"]),
            ("/agents", self._list_agents, ["GET"]),
            ("/agents/<session_id>/current", self._current_agent, ["GET"]),
            ("/agents/<session_id>/switch", self._switch_agent, ["POST"]),
            ("/events/metrics", self._metrics, ["GET"]),
            ("/events/metrics/sessions", self._metrics_sessions, ["GET"]),
            ("/events/metrics/session/<session_id>", self._metrics_session, ["GET"]),
            ("/events/audit-log", self._audit_log, ["GET"]),
            ("/events/stats", self._event_stats, ["GET"]),
        ]
        for path, view, methods in routes:
            app.add_url_rule(path, view.__name__.lstrip("_"), view, methods=methods)
        return app

    async def _read_body(self) -> None:
        """Read (and cache) every request body before anything can answer early.

        hypercorn 0.18 wedges a keep-alive connection when an answer goes out before the
        request's body has arrived and the body is never read: the gateway's next request on
        that pooled connection then waited for REQUEST_TIMEOUT and its client got 504 (found
        by schemathesis, see tests/test_hostile_regressions.py).
        """
        if request.path != "/agent/message/stream":
            self.rest_headers.append(
                [(name.decode("latin-1").lower(), value.decode("latin-1"))
                 for name, value in request.scope["headers"]]
            )  # fmt: skip
        await request.get_data()

    async def _check_auth(self) -> TrioResponse | None:
        if request.path == "/health" and request.method in ("GET", "HEAD"):
            return None
        # Compare bytes: compare_digest rejects non-ASCII str, and latin-1 gives back the raw
        # header bytes that the client sent.
        given = request.headers.get("X-Internal-Auth", "").encode("latin-1", "replace")
        if hmac.compare_digest(given, self._key):
            return None
        return _json_response({"detail": "Invalid or missing internal auth"}, 401)

    async def _api_error(self, error: ApiError) -> TrioResponse:
        return _json_response({"detail": error.detail}, error.status)

    async def _client_gone(self, error: Exception) -> TrioResponse:
        return TrioResponse(b"", status=499)

    async def _http_error(self, error: HTTPException) -> TrioResponse:
        # Quart's default error pages are HTML; the runtime answers JSON everywhere.
        return _json_response({"detail": error.description or error.name}, error.code or 500)

    # ---------------------------------------------------------------------------------------
    # State helpers
    # ---------------------------------------------------------------------------------------

    def _record(self, event_type: str, session_id: str | None, **data: Any) -> None:
        self._event_seq += 1
        self._events_by_type[event_type] += 1
        self._audit.append(
            {
                "event_id": self._event_seq,
                "event_type": event_type,
                "session_id": session_id,
                "timestamp": _now_iso(),
                "data": data,
            }
        )

    def _touch(self, session: _Session) -> None:
        session.last_activity = _now_iso()
        # A session deleted or evicted while a turn ran stays gone.
        if self._sessions.get(session.id) is session:
            self._sessions.move_to_end(session.id)

    def _new_session(self, session_id: str) -> _Session:
        now = _now_iso()
        session = _Session(id=session_id, created_at=now, last_activity=now)
        self._sessions[session_id] = session
        self._stats["sessions_created"] += 1
        self._record("session_created", session_id)
        self._evict(keep=session)
        return session

    def _evict(self, keep: _Session) -> None:
        while len(self._sessions) > self.config.max_sessions:
            # Least recently active first, but skip sessions with a turn running or queued:
            # evicting those would let a new stream for the same id bypass the session lock.
            others = (s for s in self._sessions.values() if s is not keep)
            idle = (s for s in self._sessions.values() if s is not keep and s.open_streams == 0)
            victim = next(idle, None) or next(others)
            del self._sessions[victim.id]
            self._record("session_evicted", victim.id)

    def _get_or_create(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        return session if session is not None else self._new_session(session_id)

    def _require(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise ApiError(404, "Session not found")
        return session

    def _add_message(self, session: _Session, role: str, content: str) -> None:
        session.messages.append({"role": role, "content": content, "timestamp": _now_iso()})
        session.stats["messages"] += 1
        self._stats[f"messages_{role}"] += 1
        if role == "user" and session.title is None and content.strip():
            session.title = _shorten(content, 60)
        self._touch(session)

    def _switch(
        self, session: _Session, to_agent: str, reason: str, confidence: float
    ) -> dict[str, Any]:
        entry = {
            "from_agent": session.current_agent,
            "to_agent": to_agent,
            "reason": reason,
            "confidence": confidence,
            "timestamp": _now_iso(),
        }
        session.current_agent = to_agent
        session.switch_count += 1
        session.agent_history.append(entry)
        session.stats["agent_switches"] += 1
        self._stats["agent_switches"] += 1
        self._record("agent_switched", session.id, **entry)
        self._touch(session)
        return entry

    def _add_pending(self, session: _Session, call: _PendingCall) -> None:
        session.pending[call.call_id] = call
        while len(session.pending) > MAX_PENDING_CALLS:
            session.pending.popitem(last=False)
        session.stats["tool_calls"] += 1
        self._stats["tool_calls"] += 1
        if call.requires_approval:
            self._stats["approvals_requested"] += 1
        self._record(
            "tool_call_requested",
            session.id,
            call_id=call.call_id,
            tool_name=call.tool_name,
            requires_approval=call.requires_approval,
        )

    # ---------------------------------------------------------------------------------------
    # POST /agent/message/stream
    # ---------------------------------------------------------------------------------------

    async def _stream_message(self) -> TrioResponse:
        """Validate a turn (errors are plain HTTP), then stream it as SSE."""
        body = await _json_body()
        if not isinstance(body, dict):
            raise ApiError(422, "Request body must be a JSON object")
        self._remember_request(body)
        session_id = body.get("session_id")
        message = body.get("message")
        if not _valid_session_id(session_id):
            raise ApiError(422, "session_id must be a non-empty string of at most 256 characters")
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ApiError(422, "message must be an object with a string type")
        turn = self._validate_turn(session_id, message)
        session = self._get_or_create(session_id)
        self._touch(session)
        response = TrioResponse(
            self._drive(session, turn),
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        # Turns may stream for minutes; Quart's RESPONSE_TIMEOUT would cut them silently.
        response.timeout = None
        return response

    def _remember_request(self, body: dict[str, Any]) -> None:
        self.stream_requests.append(body)
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.stream_headers.append(headers)
        for recorded in (self.stream_requests, self.stream_headers):
            if len(recorded) > MAX_RECORDED_REQUESTS:
                del recorded[: len(recorded) - MAX_RECORDED_REQUESTS]

    def _validate_turn(self, session_id: str, message: dict[str, Any]) -> _Turn:
        kind = message["type"]
        if kind not in MESSAGE_TYPES:
            raise ApiError(400, f"Unsupported message type: {_shorten(kind, 64)}")
        if kind == "user_message":
            content = message.get("content")
            if not isinstance(content, str):
                raise ApiError(422, "user_message requires a string content")
            agent_type = message.get("agent_type")
            if agent_type is not None and not _is_agent(agent_type):
                raise ApiError(400, f"Unknown agent_type: {_summarise(agent_type, 64)}")
            bench = None
            if content.startswith("bench "):
                bench = _parse_bench(content, self.config.max_bench_tokens)
            return _Turn(kind, message, bench)
        if kind == "switch_agent":
            agent_type = message.get("agent_type")
            if not _is_agent(agent_type):
                raise ApiError(400, f"Unknown or missing agent_type: {_summarise(agent_type, 64)}")
            return _Turn(kind, message)
        call_id = message.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ApiError(400, f"{kind} requires call_id")
        session = self._sessions.get(session_id)
        call = session.pending.get(call_id) if session is not None else None
        if kind == "hitl_decision":
            decision = message.get("decision")
            if not (isinstance(decision, str) and decision in HITL_DECISIONS):
                raise ApiError(400, "decision must be one of approve, edit, reject")
            if call is None or not call.requires_approval:
                raise ApiError(400, f"No pending approval with call_id {_shorten(call_id, 64)}")
        elif call is None:
            raise ApiError(400, f"No pending tool call with call_id {_shorten(call_id, 64)}")
        return _Turn(kind, message)

    async def _drive(self, session: _Session, turn: _Turn) -> AsyncIterator[bytes]:
        """The response body: run the turn's plan under the session lock, pacing its steps.

        A client disconnect cancels the task that iterates this generator (quart-trio cancels
        the request's nursery on ``http.disconnect``): the cancellation arrives at a pause or,
        while a chunk is being sent, as ``aclose()`` at a ``yield``. Either way only the
        ``finally`` blocks run, and they must not await.
        """
        self.active_streams += 1
        self._stats["streams_started"] += 1
        session.open_streams += 1
        session.stats["streams"] += 1
        self._record("stream_started", session.id, message_type=turn.kind)
        finished = False
        try:
            # Manual acquire/release rather than `async with`: the lock is held across yields.
            await session.lock.acquire()
            try:
                plan = self._plan(session, turn)
                try:
                    while True:
                        try:
                            step = next(plan)
                        except StopIteration:
                            break
                        except Exception as error:
                            # Contract: a runtime failure inside the stream is a final error
                            # chunk with HTTP status still 200.
                            logger.exception("demo runtime turn failed")
                            yield encode_chunk(
                                "error", error=f"{type(error).__name__}: {error}", is_final=True
                            )
                            break
                        if isinstance(step, bytes):
                            yield step
                        elif isinstance(step, _Until):
                            await trio.sleep_until(step.deadline)
                        elif self.config.instant or step.seconds <= 0:
                            await trio.lowlevel.checkpoint()
                        else:
                            await trio.sleep(step.seconds)
                finally:
                    plan.close()
            finally:
                session.lock.release()
            finished = True
        finally:
            self.active_streams -= 1
            session.open_streams -= 1
            if finished:
                self.completed_streams += 1
                self._stats["streams_completed"] += 1
                self._record("stream_completed", session.id, message_type=turn.kind)
            else:
                self.cancelled_streams += 1
                self._stats["streams_cancelled"] += 1
                self._record("stream_cancelled", session.id, message_type=turn.kind)
            self._touch(session)

    # ---------------------------------------------------------------------------------------
    # Plans (run with the session lock held)
    # ---------------------------------------------------------------------------------------

    def _plan(self, session: _Session, turn: _Turn) -> _Plan:
        if turn.kind == "switch_agent":
            return self._plan_switch(session, turn.message)
        if turn.kind == "user_message":
            if turn.bench is not None:
                return self._plan_bench(session, turn.message["content"], *turn.bench)
            return self._plan_user_message(session, turn.message)
        return self._plan_tool_outcome(session, turn)

    def _words(self, text: str) -> _Plan:
        """Stream ``text`` word by word: token == content == the word plus a trailing space."""
        for index, word in enumerate(text.split()):
            if index:
                yield _Pause(self.config.token_delay)
            piece = word + " "
            yield encode_chunk("assistant_message", content=piece, token=piece)

    def _final(self) -> bytes:
        return encode_chunk("assistant_message", content="", token="", is_final=True)

    def _plan_switch(self, session: _Session, message: dict[str, Any]) -> _Plan:
        reason = message.get("reason")
        entry = self._switch(
            session,
            message["agent_type"],
            reason if isinstance(reason, str) and reason else "Requested by the user",
            1.0,
        )
        yield self._switch_chunk(entry, is_final=True)

    def _switch_chunk(self, entry: dict[str, Any], *, is_final: bool) -> bytes:
        metadata = {key: entry[key] for key in ("from_agent", "to_agent", "reason", "confidence")}
        return encode_chunk(
            "agent_switched",
            content=f"Switching to {entry['to_agent']} agent",
            is_final=is_final,
            metadata=metadata,
        )

    def _plan_bench(self, session: _Session, content: str, count: int, rate: float | None) -> _Plan:
        # No think delay here: bench pacing is exactly what the client asked for, so direct and
        # through-the-gateway measurements compare like with like.
        self._add_message(session, "user", content)
        start = trio.current_time()
        for index in range(count):
            if rate is not None:
                # Absolute schedule: a late token does not delay the ones after it.
                yield _Until(start + index / rate)
            elif index:
                yield _Pause(self.config.token_delay)
            piece = f"t{index} "
            # Paced streams carry their emit time so a client can measure relay latency.
            # Unpaced (throughput) streams carry none: chunks whose metadata differ can never
            # be coalesced, and a real runtime's tokens carry no per-token metadata either.
            metadata = {"emitted_ns": time.time_ns(), "index": index} if rate else None
            yield encode_chunk("assistant_message", content=piece, token=piece, metadata=metadata)
        yield _Pause(0)
        yield self._final()
        self._add_message(session, "assistant", f"[bench: streamed {count} tokens]")

    def _plan_user_message(self, session: _Session, message: dict[str, Any]) -> _Plan:
        """A question gets an echoing answer; a coding request starts the tool-call flow.

        An explicit ``agent_type`` switches to that agent first and is then respected: only a
        session whose agent was not chosen in this message is routed to the coder.
        """
        content: str = message["content"]
        self._add_message(session, "user", content)
        self._record("message_received", session.id, role="user", content=_shorten(content, 200))
        yield _Pause(self.config.think_delay)
        agent_type = message.get("agent_type")
        explicit = isinstance(agent_type, str)  # validated against AGENTS before streaming
        if isinstance(agent_type, str) and agent_type != session.current_agent:
            entry = self._switch(session, agent_type, "Requested by the client", 1.0)
            yield self._switch_chunk(entry, is_final=False)
            yield _Pause(self.config.token_delay)
        if CODING_REQUEST.search(content) is None:
            answer = (
                f'You asked: "{_shorten(content, 120)}". I am the demo Agent Runtime, so I can '
                "only echo questions back. Ask me to write some code to see the tool-call flow."
            )
            yield from self._words(answer)
            yield _Pause(self.config.token_delay)
            yield self._final()
            self._add_message(session, "assistant", answer)
            return
        if session.current_agent not in CODING_AGENTS and not explicit:
            entry = self._switch(session, "coder", "The request asks for code", 0.9)
            yield self._switch_chunk(entry, is_final=False)
            yield _Pause(self.config.token_delay)
        text = "I will read README.md first to see how the project is laid out."
        yield from self._words(text)
        yield _Pause(self.config.token_delay)
        yield self._tool_call(session, "read_file", {"path": "README.md"}, requires_approval=False)
        self._add_message(session, "assistant", text)

    def _tool_call(
        self,
        session: _Session,
        tool_name: str,
        arguments: dict[str, Any],
        *,
        requires_approval: bool,
    ) -> bytes:
        call = _PendingCall(
            call_id=f"call_{secrets.token_hex(8)}",
            tool_name=tool_name,
            arguments=arguments,
            requires_approval=requires_approval,
            request_id=f"req_{secrets.token_hex(8)}",
            created_at=_now_iso(),
        )
        self._add_pending(session, call)
        return encode_chunk(
            "tool_call",
            call_id=call.call_id,
            tool_name=tool_name,
            arguments=arguments,
            requires_approval=requires_approval,
            is_final=True,
        )

    def _plan_tool_outcome(self, session: _Session, turn: _Turn) -> _Plan:
        """``tool_result`` or ``hitl_decision``: finish the pending call and continue the flow."""
        message = turn.message
        call = session.pending.pop(message["call_id"], None)
        if call is None:
            # Validated before streaming, but a concurrent turn for this session may have
            # consumed the call while this one waited for the lock.
            yield encode_chunk("error", error="The tool call is no longer pending", is_final=True)
            return
        arguments = call.arguments
        if turn.kind == "hitl_decision":
            decision = message["decision"]
            feedback = message.get("feedback")
            modified = message.get("modified_arguments")
            if decision == "edit" and isinstance(modified, dict):
                arguments = {**arguments, **modified}
            error = None
            if decision == "reject":
                error = feedback if isinstance(feedback, str) and feedback else "Rejected by user"
            self._stats[f"approvals_{'rejected' if error else 'approved'}"] += 1
            self._record("approval_decided", session.id, call_id=call.call_id, decision=decision)
            self._add_message(session, "user", f"[{decision}] {call.tool_name} ({call.call_id})")
        else:
            raw_error = message.get("error")
            error = _summarise(raw_error, 200) if raw_error not in (None, "") else None
            self._stats["tool_results"] += 1
            self._record("tool_result_received", session.id, call_id=call.call_id, ok=error is None)
            outcome = f"error: {error}" if error else _summarise(message.get("result"))
            self._add_message(session, "tool", f"{call.tool_name}: {outcome}")
        yield _Pause(self.config.think_delay)
        if call.tool_name == "read_file":
            text = (
                f"I could not read README.md ({error}), so I will go straight to writing the code."
                if error
                else "Thanks, README.md is read. Now I will write hello.py for you."
            )
            yield from self._words(text)
            yield _Pause(self.config.token_delay)
            yield self._tool_call(
                session,
                "write_file",
                {"path": HELLO_PATH, "content": HELLO_CONTENT},
                requires_approval=True,
            )
        else:
            path = arguments.get("path", HELLO_PATH)
            text = (
                f"Understood, I did not write {path} ({error}). Tell me what to change and I "
                "will try again."
                if error
                else f"Done: wrote {path} with a hello-world program."
            )
            yield from self._words(text)
            yield _Pause(self.config.token_delay)
            yield self._final()
        self._add_message(session, "assistant", text)

    # ---------------------------------------------------------------------------------------
    # REST
    # ---------------------------------------------------------------------------------------

    async def _health(self) -> TrioResponse:
        return _json_response({"status": "healthy", "service": "agent-runtime", "version": VERSION})

    def _session_summary(self, session: _Session) -> dict[str, Any]:
        return {
            "id": session.id,
            "title": session.title,
            "message_count": len(session.messages),
            "last_activity": session.last_activity,
            "is_active": session.is_active,
            "current_agent": session.current_agent,
        }

    def _session_detail(self, session: _Session, *, include_messages: bool) -> dict[str, Any]:
        detail = {**self._session_summary(session), "created_at": session.created_at}
        if include_messages:
            detail["messages"] = list(session.messages)
        return detail

    async def _create_session(self) -> TrioResponse:
        body = await _json_body(optional=True)
        if body is not None and not isinstance(body, dict):
            raise ApiError(422, "Request body must be a JSON object")
        session_id = body.get("session_id") if body else None
        if session_id is None:
            session_id = str(uuid.uuid4())
        elif not _valid_session_id(session_id):
            raise ApiError(422, "session_id must be a non-empty string of at most 256 characters")
        elif session_id in self._sessions:
            raise ApiError(409, "Session already exists")
        session = self._new_session(session_id)
        return _json_response(
            {
                "id": session.id,
                "message_count": 0,
                "created_at": session.created_at,
                "is_active": session.is_active,
                "current_agent": session.current_agent,
            },
            201,
        )

    async def _list_sessions(self) -> TrioResponse:
        limit = _query_int("limit", 50, 1, MAX_PAGE_LIMIT)
        offset = _query_int("offset", 0, 0, 2**62)
        active_only = _query_bool("active_only")
        # Most recently active first.
        sessions = [s for s in reversed(self._sessions.values()) if s.is_active or not active_only]
        page = sessions[offset : offset + limit]
        return _json_response(
            {
                "sessions": [self._session_summary(s) for s in page],
                "total": len(sessions),
                "limit": limit,
                "offset": offset,
            }
        )

    async def _get_session(self, session_id: str) -> TrioResponse:
        include_messages = _query_bool("include_messages")
        session = self._require(session_id)
        detail = self._session_detail(session, include_messages=include_messages)
        return _json_response({"session": detail})

    async def _patch_session(self, session_id: str) -> TrioResponse:
        session = self._require(session_id)
        body = await _json_body()
        if not isinstance(body, dict):
            raise ApiError(422, "Request body must be a JSON object")
        title = body.get("title")
        is_active = body.get("is_active")
        if "title" in body and not (title is None or isinstance(title, str)):
            raise ApiError(422, "title must be a string")
        if "is_active" in body and not isinstance(is_active, bool):
            raise ApiError(422, "is_active must be a boolean")
        if "title" in body:
            session.title = _shorten(title, 200) if title is not None else None
        if isinstance(is_active, bool):
            session.is_active = is_active
        self._touch(session)
        changed = sorted(body.keys() & {"title", "is_active"})
        self._record("session_updated", session.id, fields=changed)
        return _json_response({"session": self._session_detail(session, include_messages=False)})

    async def _delete_session(self, session_id: str) -> TrioResponse:
        self._require(session_id)
        del self._sessions[session_id]
        self._record("session_deleted", session_id)
        return TrioResponse(b"", status=204)

    async def _history(self, session_id: str) -> TrioResponse:
        session = self._require(session_id)
        return _json_response(
            {
                "session_id": session.id,
                "messages": list(session.messages),
                "message_count": len(session.messages),
                "last_activity": session.last_activity,
                "current_agent": session.current_agent,
                "agent_history": list(session.agent_history),
            }
        )

    async def _pending_approvals(self, session_id: str) -> TrioResponse:
        session = self._sessions.get(session_id)
        calls = [c for c in session.pending.values() if c.requires_approval] if session else []
        approvals = [
            {
                "request_id": call.request_id,
                "request_type": "tool_call",
                "subject": f"{call.tool_name} {call.arguments.get('path', '')}".strip(),
                "details": dict(call.arguments),
                "reason": f"{call.tool_name} changes the workspace and needs approval",
                "created_at": call.created_at,
                "call_id": call.call_id,
                "tool_name": call.tool_name,
                "arguments": call.arguments,
            }
            for call in calls
        ]
        return _json_response(
            {"session_id": session_id, "pending_approvals": approvals, "count": len(approvals)}
        )

    async def _list_agents(self) -> TrioResponse:
        agents = [{"type": agent_type, **info} for agent_type, info in AGENTS.items()]
        return _json_response({"agents": agents, "total": len(agents)})

    def _context(self, session: _Session, *, include_history: bool) -> dict[str, Any]:
        context: dict[str, Any] = {
            "session_id": session.id,
            "current_agent": session.current_agent,
            "switch_count": session.switch_count,
        }
        if include_history:
            context["agent_history"] = list(session.agent_history)
        return context

    async def _current_agent(self, session_id: str) -> TrioResponse:
        include_history = _query_bool("include_history")
        session = self._require(session_id)
        return _json_response({"context": self._context(session, include_history=include_history)})

    async def _switch_agent(self, session_id: str) -> TrioResponse:
        body = await _json_body()
        if not isinstance(body, dict):
            raise ApiError(422, "Request body must be a JSON object")
        target = body.get("target_agent")
        reason = body.get("reason")
        confidence = body.get("confidence", 1.0)
        if not isinstance(target, str) or not isinstance(reason, str):
            raise ApiError(422, "target_agent and reason must be strings")
        if isinstance(confidence, bool) or not isinstance(confidence, int | float):
            raise ApiError(422, "confidence must be a number")
        if not 0 <= confidence <= 1:
            raise ApiError(422, "confidence must be between 0 and 1")
        if not _is_agent(target):
            raise ApiError(400, f"Unknown agent: {_shorten(target, 64)}")
        if not _valid_session_id(session_id):
            raise ApiError(422, "session_id is too long")
        # Like a stream, a switch creates the session's context on demand.
        session = self._get_or_create(session_id)
        self._switch(session, target, reason, float(confidence))
        return _json_response({"context": self._context(session, include_history=True)})

    def _counters(self) -> dict[str, Any]:
        stats = self._stats
        return {
            "streams": {
                "started": stats["streams_started"],
                "completed": stats["streams_completed"],
                "cancelled": stats["streams_cancelled"],
                "active": self.active_streams,
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

    async def _metrics(self) -> TrioResponse:
        sessions = self._sessions.values()
        return _json_response(
            {
                **self._counters(),
                "sessions": {
                    "total": len(self._sessions),
                    "active": sum(1 for s in sessions if s.is_active),
                    "created": self._stats["sessions_created"],
                },
                "uptime_seconds": round(time.monotonic() - self._started_at, 3),
                "timestamp": _now_iso(),
            }
        )

    def _session_metrics(self, session: _Session) -> dict[str, Any]:
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

    async def _metrics_sessions(self) -> TrioResponse:
        sessions = [self._session_metrics(s) for s in reversed(self._sessions.values())]
        return _json_response({"sessions": sessions, "total": len(sessions)})

    async def _metrics_session(self, session_id: str) -> TrioResponse:
        return _json_response(self._session_metrics(self._require(session_id)))

    async def _audit_log(self) -> TrioResponse:
        limit = _query_int("limit", 100, 1, MAX_AUDIT_EVENTS)
        session_id = request.args.get("session_id") or None
        event_type = request.args.get("event_type") or None
        matching = [
            event
            for event in reversed(self._audit)  # newest first
            if (session_id is None or event["session_id"] == session_id)
            and (event_type is None or event["event_type"] == event_type)
        ]
        return _json_response({"events": matching[:limit], "total": len(matching), "limit": limit})

    async def _event_stats(self) -> TrioResponse:
        return _json_response(
            {
                "total_events": self._event_seq,
                "events_by_type": dict(self._events_by_type),
                "audit_log_size": len(self._audit),
                "sessions": len(self._sessions),
                "active_streams": self.active_streams,
                "uptime_seconds": round(time.monotonic() - self._started_at, 3),
            }
        )


def create_demo_runtime(config: DemoRuntimeConfig | None = None) -> DemoRuntime:
    """Create a runtime (and its app) with ``config``, or the interactive defaults."""
    return DemoRuntime(config if config is not None else DemoRuntimeConfig())


async def serve_demo_runtime(
    runtime: DemoRuntime,
    host: str = "127.0.0.1",
    port: int = 8001,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``runtime.app`` with ``hypercorn.trio.serve`` on ``host:port`` until the trigger fires.

    ``task_status.started(binds)`` reports the bound addresses, e.g.
    ``["http://127.0.0.1:43211"]``; port 0 lets the OS choose, which is what test fixtures use.
    """
    config = HypercornConfig()
    # IPv6 literals need brackets in a bind string.
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # The gateway opens one connection per turn: thousands of turns starting together would
    # overflow hypercorn's default backlog of 100 (connections reset, SYNs retransmitted).
    config.backlog = 4096
    # hypercorn arms keep_alive_timeout (default 5 s) as soon as it takes a connection off the
    # accept queue, and only disarms it once the request line has been parsed, so it acts as a
    # "first request within 5 s" timeout. Under a burst of turn starts the accept queue and the
    # event loop fall seconds behind: the gateway's request is already in the socket, yet the
    # timer fires first and the connection is closed (FIN: "ConnectionClosed ... state=
    # SEND_RESPONSE" at the gateway; RST when the request was still unread), which the gateway
    # can only report as runtime_stream_broken. The gateway sends its request together with the
    # connect, so a slow first request only means a backed-up runtime: wait for it.
    config.keep_alive_timeout = DEMO_KEEP_ALIVE_TIMEOUT
    # A logger object of our own, not "-" (which would install hypercorn's own stderr handler)
    # nor the shared "hypercorn.error": in `trio-gateway demo` this server runs next to the
    # gateway, and its lines must not pass for the gateway's.
    config.errorlog = logging.getLogger("trio_gateway.demo_runtime.hypercorn")
    await serve(runtime.app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
