"""The floors the cost benchmarks measure the gateway against: the leanest programs this stack
allows for the same job, each run as a child process on a free loopback port.

- ``relay`` (``frame_cost.py``): a plain ASGI app on hypercorn's trio worker (the gateway's
  hypercorn patches and its compression setting, so the WebSocket layer is the same) that does
  for each client message only what a relay cannot skip: it POSTs the message to the runtime
  over the gateway's own h11 keep-alive pool (``trio_gateway.upstream.http_stream``), cuts the
  SSE answer into events on ``\\n\\n``, parses each ``data:`` payload with orjson, numbers it
  (``seq``), keeps it in a bounded replay deque and sends it as one text frame, from the task
  that reads the runtime. No validation, limits, authentication, metrics, logging,
  backpressure, heartbeats, resume or drain.
- ``rest`` (``rest_cost.py``): a plain ASGI app on hypercorn's trio worker that checks the
  bearer token with PyJWT (RS256, ``aud``, ``iss``, ``exp``; verified tokens cached by their
  text, as the gateway does), sends ``GET /agents`` over the same pool and relays status,
  content type and body. No header policy, limits, metrics or logs.

Both answer ``GET /health`` for the launcher and serve until SIGTERM. Command line:
``python bench/floors.py relay PORT AGENT_URL KEY on|off`` or
``python bench/floors.py rest PORT AGENT_URL JWKS_FILE KEY``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import trio

if __package__ in (None, ""):  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.ports import HOST, free_port
from tests.support.processes import Child, die_with_parent

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
REPLAY_FRAMES = 1000
TURN_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
MAX_BODY = 16 * 1024 * 1024


def _pool(agent_url: str, key: str) -> Any:
    from trio_gateway.upstream.http_stream import ConnectionPool

    return ConnectionPool(
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


async def _respond(send: Any, status: int, content_type: bytes, body: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Any) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


def _serve(app: ASGIApp, port: int, pool: Any, *, compression: bool | None = None) -> None:
    """Serve ``app`` on loopback ``port`` with ``pool`` running until SIGTERM or SIGINT;
    ``compression`` (not None) applies the gateway's hypercorn patches with that setting."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.accesslog = None
    config.errorlog = None
    if compression is not None:
        from trio_gateway import hypercorn_patches

        hypercorn_patches.apply()
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
            await serve(app, config, shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()

    trio.run(main)


def serve_relay_floor(port: int, agent_url: str, key: str, compression: bool) -> None:
    """The relay floor (see the module docstring)."""
    pool = _pool(agent_url, key)

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
            await _lifespan(receive, send)
        elif scope["type"] == "http":  # /health, for the launcher
            await _respond(send, 200, b"application/json", b"{}")
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await relay(scope["path"].rsplit("/", 1)[-1], receive, send)

    _serve(app, port, pool, compression=compression)


def serve_rest_floor(port: int, agent_url: str, jwks_file: Path, key: str) -> None:
    """The REST floor (see the module docstring)."""
    import jwt

    jwk = jwt.PyJWK(json.loads(jwks_file.read_text())["keys"][0])
    verified: dict[str, str] = {}
    pool = _pool(agent_url, key)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":  # for the launcher
            await _respond(send, 200, b"application/json", b'{"status":"ok"}')
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = authorization.decode("latin-1").removeprefix("Bearer ")
        sub = verified.get(token)
        if sub is None:
            try:
                claims = jwt.decode(
                    token,
                    jwk,
                    algorithms=[jwk.algorithm_name],
                    audience="codelab-api",
                    issuer="https://auth.codelab.local",
                    options={"require": ["exp", "sub"]},
                )
            except jwt.PyJWTError:
                await _respond(send, 401, b"application/json", b'{"error":"unauthorized"}')
                return
            sub = verified[token] = str(claims["sub"])
        headers = [(b"x-user-id", sub.encode())]
        async with pool.stream("GET", "/agents", b"", headers) as response:
            body = await response.read_limited(MAX_BODY)
            status = response.status_code
            content_type = response.headers.get("content-type", "application/json")
        await _respond(send, status, content_type.encode("latin-1"), body)

    _serve(app, port, pool)


@contextmanager
def spawned_floor(kind: str, args: Sequence[str], workdir: Path) -> Iterator[Child]:
    """The ``kind`` floor (``relay`` or ``rest``) with ``args`` after its port, as a child
    process on a free loopback port, stopped when the block ends."""
    port = free_port()
    log_path = workdir / f"floor-{kind}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, kind, str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    child = Child(f"floor-{kind}", process, log_path, f"http://{HOST}:{port}")
    try:
        yield child
    finally:
        child.stop()


def main(argv: Sequence[str]) -> int:
    """Serve the floor the command line names (see the module docstring)."""
    kind, port, agent_url, *rest = argv
    if kind == "relay":
        key, compression = rest
        serve_relay_floor(int(port), agent_url, key, compression == "on")
    elif kind == "rest":
        jwks_file, key = rest
        serve_rest_floor(int(port), agent_url, Path(jwks_file), key)
    else:
        raise SystemExit(f"unknown floor {kind!r}: relay or rest")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
