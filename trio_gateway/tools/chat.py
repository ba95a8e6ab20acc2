"""``trio-gateway chat``: an interactive terminal client for the gateway's WebSocket (protocol v2).

Two layers:

* :class:`ChatCore` is the whole client logic without any I/O: it turns received frames into
  display text and decisions (frames to send, quitting), tracks the state that matters (the
  highest ``seq`` processed, pending approvals, whether a turn is running, resume in progress)
  and interprets user input, Ctrl-C and end of input. It is unit-tested frame by frame.
* :class:`ChatRunner` is the thin trio I/O loop around it: stdin lines, SIGINT, one WebSocket
  (trio-websocket) with reconnect + resume, and stdout.

The client never executes tools. A ``tool_call`` is answered with a made-up result
(:data:`SIMULATED_RESULT`), after asking the user when the call requires approval: a chat
window must not become a way for a server to touch the user's files or run commands.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import trio
import trio_websocket

__all__ = [
    "FINAL_CLOSE_CODES",
    "SIMULATED_RESULT",
    "SUBPROTOCOL_V2",
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

Frame = dict[str, Any]

SUBPROTOCOL_V2: Final = "codelab.v2"
#: What an approved (or automatic) tool call is answered with: nothing was executed.
SIMULATED_RESULT: Final[Mapping[str, Any]] = {
    "ok": True,
    "simulated": True,
    "note": "chat client does not execute tools",
}
REJECTED_BY_USER: Final = "rejected by user"
#: Close codes after which reconnecting cannot help: the user has to act (docs/protocol.md).
FINAL_CLOSE_CODES: Final[Mapping[int, str]] = {
    1008: "the gateway closed the connection for a policy violation (client too slow?)",
    1009: "a message was too large for the gateway",
    4401: "unauthorized: the token is missing, invalid or expired",
    4403: "forbidden: the token lacks the write scope or the session belongs to someone else",
    4409: "another connection to this session replaced this one",
}
NEEDS_TOKEN: Final = "the gateway needs a token: --token or --token-from-demo"
TOKEN_REFUSED: Final = "the gateway refused the token (invalid or expired?)"
#: HTTP statuses of a refused handshake that a retry cannot fix.
FINAL_HTTP_STATUSES: Final = frozenset({400, 401, 403, 404})
#: v2 frames without a ``seq``: never dropped as duplicates.
UNSEQUENCED_TYPES: Final = frozenset(
    {"session_ready", "resumed", "resync_required", "heartbeat", "pong", "auth_ok"}
)
#: Error codes with which a gateway that predates resume refuses the ``resume`` frame.
RESUME_REFUSED_CODES: Final = frozenset({"unsupported_type", "invalid_message"})
MAX_ARGUMENTS_SHOWN: Final = 300
BACKOFF_INITIAL: Final = 0.2
BACKOFF_MAX: Final = 5.0
MAX_RECONNECT_ATTEMPTS: Final = 10
CONNECT_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 2.0
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
PROMPT: Final = "you> "
HELP: Final = "Type a message and press Enter. /quit leaves; Ctrl-C cancels a running turn."
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")
_STYLES: Final[Mapping[str, str]] = {
    "assistant": "\x1b[1;36m",
    "agent": "\x1b[35m",
    "tool": "\x1b[33m",
    "approve": "\x1b[1;33m",
    "error": "\x1b[1;31m",
    "notice": "\x1b[2m",
    "prompt": "\x1b[1;32m",
}
_RESET: Final = "\x1b[0m"


def _clean(text: str) -> str:
    # Text comes from the server: never let it move the cursor, retitle the terminal or
    # otherwise drive the user's terminal with escape sequences.
    return _CONTROL_CHARS.sub("", text)


def _compact(value: Any, limit: int = MAX_ARGUMENTS_SHOWN) -> str:
    """One-line JSON (newlines escaped), shortened to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    except (TypeError, ValueError):
        text = repr(value)
    text = _clean(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def want_color(stream: TextIO, *, plain: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, unless ``--plain`` or ``NO_COLOR`` (https://no-color.org)."""
    env = os.environ if environ is None else environ
    if plain or env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


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
    match = re.fullmatch(r"(.*)/api/v1/ws/([^/]+)", path)
    if match is not None:
        if session_id is not None:
            raise ValueError("the URL already names a session; drop --session or the session id")
        return url, match.group(2)
    if path.endswith("/api/v1/ws"):
        path = path[: -len("/api/v1/ws")]
    base = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    if session_id is None:
        return base, None
    return session_ws_url(base, session_id), session_id


def _check_session_id(session_id: str) -> None:
    if not session_id or len(session_id) > 256:
        raise ValueError("a session id must have 1 to 256 characters")


def session_ws_url(base: str, session_id: str) -> str:
    """The WebSocket URL of ``session_id`` on the gateway whose WebSocket base is ``base``."""
    _check_session_id(session_id)
    parts = urlsplit(base)
    full = f"{parts.path.rstrip('/')}/api/v1/ws/{quote(session_id, safe='')}"
    return urlunsplit((parts.scheme, parts.netloc, full, parts.query, ""))


def rest_base_url(ws_url: str) -> str:
    """The gateway's REST base (``http``/``https``, with any proxy prefix) for a WebSocket URL.

    ``ws://host:8000/prefix/api/v1/ws/ID`` (or the base ``ws://host:8000/prefix``) becomes
    ``http://host:8000/prefix``; ``wss`` becomes ``https``. The query is the socket's own.
    """
    parts = urlsplit(ws_url)
    path = parts.path.rstrip("/")
    match = re.fullmatch(r"(.*)/api/v1/ws(?:/[^/]+)?", path)
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
    detail = " ".join(_clean(detail).split())
    if len(detail) > MAX_ARGUMENTS_SHOWN:
        detail = detail[: MAX_ARGUMENTS_SHOWN - 1] + "…"
    return f"HTTP {answer.status_code}" + (f" {detail}" if detail else "")


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (1-based): 0.2 s doubling to 5 s."""
    return min(BACKOFF_MAX, BACKOFF_INITIAL * 2.0 ** max(0, attempt - 1))


@dataclass(frozen=True)
class Reaction:
    """What the I/O layer must do after an event: write ``text``, send ``send``, maybe quit."""

    text: str = ""
    send: tuple[Frame, ...] = ()
    quit: bool = False


@dataclass
class _ToolCall:
    call_id: str
    tool_name: str
    arguments: Any


@dataclass
class ChatCore:
    """The chat client's logic, without sockets, terminals or clocks.

    Every method returns a :class:`Reaction`. ``last_seq`` is the highest ``seq`` processed:
    frames at or below it are duplicates (a resume replay overlapping what was shown) and are
    ignored.
    """

    session_id: str
    color: bool = False
    last_seq: int = 0
    v2: bool = True
    turn_active: bool = False
    # Runtime-bound frames produced but whose turn has not started yet (they may sit in the
    # outbox or in the gateway's FIFO): while any is outstanding a turn is as good as running.
    awaiting_start: int = 0
    cancel_requested: bool = False
    resuming: bool = False
    quit_when_idle: bool = False
    approvals: deque[_ToolCall] = field(default_factory=deque)
    # call_ids answered here: a pending-approvals list fetched before the answer reached the
    # runtime must not ask about them again.
    answered: set[str] = field(default_factory=set)
    _streaming: bool = False  # an assistant line is open (tokens printed, no newline yet)
    _streamed: str = ""
    _line_open: bool = False  # the cursor is not at the start of a line
    _rebase: bool = False  # after resync_required: accept the next seq whatever it is
    _connections: int = 0
    # Per connection: the gateway's seq when it greeted us (session_ready's last_seq), and
    # whether a gap was already announced. A gateway that lost its state says so twice (a
    # session_ready behind our seq, then resync_required for our resume): one loss, one notice.
    _ready_seq: int | None = None
    _gap_reported: bool = False
    # A notice that arrived while an answer streamed (from a REST call running beside the
    # socket): shown when the answer's line ends instead of splitting it in two.
    _deferred: str = ""

    # --- state --------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a turn runs or a message we sent has not started its turn yet."""
        return self.turn_active or self.awaiting_start > 0

    @property
    def pending_approval(self) -> str | None:
        """The ``call_id`` the user is being asked about, if any."""
        return self.approvals[0].call_id if self.approvals else None

    # --- output helpers -----------------------------------------------------------------

    def _paint(self, style: str, text: str) -> str:
        return f"{_STYLES[style]}{text}{_RESET}" if self.color else text

    def _line(self, style: str, text: str) -> str:
        """A full line, starting on a fresh line (closing an open assistant stream first)."""
        prefix = "\n" if self._line_open else ""
        self._line_open = False
        self._streaming = False
        deferred, self._deferred = self._deferred, ""
        return f"{prefix}{deferred}{self._paint(style, text)}\n"

    def _open(self, text: str) -> str:
        """Text that leaves the cursor on its line (a prompt or a question)."""
        prefix = "\n" if self._line_open else ""
        self._line_open = True
        self._streaming = False
        return prefix + text

    def _prompt_if_idle(self) -> str:
        if self.approvals:
            # Still on the question's line (e.g. turn_finished right after the tool_call):
            # asking again would print the question twice.
            return "" if self._line_open else self._ask()
        if self.busy or self.quit_when_idle:
            return ""
        return self._open(self._paint("prompt", PROMPT))

    def _ask(self) -> str:
        call = self.approvals[0]
        question = (
            f"[approve] run tool {_clean(call.tool_name)} with args "
            f"{_compact(call.arguments)}? [y/N] "
        )
        return self._open(self._paint("approve", question))

    def _idle_quit(self, reaction: Reaction) -> Reaction:
        # End of input: leave as soon as nothing runs (a pending approval cannot be answered
        # any more, so it does not keep the client alive).
        if self.quit_when_idle and not self.busy and not reaction.quit:
            return Reaction(reaction.text, reaction.send, quit=True)
        return reaction

    # --- lifecycle ----------------------------------------------------------------------

    def creating(self, url: str) -> Reaction:
        """Said before the session is created over REST (``POST {url}``)."""
        return Reaction(self._line("notice", f"[session] creating a session: POST {url}"))

    def starting(self, url: str, *, created: bool = False) -> Reaction:
        """The banner printed before the first connection (``created``: made over REST)."""
        how = "created " if created else ""
        session = (
            f"[session] {how}{_clean(self.session_id)} "
            f"(come back to it with --session {_clean(self.session_id)})"
        )
        return Reaction(
            self._line("notice", session) + self._line("notice", f"[session] connecting to {url}")
        )

    def connection_opened(self, *, v2: bool) -> Reaction:
        """A connection is open; on a reconnect the ``resume`` frame must be its first frame."""
        self.v2 = v2
        self._connections += 1
        self._ready_seq = None
        self._gap_reported = False
        if self._connections == 1:
            protocol = SUBPROTOCOL_V2 if v2 else "v1 (the gateway did not accept codelab.v2)"
            text = self._line("notice", f"[session] connected, protocol {protocol}")
            text += self._line("notice", HELP)
            return Reaction(text + self._prompt_if_idle())
        self.resuming = True
        resume: Frame = {"type": "resume", "last_seq": self.last_seq}
        text = self._line("notice", f"[session] reconnected; resuming after seq {self.last_seq}")
        return Reaction(text, send=(resume,))

    def connection_lost(self, why: str, delay: float, attempt: int, attempts: int) -> Reaction:
        """The connection dropped; a reconnect follows after ``delay`` seconds."""
        return Reaction(
            self._line(
                "notice",
                f"[session] connection lost ({why}); reconnecting in {delay:.1f} s "
                f"(attempt {attempt}/{attempts})",
            )
        )

    def fatal(self, why: str) -> Reaction:
        """The client gives up: a final close code, a refused handshake, no more attempts."""
        return Reaction(self._line("error", f"[session] {why}"))

    # --- user side ----------------------------------------------------------------------

    def user_line(self, line: str) -> Reaction:
        """One line typed by the user (without its newline)."""
        self._line_open = False  # the terminal echoed the Enter key
        text = line.strip()
        if text in ("/quit", "/exit"):
            return Reaction(quit=True)
        if text == "/help":
            return Reaction(self._line("notice", HELP) + self._prompt_if_idle())
        if self.approvals:
            return self._answer(text)
        if not text:
            return Reaction(self._prompt_if_idle())
        self.awaiting_start += 1
        return Reaction(send=({"type": "user_message", "content": line, "role": "user"},))

    def _answer(self, text: str) -> Reaction:
        answer = text.lower()
        if answer not in ("y", "yes", "n", "no", ""):
            return Reaction(self._line("notice", "please answer y or n") + self._ask())
        return self._decide(approve=answer in ("y", "yes"))

    def _decide(self, *, approve: bool, how: str = "") -> Reaction:
        """Answer the approval being asked: a simulated result, or the IDE's rejection (a
        ``tool_result`` carrying ``error``, which the runtime handles as "no")."""
        call = self.approvals.popleft()
        self.answered.add(call.call_id)
        name = _clean(call.tool_name)
        self.awaiting_start += 1
        if approve:
            frame: Frame = {
                "type": "tool_result",
                "call_id": call.call_id,
                "result": dict(SIMULATED_RESULT),
            }
            note = f"[tool] approved {name}: simulated result sent (nothing was executed)"
        else:
            frame = {"type": "tool_result", "call_id": call.call_id, "error": REJECTED_BY_USER}
            note = f"[tool] rejected {name}{how}"
        return Reaction(self._line("tool", note) + self._prompt_if_idle(), send=(frame,))

    def restore_approvals(self, pending: Any) -> Reaction:
        """The runtime's pending approvals of this session (the ``pending_approvals`` list of
        ``GET /api/v1/sessions/{id}/pending-approvals``), fetched when the session is opened.

        A session reopened while a tool call waits for approval asks about it again, as the
        IDE restores its approval dialogs; calls already asked or answered here are skipped.
        """
        if not isinstance(pending, list):
            return Reaction()
        known = {call.call_id for call in self.approvals} | self.answered
        added: list[_ToolCall] = []
        for item in pending:
            call_id = item.get("call_id") if isinstance(item, Mapping) else None
            if not isinstance(call_id, str) or not call_id or call_id in known:
                continue
            known.add(call_id)
            name = item.get("tool_name")
            added.append(_ToolCall(call_id, str(name) if name else "?", item.get("arguments")))
        if not added:
            return Reaction()
        self.approvals.extend(added)
        text = self._line(
            "notice", f"[session] {len(added)} tool call(s) of this session wait for your approval"
        )
        return Reaction(text + self._ask())

    def interrupt(self) -> Reaction:
        """Ctrl-C: at an approval question, reject the tool call (the session goes on); else
        cancel the running turn; when idle, or at the second Ctrl-C, quit.

        Quitting at the question would leave the call pending on the runtime, the session
        stuck until someone answers it.
        """
        self._line_open = True  # the terminal printed ^C on the current line
        if self.approvals:
            return self._decide(approve=False, how=" (Ctrl-C)")
        if self.busy and not self.cancel_requested:
            self.cancel_requested = True
            text = self._line("notice", "[cancel] cancelling the turn (Ctrl-C again to quit)")
            return Reaction(text, send=({"type": "cancel"},))
        return Reaction(self._line("notice", "[session] bye"), quit=True)

    def end_of_input(self) -> Reaction:
        """stdin reached its end: quit now, or once the running turn is over."""
        self.quit_when_idle = True
        return self._idle_quit(Reaction(self._line("notice", "[session] end of input")))

    def approvals_unknown(self, why: str) -> Reaction:
        """The session's pending approvals could not be read (see :meth:`restore_approvals`)."""
        if self._streaming:
            self._deferred += self._paint(
                "notice", f"[session] cannot read pending approvals ({_clean(why)})\n"
            )
            return Reaction()
        return Reaction(
            self._line("notice", f"[session] cannot read pending approvals ({_clean(why)})")
            + self._prompt_if_idle()
        )

    # --- server side --------------------------------------------------------------------

    def receive_text(self, message: str | bytes) -> Reaction:
        """One WebSocket message from the gateway."""
        try:
            frame = json.loads(message)
        except ValueError:
            return Reaction(self._line("error", "[session] the gateway sent a non-JSON frame"))
        if not isinstance(frame, dict):
            return Reaction(self._line("error", "[session] the gateway sent a non-object frame"))
        return self.receive(frame)

    def receive(self, frame: Mapping[str, Any]) -> Reaction:
        """One decoded frame: deduplicate by ``seq``, then display and react."""
        kind = frame.get("type")
        seq = frame.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if kind in UNSEQUENCED_TYPES:
                # Today's gateway numbers these too; keep the count in step, never drop them.
                self.last_seq = max(self.last_seq, seq)
            elif self._rebase:
                self._rebase = False
                self.last_seq = seq
            elif seq <= self.last_seq:
                return Reaction()  # already shown before the reconnect
            else:
                self.last_seq = seq
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        reaction = handler(self, frame) if handler is not None else self._on_other(frame)
        if not self.v2 and frame.get("is_final", kind == "assistant_message") is True:
            # v1 has no turn_finished: a final chunk ends the turn.
            self.awaiting_start = max(0, self.awaiting_start - 1)
            reaction = Reaction(reaction.text + self._prompt_if_idle(), reaction.send)
        return self._idle_quit(reaction)

    def _on_assistant(self, frame: Mapping[str, Any]) -> Reaction:
        token, content = frame.get("token"), frame.get("content")
        # The IDE treats a missing is_final as true (docs/compatibility.md §2.2).
        final = frame.get("is_final", True) is not False
        piece = token if isinstance(token, str) else content if isinstance(content, str) else ""
        if final and not isinstance(token, str) and piece == self._streamed and self._streaming:
            piece = ""  # a final chunk that repeats the whole streamed answer
        text = ""
        if not self._streaming:
            text = self._line_break() + self._paint("assistant", "assistant> ")
            self._streaming = True
            self._streamed = ""
        text += _clean(piece)
        self._streamed += piece
        self._line_open = True
        if final:
            text += "\n" + self._deferred
            self._deferred = ""
            self._line_open = False
            self._streaming = False
        return Reaction(text)

    def _line_break(self) -> str:
        if self._line_open:
            self._line_open = False
            return "\n"
        return ""

    def _on_agent_switched(self, frame: Mapping[str, Any]) -> Reaction:
        metadata = frame.get("metadata")
        meta = metadata if isinstance(metadata, Mapping) else {}

        def pick(name: str) -> str | None:
            value = frame.get(name)
            if value is None:
                value = meta.get(name)
            return None if value is None else _clean(str(value))

        source = pick("from_agent") or "?"
        target = pick("to_agent") or "?"
        reason = pick("reason")
        text = f"[agent] {source} → {target}" + (f" ({reason})" if reason else "")
        return Reaction(self._line("agent", text))

    def _on_error(self, frame: Mapping[str, Any]) -> Reaction:
        content, error, code = frame.get("content"), frame.get("error"), frame.get("code")
        if self.resuming and code in RESUME_REFUSED_CODES:
            # A gateway without resume refuses the frame we sent first on this connection.
            self.resuming = False
            return Reaction(
                self._line(
                    "notice",
                    "[session] this gateway cannot resume; output sent while disconnected "
                    "may be missing",
                )
                + self._prompt_if_idle()
            )
        text = content if isinstance(content, str) and content else error
        message = _clean(str(text)) if text else "unknown error"
        suffix = f" [{_clean(str(code))}]" if code else ""
        if code == "cancelled":
            self.cancel_requested = False
        return Reaction(self._line("error", f"error> {message}{suffix}"))

    def _on_tool_call(self, frame: Mapping[str, Any]) -> Reaction:
        call_id, name = frame.get("call_id"), frame.get("tool_name")
        arguments = frame.get("arguments")
        tool = _clean(str(name)) if name else "?"
        shown = f"[tool] {tool} {_compact(arguments if arguments is not None else {})}"
        if not isinstance(call_id, str) or not call_id:
            return Reaction(self._line("error", f"{shown} (no call_id; cannot answer)"))
        call = _ToolCall(call_id, str(name), arguments)
        if frame.get("requires_approval") is True:
            if any(pending.call_id == call_id for pending in self.approvals):
                return Reaction()  # already asked: restored from the pending-approvals list
            self.approvals.append(call)
            text = self._line("tool", f"{shown} needs your approval")
            return Reaction(text + (self._ask() if len(self.approvals) == 1 else ""))
        self.awaiting_start += 1
        result: Frame = {
            "type": "tool_result",
            "call_id": call_id,
            "result": dict(SIMULATED_RESULT),
        }
        text = self._line("tool", f"{shown} → simulated result sent (nothing was executed)")
        return Reaction(text, send=(result,))

    def _on_session_ready(self, frame: Mapping[str, Any]) -> Reaction:
        self.turn_active = frame.get("turn_running") is True
        server_seq = frame.get("last_seq")
        text = ""
        if isinstance(server_seq, int) and not isinstance(server_seq, bool):
            self._ready_seq = server_seq
        if self._ready_seq is not None and self._ready_seq < self.last_seq:
            # The gateway's numbering restarted (its state is gone): what we hold is stale.
            self.last_seq = self._ready_seq
            text += self._missing("the gateway lost the session's earlier frames")
        if frame.get("reattached") is True and self.turn_active and self._connections == 1:
            text += self._line("notice", "[session] a turn of this session is still running")
        return Reaction(text)

    def _missing(self, reason: str) -> str:
        if self._gap_reported:
            return ""  # this connection's loss is already announced
        self._gap_reported = True
        return self._line(
            "notice",
            f"[session] some output may be missing ({_clean(reason)}); the full history is at "
            f"GET /api/v1/sessions/{self.session_id}/history",
        )

    def _on_resumed(self, frame: Mapping[str, Any]) -> Reaction:
        self.resuming = False
        return Reaction(self._prompt_if_idle() if not self._line_open else "")

    def _on_resync(self, frame: Mapping[str, Any]) -> Reaction:
        self.resuming = False
        self._rebase = True
        if self._ready_seq is not None:
            # What the gateway had numbered when it greeted us is shown or lost for good: a
            # later reconnect resumes after it, instead of asking again for the frames just
            # declared lost and announcing the same loss once more.
            self.last_seq = max(self.last_seq, self._ready_seq)
        reason = frame.get("reason")
        text = self._missing(str(reason) if reason else "resync required")
        # The notices wrote over the prompt: show it again (the resumed frame does the same).
        return Reaction(text + self._prompt_if_idle())

    def _on_turn_started(self, frame: Mapping[str, Any]) -> Reaction:
        self.turn_active = True
        self.awaiting_start = max(0, self.awaiting_start - 1)
        return Reaction()

    def _on_turn_finished(self, frame: Mapping[str, Any]) -> Reaction:
        self.turn_active = False
        status = frame.get("status")
        text = ""
        if self._streaming:
            text += self._line_break()
            self._streaming = False
        if status == "cancelled":
            text += self._line("notice", "[turn] cancelled")
        elif status not in ("completed", None):
            text += self._line("notice", f"[turn] {_clean(str(status))}")
        if not self.busy:
            self.cancel_requested = False
        return Reaction(text + self._prompt_if_idle())

    def _on_cancel_ack(self, frame: Mapping[str, Any]) -> Reaction:
        self.cancel_requested = False
        dropped = frame.get("dropped_messages")
        # The gateway dropped every queued message: none of them will start a turn.
        self.awaiting_start = 0
        if frame.get("turn_cancelled") is True:
            text = "[cancel] the gateway cancelled the turn"
        else:
            text = "[cancel] nothing was running"
        if isinstance(dropped, int) and dropped:
            text += f"; {dropped} queued message(s) dropped"
        return Reaction(self._line("notice", text) + self._prompt_if_idle())

    def _on_quiet(self, frame: Mapping[str, Any]) -> Reaction:
        return Reaction()  # heartbeat, pong, auth_ok: liveness, nothing to show

    def _on_other(self, frame: Mapping[str, Any]) -> Reaction:
        # Newer runtimes add types (status, plan_*, ...): show them, like the IDE does.
        kind = frame.get("type")
        content = frame.get("content")
        label = _clean(str(kind)) if isinstance(kind, str) else "?"
        if isinstance(content, str) and content:
            body = _clean(content)
        else:
            body = _compact({k: v for k, v in frame.items() if k not in ("type", "seq")})
        return Reaction(self._line("notice", f"[{label}] {body}"))


_Handler = Callable[[ChatCore, Mapping[str, Any]], Reaction]
_HANDLERS: Final[Mapping[str, _Handler]] = {
    "assistant_message": ChatCore._on_assistant,
    "agent_switched": ChatCore._on_agent_switched,
    "error": ChatCore._on_error,
    "tool_call": ChatCore._on_tool_call,
    "session_ready": ChatCore._on_session_ready,
    "resumed": ChatCore._on_resumed,
    "resync_required": ChatCore._on_resync,
    "turn_started": ChatCore._on_turn_started,
    "turn_finished": ChatCore._on_turn_finished,
    "cancel_ack": ChatCore._on_cancel_ack,
    "heartbeat": ChatCore._on_quiet,
    "pong": ChatCore._on_quiet,
    "auth_ok": ChatCore._on_quiet,
}


# --------------------------------------------------------------------------------------------
# The I/O loop
# --------------------------------------------------------------------------------------------


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
            # The user leaves: close with 1000 so the gateway knows it was deliberate. Bounded,
            # because a gateway that never answers the close must not keep the terminal.
            ws = self._ws
            if ws is not None:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose(1000, "client quit")
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
        if not isinstance(created, str) or not 0 < len(created) <= 256:
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
        code = int(reason.code) if reason is not None and reason.code is not None else 1006
        text = reason.reason if reason is not None and reason.reason else ""
        if code in FINAL_CLOSE_CODES:
            detail = f" ({_clean(text)})" if text else ""
            return _Ended(
                f"{FINAL_CLOSE_CODES[code]}{detail} [close {code}]", final=True, opened=opened
            )
        if code == 1012:
            return _Ended("the gateway is restarting [close 1012]", opened=opened)
        return _Ended(f"close {code}" + (f": {_clean(text)}" if text else ""), opened=opened)


async def run_chat(options: ChatOptions) -> int:
    """Run one interactive chat on stdin/stdout; returns the process exit code."""
    return await ChatRunner(options).run()
