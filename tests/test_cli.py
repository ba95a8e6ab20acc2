"""The trio-gateway command, run as a user would: a real process on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import trio
import trio_websocket

from .conftest import WsClient
from .test_drain import wait_until_serving


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start(*args: str, env: dict[str, str] | None = None) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_gateway.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


async def stop(process: trio.Process, sig: int = signal.SIGINT) -> int:
    if process.returncode is None:
        process.send_signal(sig)
    with trio.fail_after(20):
        return await process.wait()


async def test_demo_serves_a_chat_and_stops_cleanly_on_ctrl_c() -> None:
    port = free_port()
    process = await start("demo", "--port", str(port))
    try:
        await wait_until_serving(f"http://127.0.0.1:{port}")
        async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{port}/api/v1/ws/demo-check"
        ) as ws:
            client = WsClient(ws)
            await client.send(
                {"type": "user_message", "content": "write a hello world in python", "role": "user"}
            )
            frames = await client.turn(timeout=20)
        types = [f["type"] for f in frames]
        assert "agent_switched" in types and types[-1] == "tool_call"
        assert await stop(process) == 0
        assert process.stdout is not None
        printed = (await process.stdout.receive_some(65536)).decode()
        assert f"ws://127.0.0.1:{port}/api/v1/ws/" in printed
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_demo_runtime_alone_serves_the_runtime_contract() -> None:
    port = free_port()
    process = await start(
        "demo-runtime",
        "--port",
        str(port),
        "--instant",
        env={"GATEWAY__INTERNAL_API_KEY": "cli-test-key"},
    )
    try:
        await wait_until_serving(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/agents")).status_code == 401
            answer = await http.get("/agents", headers={"X-Internal-Auth": "cli-test-key"})
            assert answer.status_code == 200 and answer.json()["total"] >= 5
        assert await stop(process, signal.SIGTERM) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_port_in_use_is_a_clear_error() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    try:
        result = await trio.run_process(
            [sys.executable, "-m", "trio_gateway.cli", "serve", "--port", str(port)],
            capture_stderr=True,
            check=False,
        )
    finally:
        await listener.aclose()
    assert result.returncode == 1
    assert b"Address already in use" in result.stderr
    assert b"Traceback" not in result.stderr


def test_hypercorn_can_import_the_asgi_app() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from trio_gateway.main import app; print(type(app).__name__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "GatewayApp"
