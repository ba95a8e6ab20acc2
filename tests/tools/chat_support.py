"""What the ``trio-gateway chat`` test modules share: the frame builder, the autouse fixture that
keeps every chat off the user's own demo issuer file, and the pseudo-terminal a real chat runs in.
"""

from __future__ import annotations

import codecs
import os
import pty
import re
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_gateway.tools.dev_auth import DEV_ISSUER_FILE_ENV

from ..support.processes import cli_command, started
from .test_cli import cli_env


@pytest.fixture(autouse=True)
def private_issuer_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No chat started here may read or write the user's own demo issuer file."""
    monkeypatch.setenv(DEV_ISSUER_FILE_ENV, str(tmp_path / "default-issuer.json"))


def chunk(type_: str, seq: int | None = None, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": type_, **fields}
    if seq is not None:
        frame["seq"] = seq
    return frame


DEADLINE = 30  # a guard against a hung client, never a performance assertion


@dataclass
class Terminal:
    """The master side of a pty whose slave is a ``trio-gateway chat`` process's terminal."""

    process: trio.Process
    stream: trio.lowlevel.FdStream
    output: str = ""
    eof: bool = False
    _pos: int = 0
    _changed: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    async def pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # Linux answers EIO once the child has closed the terminal
            # The terminal turns "\n" into "\r\n": compare text as the user reads it.
            self.output += decoder.decode(data, final=not data).replace("\r", "")
            self._changed.unpark_all()
            if not data:
                self.eof = True
                return

    async def expect(self, pattern: str) -> re.Match[str]:
        """The next match of ``pattern`` in the output after the previous match."""
        regex = re.compile(pattern)
        with trio.move_on_after(DEADLINE):
            while True:
                match = regex.search(self.output, self._pos)
                if match is not None:
                    self._pos = match.end()
                    return match
                if self.eof:
                    break
                await self._changed.park()
        raise AssertionError(f"no {pattern!r} in the chat's output:\n{self.output}")

    async def type(self, text: str) -> None:
        await self.stream.send_all(text.encode())

    async def ask(self, line: str) -> None:
        """At the next prompt, type ``line`` and Enter."""
        await self.expect("you> ")
        await self.type(line + "\n")

    async def exit_code(self) -> int:
        with trio.fail_after(DEADLINE):
            return await self.process.wait()


@asynccontextmanager
async def chat(*args: str, cwd: Path, env: dict[str, str] | None = None) -> AsyncIterator[Terminal]:
    """``trio-gateway chat ARGS --plain`` on a fresh pty, killed at the end if still running."""
    master, slave = pty.openpty()
    async with trio.lowlevel.FdStream(master) as stream, AsyncExitStack() as stack:
        try:
            child = await stack.enter_async_context(
                started(
                    cli_command("chat", *args, "--plain"),
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=cwd,
                    env=cli_env(env),
                    stop_signal=signal.SIGKILL,
                )
            )
        finally:
            os.close(slave)  # the child has its own copy: EOF on the master when it exits
        terminal = Terminal(child.process, stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminal.pump)
            try:
                yield terminal
            finally:
                await child.stop(signal.SIGKILL)  # a chat still running; then the pump
                nursery.cancel_scope.cancel()
