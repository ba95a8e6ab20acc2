"""The demo runtime's HTTP side: its ASGI app, the SSE turn stream and the REST routes.

:class:`DemoRuntime` validates each request (errors are plain HTTP ``{"detail": ...}``), drives
a turn's plan (``agent.py``) into the response body under the session lock, and answers the
REST routes from the state (``state.py``). No module-level mutable state: everything lives on
a :class:`DemoRuntime`, one per app, so tests can run many runtimes side by side.
"""

from __future__ import annotations

import hmac
import importlib
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeGuard

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioResponse
from werkzeug.exceptions import HTTPException

from .agent import ScriptedAgent, Turn, Until, encode_chunk
from .state import (
    AGENTS,
    MAX_AUDIT_EVENTS,
    MAX_SESSION_ID_LENGTH,
    ApiError,
    DemoRuntimeConfig,
    RuntimeState,
    Session,
    now_iso,
    shorten,
    summarise,
)

__all__ = ["DemoRuntime", "create_demo_runtime", "serve_demo_runtime"]

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
MAX_PAGE_LIMIT: Final = 1000
#: Seconds hypercorn waits for the first (and each next) request on a connection; see
#: :func:`serve_demo_runtime`.
DEMO_KEEP_ALIVE_TIMEOUT: Final = 120.0

MESSAGE_TYPES: Final = frozenset({"user_message", "tool_result", "switch_agent", "hitl_decision"})
HITL_DECISIONS: Final = frozenset({"approve", "edit", "reject"})


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
        self.state = RuntimeState(config)
        self.agent = ScriptedAgent(self.state, config)
        # The recordings and the sessions are the state's; tests and the benchmark read them here.
        self.stream_requests = self.state.stream_requests
        self.stream_headers = self.state.stream_headers
        self.rest_headers = self.state.rest_headers
        self._sessions = self.state.sessions
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
        by schemathesis, see tests/hostile/test_hostile_regressions.py).
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
        session = self.state.get_or_create(session_id)
        self.state.touch(session)
        response = TrioResponse(
            self._drive(session, turn),
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        # Turns may stream for minutes; Quart's RESPONSE_TIMEOUT would cut them silently.
        response.timeout = None
        return response

    def _remember_request(self, body: dict[str, Any]) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.state.remember_stream_request(body, headers)

    def _validate_turn(self, session_id: str, message: dict[str, Any]) -> Turn:
        kind = message["type"]
        if kind not in MESSAGE_TYPES:
            raise ApiError(400, f"Unsupported message type: {shorten(kind, 64)}")
        if kind == "user_message":
            content = message.get("content")
            if not isinstance(content, str):
                raise ApiError(422, "user_message requires a string content")
            agent_type = message.get("agent_type")
            if agent_type is not None and not _is_agent(agent_type):
                raise ApiError(400, f"Unknown agent_type: {summarise(agent_type, 64)}")
            bench = None
            if content.startswith("bench "):
                bench = _parse_bench(content, self.config.max_bench_tokens)
            return Turn(kind, message, bench)
        if kind == "switch_agent":
            agent_type = message.get("agent_type")
            if not _is_agent(agent_type):
                raise ApiError(400, f"Unknown or missing agent_type: {summarise(agent_type, 64)}")
            return Turn(kind, message)
        call_id = message.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ApiError(400, f"{kind} requires call_id")
        session = self.state.sessions.get(session_id)
        call = session.pending.get(call_id) if session is not None else None
        if kind == "hitl_decision":
            decision = message.get("decision")
            if not (isinstance(decision, str) and decision in HITL_DECISIONS):
                raise ApiError(400, "decision must be one of approve, edit, reject")
            if call is None or not call.requires_approval:
                raise ApiError(400, f"No pending approval with call_id {shorten(call_id, 64)}")
        elif call is None:
            raise ApiError(400, f"No pending tool call with call_id {shorten(call_id, 64)}")
        return Turn(kind, message)

    async def _drive(self, session: Session, turn: Turn) -> AsyncIterator[bytes]:
        """The response body: run the turn's plan under the session lock, pacing its steps.

        A client disconnect cancels the task that iterates this generator (quart-trio cancels
        the request's nursery on ``http.disconnect``): the cancellation arrives at a pause or,
        while a chunk is being sent, as ``aclose()`` at a ``yield``. Either way only the
        ``finally`` blocks run, and they must not await.
        """
        self.active_streams += 1
        self.state.stats["streams_started"] += 1
        session.open_streams += 1
        session.stats["streams"] += 1
        self.state.record("stream_started", session.id, message_type=turn.kind)
        finished = False
        try:
            # Manual acquire/release rather than `async with`: the lock is held across yields.
            await session.lock.acquire()
            try:
                plan = self.agent.plan(session, turn)
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
                        elif isinstance(step, Until):
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
                self.state.stats["streams_completed"] += 1
                self.state.record("stream_completed", session.id, message_type=turn.kind)
            else:
                self.cancelled_streams += 1
                self.state.stats["streams_cancelled"] += 1
                self.state.record("stream_cancelled", session.id, message_type=turn.kind)
            self.state.touch(session)

    # ---------------------------------------------------------------------------------------
    # REST
    # ---------------------------------------------------------------------------------------

    async def _health(self) -> TrioResponse:
        return _json_response({"status": "healthy", "service": "agent-runtime", "version": VERSION})

    async def _create_session(self) -> TrioResponse:
        body = await _json_body(optional=True)
        if body is not None and not isinstance(body, dict):
            raise ApiError(422, "Request body must be a JSON object")
        session_id = body.get("session_id") if body else None
        if session_id is None:
            session_id = str(uuid.uuid4())
        elif not _valid_session_id(session_id):
            raise ApiError(422, "session_id must be a non-empty string of at most 256 characters")
        elif session_id in self.state.sessions:
            raise ApiError(409, "Session already exists")
        session = self.state.new_session(session_id)
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
        sessions = [
            s for s in reversed(self.state.sessions.values()) if s.is_active or not active_only
        ]
        page = sessions[offset : offset + limit]
        return _json_response(
            {
                "sessions": [self.state.session_summary(s) for s in page],
                "total": len(sessions),
                "limit": limit,
                "offset": offset,
            }
        )

    async def _get_session(self, session_id: str) -> TrioResponse:
        include_messages = _query_bool("include_messages")
        session = self.state.require(session_id)
        detail = self.state.session_detail(session, include_messages=include_messages)
        return _json_response({"session": detail})

    async def _patch_session(self, session_id: str) -> TrioResponse:
        session = self.state.require(session_id)
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
            session.title = shorten(title, 200) if title is not None else None
        if isinstance(is_active, bool):
            session.is_active = is_active
        self.state.touch(session)
        changed = sorted(body.keys() & {"title", "is_active"})
        self.state.record("session_updated", session.id, fields=changed)
        return _json_response(
            {"session": self.state.session_detail(session, include_messages=False)}
        )

    async def _delete_session(self, session_id: str) -> TrioResponse:
        self.state.require(session_id)
        del self.state.sessions[session_id]
        self.state.record("session_deleted", session_id)
        return TrioResponse(b"", status=204)

    async def _history(self, session_id: str) -> TrioResponse:
        session = self.state.require(session_id)
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
        session = self.state.sessions.get(session_id)
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

    async def _current_agent(self, session_id: str) -> TrioResponse:
        include_history = _query_bool("include_history")
        session = self.state.require(session_id)
        return _json_response(
            {"context": self.state.context(session, include_history=include_history)}
        )

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
            raise ApiError(400, f"Unknown agent: {shorten(target, 64)}")
        if not _valid_session_id(session_id):
            raise ApiError(422, "session_id is too long")
        # Like a stream, a switch creates the session's context on demand.
        session = self.state.get_or_create(session_id)
        self.state.switch(session, target, reason, float(confidence))
        return _json_response({"context": self.state.context(session, include_history=True)})

    async def _metrics(self) -> TrioResponse:
        sessions = self.state.sessions.values()
        return _json_response(
            {
                **self.state.counters(self.active_streams),
                "sessions": {
                    "total": len(self.state.sessions),
                    "active": sum(1 for s in sessions if s.is_active),
                    "created": self.state.stats["sessions_created"],
                },
                "uptime_seconds": self.state.uptime(),
                "timestamp": now_iso(),
            }
        )

    async def _metrics_sessions(self) -> TrioResponse:
        sessions = [self.state.session_metrics(s) for s in reversed(self.state.sessions.values())]
        return _json_response({"sessions": sessions, "total": len(sessions)})

    async def _metrics_session(self, session_id: str) -> TrioResponse:
        return _json_response(self.state.session_metrics(self.state.require(session_id)))

    async def _audit_log(self) -> TrioResponse:
        limit = _query_int("limit", 100, 1, MAX_AUDIT_EVENTS)
        session_id = request.args.get("session_id") or None
        event_type = request.args.get("event_type") or None
        matching = [
            event
            for event in reversed(self.state.audit)  # newest first
            if (session_id is None or event["session_id"] == session_id)
            and (event_type is None or event["event_type"] == event_type)
        ]
        return _json_response({"events": matching[:limit], "total": len(matching), "limit": limit})

    async def _event_stats(self) -> TrioResponse:
        return _json_response(
            {
                "total_events": self.state.event_seq,
                "events_by_type": dict(self.state.events_by_type),
                "audit_log_size": len(self.state.audit),
                "sessions": len(self.state.sessions),
                "active_streams": self.active_streams,
                "uptime_seconds": self.state.uptime(),
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
