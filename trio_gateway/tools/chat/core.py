"""The chat client's logic without any I/O: frames in, text and frames out (sans-IO).

:class:`ChatCore` turns received frames into display text and decisions (frames to send,
quitting), tracks the state that matters (the highest ``seq`` processed, pending approvals,
whether a turn is running, resume in progress) and interprets user input, Ctrl-C and end of
input. It is unit-tested frame by frame; ``runner.py`` is the trio loop around it.

The client never executes tools. A ``tool_call`` is answered with a made-up result
(:data:`SIMULATED_RESULT`), after asking the user when the call requires approval: a chat
window must not become a way for a server to touch the user's files or run commands.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from ...protocol import CONNECTION_FRAME_TYPES, SUBPROTOCOL_V2, ErrorCode, TurnStatus

__all__ = [
    "SIMULATED_RESULT",
    "ChatCore",
    "Reaction",
    "want_color",
]

Frame = dict[str, Any]

#: What an approved (or automatic) tool call is answered with: nothing was executed.
SIMULATED_RESULT: Final[Mapping[str, Any]] = {
    "ok": True,
    "simulated": True,
    "note": "chat client does not execute tools",
}
REJECTED_BY_USER: Final = "rejected by user"
#: Error codes with which a gateway that predates resume refuses the ``resume`` frame.
RESUME_REFUSED_CODES: Final = frozenset({ErrorCode.UNSUPPORTED_TYPE, ErrorCode.INVALID_MESSAGE})
MAX_ARGUMENTS_SHOWN: Final = 300
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


def strip_controls(text: str) -> str:
    """``text`` without control characters, fit to be written to the user's terminal."""
    # Text comes from the server: never let it move the cursor, retitle the terminal or
    # otherwise drive the user's terminal with escape sequences.
    return _CONTROL_CHARS.sub("", text)


def _compact(value: Any, limit: int = MAX_ARGUMENTS_SHOWN) -> str:
    """One-line JSON (newlines escaped), shortened to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    except (TypeError, ValueError):
        text = repr(value)
    text = strip_controls(text)
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
            f"[approve] run tool {strip_controls(call.tool_name)} with args "
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
            f"[session] {how}{strip_controls(self.session_id)} "
            f"(come back to it with --session {strip_controls(self.session_id)})"
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
            protocol = SUBPROTOCOL_V2 if v2 else f"v1 (the gateway did not accept {SUBPROTOCOL_V2})"
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
        name = strip_controls(call.tool_name)
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
                "notice", f"[session] cannot read pending approvals ({strip_controls(why)})\n"
            )
            return Reaction()
        return Reaction(
            self._line("notice", f"[session] cannot read pending approvals ({strip_controls(why)})")
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
            if kind in CONNECTION_FRAME_TYPES:
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
        text += strip_controls(piece)
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
            return None if value is None else strip_controls(str(value))

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
        message = strip_controls(str(text)) if text else "unknown error"
        suffix = f" [{strip_controls(str(code))}]" if code else ""
        if code == ErrorCode.CANCELLED:
            self.cancel_requested = False
        return Reaction(self._line("error", f"error> {message}{suffix}"))

    def _on_tool_call(self, frame: Mapping[str, Any]) -> Reaction:
        call_id, name = frame.get("call_id"), frame.get("tool_name")
        arguments = frame.get("arguments")
        tool = strip_controls(str(name)) if name else "?"
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
            f"[session] some output may be missing ({strip_controls(reason)}); the full history "
            f"is at GET /api/v1/sessions/{self.session_id}/history",
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
        if status == TurnStatus.CANCELLED:
            text += self._line("notice", "[turn] cancelled")
        elif status not in (TurnStatus.COMPLETED, None):
            text += self._line("notice", f"[turn] {strip_controls(str(status))}")
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
        label = strip_controls(str(kind)) if isinstance(kind, str) else "?"
        if isinstance(content, str) and content:
            body = strip_controls(content)
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
