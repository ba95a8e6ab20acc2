"""The OpenAPI document and /docs as a reader of a deployed gateway meets them."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from trio_gateway.edge.rest_routes import ROUTES
from trio_gateway.openapi import PROTOCOL_PATH, build_openapi

from ..conftest import RunningGateway
from ..support.processes import run_python

ROOT = Path(__file__).resolve().parents[2]


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }


def test_rest_routes_declare_bearer_jwt_and_health_is_public() -> None:
    document = build_openapi()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["bearerAuth"]["bearerFormat"] == "JWT"
    assert schemes["internalKey"]["in"] == "header"
    assert schemes["internalKey"]["name"] == "X-Internal-Auth"
    assert "security" not in document  # no global requirement: health stays public
    found = operations(document)
    for route in ROUTES:
        security = found[(route.method, route.path)]["security"]
        assert {"bearerAuth": []} in security and {} not in security, route.path
    for public in (("GET", "/health"), ("GET", "/api/v1/health")):
        assert "security" not in found[public]


def body_schema(document: dict[str, Any], method: str, path: str) -> tuple[bool, dict[str, Any]]:
    body = operations(document)[(method, path)]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    return body["required"], document["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_request_bodies_have_the_contracts_schemas() -> None:
    document = build_openapi()
    required, create = body_schema(document, "POST", "/api/v1/sessions")
    assert not required and "required" not in create
    assert create["properties"]["session_id"]["type"] == "string"
    assert create["properties"]["session_id"]["minLength"] == 1
    required, switch = body_schema(document, "POST", "/api/v1/agents/{session_id}/switch")
    assert required and switch["required"] == ["target_agent", "reason"]
    assert switch["properties"]["target_agent"]["type"] == "string"
    assert switch["properties"]["confidence"] == {
        **switch["properties"]["confidence"], "type": "number", "minimum": 0, "maximum": 1
    }  # fmt: skip
    required, update = body_schema(document, "PATCH", "/api/v1/sessions/{session_id}")
    assert required and {"title", "is_active"} <= update["properties"].keys()
    assert update["properties"]["is_active"]["type"] == "boolean"  # null is refused (422)
    # Extra keys are passed through to the runtime, so the schemas allow them.
    assert all(s["additionalProperties"] is True for s in (create, switch, update))
    # Nothing else takes a body.
    bodies = {key for key, op in operations(document).items() if "requestBody" in op}
    assert bodies == {
        ("POST", "/api/v1/sessions"),
        ("PATCH", "/api/v1/sessions/{session_id}"),
        ("POST", "/api/v1/agents/{session_id}/switch"),
    }


async def test_docs_link_the_protocol_which_the_gateway_serves(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        page = await http.get("/docs")
        protocol = await http.get(PROTOCOL_PATH)
        document = (await http.get("/openapi.json")).json()
    assert f"<a href='{PROTOCOL_PATH}'>" in page.text
    # Every mention is the served path, none the repository file a reader cannot open.
    assert not re.search(r"(?<!/)docs/protocol\.md", page.text)
    assert PROTOCOL_PATH in document["info"]["description"]
    assert protocol.status_code == 200
    assert protocol.headers["content-type"] == "text/plain; charset=utf-8"
    assert protocol.text == (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_the_packaged_protocol_is_docs_protocol_md() -> None:
    packaged = ROOT / "trio_gateway" / "protocol.md"
    assert packaged.read_bytes() == (ROOT / "docs" / "protocol.md").read_bytes(), (
        "trio_gateway/protocol.md is the copy of docs/protocol.md the gateway serves: "
        "cp docs/protocol.md trio_gateway/protocol.md"
    )


# pip builds a wheel in an isolated environment: it needs setuptools from an index.
@pytest.mark.timeout(300)
def test_a_wheel_serves_the_protocol_without_the_source_tree(tmp_path: Path) -> None:
    build = run_python(
        *("-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)), timeout=280
    )
    if build.returncode != 0 and "setuptools" in build.stderr and "find" in build.stderr:
        pytest.skip(f"no build backend available: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("trio_gateway-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "trio_gateway/protocol.md" in archive.namelist()
    # Import the package from the wheel alone (zip import, ahead of the editable install),
    # in a directory without docs/: the text comes from the installed package.
    probe = (
        "import trio_gateway.openapi as o, sys; "
        "assert '.whl' in o.__file__, o.__file__; "
        "sys.stdout.write(o.load_protocol_document() or '')"
    )
    result = run_python(
        "-c", probe, cwd=tmp_path, env={"PYTHONPATH": str(wheel), "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
