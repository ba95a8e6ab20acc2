"""``trio-gateway chat``: an interactive terminal client for the gateway's WebSocket (protocol v2).

``core.py`` is the client's logic without any I/O (frames in, text and frames out), ``runner.py``
the trio loop around it (stdin, SIGINT, the WebSocket with reconnect + resume, stdout) and
``urls.py`` derives a session's socket and the REST routes from the URL the user gave.
"""

from .core import SIMULATED_RESULT, ChatCore, Reaction, want_color
from .runner import (
    FINAL_CLOSE_CODES,
    MAX_RECONNECT_ATTEMPTS,
    ChatOptions,
    ChatRunner,
    backoff_delay,
    describe_http_error,
    run_chat,
)
from .urls import build_ws_url, pending_approvals_url, rest_base_url, session_ws_url, sessions_url

__all__ = [
    "FINAL_CLOSE_CODES",
    "MAX_RECONNECT_ATTEMPTS",
    "SIMULATED_RESULT",
    "ChatCore",
    "ChatOptions",
    "ChatRunner",
    "Reaction",
    "backoff_delay",
    "build_ws_url",
    "describe_http_error",
    "pending_approvals_url",
    "rest_base_url",
    "run_chat",
    "session_ws_url",
    "sessions_url",
    "want_color",
]
