"""The scripted agent of the demo runtime: what each turn streams.

A turn is a *plan*: a plain (synchronous) generator of steps, either an encoded SSE event or a
pause. ``app.py`` drives the plan into the response body. Keeping the scripted logic
synchronous means no nested async generators whose finalisation trio would have to chase when
a client disconnects, and state changes (a call becoming pending) happen exactly when the chunk
announcing them is produced.

A question gets an echoing answer, a coding request the tool-call flow (read README.md, then
write hello.py after the user's approval), ``bench N [R]`` N tokens (R per second).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Final

import orjson
import trio

from .state import (
    DemoRuntimeConfig,
    PendingCall,
    RuntimeState,
    Session,
    now_iso,
    shorten,
    summarise,
)

__all__ = ["Pause", "Plan", "ScriptedAgent", "Turn", "Until", "encode_chunk"]

# Agents that write code themselves: a coding request sent to any other agent switches to coder.
CODING_AGENTS: Final = frozenset({"coder", "universal"})
CODING_REQUEST = re.compile(
    r"\b(write|create|implement|code|fix|refactor|function|class|script|build)\b", re.IGNORECASE
)
HELLO_PATH: Final = "hello.py"
HELLO_CONTENT: Final = 'print("Hello, world!")\n'


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait this long (a bare checkpoint in instant mode or for zero)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Until:
    """Wait until this ``trio.current_time()`` (rate-paced bench; honoured even when instant)."""

    deadline: float


Step = bytes | Pause | Until
Plan = Generator[Step, None, None]


def encode_chunk(
    type_: str,
    *,
    content: str | None = None,
    token: str | None = None,
    is_final: bool = False,
    call_id: str | None = None,
    tool_name: str | None = None,
    arguments: dict[str, Any] | None = None,
    requires_approval: bool = False,
    error: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """Encode one stream chunk as an SSE event, every field present (today's runtime does so)."""
    return (
        b"data: "
        + orjson.dumps(
            {
                "type": type_,
                "content": content,
                "token": token,
                "is_final": is_final,
                "call_id": call_id,
                "tool_name": tool_name,
                "arguments": arguments,
                "requires_approval": requires_approval,
                "error": error,
                "metadata": metadata,
            }
        )
        + b"\n\n"
    )


@dataclass(frozen=True, slots=True)
class Turn:
    """A validated stream request, ready to run once the session lock is held."""

    kind: str
    message: dict[str, Any]
    bench: tuple[int, float | None] | None = None


class ScriptedAgent:
    """Plays turns against a :class:`~.state.RuntimeState`; run each plan under the session lock."""

    def __init__(self, state: RuntimeState, config: DemoRuntimeConfig) -> None:
        """An agent over ``state``, paced by ``config``'s delays."""
        self.state = state
        self.config = config

    def plan(self, session: Session, turn: Turn) -> Plan:
        """The steps of ``turn``; it changes the session as its chunks are produced."""
        if turn.kind == "switch_agent":
            return self._plan_switch(session, turn.message)
        if turn.kind == "user_message":
            if turn.bench is not None:
                return self._plan_bench(session, turn.message["content"], *turn.bench)
            return self._plan_user_message(session, turn.message)
        return self._plan_tool_outcome(session, turn)

    def _words(self, text: str) -> Plan:
        """Stream ``text`` word by word: token == content == the word plus a trailing space."""
        for index, word in enumerate(text.split()):
            if index:
                yield Pause(self.config.token_delay)
            piece = word + " "
            yield encode_chunk("assistant_message", content=piece, token=piece)

    def _final(self) -> bytes:
        return encode_chunk("assistant_message", content="", token="", is_final=True)

    def _plan_switch(self, session: Session, message: dict[str, Any]) -> Plan:
        reason = message.get("reason")
        entry = self.state.switch(
            session,
            message["agent_type"],
            reason if isinstance(reason, str) and reason else "Requested by the user",
            1.0,
        )
        yield self._switch_chunk(entry, is_final=True)

    def _switch_chunk(self, entry: dict[str, Any], *, is_final: bool) -> bytes:
        metadata = {key: entry[key] for key in ("from_agent", "to_agent", "reason", "confidence")}
        return encode_chunk(
            "agent_switched",
            content=f"Switching to {entry['to_agent']} agent",
            is_final=is_final,
            metadata=metadata,
        )

    def _plan_bench(self, session: Session, content: str, count: int, rate: float | None) -> Plan:
        # No think delay here: bench pacing is exactly what the client asked for, so direct and
        # through-the-gateway measurements compare like with like.
        self.state.add_message(session, "user", content)
        start = trio.current_time()
        for index in range(count):
            if rate is not None:
                # Absolute schedule: a late token does not delay the ones after it.
                yield Until(start + index / rate)
            elif index:
                yield Pause(self.config.token_delay)
            piece = f"t{index} "
            # Paced streams carry their emit time so a client can measure relay latency.
            # Unpaced (throughput) streams carry none: chunks whose metadata differ can never
            # be coalesced, and a real runtime's tokens carry no per-token metadata either.
            metadata = {"emitted_ns": time.time_ns(), "index": index} if rate else None
            yield encode_chunk("assistant_message", content=piece, token=piece, metadata=metadata)
        yield Pause(0)
        yield self._final()
        self.state.add_message(session, "assistant", f"[bench: streamed {count} tokens]")

    def _plan_user_message(self, session: Session, message: dict[str, Any]) -> Plan:
        """A question gets an echoing answer; a coding request starts the tool-call flow.

        An explicit ``agent_type`` switches to that agent first and is then respected: only a
        session whose agent was not chosen in this message is routed to the coder.
        """
        content: str = message["content"]
        self.state.add_message(session, "user", content)
        self.state.record(
            "message_received", session.id, role="user", content=shorten(content, 200)
        )
        yield Pause(self.config.think_delay)
        agent_type = message.get("agent_type")
        explicit = isinstance(agent_type, str)  # validated against AGENTS before streaming
        if isinstance(agent_type, str) and agent_type != session.current_agent:
            entry = self.state.switch(session, agent_type, "Requested by the client", 1.0)
            yield self._switch_chunk(entry, is_final=False)
            yield Pause(self.config.token_delay)
        if CODING_REQUEST.search(content) is None:
            answer = (
                f'You asked: "{shorten(content, 120)}". I am the demo Agent Runtime, so I can '
                "only echo questions back. Ask me to write some code to see the tool-call flow."
            )
            yield from self._words(answer)
            yield Pause(self.config.token_delay)
            yield self._final()
            self.state.add_message(session, "assistant", answer)
            return
        if session.current_agent not in CODING_AGENTS and not explicit:
            entry = self.state.switch(session, "coder", "The request asks for code", 0.9)
            yield self._switch_chunk(entry, is_final=False)
            yield Pause(self.config.token_delay)
        text = "I will read README.md first to see how the project is laid out."
        yield from self._words(text)
        yield Pause(self.config.token_delay)
        yield self._tool_call(session, "read_file", {"path": "README.md"}, requires_approval=False)
        self.state.add_message(session, "assistant", text)

    def _tool_call(
        self,
        session: Session,
        tool_name: str,
        arguments: dict[str, Any],
        *,
        requires_approval: bool,
    ) -> bytes:
        call = PendingCall(
            call_id=f"call_{secrets.token_hex(8)}",
            tool_name=tool_name,
            arguments=arguments,
            requires_approval=requires_approval,
            request_id=f"req_{secrets.token_hex(8)}",
            created_at=now_iso(),
        )
        self.state.add_pending(session, call)
        return encode_chunk(
            "tool_call",
            call_id=call.call_id,
            tool_name=tool_name,
            arguments=arguments,
            requires_approval=requires_approval,
            is_final=True,
        )

    def _plan_tool_outcome(self, session: Session, turn: Turn) -> Plan:
        """``tool_result`` or ``hitl_decision``: finish the pending call and continue the flow."""
        message = turn.message
        call = session.pending.pop(message["call_id"], None)
        if call is None:
            # Validated before streaming, but a concurrent turn for this session may have
            # consumed the call while this one waited for the lock.
            yield encode_chunk("error", error="The tool call is no longer pending", is_final=True)
            return
        arguments = call.arguments
        if turn.kind == "hitl_decision":
            decision = message["decision"]
            feedback = message.get("feedback")
            modified = message.get("modified_arguments")
            if decision == "edit" and isinstance(modified, dict):
                arguments = {**arguments, **modified}
            error = None
            if decision == "reject":
                error = feedback if isinstance(feedback, str) and feedback else "Rejected by user"
            self.state.stats[f"approvals_{'rejected' if error else 'approved'}"] += 1
            self.state.record(
                "approval_decided", session.id, call_id=call.call_id, decision=decision
            )
            self.state.add_message(
                session, "user", f"[{decision}] {call.tool_name} ({call.call_id})"
            )
        else:
            raw_error = message.get("error")
            error = summarise(raw_error, 200) if raw_error not in (None, "") else None
            self.state.stats["tool_results"] += 1
            self.state.record(
                "tool_result_received", session.id, call_id=call.call_id, ok=error is None
            )
            outcome = f"error: {error}" if error else summarise(message.get("result"))
            self.state.add_message(session, "tool", f"{call.tool_name}: {outcome}")
        yield Pause(self.config.think_delay)
        if call.tool_name == "read_file":
            text = (
                f"I could not read README.md ({error}), so I will go straight to writing the code."
                if error
                else "Thanks, README.md is read. Now I will write hello.py for you."
            )
            yield from self._words(text)
            yield Pause(self.config.token_delay)
            yield self._tool_call(
                session,
                "write_file",
                {"path": HELLO_PATH, "content": HELLO_CONTENT},
                requires_approval=True,
            )
        else:
            path = arguments.get("path", HELLO_PATH)
            text = (
                f"Understood, I did not write {path} ({error}). Tell me what to change and I "
                "will try again."
                if error
                else f"Done: wrote {path} with a hello-world program."
            )
            yield from self._words(text)
            yield Pause(self.config.token_delay)
            yield self._final()
        self.state.add_message(session, "assistant", text)
