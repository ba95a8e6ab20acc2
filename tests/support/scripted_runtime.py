"""A real HTTP/1.1 server on loopback playing the Agent Runtime with byte-exact, scripted answers.

The demo runtime covers the happy paths; this one misbehaves on purpose (dies mid-stream, goes
silent, answers 4xx/5xx, splits events at odd bytes) so the gateway's failure handling is
tested against real sockets. A script is chosen by the ``content`` of the relayed message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

from .frames import CHUNK_FIELDS
from .ports import LoopbackServer


def chunk(**fields: Any) -> dict[str, Any]:
    """A stream chunk with every field present, nulls included, like today's runtime."""
    base: dict[str, Any] = dict.fromkeys(CHUNK_FIELDS)
    base["is_final"] = False
    base.update(fields)
    return base


def sse(*chunks: dict[str, Any]) -> bytes:
    """Events exactly as today's runtime writes them."""
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)


@dataclass
class Script:
    """What to answer: a status, then body pieces (bytes) or pauses (floats), then maybe a
    clean end, an abrupt close, or silence until the client goes away."""

    status: int = 200
    # bytes are sent, a float pauses that long, an Event holds the stream until it is set
    body: Sequence[bytes | float | trio.Event] = field(default_factory=list)
    ending: str = "end"  # "end" | "die" | "hang"
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    # Sent verbatim instead of a status line, headers and chunked body (then the socket is
    # closed): for answers that are not HTTP at all or break the chunked framing.
    raw: bytes | None = None


class ScriptedRuntime(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, Script] = {}  # streaming turns, by message content
        self.rest_scripts: dict[str, Script] = {}  # other requests, by "METHOD /path"
        self.rest_requests: list[tuple[str, dict[str, str], bytes]] = []
        # Every header line of each REST request, as received (name case, order, repeats).
        self.rest_header_lines: list[list[tuple[str, str]]] = []
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []
        self.open_streams = 0
        self.client_went_away = 0

    async def _read_request(
        self, stream: trio.SocketStream
    ) -> tuple[dict[str, str], bytes, list[tuple[str, str]]] | None:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = await stream.receive_some(65536)
            if not piece:
                return None
            data += piece
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        pairs: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
            pairs.append((name, value.strip()))
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            piece = await stream.receive_some(65536)
            if not piece:
                return None
            rest += piece
        headers[":request-line"] = lines[0]
        return headers, rest[:length], pairs

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            request = await self._read_request(stream)
            if request is None:
                return
            headers, body, pairs = request
            method, target = headers[":request-line"].split(" ")[:2]
            if target.split("?", 1)[0] != "/agent/message/stream":
                self.rest_requests.append((headers[":request-line"], headers, body))
                self.rest_header_lines.append(pairs)
                path = target.split("?", 1)[0]
                script = self.rest_scripts.get(f"{method} {path}") or Script(
                    content_type="application/json", body=[b'{"ok": true}']
                )
                await self._answer(stream, script)
                return
            self.request_headers.append(headers)
            payload = orjson.loads(body) if body else {}
            self.requests.append(payload)
            content = str((payload.get("message") or {}).get("content"))
            script = self.scripts.get(content) or Script(
                body=[sse(chunk(type="assistant_message", content="ok", token="ok", is_final=True))]
            )
            await self._answer(stream, script)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.SocketStream, script: Script) -> None:
        if script.raw is not None:
            await stream.send_all(script.raw)
            return
        reason = {200: "OK"}.get(script.status, "Error")
        extra = "".join(f"{name}: {value}\r\n" for name, value in script.headers.items())
        head = (
            f"HTTP/1.1 {script.status} {reason}\r\n"
            f"Content-Type: {script.content_type}\r\n{extra}"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        if script.status in (204, 304):  # no body allowed
            head = f"HTTP/1.1 {script.status} {reason}\r\n{extra}Connection: close\r\n\r\n"
            await stream.send_all(head.encode())
            return
        await stream.send_all(head.encode())
        self.open_streams += 1
        try:
            for piece in script.body:
                if isinstance(piece, float):
                    await trio.sleep(piece)
                elif isinstance(piece, trio.Event):
                    await piece.wait()
                elif piece:
                    await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
            if script.ending == "end":
                await stream.send_all(b"0\r\n\r\n")
            elif script.ending == "hang":
                # Silent until the client closes the request (what cancellation must do).
                while await stream.receive_some(65536):
                    pass
                self.client_went_away += 1
            # "die": return without the terminating chunk; the caller closes the socket.
        finally:
            self.open_streams -= 1
