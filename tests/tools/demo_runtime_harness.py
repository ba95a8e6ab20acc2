"""What the demo Agent Runtime test modules share: a real server (hypercorn on 127.0.0.1:0) with an
httpx client that holds the internal key, the same way the gateway speaks to it, and helpers to
run a turn and read its SSE. Pacing is switched off so every test runs in moments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
import trio

from trio_gateway.tools.demo_runtime import (
    DemoRuntime,
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)

from ..support.frames import CHUNK_FIELDS

KEY = "test-internal-key"
AUTH = "X-Internal-Auth"
STREAM = "/agent/message/stream"
FAST = DemoRuntimeConfig(internal_api_key=KEY, token_delay=0, think_delay=0)


@asynccontextmanager
async def serving(
    config: DemoRuntimeConfig,
) -> AsyncIterator[tuple[DemoRuntime, httpx.AsyncClient]]:
    """Serve a fresh runtime on an OS-chosen port; yield it with a client that holds the key."""
    runtime = create_demo_runtime(config)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=stop.wait)
        )
        try:
            # Plain HTTP on loopback: verify=False only skips loading the CA bundle, which
            # costs about 0.25 s per client.
            async with httpx.AsyncClient(
                base_url=binds[0], headers={AUTH: KEY}, timeout=10, verify=False
            ) as client:
                yield runtime, client
        finally:
            stop.set()


@pytest.fixture
async def served() -> AsyncIterator[tuple[DemoRuntime, httpx.AsyncClient]]:
    async with serving(FAST) as pair:
        yield pair


@pytest.fixture
def runtime(served: tuple[DemoRuntime, httpx.AsyncClient]) -> DemoRuntime:
    return served[0]


@pytest.fixture
def client(served: tuple[DemoRuntime, httpx.AsyncClient]) -> httpx.AsyncClient:
    return served[1]


def parse_sse(body: bytes) -> list[dict[str, Any]]:
    """Parse the runtime's SSE body strictly: every event is exactly ``data: <json>\\n\\n``."""
    assert body.endswith(b"\n\n")
    chunks = []
    for event in body.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        assert b"\n" not in event
        chunk = orjson.loads(event[len(b"data: ") :])
        assert set(chunk) == set(CHUNK_FIELDS)  # every field, nulls included
        chunks.append(chunk)
    return chunks


async def turn(client: httpx.AsyncClient, session_id: str, message: dict[str, Any]) -> list[Any]:
    """Stream one turn to the end and return its chunks."""
    body = {"session_id": session_id, "message": message}
    async with client.stream("POST", STREAM, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = await response.aread()
    chunks = parse_sse(raw)
    assert chunks[-1]["is_final"] is True
    assert all(chunk["is_final"] is False for chunk in chunks[:-1])
    return chunks


def user(content: str, **extra: Any) -> dict[str, Any]:
    return {"type": "user_message", "content": content, "role": "user", **extra}


def tool_result(call_id: str, **outcome: Any) -> dict[str, Any]:
    return {"type": "tool_result", "call_id": call_id, **outcome}


async def get_json(client: httpx.AsyncClient, path: str, status: int = 200, **params: Any) -> Any:
    response = await client.get(path, params=params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a runtime counter (the runtime offers no event to wait on), for up to 5 s."""
    for _ in range(1000):
        if condition():
            return
        await trio.sleep(0.005)
    raise AssertionError("condition not reached within 5 s")


async def start_coding(client: httpx.AsyncClient, session_id: str) -> str:
    """Run the first coding turn; return the read_file call id."""
    chunks = await turn(client, session_id, user("Write a hello world script"))
    return str(chunks[-1]["call_id"])
