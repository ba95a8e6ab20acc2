"""The OpenAPI document of the REST surface, generated from the route table and pydantic models.

Response bodies of proxied routes are the runtime's own (passed through unchanged), so they are
described as JSON objects; request bodies, the gateway's own errors and health answers have
models here. Every proxied route declares how to authenticate (a bearer JWT, or a service's
internal key); the health routes are public.

The WebSocket protocol (``docs/protocol.md``) is shipped inside the package as
``trio_gateway/protocol.md`` (a test keeps the two identical) and served at
:data:`PROTOCOL_PATH`, so the ``/docs`` page of a deployed gateway links to a page its readers
can open.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from ._version import __version__
from .edge.rest_routes import ROUTES, ProxyRoute
from .protocol import SESSION_ID_MAX_LENGTH

#: Where the gateway serves the WebSocket protocol document (plain text, Markdown source).
PROTOCOL_PATH: Final = "/docs/protocol.md"
#: The packaged copy of docs/protocol.md.
PROTOCOL_RESOURCE: Final = "protocol.md"
BEARER_SCHEME: Final = "bearerAuth"
INTERNAL_KEY_SCHEME: Final = "internalKey"
_SECURITY_SCHEMES: Final[dict[str, Any]] = {
    BEARER_SCHEME: {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An access token of the Auth Service (RS256, checked against its "
        "JWKS): GET routes need the read scope (GATEWAY__READ_SCOPE, default api:read), the "
        "others the write scope (GATEWAY__WRITE_SCOPE, default api:write). Not checked when "
        "the gateway runs with GATEWAY__USE_JWT_AUTH=false.",
    },
    INTERNAL_KEY_SCHEME: {
        "type": "apiKey",
        "in": "header",
        "name": "X-Internal-Auth",
        "description": "Services only: the runtime's internal key instead of a token, when "
        "the gateway allows it (GATEWAY__ALLOW_INTERNAL_AUTH=true).",
    },
}


def load_protocol_document() -> str | None:
    """The WebSocket protocol document packaged with the gateway, or None if it is missing."""
    try:
        return resources.files(__package__).joinpath(PROTOCOL_RESOURCE).read_text("utf-8")
    except (FileNotFoundError, OSError):
        return None


def _without_null_defaults(schema: dict[str, Any]) -> None:
    """Optional fields that may be omitted but not sent as null: no ``default: null``."""
    for field in schema.get("properties", {}).values():
        if "default" in field and field["default"] is None:
            del field["default"]


class CreateSessionRequest(BaseModel):
    """Body of ``POST /api/v1/sessions`` (optional; without it the runtime picks an id)."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_without_null_defaults)
    session_id: str = Field(
        None,  # type: ignore[assignment]
        min_length=1,
        max_length=SESSION_ID_MAX_LENGTH,
        description="Use this id instead of a generated one (409 if it exists).",
    )


class UpdateSessionRequest(BaseModel):
    """Body of ``PATCH /api/v1/sessions/{session_id}``: the fields to change."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_without_null_defaults)
    title: str | None = Field(None, description="New title; null clears it.")
    is_active: bool = Field(None, description="Archive (false) or restore (true).")  # type: ignore[assignment]


class SwitchAgentRequest(BaseModel):
    """Body of ``POST /api/v1/agents/{session_id}/switch``."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_without_null_defaults)
    target_agent: str = Field(description="The agent to switch to, e.g. coder.")
    reason: str = Field(description="Why; shown in the session's agent history.")
    confidence: float = Field(
        None,  # type: ignore[assignment]
        ge=0,
        le=1,
        description="How sure the caller is (0 to 1; the runtime assumes 1).",
    )


class GatewayError(BaseModel):
    """Every error the gateway itself produces."""

    error: str = Field(description="Machine-readable code, e.g. runtime_unavailable.")
    error_description: str = Field(description="Human-readable explanation.")


class Liveness(BaseModel):
    """Answer of ``GET /health``."""

    status: str
    service: str
    version: str


class Readiness(BaseModel):
    """Answer of ``GET /api/v1/health`` (503 when not ready)."""

    status: str
    version: str
    checks: dict[str, Any]


_MODELS: tuple[type[BaseModel], ...] = (
    CreateSessionRequest,
    UpdateSessionRequest,
    SwitchAgentRequest,
    GatewayError,
    Liveness,
    Readiness,
)
_GATEWAY_ERRORS = {
    "413": "Request body too large.",
    "502": "The runtime is unreachable.",
    "503": "The gateway is saturated (Retry-After given).",
    "504": "The runtime did not answer in time.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(route: ProxyRoute) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _path_schema(name)}
        for name in _path_names(route.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": {"type": kind},
         "description": description}
        for name, kind, description in route.query
    ]  # fmt: skip
    responses: dict[str, Any] = {
        str(route.success_status): {
            "description": "The runtime's answer, passed through unchanged.",
            **(
                {}
                if route.success_status == 204
                else {"content": _json_content({"type": "object"})}
            ),
        },
        "4XX": {
            "description": 'The runtime\'s error (e.g. {"detail": ...}), unchanged; or the '
            "gateway's own refusal as GatewayError (400 invalid_session_id, 400 "
            "invalid_request for a repeated single-valued header or, on POST /sessions, a body "
            "that is not a strict UTF-8 JSON object; 401, 403, 404, 405, 413, 415 for a "
            "Content-Encoding, 429 with Retry-After).",
            "content": _json_content({"type": "object"}),
        },
    }
    for status, description in _GATEWAY_ERRORS.items():
        responses[status] = {
            "description": description,
            "content": _json_content(_ref("GatewayError")),
        }
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_{route.path.strip('/').replace('/', '_')}".replace(
            "{", ""
        )
        .replace("}", "")
        .replace("-", "_"),
        "parameters": parameters,
        "responses": responses,
        # Either scheme will do (an empty requirement would mean "no authentication").
        "security": [{BEARER_SCHEME: []}, {INTERNAL_KEY_SCHEME: []}],
    }
    if route.request_body:
        operation["requestBody"] = {
            "required": route.method != "POST" or route.success_status != 201,
            "content": _json_content(_ref(route.request_body)),
        }
    return operation


def _path_schema(name: str) -> dict[str, Any]:
    """Schema of a path parameter; session ids carry the gateway's own rules (protocol.py)."""
    if name != "session_id":
        return {"type": "string"}
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": SESSION_ID_MAX_LENGTH,
        # No '/', no control characters; '.' and '..' are refused too (400 invalid_session_id).
        "pattern": "^[^/\\x00-\\x1f\\x7f]+$",
        "description": "1-256 printable characters without '/', not '.' or '..'; "
        "anything else gets 400 invalid_session_id.",
    }


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def build_openapi() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    paths: dict[str, dict[str, Any]] = {
        "/health": {
            "get": {
                "summary": "Liveness (never touches the runtime).",
                "operationId": "get_health",
                "responses": {
                    "200": {"description": "Alive.", "content": _json_content(_ref("Liveness"))}
                },
            }
        },
        "/api/v1/health": {
            "get": {
                "summary": "Readiness: runtime reachable, not draining.",
                "operationId": "get_api_v1_health",
                "responses": {
                    "200": {"description": "Ready.", "content": _json_content(_ref("Readiness"))},
                    "503": {
                        "description": "Not ready.",
                        "content": _json_content(_ref("Readiness")),
                    },
                },
            }
        },
    }  # fmt: skip
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    schemas = {
        model.__name__: model.model_json_schema(ref_template="#/components/schemas/{model}")
        for model in _MODELS
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trio-gateway REST API",
            "version": __version__,
            "description": "REST surface of trio-gateway; proxied routes pass the Agent "
            "Runtime's answers through unchanged. The WebSocket protocol "
            f"(/api/v1/ws/{{session_id}}) is described at {PROTOCOL_PATH} on this gateway.",
        },
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": _SECURITY_SCHEMES},
    }


def render_docs_html(document: dict[str, Any]) -> str:
    """A self-contained, human-readable page of the document (no CDN assets needed)."""
    rows = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            params = ", ".join(f"{p['name']} ({p['in']})" for p in operation.get("parameters", []))
            statuses = ", ".join(operation["responses"])
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code>"
                f"</td><td>{html.escape(operation['summary'])}</td><td>{html.escape(params)}</td>"
                f"<td>{html.escape(statuses)}</td></tr>"
            )
    info = document["info"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(info['title'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border-bottom:1px solid #ddd;"
        "padding:4px 8px;text-align:left}</style></head><body>"
        f"<h1>{html.escape(info['title'])} {html.escape(info['version'])}</h1>"
        f"<p>{html.escape(info['description'])} Machine-readable: "
        "<a href='/openapi.json'>/openapi.json</a>.</p>"
        f"<p>The WebSocket protocol: <a href='{PROTOCOL_PATH}'>"
        f"{PROTOCOL_PATH}</a>. Authentication: <code>Authorization: Bearer &lt;JWT&gt;</code> "
        "on every <code>/api/v1</code> route except <code>/api/v1/health</code>.</p>"
        "<table><tr><th>Method</th><th>Path</th><th>Summary</th><th>Parameters</th>"
        "<th>Statuses</th></tr>" + "".join(rows) + "</table></body></html>"
    )
