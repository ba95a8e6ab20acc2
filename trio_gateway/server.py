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

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from . import hypercorn_patches
from .app import GatewayApp
from .settings import Settings

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
    config.access_log_format = "%(h)s %(r)s %(s)s %(M)s"
    # Protocol pings every interval; a peer that sends nothing (pongs count) for about two
    # intervals trips the read timeout and is dropped (hypercorn has no pong timeout).
    config.websocket_ping_interval = settings.ws_heartbeat_interval
    config.read_timeout = settings.read_timeout  # type: ignore[assignment]
    config.websocket_max_message_size = settings.ws_max_message_bytes
    # By the time hypercorn's own graceful stop starts, our drain has closed every session;
    # what is left are hypercorn's per-connection ping tasks, which only notice a closed
    # socket at their next tick (up to a heartbeat interval). Waiting for them gains nothing.
    config.graceful_timeout = min(1.0, settings.ws_close_timeout)
    # ASGI events hypercorn buffers per connection before it stops reading the socket: with
    # the session reader consuming as it goes, this is the whole inbound buffer.
    config.max_app_queue_size = 8
    # hypercorn's keep-alive timer runs from a connection's opening, and from the end of each
    # response, until the next request head is complete: so it is also the bound on a slow
    # request head (slow-loris), once hypercorn_patches.py keeps the timer armed (item 3).
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
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns (default: SIGTERM/SIGINT), then drain.

    ``task_status`` receives the bound addresses (bind port 0 to let the OS choose).
    """
    hypercorn_patches.apply()  # before any connection: see hypercorn_patches.py
    config = build_hypercorn_config(settings, host, port)
    trigger = shutdown_trigger or wait_for_signal

    async def drain_then_stop() -> None:
        await trigger()
        await app.gateway.drain(settings.drain_timeout)
        logger.info("drain complete; stopping")

    await hypercorn_serve(app, config, shutdown_trigger=drain_then_stop, task_status=task_status)
