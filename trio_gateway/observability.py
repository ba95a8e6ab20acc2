"""Logging setup and the per-session/request context every log line carries."""

from __future__ import annotations

import contextvars
import logging
import sys

session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "session_id", default=None
)


class _ContextFilter(logging.Filter):
    # trio copies contextvars into every task started from a context, so binding session_id
    # before a session's nursery opens tags every line its child tasks log.
    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = session_id_var.get() or "-"
        return True


def configure_logging(level: str) -> None:
    """Send gateway and hypercorn logs to stderr, one line each, tagged with the session id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [session=%(session_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO, with URLs: too chatty for the hot path.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpcore").setLevel(max(logging.WARNING, root.level))
