"""Client of the Agent Runtime's streaming endpoint (HTTP + SSE), over the app's keep-alive pool
(:func:`make_runtime_pool`: one per app, shared with the REST proxy)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..protocol import ErrorCode
from ..settings import Settings
from .http_stream import (
    ConnectionPool,
    PoolTimeout,
    StreamBroken,
    StreamConnectError,
    StreamTimeout,
)
from .sse import SSEProtocolError, SSESplitter

logger = logging.getLogger("trio_gateway.runtime")

STREAM_PATH = "/agent/message/stream"
MAX_ERROR_BODY = 64 * 1024
MAX_DETAIL_CHARS = 500

# A batch of relayed chunks and, for each, the number of SSE payload bytes it came from
# (per chunk, not per batch: one oversized chunk among small ones must be counted as such).
Deliver = Callable[[list[dict[str, Any]], list[int]], Awaitable[None]]


class RuntimeFailure(Exception):
    """A turn that could not be relayed to the end; carries the error frame's code and text."""

    def __init__(
        self, code: ErrorCode, message: str, *, status: int | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.detail = detail


def _drop_nulls(chunk: dict[str, Any]) -> dict[str, Any]:
    # Today's runtime sends every field, nulls included; clients do not need them.
    return {key: value for key, value in chunk.items() if value is not None}


def _error_detail(body: bytes) -> str | None:
    """The runtime's client-facing message: a JSON ``{"detail": "<text>"}``, shortened.

    Anything else stays out of client frames: a validation ``detail`` list echoes the client's
    input back (summarised instead), and a raw body (an HTML 500 page, a traceback) may expose
    runtime internals.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    if isinstance(detail, list):
        return f"request validation failed ({len(detail)} error(s))"
    if not isinstance(detail, str):
        return None
    return " ".join(detail.split())[:MAX_DETAIL_CHARS]


def _parse_events(payloads: list[bytes | str]) -> tuple[list[dict[str, Any]], list[int]]:
    """JSON chunks (nulls dropped) of one network read's events, and each one's payload bytes."""
    batch: list[dict[str, Any]] = []
    sizes: list[int] = []
    loads = orjson.loads
    for data in payloads:
        try:
            chunk = loads(data)
        except orjson.JSONDecodeError:
            # orjson refuses invalid UTF-8 in bytes; the SSE standard decodes it with
            # replacement characters, so a payload from the fast path gets that second chance.
            if not isinstance(data, bytes):
                logger.warning("runtime sent an SSE event that is not JSON; skipped")
                continue
            try:
                chunk = loads(data.decode("utf-8", "replace"))
            except orjson.JSONDecodeError:
                logger.warning("runtime sent an SSE event that is not JSON; skipped")
                continue
        if type(chunk) is not dict:
            logger.warning("runtime sent an SSE event that is not a JSON object; skipped")
            continue
        batch.append(_drop_nulls(chunk))
        sizes.append(len(data))
    return batch, sizes


# Headers of every turn request besides the pool's own (Host, X-Internal-Auth).
_TURN_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


def make_runtime_pool(settings: Settings) -> ConnectionPool:
    """The app's one keep-alive pool to the runtime, for turns and proxied REST alike.

    One pool, so that one cap (``RUNTIME_MAX_CONNECTIONS``) bounds every connection the gateway
    opens to the runtime, and so that REST requests reuse connections turns left idle.
    """
    return ConnectionPool(
        settings.agent_url,
        # Only what every request carries: the Auth Service is never reached through this pool.
        default_headers={"X-Internal-Auth": settings.internal_api_key.get_secret_value()},
        connect_timeout=settings.request_timeout,
        write_timeout=settings.request_timeout,
        # The turns' stream *idle* timeout: a stream silent for longer fails, while a long but
        # lively one never does. REST requests pass their own (REQUEST_TIMEOUT).
        idle_timeout=settings.stream_idle_timeout,
        # Every turn holds one runtime connection for its whole length: cap them.
        max_connections=settings.runtime_max_connections,
        max_idle=settings.runtime_pool_max_idle,
        idle_expiry=settings.runtime_pool_idle_expiry,
        slot_wait=settings.request_timeout,
    )


class RuntimeClient:
    """Streams turns from the runtime and turns every failure into a :class:`RuntimeFailure`."""

    def __init__(self, settings: Settings, pool: ConnectionPool | None = None) -> None:
        """A client over ``pool`` (the app's), or over a pool of its own when none is given."""
        self._pool = make_runtime_pool(settings) if pool is None else pool
        self._idle_timeout = settings.stream_idle_timeout

    @property
    def pool(self) -> ConnectionPool:
        """The keep-alive pool turns are streamed over."""
        return self._pool

    async def run_pool(self) -> None:
        """Close expired idle connections in the background until :meth:`aclose`."""
        await self._pool.run()

    async def aclose(self) -> None:
        """Close the pooled idle connections (the app is stopping)."""
        await self._pool.aclose()

    async def stream_turn(
        self,
        session_id: str,
        message: dict[str, Any],
        deliver: Deliver,
        headers: dict[str, str] | None = None,
    ) -> int:
        """Relay one turn: POST the message, hand every batch of chunks to ``deliver``.

        All events parsed from one network read are delivered as one batch (the per-token cost
        must stay tiny; docs/performance.md). Returns the number of chunks relayed. Cancelling
        the caller closes the runtime connection at once. ``headers`` are added to the request
        (the caller's ``X-User-ID`` and ``X-User-Scopes``).
        """
        body = orjson.dumps({"session_id": session_id, "message": message})
        relayed = 0
        request_headers = {**_TURN_HEADERS, **headers} if headers else _TURN_HEADERS
        try:
            async with self._pool.stream("POST", STREAM_PATH, body, request_headers) as response:
                if response.status_code != 200:
                    status = response.status_code
                    detail = _error_detail(await response.read_limited(MAX_ERROR_BODY))
                    text = f"Agent runtime answered HTTP {status}"
                    if detail is not None and status < 500:
                        text += f": {detail}"  # the runtime's message for the client
                    raise RuntimeFailure(
                        ErrorCode.RUNTIME_ERROR, text, status=status, detail=detail
                    )
                # The hot loop: one network read -> h11 -> SSE blocks -> JSON -> one batch.
                # Plain coroutine calls, no async generator, no per-read cancel scope.
                receive = response.receive_body
                split = SSESplitter().feed_data
                while (piece := await receive()) is not None:
                    try:
                        payloads = split(piece)
                    except SSEProtocolError as error:
                        # Relay what was complete before the runaway line, then fail.
                        if error.events:
                            batch, sizes = _parse_events([e.data for e in error.events])
                            if batch:
                                await deliver(batch, sizes)
                        raise
                    if payloads:
                        batch, sizes = _parse_events(payloads)
                        if batch:
                            relayed += len(batch)
                            await deliver(batch, sizes)
        except SSEProtocolError:
            raise RuntimeFailure(
                ErrorCode.RUNTIME_STREAM_BROKEN, "Agent runtime sent a malformed event stream"
            ) from None
        except PoolTimeout:
            raise RuntimeFailure(
                ErrorCode.RUNTIME_UNAVAILABLE,
                "Gateway has no free connection to the runtime; try again shortly",
            ) from None
        except StreamConnectError as error:
            logger.info("runtime unreachable: %s", error)
            raise RuntimeFailure(
                ErrorCode.RUNTIME_UNAVAILABLE, "Agent runtime is unreachable"
            ) from None
        except StreamTimeout:
            raise RuntimeFailure(
                ErrorCode.RUNTIME_TIMEOUT,
                f"Agent runtime sent nothing for {self._idle_timeout:g} s",
            ) from None
        except StreamBroken as error:
            logger.info("runtime stream broke: %s", error)
            raise RuntimeFailure(
                ErrorCode.RUNTIME_STREAM_BROKEN, "Agent runtime stream ended unexpectedly"
            ) from None
        return relayed
