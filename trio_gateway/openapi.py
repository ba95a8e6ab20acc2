"""The OpenAPI document of the REST surface, generated from the route table and pydantic models.

Response bodies of proxied routes are the runtime's own (passed through unchanged), so they are
described as JSON objects; request bodies, the gateway's own errors and health answers have
models here.
"""

from __future__ import annotations

import html
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .protocol import SESSION_ID_MAX_LENGTH
from .rest_proxy import ROUTES, ProxyRoute


class CreateSessionRequest(BaseModel):
    """Body of ``POST /api/v1/sessions`` (optional)."""

    model_config = ConfigDict(extra="allow")
    session_id: str | None = Field(None, description="Use this id instead of a generated one.")


class UpdateSessionRequest(BaseModel):
    """Body of ``PATCH /api/v1/sessions/{session_id}``."""

    model_config = ConfigDict(extra="allow")
    title: str | None = None
    is_active: bool | None = None


class SwitchAgentRequest(BaseModel):
    """Body of ``POST /api/v1/agents/{session_id}/switch``."""

    model_config = ConfigDict(extra="allow")
    target_agent: str
    reason: str | None = None
    confidence: float | None = None


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
            "Runtime's answers through unchanged. The WebSocket protocol is in docs/protocol.md.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
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
        "<table><tr><th>Method</th><th>Path</th><th>Summary</th><th>Parameters</th>"
        "<th>Statuses</th></tr>" + "".join(rows) + "</table></body></html>"
    )
