"""Checks on an HTTP request before Quart (or the proxy) sees it: the body gate and the Host
check, plus the plain-ASGI refusal they answer with."""

from __future__ import annotations

from typing import Any

import orjson
import trio


class RequestBodyGate:
    """Holds an HTTP response back until the request's body has arrived (bounded).

    hypercorn 0.18 (h11) can keep a connection alive only if the request's body had arrived
    in full when the response ended; otherwise it means to close the connection, but that
    close runs in the app's task right after hypercorn queued ``http.disconnect``, which
    quart-trio answers by cancelling that task: the socket stays open, the late body is
    dropped, and the client's next request on the connection never gets an answer. Clients
    such as requests/urllib3 write a request's head and body separately, so now and then the
    body comes a few milliseconds after the head, and any answer that does not need the body
    (Quart's automatic ``OPTIONS``, 404, 405, a refusal, a view that never reads it) could go
    out first: found by schemathesis, about 1 request in 600. quart-trio reads the body in
    its own task whatever the view does, so waiting for it here costs the body's transit time
    only, and covers every route at once.

    (Shielding hypercorn's end of request instead was tried and reverted: with it the short
    soak test, ``tests/proof/test_soak_short.py``, failed every time with connections left in
    CLOSE-WAIT, two tasks each.)

    Not waited for: a body announced larger than ``limit`` (the 413 goes out at once with
    ``Connection: close``, so the client does not reuse the connection), more than ``limit``
    bytes received (a chunked body without an announced length), nor longer than ``timeout``
    seconds in all.
    """

    def __init__(self, limit: int, timeout: float) -> None:
        """A gate for one request that announced a body of at most ``limit`` bytes."""
        self._complete = trio.Event()
        self._limit = limit
        self._timeout = timeout
        self._received = 0

    def receive(self, receive: Any) -> Any:
        """``receive`` that notes when the whole body (or a disconnect) has come through."""

        async def gated_receive() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                self._received += len(message.get("body", b""))
                if not message.get("more_body", False) or self._received > self._limit:
                    self._complete.set()
            else:  # http.disconnect: nothing more will come
                self._complete.set()
            return message

        return gated_receive

    def send(self, send: Any) -> Any:
        """``send`` that starts a response only once the body is in (or the gate gave up)."""

        async def gated_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and not self._complete.is_set():
                with trio.move_on_after(self._timeout):
                    await self._complete.wait()
            await send(message)

        return gated_send


def announces_acceptable_body(scope: dict[str, Any], limit: int) -> bool:
    """Whether the request announces a body (of at most ``limit`` bytes, when it says)."""
    for key, value in scope.get("headers") or []:
        name = key.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:  # h11 refuses these before the app sees them
                return False
            return 0 < length <= limit
    return False


def has_ambiguous_framing(scope: dict[str, Any]) -> bool:
    """Whether the request carries both ``Content-Length`` and ``Transfer-Encoding``."""
    names = {key.lower() for key, _ in scope.get("headers") or []}
    return b"content-length" in names and b"transfer-encoding" in names


def host_is_valid(scope: dict[str, Any]) -> bool:
    """Whether Quart can route with this request's ``Host`` header.

    Werkzeug encodes the host name with IDNA while Quart builds the request context, outside
    Quart's error handling: a label over 63 octets or a character IDNA refuses raised an
    uncaught error and the client got a 500 (found by tests/hostile/test_fuzz.py).
    """
    for key, value in scope.get("headers") or []:
        if key.lower() == b"host":
            name = value.decode("latin-1").partition(":")[0]
            try:
                name.encode("idna")
            except UnicodeError:
                return False
    return True


async def refuse(
    scope: dict[str, Any],
    send: Any,
    status: int,
    code: str,
    text: str,
    *,
    close: bool = False,
) -> None:
    """Answer ``status`` with the gateway's JSON error body, below Quart (plain ASGI);
    ``close``: with ``Connection: close`` (hypercorn then closes the connection)."""
    body = orjson.dumps({"error": code, "error_description": text})
    prefix = "websocket.http" if scope["type"] == "websocket" else "http"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})
