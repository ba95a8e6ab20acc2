"""Where things are on a gateway, for the chat client: a session's socket and the REST routes.

The chat is given one WebSocket URL (the gateway's base, possibly behind a reverse proxy's path
prefix, or a session's own socket) and derives every other address from it.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit, urlunsplit

from ...protocol import SESSION_ID_MAX_LENGTH, WS_PATH

__all__ = [
    "build_ws_url",
    "pending_approvals_url",
    "rest_base_url",
    "session_ws_url",
    "sessions_url",
]


def build_ws_url(url: str, session_id: str | None) -> tuple[str, str | None]:
    """The WebSocket URL to open, and the session id (None: a session is to be created).

    ``url`` is either the gateway's base (``ws://host:8000``, optionally with a path prefix of a
    reverse proxy) or a full session URL (``.../api/v1/ws/<id>``), whose id is used when
    ``session_id`` is None. With a base and no ``session_id`` the answer is the base itself
    (without a trailing ``/api/v1/ws``): the session is created over REST first
    (:func:`create_session`) and :func:`session_ws_url` then names its socket. Raises
    :class:`ValueError` for anything else.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    path = parts.path.rstrip("/")
    match = re.fullmatch(rf"(.*){re.escape(WS_PATH)}/([^/]+)", path)
    if match is not None:
        if session_id is not None:
            raise ValueError("the URL already names a session; drop --session or the session id")
        return url, match.group(2)
    if path.endswith(WS_PATH):
        path = path.removesuffix(WS_PATH)
    base = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    if session_id is None:
        return base, None
    return session_ws_url(base, session_id), session_id


def _check_session_id(session_id: str) -> None:
    if not 0 < len(session_id) <= SESSION_ID_MAX_LENGTH:
        raise ValueError(f"a session id must have 1 to {SESSION_ID_MAX_LENGTH} characters")


def session_ws_url(base: str, session_id: str) -> str:
    """The WebSocket URL of ``session_id`` on the gateway whose WebSocket base is ``base``."""
    _check_session_id(session_id)
    parts = urlsplit(base)
    full = f"{parts.path.rstrip('/')}{WS_PATH}/{quote(session_id, safe='')}"
    return urlunsplit((parts.scheme, parts.netloc, full, parts.query, ""))


def rest_base_url(ws_url: str) -> str:
    """The gateway's REST base (``http``/``https``, with any proxy prefix) for a WebSocket URL.

    ``ws://host:8000/prefix/api/v1/ws/ID`` (or the base ``ws://host:8000/prefix``) becomes
    ``http://host:8000/prefix``; ``wss`` becomes ``https``. The query is the socket's own.
    """
    parts = urlsplit(ws_url)
    path = parts.path.rstrip("/")
    match = re.fullmatch(rf"(.*){re.escape(WS_PATH)}(?:/[^/]+)?", path)
    prefix: str = match.group(1) if match is not None else path
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, prefix, "", ""))


def sessions_url(ws_url: str, session_id: str | None = None, tail: str = "") -> str:
    """``{rest base}/api/v1/sessions[/{id}{tail}]`` on the gateway of ``ws_url``."""
    url = f"{rest_base_url(ws_url)}/api/v1/sessions"
    if session_id is not None:
        url += f"/{quote(session_id, safe='')}{tail}"
    return url


def pending_approvals_url(ws_url: str, session_id: str) -> str:
    """The REST URL of a session's pending approvals, on the gateway of ``ws_url``.

    ``ws://host:8000/prefix/api/v1/ws/ID`` becomes
    ``http://host:8000/prefix/api/v1/sessions/ID/pending-approvals`` (``wss`` becomes ``https``).
    """
    return sessions_url(ws_url, session_id, "/pending-approvals")
