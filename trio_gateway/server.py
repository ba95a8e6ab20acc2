"""``trio-gateway serve``: hypercorn's trio server around the app, with a graceful drain.

We run ``hypercorn.trio.serve`` ourselves instead of the hypercorn CLI because the CLI's
shutdown gives WebSocket clients 1006 (tasks are cancelled, no close frame) and never tells the
app it is stopping. Here the shutdown trigger waits for SIGTERM/SIGINT, drains the sessions
(new handshakes get 503, live sessions get 1012 when their turn ends or the drain times out),
and only then lets hypercorn stop. One process per container; scale out with replicas.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.trio import serve as hypercorn_serve

from . import hypercorn_patches
from .app import GatewayApp
from .settings import Settings
from .state import sqlite_store
from .workers import reuse_port_socket

logger = logging.getLogger("trio_gateway.server")

# hypercorn's default listen backlog (100) overflows when hundreds of clients connect at once
# (after a drain's 1012 every IDE reconnects): dropped SYNs cost each of them 1-3 s of TCP
# retransmission, and an overflowing accept queue resets connections. The kernel caps it at
# net.core.somaxconn.
LISTEN_BACKLOG = 4096


# CPython's cyclic GC defaults (700, 10, 10) suit small programs. A gateway holding thousands
# of sessions keeps ~400 objects per session alive for seconds (a turn's stream, frames, tasks,
# cancel scopes): with a young collection every 700 allocations those objects survive into the
# oldest generation, which then fills by 25% every few seconds and triggers a full collection
# that walks the whole heap. Measured with bench/load.py at 2000 sessions (Python 3.11, ~800k
# tracked objects): one full collection every ~5 s taking ~2 s of wall time, and ~3 s of every
# 5 s inside the collector altogether - event-loop stalls that queued every token behind them.
# Larger young generations let a turn's objects die young; cycles are still collected.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Process-wide GC settings for a long-running server; call once, after start-up.

    ``gc.freeze()`` moves everything allocated so far (modules, the app, settings) to the
    permanent generation, so full collections no longer walk it on every pass."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: Set in an HTTP request's ASGI scope once the app has sent the last part of its answer.
RESPONSE_SENT = "trio_gateway.response_sent"

# hypercorn's access-log format: only for handlers other than ours (observability's formatters
# build the line from the fields). Duration in microseconds: `D` is hypercorn 0.18's atom for
# it (`M`, gunicorn's milliseconds, does not exist there and came out as "-").
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(D)sus'


class AccessAtoms(dict[str, Any]):
    """The access-log fields of one request that the gateway reads: the format above, the
    JSON/text fields of ``observability`` (method, path, status, duration, client, request id)
    and its healthcheck filter (user agent). Missing atoms read ``-``, as hypercorn's do.

    hypercorn's own ``AccessLogAtoms`` also copies every environment variable and every request
    and response header into each request's mapping, for format atoms nothing here uses: about
    3% of a proxied request's CPU (docs/performance.md).
    """

    def __init__(self, request: Any, response: Any, request_time: float) -> None:
        method = request["method"] if request["type"] == "http" else "GET"
        path = request["path"]
        client = request.get("client")
        super().__init__(
            h=None if not client else ":".join(str(part) for part in client),
            r=f"{method} {path} {request.get('http_version', 'ws')}",
            m=method,
            U=path,
            s="-" if response is None else str(response["status"]),
            D=int(request_time * 1_000_000),
        )
        for name, value in request["headers"]:
            if name.lower() == b"user-agent":
                self["{user-agent}i"] = value.decode("latin1")
        for name, value in (response or {}).get("headers", ()):
            if name.lower() == b"x-request-id":
                self["{x-request-id}o"] = value.decode("latin1")

    def __missing__(self, key: str) -> str:
        return "-"


class AccessLogger(HypercornLogger):
    """hypercorn's logger with lean atoms (:class:`AccessAtoms`) and without the second,
    status-less access line of a finished request.

    hypercorn 0.18 logs a request with no response (status ``-``) when the client's close
    arrives while the request is not yet marked complete, and it marks it complete only after
    writing the end of the body, a checkpoint later. A client that hangs up as soon as it has
    read the answer (curl, health probes) lands in that gap, and every such request got two
    lines: ``-`` and then the real one. A request whose answer the app had fully sent (see
    :func:`mark_sent_responses`) gets only the real line; a client that leaves before the
    answer still gets its ``-`` line.
    """

    async def access(self, request: Any, response: Any, request_time: float) -> None:
        if response is None and request.get(RESPONSE_SENT):
            return
        await super().access(request, response, request_time)

    def atoms(self, request: Any, response: Any, request_time: float) -> AccessAtoms:
        """The fields of one access line (see :class:`AccessAtoms`)."""
        return AccessAtoms(request, response, request_time)


def mark_sent_responses(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """``app`` behind an ASGI layer that sets :data:`RESPONSE_SENT` in an HTTP request's scope
    once the app has handed over its whole answer (read by :class:`AccessLogger`).

    "Whole" is the last body message, or the last byte of a declared ``Content-Length``:
    Quart sends the body and then an empty last message, and a client that knows the length
    may hang up between the two.
    """

    def marked(scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        # A plain function handing over the app's own coroutine: a WebSocket runs for hours,
        # and a wrapper coroutine awaiting it would sit in every idle session (~0.3 KiB).
        # hypercorn is therefore told the mode (it detects ASGI by coroutine functions).
        if scope["type"] != "http":
            return app(scope, receive, send)
        return marked_http(scope, receive, send)

    async def marked_http(scope: dict[str, Any], receive: Any, send: Any) -> None:
        remaining: int | None = None

        async def marking_send(message: dict[str, Any]) -> None:
            nonlocal remaining
            kind = message["type"]
            if kind == "http.response.start":
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-length" and value.strip().isdigit():
                        remaining = int(value)
            elif kind == "http.response.body":
                if remaining is not None:
                    remaining -= len(message.get("body", b""))
                if not message.get("more_body", False) or (
                    remaining is not None and remaining <= 0
                ):
                    scope[RESPONSE_SENT] = True  # before hypercorn's write: the race is inside it
            await send(message)

        await app(scope, receive, marking_send)

    return marked


def build_hypercorn_config(
    settings: Settings, host: str | None = None, port: int | None = None
) -> Config:
    """hypercorn settings derived from ours (heartbeat, dead-peer detection, message size)."""
    config = Config()
    bind_host = host if host is not None else settings.host
    bind_port = settings.port if port is None else port
    config.bind = [f"[{bind_host}]:{bind_port}" if ":" in bind_host else f"{bind_host}:{bind_port}"]
    # Our loggers (configured by observability.configure_logging), so hypercorn's lines come
    # out in the same format as ours.
    config.accesslog = logging.getLogger("hypercorn.access") if settings.access_log else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.access_log_format = ACCESS_LOG_FORMAT
    config.logger_class = AccessLogger
    # Protocol pings every interval are sent by whoever sends on the socket (transport.ask_ping),
    # not from a hypercorn task per socket; a peer that sends nothing (pongs count) for about
    # two intervals trips the read timeout and is dropped (hypercorn has no pong timeout).
    config.websocket_ping_interval = None
    config.read_timeout = settings.read_timeout  # type: ignore[assignment]
    config.websocket_max_message_size = settings.ws_max_message_bytes
    # Read per connection by hypercorn_patches.handshake_accept: off never negotiates
    # permessage-deflate; on inflates within websocket_max_message_size.
    hypercorn_patches.set_compression(config, settings.ws_compression == "on")
    # By the time hypercorn's own graceful stop starts, our drain has closed every session;
    # what is left of a connection notices the closed socket by itself. Waiting gains nothing.
    config.graceful_timeout = min(1.0, settings.ws_close_timeout)
    # ASGI events hypercorn buffers per connection before it stops reading the socket: with
    # the session reader consuming as it goes, this is the whole inbound buffer.
    config.max_app_queue_size = 8
    # hypercorn's keep-alive timer runs from a connection's opening, and from the end of each
    # response, until the next request head is complete: so it is also the bound on a slow
    # request head (slow-loris), once hypercorn_patches.py keeps the timer armed (item 4).
    # A request being served is not timed by it: long streams and WebSockets are unaffected.
    config.keep_alive_timeout = settings.http_head_timeout  # type: ignore[assignment]
    config.backlog = LISTEN_BACKLOG
    return config


async def wait_for_signal() -> None:
    """Return at the first SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("received %s; draining", signal.Signals(signum).name)
            return


async def serve(
    app: GatewayApp,
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns (default: SIGTERM/SIGINT), then drain.

    ``task_status`` receives the bound addresses (bind port 0 to let the OS choose).
    ``reuse_port``: listen with ``SO_REUSEPORT`` beside the other workers of
    ``trio-gateway serve --workers N`` (see workers.py).
    """
    hypercorn_patches.apply()  # before any connection: see hypercorn_patches.py
    # An unusable state file stops the start here, as the one error, before the port is bound:
    # from the app's own startup it would surface wrapped in hypercorn's lifespan failure.
    await sqlite_store.preflight(settings)
    config = build_hypercorn_config(settings, host, port)
    if reuse_port:
        bind_host = host if host is not None else settings.host
        bind_port = settings.port if port is None else port
        sock = reuse_port_socket(bind_host, bind_port)
        # hypercorn adopts the descriptor (socket(fileno=...)): detach so that only its
        # socket object owns and closes it.
        config.bind = [f"fd://{sock.detach()}"]
    trigger = shutdown_trigger or wait_for_signal

    async def drain_then_stop() -> None:
        await trigger()
        await app.gateway.drain(settings.drain_timeout)
        logger.info("drain complete; stopping")

    await hypercorn_serve(
        mark_sent_responses(app),
        config,
        shutdown_trigger=drain_then_stop,
        task_status=task_status,
        mode="asgi",  # mark_sent_responses is not a coroutine function (see there)
    )
