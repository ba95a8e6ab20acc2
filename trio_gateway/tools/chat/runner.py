"""The trio side of ``trio-gateway chat``: stdin, SIGINT, one WebSocket with reconnect +
resume (trio-websocket), and stdout, around the sans-IO :class:`~.core.ChatCore`."""

from __future__ import annotations

import codecs
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final, TextIO

import httpx
import trio
import trio_websocket

from ...protocol import SESSION_ID_MAX_LENGTH, SUBPROTOCOL_V2, CloseCode
from .core import MAX_ARGUMENTS_SHOWN, ChatCore, Frame, Reaction, strip_controls
from .urls import pending_approvals_url, session_ws_url, sessions_url

__all__ = [
    "FINAL_CLOSE_CODES",
    "MAX_RECONNECT_ATTEMPTS",
    "ChatOptions",
    "ChatRunner",
    "backoff_delay",
    "describe_http_error",
    "run_chat",
]

#: Close codes after which reconnecting cannot help: the user has to act (docs/protocol.md).
FINAL_CLOSE_CODES: Final[Mapping[int, str]] = {
    CloseCode.POLICY_VIOLATION: (
        "the gateway closed the connection for a policy violation (client too slow?)"
    ),
    CloseCode.MESSAGE_TOO_BIG: "a message was too large for the gateway",
    CloseCode.UNAUTHORIZED: "unauthorized: the token is missing, invalid or expired",
    CloseCode.FORBIDDEN: (
        "forbidden: the token lacks the write scope or the session belongs to someone else"
    ),
    CloseCode.SESSION_REPLACED: "another connection to this session replaced this one",
}
#: What a connection closed without a close frame reports (RFC 6455 7.1.5; never sent).
ABNORMAL_CLOSURE: Final = 1006
NEEDS_TOKEN: Final = "the gateway needs a token: --token or --token-from-demo"
TOKEN_REFUSED: Final = "the gateway refused the token (invalid or expired?)"
#: HTTP statuses of a refused handshake that a retry cannot fix.
FINAL_HTTP_STATUSES: Final = frozenset({400, 401, 403, 404})
BACKOFF_INITIAL: Final = 0.2
BACKOFF_MAX: Final = 5.0
MAX_RECONNECT_ATTEMPTS: Final = 10
CONNECT_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 2.0
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


def describe_http_error(answer: httpx.Response) -> str:
    """A gateway's (or runtime's) error answer as one short line for the user.

    The gateway answers ``{"error", "error_description"}``, the runtime ``{"detail"}``; anything
    else is shown as the status and the start of the body.
    """
    try:
        body = answer.json()
    except ValueError:
        body = None
    detail = ""
    if isinstance(body, dict):
        error, description = body.get("error"), body.get("error_description")
        parts = [str(part) for part in (error, description) if part]
        if not parts and body.get("detail"):
            parts = [str(body["detail"])]
        detail = ": ".join(parts)
    if not detail:
        detail = answer.text.strip()
    detail = " ".join(strip_controls(detail).split())
    if len(detail) > MAX_ARGUMENTS_SHOWN:
        detail = detail[: MAX_ARGUMENTS_SHOWN - 1] + "…"
    return f"HTTP {answer.status_code}" + (f" {detail}" if detail else "")


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (1-based): 0.2 s doubling to 5 s."""
    return min(BACKOFF_MAX, BACKOFF_INITIAL * 2.0 ** max(0, attempt - 1))


@dataclass(frozen=True)
class ChatOptions:
    """Everything :func:`run_chat` needs, resolved by the command line."""

    #: The session's full WebSocket URL, or the gateway's WebSocket base when ``session_id``
    #: is None (see :func:`build_ws_url`).
    url: str
    #: The session to open; None: create one over REST first (``POST /api/v1/sessions``),
    #: as the IDE does, because the real runtime knows only sessions created that way.
    session_id: str | None
    #: Returns a bearer token for each connection attempt (None: connect without one). It may
    #: block (reading a key file), so it runs in a thread.
    token_provider: Callable[[], str] | None = None
    color: bool = False
    max_attempts: int = MAX_RECONNECT_ATTEMPTS


@dataclass(frozen=True)
class _Ended:
    """How one connection ended."""

    why: str
    final: bool = False
    opened: bool = False  # the handshake succeeded
    received: bool = False  # ... and the gateway sent at least one frame


class ChatRunner:
    """The trio side of the chat: stdin, SIGINT, the WebSocket with reconnects, stdout."""

    def __init__(self, options: ChatOptions, *, stdin_fd: int = 0, out: TextIO | None = None):
        """Prepare a run; nothing happens until :meth:`run`."""
        self.options = options
        # Known once the session exists (created over REST when options.session_id is None).
        self.core = ChatCore(options.session_id or "", color=options.color)
        self._url = options.url
        self._created = False
        self._stdin_fd = stdin_fd
        self._out = sys.stdout if out is None else out
        # Frames waiting for a connection, oldest first. A frame leaves only once written, so
        # nothing typed while the connection is down is lost.
        self._outbox: deque[Frame] = deque()
        self._outbox_changed = trio.lowlevel.ParkingLot()
        self._quit = trio.Event()
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._received = False  # the current connection has delivered a frame
        self._approvals_warned = False  # said once that pending approvals cannot be read

    # --- reactions --------------------------------------------------------------------------

    def _apply(self, reaction: Reaction) -> None:
        if reaction.text:
            self._out.write(reaction.text)
            self._out.flush()
        if reaction.send:
            self._outbox.extend(reaction.send)
            self._outbox_changed.unpark_all()
        if reaction.quit:
            self._quit.set()

    # --- tasks ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Chat until the user quits (0) or the connection is lost for good (1 or 2)."""
        # Before any socket: a session the runtime knows, and a token if the gateway wants one.
        if not await self._open_session():
            return 1
        exit_code = 0
        async with trio.open_nursery() as nursery:
            # SIGINT is ours from here on: Ctrl-C becomes a cancel frame, not a
            # KeyboardInterrupt tearing through the connection.
            await nursery.start(self._watch_interrupts)
            nursery.start_soon(self._read_input)

            async def connect_then_stop() -> None:
                nonlocal exit_code
                exit_code = await self._connection_loop()
                nursery.cancel_scope.cancel()

            nursery.start_soon(connect_then_stop)
            await self._quit.wait()
            # The user leaves: close normally (1000) so the gateway knows it was deliberate.
            # Bounded, because a gateway that never answers the close must not keep the terminal.
            ws = self._ws
            if ws is not None:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose(CloseCode.NORMAL, "client quit")
            exit_code = 0
            nursery.cancel_scope.cancel()
        return exit_code

    async def _watch_interrupts(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                self._apply(self.core.interrupt())

    async def _read_input(self) -> None:
        # os.read in a thread, not sys.stdin: the thread is abandoned (left blocked) when the
        # chat ends, and a thread blocked inside sys.stdin's buffered reader holds its lock,
        # which makes interpreter shutdown abort. A raw read holds no Python-level lock.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            data = await trio.to_thread.run_sync(
                os.read, self._stdin_fd, 65536, abandon_on_cancel=True
            )
            pending += decoder.decode(data, final=not data)
            *lines, pending = pending.split("\n")
            for line in lines:
                self._apply(self.core.user_line(line.rstrip("\r")))
            if not data:
                if pending:
                    self._apply(self.core.user_line(pending))
                self._apply(self.core.end_of_input())
                return

    async def _token(self) -> list[tuple[bytes, bytes]]:
        provider = self.options.token_provider
        if provider is None:
            return []
        token = await trio.to_thread.run_sync(provider)
        return [(b"Authorization", f"Bearer {token}".encode())]

    async def _open_session(self) -> bool:
        """Create the session over REST (no id given), or check that we may open it.

        Both happen before the WebSocket opens, so a gateway that wants a token says so before
        "connected" (it would accept the socket, wait for a first-frame ``auth`` and close it
        with 4401 only then). False (said why): nothing to chat with.
        """
        if self.options.session_id is None:
            created = await self._create_session()
            if created is None:
                return False
            self.core.session_id = created
            self._url = session_ws_url(self.options.url, created)
            self._created = True
            return True
        if self.options.token_provider is None:
            return await self._probe_session(self.options.session_id)
        return True  # with a token, the handshake itself answers 401/403

    async def _create_session(self) -> str | None:
        # As the IDE does: POST /api/v1/sessions without a body (the runtime picks the id),
        # then open the socket of the id in its 201 answer.
        url = sessions_url(self.options.url)
        self._apply(self.core.creating(url))
        try:
            headers = await self._token()
        except (OSError, ValueError) as error:
            self._apply(self.core.fatal(f"cannot get a token: {error}"))
            return None
        try:
            async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT, trust_env=False) as http:
                answer = await http.post(url, headers=dict(headers))
        except (httpx.HTTPError, OSError) as error:
            self._apply(self.core.fatal(f"cannot connect: {error or type(error).__name__}"))
            return None
        if answer.status_code == 401:
            hint = NEEDS_TOKEN if self.options.token_provider is None else TOKEN_REFUSED
            why = f"cannot create a session: {describe_http_error(answer)}; {hint}"
            self._apply(self.core.fatal(why))
            return None
        if not answer.is_success:
            why = f"cannot create a session: {describe_http_error(answer)}"
            self._apply(self.core.fatal(why))
            return None
        try:
            body = answer.json()
        except ValueError:
            body = None
        created = body.get("id") if isinstance(body, dict) else None
        if not isinstance(created, str) or not 0 < len(created) <= SESSION_ID_MAX_LENGTH:
            why = f"cannot create a session: HTTP {answer.status_code} without a usable id"
            self._apply(self.core.fatal(why))
            return None
        return created

    async def _probe_session(self, session_id: str) -> bool:
        # No token: one cheap REST request tells whether the gateway wants one. Anything but a
        # 401 (JWT off: the runtime's 200 or 404; an unreachable gateway) is left to the
        # socket, which reports it as it always has.
        url = sessions_url(self._url, session_id)
        try:
            async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT, trust_env=False) as http:
                answer = await http.get(url)
        except (httpx.HTTPError, OSError):
            return True
        if answer.status_code != 401:
            return True
        self._apply(self.core.fatal(f"{describe_http_error(answer)}; {NEEDS_TOKEN}"))
        return False

    async def _connection_loop(self) -> int:
        self._apply(self.core.starting(self._url, created=self._created))
        failures = 0
        ever_opened = False
        while True:
            ended = await self._connect_once()
            if self._quit.is_set():
                return 0
            ever_opened = ever_opened or ended.opened
            if ended.final or not ever_opened:
                # Never connected at all: a wrong URL or port should fail now, not in 30 s.
                self._apply(self.core.fatal(ended.why))
                return 1
            # A connection that delivered something starts a new series of attempts; one that
            # opens and dies at once counts as a failure, so a crashing gateway cannot keep
            # the client in a tight reconnect loop forever.
            failures = 1 if ended.received else failures + 1
            if failures > self.options.max_attempts:
                self._apply(
                    self.core.fatal(
                        f"{ended.why}; giving up after {self.options.max_attempts} attempts"
                    )
                )
                return 1
            delay = backoff_delay(failures)
            self._apply(
                self.core.connection_lost(ended.why, delay, failures, self.options.max_attempts)
            )
            await trio.sleep(delay)

    async def _connect_once(self) -> _Ended:
        try:
            headers = await self._token()
        except (OSError, ValueError) as error:
            return _Ended(f"cannot get a token: {error}", final=True)
        opened = False
        self._received = False
        try:
            async with trio_websocket.open_websocket_url(
                self._url,
                subprotocols=[SUBPROTOCOL_V2],
                extra_headers=headers,
                max_message_size=MAX_MESSAGE_BYTES,
                connect_timeout=CONNECT_TIMEOUT,
                disconnect_timeout=CLOSE_TIMEOUT,
            ) as ws:
                opened = True
                ended = await self._converse(ws)
                return _Ended(ended.why, ended.final, opened=True, received=self._received)
        except trio_websocket.ConnectionRejected as rejected:
            status = int(rejected.status_code)
            return _Ended(
                f"the gateway refused the connection: HTTP {status}",
                final=status in FINAL_HTTP_STATUSES,
            )
        except trio_websocket.ConnectionClosed as closed:
            return replace(self._closed(closed.reason, opened), received=self._received)
        except (trio_websocket.HandshakeError, OSError) as error:
            cause = error.__cause__ or error
            why = f"cannot connect: {cause or type(cause).__name__}"
            return _Ended(why, opened=opened, received=self._received)
        except Exception as error:
            # trio-websocket's reader can die with a protocol error when a server ping crosses
            # our close (python-trio/trio-websocket#184): that is a lost connection as well.
            if not opened:
                raise
            return _Ended(
                f"connection error: {type(error).__name__}", opened=True, received=self._received
            )
        finally:
            self._ws = None

    async def _converse(self, ws: trio_websocket.WebSocketConnection) -> _Ended:
        reaction = self.core.connection_opened(v2=ws.subprotocol == SUBPROTOCOL_V2)
        # The resume frame goes out before anything queued: the gateway must read it first.
        self._apply(Reaction(reaction.text, (), reaction.quit))
        try:
            for frame in reaction.send:
                await ws.send_message(json.dumps(frame))
        except trio_websocket.ConnectionClosed as closed:
            return self._closed(closed.reason, True)
        self._ws = ws
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_outbox, ws)
            nursery.start_soon(self._restore_approvals)
            try:
                while True:
                    message = await ws.get_message()
                    self._received = True
                    self._apply(self.core.receive_text(message))
            except trio_websocket.ConnectionClosed as closed:
                return self._closed(closed.reason, True)
            finally:
                nursery.cancel_scope.cancel()

    async def _restore_approvals(self) -> None:
        # Like the IDE on connect: tool calls the runtime still waits on (this session was
        # left at an approval question, or its tool_call was sent while no client listened)
        # are asked about again. Best effort: a gateway or runtime that cannot say is no
        # reason to stop chatting; a session the runtime does not know (404) has none.
        url = pending_approvals_url(self._url, self.core.session_id)
        try:
            headers = await self._token()
            async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT, trust_env=False) as http:
                answer = await http.get(url, headers=dict(headers))
            if answer.status_code == 404:
                return
            if answer.status_code != 200:
                raise ValueError(f"HTTP {answer.status_code}")
            body = answer.json()
        except (httpx.HTTPError, OSError, ValueError) as error:
            if not self._approvals_warned:  # once, not at every reconnect
                self._approvals_warned = True
                self._apply(self.core.approvals_unknown(str(error) or type(error).__name__))
            return
        pending = body.get("pending_approvals") if isinstance(body, dict) else None
        self._apply(self.core.restore_approvals(pending))

    async def _write_outbox(self, ws: trio_websocket.WebSocketConnection) -> None:
        # The only task that sends on this connection (besides the resume frame, sent before it
        # starts), so frames keep the order in which they were produced.
        try:
            while True:
                while not self._outbox:
                    await self._outbox_changed.park()
                await ws.send_message(json.dumps(self._outbox[0]))
                self._outbox.popleft()
        except trio_websocket.ConnectionClosed:
            return  # the reader sees the close too and reports it

    def _closed(self, reason: trio_websocket.CloseReason | None, opened: bool) -> _Ended:
        code = (
            int(reason.code) if reason is not None and reason.code is not None else ABNORMAL_CLOSURE
        )
        text = reason.reason if reason is not None and reason.reason else ""
        if code in FINAL_CLOSE_CODES:
            detail = f" ({strip_controls(text)})" if text else ""
            return _Ended(
                f"{FINAL_CLOSE_CODES[code]}{detail} [close {code}]", final=True, opened=opened
            )
        if code == CloseCode.SERVICE_RESTART:
            return _Ended(f"the gateway is restarting [close {code}]", opened=opened)
        detail = f": {strip_controls(text)}" if text else ""
        return _Ended(f"close {code}{detail}", opened=opened)


async def run_chat(options: ChatOptions) -> int:
    """Run one interactive chat on stdin/stdout; returns the process exit code."""
    return await ChatRunner(options).run()
