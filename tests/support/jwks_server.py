"""A real Auth Service stand-in on loopback: serves a mutable JWKS over HTTP for the auth tests.

A quart-trio app served by ``hypercorn.trio.serve`` on ``127.0.0.1:0`` (the OS picks the port),
so the JWKS cache is tested through the same httpx client, sockets and HTTP framing as in
production. Everything about the answer can be changed between requests: the key set, the
``Cache-Control`` header, the status (to play "down"), a raw body (to send garbage) and a delay.
Every request is counted, which is how the tests prove how often the gateway asks.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

JWKS_PATH = "/.well-known/jwks.json"


class JWKSServer:
    """Serves ``GET /.well-known/jwks.json`` from the attributes below, as they are right now.

    Start it with ``url = await nursery.start(server.serve)``; ``stop()`` ends it.
    """

    def __init__(
        self,
        jwks: dict[str, Any] | None = None,
        *,
        cache_control: str | None = "public, max-age=3600",
    ) -> None:
        """Serve ``jwks`` (an empty key set by default) with ``cache_control``."""
        self.jwks: dict[str, Any] = jwks if jwks is not None else {"keys": []}
        #: ``None`` sends no Cache-Control header at all.
        self.cache_control = cache_control
        #: Anything but 200 answers with that status and a text body (the Auth Service "down").
        self.status = 200
        #: When set, sent instead of the JSON-encoded ``jwks`` (to test garbage answers).
        self.raw_body: bytes | None = None
        #: Seconds to wait before answering (cut short by ``stop()``).
        self.delay = 0.0
        #: Requests received, answered or not, and the headers of the last one.
        self.requests = 0
        self.last_headers: dict[str, str] = {}
        self.url = ""
        self._stop = trio.Event()
        self.app = QuartTrio(__name__)
        self.app.add_url_rule(JWKS_PATH, "jwks", self._jwks, methods=["GET"])

    def go_down(self, status: int = 503) -> None:
        """Answer every request with ``status`` until :meth:`go_up`."""
        self.status = status

    def go_up(self) -> None:
        """Answer normally again."""
        self.status = 200

    async def serve(
        self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED, port: int = 0
    ) -> None:
        """Serve until :meth:`stop`; reports the JWKS URL through ``task_status``.

        ``port`` 0 lets the OS choose; a fixed port lets a test stop the server (connections
        refused) and bring it back at the same address.
        """
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        # A delayed request is released by stop(); nothing else should hold the shutdown up.
        config.graceful_timeout = 1.0
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(serve, self.app, config, shutdown_trigger=self._stop.wait)
            )
            self.url = binds[0] + JWKS_PATH
            task_status.started(self.url)

    def stop(self) -> None:
        """Stop serving (and release any delayed request)."""
        self._stop.set()

    async def _jwks(self) -> Response:
        self.requests += 1
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        if self.delay:
            with trio.move_on_after(self.delay):
                await self._stop.wait()
        if self.status != 200:
            return Response("auth service unavailable", status=self.status)
        body = self.raw_body if self.raw_body is not None else json.dumps(self.jwks).encode()
        headers = {"Content-Type": "application/json"}
        if self.cache_control is not None:
            headers["Cache-Control"] = self.cache_control
        return Response(body, status=200, headers=headers)
