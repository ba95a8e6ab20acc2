"""The leanest relay this stack allows: the floor ``frame_cost.py`` measures the gateway against.

A plain ASGI app on hypercorn's trio worker (the gateway's hypercorn patches and its compression
setting, so the WebSocket layer is the same) that does for each client message only what a
relay cannot skip: it POSTs the message to the runtime over the gateway's own h11 keep-alive
pool (``trio_gateway.upstream.http_stream.ConnectionPool``), cuts the SSE answer into events on
``\\n\\n``, parses each ``data:`` payload with orjson, numbers it (``seq``), keeps it in a
bounded replay deque, and sends it as one text frame. No validation, limits, authentication,
metrics, logging, backpressure, heartbeats, resume or drain.

Run as a child process by ``frame_cost.py`` (``python bench/floor_relay.py PORT AGENT_URL KEY
on|off``); it serves until SIGTERM. ``GET /health`` answers 200 for the launcher.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import trio

if __package__ in (None, ""):  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.ports import HOST, free_port
from tests.support.processes import Child, die_with_parent

REPLAY_FRAMES = 1000
TURN_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


def serve(port: int, agent_url: str, key: str, compression: bool) -> None:
    """Serve the floor relay on ``port`` until SIGTERM (see the module docstring)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    from trio_gateway import hypercorn_patches
    from trio_gateway.upstream.http_stream import ConnectionPool

    hypercorn_patches.apply()
    pool = ConnectionPool(
        agent_url,
        default_headers={"X-Internal-Auth": key},
        connect_timeout=30,
        write_timeout=30,
        idle_timeout=60,
        max_connections=1000,
        max_idle=200,
        idle_expiry=4,
        slot_wait=30,
    )

    async def relay(session_id: str, receive: Any, send: Any) -> None:
        seq = 0
        replay: deque[tuple[int, str]] = deque(maxlen=REPLAY_FRAMES)
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            message = orjson.loads(event.get("text") or event.get("bytes") or b"{}")
            if message.get("type") != "user_message":
                continue
            body = orjson.dumps({"session_id": session_id, "message": message})
            async with pool.stream("POST", "/agent/message/stream", body, TURN_HEADERS) as answer:
                pending = b""
                while (data := await answer.receive_body()) is not None:
                    *blocks, pending = (pending + data).split(b"\n\n")
                    for block in blocks:
                        if not block.startswith(b"data: "):
                            continue
                        chunk = orjson.loads(block[6:])
                        seq += 1
                        chunk["seq"] = seq
                        text = orjson.dumps(chunk).decode()
                        replay.append((seq, text))
                        await send({"type": "websocket.send", "text": text})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":  # /health, for the launcher
            headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"{}"})
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await relay(scope["path"].rsplit("/", 1)[-1], receive, send)

    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.accesslog = None
    config.errorlog = None
    hypercorn_patches.set_compression(config, compression)
    stop = trio.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        stop.set()
                        return

            nursery.start_soon(on_signal)
            await hypercorn_serve(app, config, shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()

    trio.run(main)


@contextmanager
def spawned_floor_relay(
    agent_url: str, key: str, compression: bool, workdir: Path
) -> Iterator[Child]:
    """The floor relay as a child process on a free loopback port (stopped on exit)."""
    port = free_port()
    log_path = workdir / "floor-relay.log"
    command = [sys.executable, __file__, str(port), agent_url, key, "on" if compression else "off"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    child = Child("floor-relay", process, log_path, f"http://{HOST}:{port}")
    try:
        yield child
    finally:
        child.stop()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "on")
