"""The REST door: the proxied routes of :data:`~trio_gateway.edge.rest_routes.ROUTES`, served as
plain ASGI from the app's ``__call__`` (as the WebSocket door is), below Quart.

Why below Quart: on the proxy's hot path (a small ``GET``) Quart's request and response
objects, its context and hooks cost about as much CPU as everything else the gateway does for
the request (docs/performance.md). Quart keeps health, readiness, docs, OpenAPI, metrics, the
error pages (404, 405, automatic ``OPTIONS``) and, as a fallback with the same proxy code
(:func:`~trio_gateway.edge.rest_proxy.route_handler`), ``HEAD`` on the GET routes and any path
this table does not match the way Werkzeug would.

What Quart did for these routes is done here, the same way: the request id (the client's
``X-Request-ID`` when sane, echoed on the answer), the body read with ``MAX_REQUEST_BODY_BYTES``
(413) and ``REQUEST_TIMEOUT`` for the whole body (408), a JSON 500 for an unexpected error.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..observability import request_id_var
from .request_gate import announces_acceptable_body
from .rest_proxy import (
    REQUEST_ID_HEADER,
    Answer,
    AnswerNow,
    RestProxy,
    error_answer,
    header_value,
    incoming_request_id,
)
from .rest_routes import ROUTES, ProxyRoute

logger = logging.getLogger("trio_gateway.rest")

# One path segment of a route: a literal, or (None, name) for a ``{name}`` parameter.
_Segment = tuple[str | None, str]


class ClientGone(Exception):
    """The client disconnected before its request's body had arrived."""


def _segments(path: str) -> tuple[_Segment, ...]:
    return tuple(
        (None, part[1:-1]) if part.startswith("{") and part.endswith("}") else (part, part)
        for part in path.split("/")
    )


class RestDoor:
    """Matches proxied routes and serves them as ASGI; see the module docstring."""

    def __init__(self, proxy: RestProxy, routes: tuple[ProxyRoute, ...] = ROUTES) -> None:
        self.proxy = proxy
        self._timeout = proxy.settings.request_timeout
        # Paths without parameters by exact (method, path): the hot GET /agents is one lookup.
        self._static: dict[tuple[str, str], ProxyRoute] = {}
        self._dynamic: dict[str, list[tuple[tuple[_Segment, ...], ProxyRoute]]] = {}
        for route in routes:
            if "{" in route.path:
                self._dynamic.setdefault(route.method, []).append((_segments(route.path), route))
            else:
                self._static[(route.method, route.path)] = route

    def match(self, method: str, path: str) -> tuple[ProxyRoute, dict[str, str]] | None:
        """The route and path parameters for ``method path``, or None (Quart serves it).

        A parameter matches one non-empty segment (no ``/``), like Werkzeug's default
        converter; anything not matched here falls through to Quart's identical rules.
        """
        route = self._static.get((method, path))
        if route is not None:
            return route, {}
        candidates = self._dynamic.get(method)
        if not candidates:
            return None
        parts = path.split("/")
        for segments, candidate in candidates:
            if len(segments) != len(parts):
                continue
            params: dict[str, str] = {}
            for (literal, name), part in zip(segments, parts, strict=True):
                if literal is None:
                    if not part:
                        break
                    params[name] = part
                elif literal != part:
                    break
            else:
                return candidate, params
        return None

    async def serve(
        self,
        route: ProxyRoute,
        path_params: dict[str, str],
        scope: dict[str, Any],
        receive: Any,
        send: Any,
    ) -> None:
        """Proxy one request and send the answer (nothing if the client left mid-body)."""
        request_id = incoming_request_id(header_value(scope, REQUEST_ID_HEADER_LOWER))
        request_id_var.set(request_id)  # this task only: hypercorn runs each request in its own

        read = False

        async def read_body(limit: int) -> bytes:
            nonlocal read
            read = True
            return await _read_body(scope, receive, limit, self._timeout)

        try:
            answer = await self.proxy.forward(route, path_params, scope, read_body)
            limit = self.proxy.settings.max_request_body_bytes
            if not read and announces_acceptable_body(scope, limit):
                # Refused before its body was read (401, 403, 400...): read the body anyway, as
                # quart-trio does for its routes, or the connection could not be kept alive and
                # the app's body gate would hold the answer for REQUEST_TIMEOUT
                # (request_gate.RequestBodyGate). Bounded: the limit and the timeout.
                await _read_body(scope, receive, limit, self._timeout)
        except ClientGone:
            return
        except AnswerNow:
            pass  # the answer stands; the body was too slow (the gate gives up too)
        except Exception:
            logger.exception("proxy failed", extra={"event": "internal_error"})
            answer = error_answer(500, "internal_error", "Internal Server Error")
        answer.headers[REQUEST_ID_HEADER] = request_id
        await send_answer(send, answer)


REQUEST_ID_HEADER_LOWER = REQUEST_ID_HEADER.lower().encode("ascii")


async def _read_body(scope: dict[str, Any], receive: Any, limit: int, timeout: float) -> bytes:
    """The request's body: all of it, or as soon as it exceeds ``limit`` what came so far (the
    caller answers 413). A request that announces no body is not waited for at all."""
    announced = False
    for key, _ in scope.get("headers") or ():
        if key.lower() in (b"content-length", b"transfer-encoding"):
            announced = True
            break
    if not announced:
        return b""
    pieces: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout) as deadline:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            piece = message.get("body", b"")
            if piece:
                pieces.append(piece)
                size += len(piece)
            if size > limit or not message.get("more_body", False):
                break
    if deadline.cancelled_caught:
        raise AnswerNow(error_answer(408, "invalid_request", "Request Timeout"))
    return b"".join(pieces)


_NO_BODY_STATUSES = (204, 304)


async def send_answer(send: Any, answer: Answer) -> None:
    """Send ``answer`` as an ASGI HTTP response."""
    headers: list[tuple[bytes, bytes]] = []
    if answer.content_type is not None:
        headers.append((b"content-type", answer.content_type.encode("latin-1")))
    body = answer.body
    if answer.status in _NO_BODY_STATUSES or answer.status < 200:
        body = b""
    else:
        headers.append((b"content-length", str(len(body)).encode("ascii")))
    for name, value in answer.headers.items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
