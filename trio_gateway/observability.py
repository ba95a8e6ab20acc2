"""Structured logs and Prometheus metrics.

Logs: one JSON object per line (or one readable line for a terminal), with timestamp, level,
logger, message, ``request_id``, ``session_id``, ``user`` and any ``extra=`` fields. The ids come
from context variables: trio copies the calling task's context into every task it starts, so
binding them before a session's nursery opens tags every line its child tasks log.

Metrics: one :class:`Metrics` (its own ``CollectorRegistry``) per app, so tests can run many
gateways in one process. Labels never carry session or user ids (cardinality).
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Literal

import orjson
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "session_id", default=None
)
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
user_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("user", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "session_id", "request_id", "user", "taskName"}
)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = session_id_var.get()
        record.request_id = request_id_var.get()
        record.user = user_var.get()
        return True


# The user agent of the container healthchecks (the Dockerfile's HEALTHCHECK and the compose
# file's): their successful probes of /health are not access-logged.
HEALTHCHECK_USER_AGENT = "trio-gateway-healthcheck"


class _HealthcheckProbeFilter(logging.Filter):
    """Drops the access line of a healthcheck's successful ``/health`` probe.

    Docker probes every 10 s: logged, that is 8,640 identical lines a day per container,
    burying the requests that matter. Only the healthcheck's own user agent is concerned, and
    only a 200 or hypercorn's "-" (hypercorn 0.18 logs a second line with no status when the
    client closes as soon as it has the answer, as the probe does); a probe that got an error
    status, and every other caller of /health, are still logged. Docker keeps the probes'
    own results (``docker inspect`` ``.State.Health``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        return not (
            record.name == "hypercorn.access"
            and isinstance(atoms, Mapping)
            and atoms.get("U") == "/health"
            and atoms.get("s") in ("200", "-")
            and atoms.get("{user-agent}i") == HEALTHCHECK_USER_AGENT
        )


# What a text log line must never carry raw: C0 controls (CR and LF forge whole log lines,
# ESC drives the operator's terminal), DEL, C1 controls (NEL is a line break too), the Unicode
# line and paragraph separators, and the bidirectional marks, embeddings, overrides and isolates
# that reorder what a terminal shows ("Trojan source"). A path is percent-decoded by the server,
# so a client puts any of them in a request line with %0a, %1b, %e2%80%a8 and the like.
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(value: object) -> str:
    """``value`` as text with every control and line-separator character escaped (``\\x0a``,
    ``\\u2028``): one log field can never become two lines or a terminal escape sequence."""
    return _UNSAFE_TEXT.sub(_escape_char, str(value))


def _access_fields(record: logging.LogRecord) -> dict[str, Any] | None:
    # hypercorn's access logger passes its "atoms" mapping as the record's args. We log the
    # path without its query string: a query may carry a token.
    atoms = record.args
    if record.name != "hypercorn.access" or not isinstance(atoms, Mapping):
        return None
    request_line = str(atoms.get("r", ""))
    parts = request_line.split(" ")
    # "m" and "U" are the method and the (decoded) path themselves: a path with a space in it
    # (%20) would otherwise be cut at the space.
    method = atoms.get("m", parts[0] if parts else "")
    path = atoms.get("U", parts[1].split("?", 1)[0] if len(parts) > 1 else "")
    fields: dict[str, Any] = {
        "event": "http_access",
        "method": method,
        "path": path,
        "status": atoms.get("s"),
        "duration_ms": _milliseconds(atoms.get("D")),
        "client": atoms.get("h"),
    }
    request_id = atoms.get("{x-request-id}o")
    if request_id and request_id != "-":
        fields["request_id"] = request_id
    return fields


def _milliseconds(microseconds: object) -> float | None:
    # hypercorn 0.18's `D` atom: the request's duration in whole microseconds.
    try:
        return round(float(microseconds) / 1000, 3)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        access = _access_fields(record)
        entry: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": "request" if access is not None else record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "session_id": getattr(record, "session_id", None),
            "user": getattr(record, "user", None),
        }
        if access is not None:
            entry.update(access)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """A readable line for a terminal, with the same context fields.

    Every field goes through :func:`escape_text`, so a record is exactly one line whatever a
    client managed to put in it; a traceback keeps its lines, each indented (escaped within),
    so that no line of it can pass for a log line of its own.
    """

    def format(self, record: logging.LogRecord) -> str:
        access = _access_fields(record)
        message = (
            " ".join(escape_text(access[key]) for key in ("method", "path", "status"))
            + f" {escape_text(access['duration_ms'])}ms"
            if access is not None
            else escape_text(record.getMessage())
        )
        context = " ".join(
            f"{name}={escape_text(value)}"
            for name in ("request_id", "session_id", "user")
            if (value := getattr(record, name, None))
        )
        line = (
            f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} "
            f"{escape_text(record.name)}: {message}" + (f"  [{context}]" if context else "")
        )
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n    {escape_text(part)}" for part in trace.splitlines())
        return line


def configure_logging(
    level: str, fmt: Literal["auto", "json", "text"] = "auto", stream: IO[str] | None = None
) -> logging.Handler:
    """Route the gateway's and hypercorn's logs to ``stream`` (stderr) in one format."""
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ContextFilter())
    handler.addFilter(_HealthcheckProbeFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("hypercorn.access", "hypercorn.error"):
        hypercorn_logger = logging.getLogger(name)
        hypercorn_logger.handlers[:] = []
        hypercorn_logger.propagate = True
    # httpx logs every request at INFO, with full URLs: too chatty for a proxy's hot path.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler


KNOWN_FRAME_TYPES = frozenset(
    {
        "user_message", "tool_result", "switch_agent", "hitl_decision", "cancel", "ping",
        "assistant_message", "tool_call", "agent_switched", "error", "done", "session_info",
        "status", "session_ready", "turn_started", "turn_finished", "pong", "heartbeat",
        "cancel_ack", "resync_required", "invalid", "binary", "auth", "auth_ok",
    }
)  # fmt: skip


def frame_type_label(frame_type: object) -> str:
    """Bounded label for a frame type: unknown runtime types collapse into ``other``."""
    return (
        frame_type if isinstance(frame_type, str) and frame_type in KNOWN_FRAME_TYPES else "other"
    )


def count_trio_tasks() -> int:
    """Live tasks of the running trio loop (0 outside one)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return 0
    count = 0
    stack = [root] if root is not None else []
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


class Metrics:
    """Every Prometheus metric of one app, in the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_websockets = Gauge(
            "gateway_active_websockets", "Open WebSocket connections.", registry=r
        )
        self.active_sessions = Gauge(
            "gateway_active_sessions", "Live sessions (connected or in grace).", registry=r
        )
        self.pending_auth_websockets = Gauge(
            "gateway_pending_auth_websockets",
            "WebSockets opened without a token, waiting for their first-frame auth.",
            registry=r,
        )
        self.connections_opened = Counter(
            "gateway_websocket_connections_opened", "WebSocket connections accepted.", registry=r
        )
        self.connections_closed = Counter(
            "gateway_websocket_connections_closed",
            "WebSocket connections closed, by close code.",
            ["code"],
            registry=r,
        )
        self.session_id_admissions = Counter(
            "gateway_websocket_session_id_admissions",
            "WebSockets admitted without a token because their session has an owner "
            "(WS_AUTH_MODE=session-id).",
            registry=r,
        )
        self.handshakes_refused = Counter(
            "gateway_websocket_handshakes_refused",
            "WebSocket handshakes refused, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.frames_in = Counter(
            "gateway_frames_in", "Client frames received, by type.", ["type"], registry=r
        )
        self.frames_out = Counter(
            "gateway_frames_out", "Frames sent to clients, by type.", ["type"], registry=r
        )
        self.chunks_relayed = Counter(
            "gateway_runtime_chunks_relayed", "Runtime stream chunks relayed.", registry=r
        )
        self.turns = Counter(
            "gateway_turns", "Turns finished, by outcome.", ["outcome"], registry=r
        )
        self.turn_duration = Histogram(
            "gateway_turn_duration_seconds",
            "Duration of turns.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "gateway_time_to_first_chunk_seconds",
            "Time from a turn's start to its first relayed chunk.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.runtime_stream_errors = Counter(
            "gateway_runtime_stream_errors",
            "Turns that failed at the runtime, by error code.",
            ["kind"],
            registry=r,
        )
        self.rest_requests = Counter(
            "gateway_rest_requests",
            "Proxied REST requests, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.rest_latency = Histogram(
            "gateway_rest_request_duration_seconds",
            "Latency of proxied REST requests, by route template.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.resumes = Counter(
            "gateway_resumes",
            "Re-attaching v2 clients, by outcome: exact replay or resync_required.",
            ["outcome"],
            registry=r,
        )
        self.limit_hits = Counter(
            "gateway_limit_hits",
            "Limits and caps hit, by limit.",
            ["limit"],
            registry=r,
        )
        self.outbound_queue_bytes = Gauge(
            "gateway_outbound_queue_bytes",
            "Relayed bytes waiting for client sockets, all sessions.",
            registry=r,
        )
        self.detached_bytes = Gauge(
            "gateway_detached_bytes",
            "Relayed bytes held for clients that left (detached sessions), all users.",
            registry=r,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Refused authentications and authorizations, by reason.",
            ["reason"],
            registry=r,
        )
        self.state_backend_up = Gauge(
            "gateway_state_backend_up",
            "1 while the shared-state backend answers (always 1 for memory), else 0.",
            registry=r,
        )
        self.state_backend_failures = Counter(
            "gateway_state_backend_failures",
            "Operations the shared state could not serve, by operation (rate checks that "
            "failed open included).",
            ["operation"],
            registry=r,
        )
        self.jwks_fetches = Gauge(
            "gateway_jwks_fetches", "JWKS fetches attempted since start.", registry=r
        )
        self.jwks_fetch_failures = Gauge(
            "gateway_jwks_fetch_failures", "JWKS fetches that failed since start.", registry=r
        )
        # Leak detection from outside (bench/soak.py): after load stops, this must return to
        # what it was before. Counted at scrape time only.
        self.trio_tasks = Gauge(
            "gateway_trio_tasks", "Live trio tasks in this process.", registry=r
        )
        self.trio_tasks.set_function(count_trio_tasks)
        self.coalesced_chunks = Counter(
            "gateway_coalesced_chunks",
            "Runtime chunks merged into a preceding frame for a client that fell behind.",
            registry=r,
        )
