"""The proxied REST routes, declared as one table: the proxy (``rest_proxy.py``), its ASGI door
(``rest_door.py``), Quart's fallback rules and the OpenAPI document (``openapi.py``) all read
it."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ProxyRoute:
    """One proxied route: ``{name}`` placeholders are path parameters."""

    method: str
    path: str  # gateway path, under /api/v1
    runtime_path: str
    summary: str
    timeout: float | None = None  # None: GATEWAY__REQUEST_TIMEOUT
    per_session: bool = False  # the route addresses one session (ownership checks apply)
    request_body: str | None = None  # name of the request model in the OpenAPI document
    success_status: int = 200
    query: tuple[tuple[str, str, str], ...] = ()  # (name, type, description)
    # Cross-session data: the runtime knows no users, so an ordinary caller's answer is
    # filtered to the sessions they own: ``(list key, session id key)`` of the runtime's JSON
    # answer. Services (internal key) see everything.
    own_sessions_in: tuple[str, str] | None = None
    # A query parameter naming one session: checked for ownership when given (an empty value
    # means no filter, as at the runtime, and is not forwarded).
    session_query: str | None = None

    @property
    def quart_rule(self) -> str:
        """The path in Quart's routing syntax."""
        return re.sub(r"\{(\w+)\}", r"<\1>", self.path)

    @property
    def template(self) -> str:
        """The path template, used as a metrics label (bounded cardinality)."""
        return self.path


ROUTES: tuple[ProxyRoute, ...] = (
    ProxyRoute("GET", "/api/v1/agents", "/agents", "List the available agents."),
    ProxyRoute(
        "GET", "/api/v1/agents/{session_id}/current", "/agents/{session_id}/current",
        "Current agent of a session.", per_session=True,
        query=(("include_history", "boolean", "Include the agent switch history."),),
    ),
    ProxyRoute(
        "POST", "/api/v1/agents/{session_id}/switch", "/agents/{session_id}/switch",
        "Switch a session's agent.", per_session=True, request_body="SwitchAgentRequest",
    ),
    ProxyRoute(
        "GET", "/api/v1/sessions", "/sessions", "List your sessions.",
        own_sessions_in=("sessions", "id"),
        query=(
            ("limit", "integer", "Page size."),
            ("offset", "integer", "Page start."),
            ("active_only", "boolean", "Only active sessions."),
        ),
    ),
    ProxyRoute(
        "POST", "/api/v1/sessions", "/sessions", "Create a session.",
        request_body="CreateSessionRequest", success_status=201,
    ),
    ProxyRoute(
        "GET", "/api/v1/sessions/{session_id}", "/sessions/{session_id}", "One session.",
        per_session=True,
        query=(("include_messages", "boolean", "Include the messages."),),
    ),
    ProxyRoute(
        "PATCH", "/api/v1/sessions/{session_id}", "/sessions/{session_id}",
        "Update a session.", per_session=True, request_body="UpdateSessionRequest",
    ),
    ProxyRoute(
        "DELETE", "/api/v1/sessions/{session_id}", "/sessions/{session_id}",
        "Delete a session.", per_session=True, success_status=204,
    ),
    ProxyRoute(
        "GET", "/api/v1/sessions/{session_id}/history", "/sessions/{session_id}/history",
        "Message history of a session.", per_session=True,
    ),
    ProxyRoute(
        "GET", "/api/v1/sessions/{session_id}/pending-approvals",
        "/sessions/{session_id}/pending-approvals",
        "Tool calls of a session waiting for approval.", per_session=True,
    ),
    ProxyRoute("GET", "/api/v1/events/metrics", "/events/metrics", "Runtime metrics."),
    ProxyRoute(
        "GET", "/api/v1/events/metrics/sessions", "/events/metrics/sessions",
        "Per-session metrics summary of your sessions (services: every session).",
        own_sessions_in=("sessions", "session_id"),
    ),
    ProxyRoute(
        "GET", "/api/v1/events/metrics/session/{session_id}",
        "/events/metrics/session/{session_id}", "Metrics of one session.", per_session=True,
    ),
    ProxyRoute(
        "GET", "/api/v1/events/audit-log", "/events/audit-log",
        "Audit log of your sessions, or of one of them (services: every session). The runtime "
        "applies limit before the gateway leaves out other users' events.",
        own_sessions_in=("events", "session_id"), session_query="session_id",
        query=(
            ("session_id", "string", "Only this session."),
            ("event_type", "string", "Only this event type."),
            ("limit", "integer", "Most recent N events."),
        ),
    ),
    ProxyRoute("GET", "/api/v1/events/stats", "/events/stats", "Event statistics."),
)  # fmt: skip
