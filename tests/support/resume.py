"""The resuming client of protocol v2, written once for the resume tests and the resume
benchmark: it remembers the last seq it processed, says where it stopped when it reconnects,
and checks across all its connections that numbered frames never skip or repeat."""

from __future__ import annotations

from typing import Any

import trio

from .rawws import RawWebSocket
from .task_tree import format_task_tree

V2 = ["codelab.v2"]


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ResumingClient:
    """A v2 client on a raw socket that tracks the last seq it processed and checks that there
    is no gap and no repeat (after ``resync_required`` the next seq is the new baseline).

    ``strict`` (the tests): a gap or a repeat fails at once, and a frame that does not come
    within ``frame_timeout`` fails with the task tree of this process (where the gateway under
    test runs). Not strict (the benchmark): violations are recorded in ``problems`` and
    ``resyncs`` and the caller goes on to the end of its turn to report everything it saw.
    """

    def __init__(
        self, port: int, session_id: str, *, strict: bool = True, frame_timeout: float = 10
    ) -> None:
        """A client for ``session_id`` on the gateway at ``port``; not connected yet."""
        self.port = port
        self.session_id = session_id
        self.strict = strict
        self.frame_timeout = frame_timeout
        self.ws: RawWebSocket | None = None
        self.last_seq = 0
        self.frames: list[dict[str, Any]] = []  # numbered frames, in the order processed
        self.control: list[dict[str, Any]] = []  # connection frames (no seq)
        self.resynced = False
        self.turns_finished = 0  # turn_finished frames processed, replayed or live
        self.turn_statuses: list[str] = []
        self.finals = 0  # assistant_message frames with is_final true
        self.token_count = 0  # ``tN `` pieces processed (a coalesced frame carries several)
        self.problems: list[str] = []
        self.resyncs: list[str] = []  # the reasons of every resync_required

    async def connect(self, *, resume: bool) -> dict[str, Any]:
        """Open a v2 WebSocket to ``self.port``, read ``session_ready``, send ``resume`` (with
        the last seq processed) if asked; the ``session_ready`` frame."""
        self.ws = await RawWebSocket.connect(
            self.port, f"/api/v1/ws/{self.session_id}", subprotocols=V2
        )
        ready = await self.ws.recv_json(self.frame_timeout)
        if ready.get("type") != "session_ready" or "seq" in ready:
            raise AssertionError(f"expected session_ready first, got {_short(ready)}")
        if resume:
            await self.ws.send_json({"type": "resume", "last_seq": self.last_seq})
        return ready

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one JSON frame on the current connection."""
        assert self.ws is not None
        await self.ws.send_json(frame)

    async def recv(self) -> dict[str, Any]:
        """The next frame as it comes, neither checked nor accounted (a ``resync_required``,
        an error answer: what a test reads before the numbered frames go on)."""
        assert self.ws is not None
        return await self.ws.recv_json(self.frame_timeout)

    async def next(self) -> dict[str, Any]:
        """The next frame, accounted: seq continuity, tokens, turn ends, errors, resyncs."""
        assert self.ws is not None
        try:
            frame = await self.ws.recv_json(self.frame_timeout)
        except trio.TooSlowError:
            if not self.strict:
                raise
            # Say what every task of the gateway (same run) was doing when nothing came.
            tree = format_task_tree()
            raise AssertionError(
                f"no frame after seq {self.last_seq} (close code {self.ws.close_code}); "
                f"tasks:\n{tree}"
            ) from None
        kind = frame.get("type")
        seq = frame.get("seq")
        if seq is None:
            self.control.append(frame)
            if kind == "resync_required":
                self.resyncs.append(str(frame.get("reason")))
                self.resynced = True
            return frame
        if self.resynced:  # after resync_required the next seq is the new baseline
            self.resynced = False
            self.last_seq = seq - 1
        if seq != self.last_seq + 1:
            if self.strict:
                raise AssertionError((frame, self.last_seq))
            self.problems.append(f"seq {seq} after {self.last_seq}")
        self.last_seq = seq
        self.frames.append(frame)
        self._account(frame)
        return frame

    def _account(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "assistant_message":
            token = frame.get("token")
            if frame.get("is_final") is True:
                self.finals += 1
            elif isinstance(token, str):
                self.token_count += token.count(" ")
            else:
                self.problems.append(f"token chunk without a token: {_short(frame)}")
        elif kind == "turn_finished":
            self.turns_finished += 1
            self.turn_statuses.append(str(frame.get("status")))
        elif kind == "error":
            self.problems.append(f"error frame: {_short(frame)}")

    async def until(self, frame_type: str) -> dict[str, Any]:
        """Read until a frame of ``frame_type``; that frame."""
        while True:
            frame = await self.next()
            if frame.get("type") == frame_type:
                return frame

    async def until_all(self, *frame_types: str) -> dict[str, dict[str, Any]]:
        """Read until a frame of each type has come, in any order; the first of each."""
        found: dict[str, dict[str, Any]] = {}
        while len(found) < len(frame_types):
            frame = await self.next()
            kind = frame.get("type")
            if kind in frame_types and kind not in found:
                found[kind] = frame
        return found

    async def until_turns_finished(self, count: int) -> None:
        """Read until ``count`` turns have finished on this session."""
        while self.turns_finished < count:
            await self.next()

    def tokens(self) -> str:
        """The text of the streamed (non-final) token frames processed."""
        return "".join(
            f["token"] or ""
            for f in self.frames
            if f["type"] == "assistant_message" and f["is_final"] is False
        )

    def text(self) -> str:
        """Every token processed, the final frames' included (the whole answer)."""
        return "".join(
            f.get("token") or "" for f in self.frames if f.get("type") == "assistant_message"
        )

    async def cut(self) -> None:
        """Vanish: TCP RST, no close frame, unread bytes dropped by the kernel."""
        ws, self.ws = self.ws, None
        if ws is not None:
            await ws.vanish(reset=True)

    async def close(self) -> None:
        """A normal close frame, then the socket goes (the reply is not awaited)."""
        ws, self.ws = self.ws, None
        if ws is not None:
            await ws.close()
