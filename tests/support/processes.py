"""Child processes of the tests and the benchmarks: ``trio-gateway serve``, ``demo-runtime``,
``demo``... started on a loopback port, waited for (bounded) until they answer ``/health``, and
stopped (SIGTERM, then SIGKILL) whatever happens. The tests start their children through this
module (redis_server.py and nginx_server.py wrap one program each); none writes its own launcher.

Three kinds, by what the caller does with the child:

- :func:`spawned` / :class:`Child`: a server whose output goes to a log file.
  :class:`subprocess.Popen` objects, so that synchronous code (a benchmark's setup, a context
  manager that must stop its child even when trio is gone) and trio code can share them; the
  waits that happen under trio poll, so they stay cancellable.
- :func:`started` / :class:`TrioChild`: any command under trio (``trio-gateway ...``:
  :func:`cli_command`) whose output the test reads line by line (a banner, a ``PORT n`` line,
  JSON log lines) or whose stdin it writes, or that runs in a pseudo-terminal; stopped with a
  signal, then SIGKILL, and its exit status read.
- :func:`run_command` / :func:`run_cli` (trio) and :func:`run_python` (synchronous): a one-shot
  command run to completion with its output captured, bounded by a timeout.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from .ports import HOST, free_port

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
STARTUP_TIMEOUT = 30.0  # seconds for a child to answer /health
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL, and for the reaping after it
RUN_TIMEOUT = 60.0  # seconds for a one-shot command (a guard against a hang, not a measure)


class ChildError(Exception):
    """A child process died, or did not become ready in time (its output is in the message)."""


def cli_command(*args: str) -> list[str]:
    """The command line of ``trio-gateway ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "trio_gateway.cli", *args]


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ``GATEWAY__*`` (an operator's variables would
    silently change what a child does), plus ``settings`` as ``GATEWAY__NAME``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY__")}
    env.update({f"GATEWAY__{key.upper()}": value for key, value in settings.items()})
    return env


def child_env(internal_key: str, **settings: str) -> dict[str, str]:
    """:func:`clean_env` with the internal key, WARNING logs and JWT off, then ``settings``
    (which may override any of them, JWT included)."""
    defaults = {"internal_api_key": internal_key, "log_level": "WARNING", "use_jwt_auth": "false"}
    return clean_env(**{**defaults, **settings})


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies (even by
    SIGKILL), so a killed run leaves no servers behind; None where unavailable.

    Linux ties the signal to the *thread* that forked: only for a Popen made by a thread that
    outlives the child (not under ``trio.lowlevel.open_process``, which forks in a worker
    thread)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


async def wait_until_serving(
    base_url: str,
    timeout: float = 20,
    *,
    check_alive: Callable[[], None] | None = None,
    path: str = "/health",
) -> None:
    """Poll ``GET base_url + path`` until it answers 200, or fail (``trio.TooSlowError``);
    ``check_alive`` (raising) is called between attempts so that a dead child fails at once."""
    async with httpx.AsyncClient(trust_env=False) as http:
        with trio.fail_after(timeout):
            while True:
                if check_alive is not None:
                    check_alive()
                with suppress(httpx.TransportError):
                    if (await http.get(f"{base_url}{path}", timeout=2.0)).status_code == 200:
                        return
                await trio.sleep(0.05)


def wait_until_serving_sync(base_url: str, timeout: float = STARTUP_TIMEOUT) -> None:
    """:func:`wait_until_serving` for code that does not run under trio."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise ChildError(f"{base_url} did not become healthy in {timeout:g} s")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` (a frozen child is thawed first), wait, SIGKILL after ``STOP_TIMEOUT``;
    reaped afterwards. Never raises."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # a SIGSTOPped child could not act on sig
            process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


@dataclass
class Child:
    """One child process (a Python interpreter running ``trio-gateway``) and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    @property
    def port(self) -> int:
        """The loopback port it serves on."""
        return int(self.url.rsplit(":", 1)[1])

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the child wrote, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise :class:`ChildError` (with its output) if the child has exited."""
        code = self.process.poll()
        if code is not None:
            raise ChildError(f"{self.name} exited with status {code}:\n{self.log_tail()}")

    async def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll ``GET /health`` until it answers 200 (bounded by ``timeout``)."""
        try:
            await wait_until_serving(self.url, timeout, check_alive=self.check_alive)
        except trio.TooSlowError:
            raise ChildError(
                f"{self.name} not healthy after {timeout:g} s:\n{self.log_tail()}"
            ) from None

    async def wait_exit(self) -> int:
        """Wait (polling: a Popen child) until the child has exited; its status."""
        while (code := self.process.poll()) is None:
            await trio.sleep(0.01)
        return code

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """``sig`` (SIGTERM: the gateway drains), then SIGKILL after a grace period."""
        stop_process(self.process, sig)


@contextmanager
def spawned(
    name: str, args: list[str], env: dict[str, str], workdir: Path, *, port: int | None = None
) -> Iterator[Child]:
    """Run ``trio-gateway ARGS --host 127.0.0.1 --port PORT`` (a free port unless given) as a
    child writing to ``workdir/NAME.log``; stop it when the block ends."""
    port = port or free_port()
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cli_command(*args, "--host", HOST, "--port", str(port)),
            env=env,
            cwd=workdir,  # no stray .env from the caller's directory
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop the children
            preexec_fn=die_with_parent(),
        )
    child = Child(name, process, log_path, f"http://{HOST}:{port}")
    try:
        yield child
    finally:
        child.stop()


# --- children under trio whose output is read ------------------------------------------------


class LineReader:
    """The lines of a child's pipe, read under trio (cancellable, unlike a blocking readline).

    Iterating gives every line up to the end of the stream; :meth:`read_line` and
    :meth:`read_until` are for a test that waits for one announcement."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._ended = False

    async def _more(self) -> bool:
        """Append the next chunk to the buffer; False at the end of the stream."""
        if not self._ended:
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            self._buffer += chunk
            self._ended = not chunk
        return not self._ended

    async def read_line(self) -> str:
        """The next line, without its newline; :class:`ChildError` if the stream ends first."""
        while b"\n" not in self._buffer:
            if not await self._more():
                raise ChildError(f"the child's output ended without a line: {self._buffer!r}")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    async def read_until(self, marker: str) -> str:
        """The text up to the end of the first ``marker``; :class:`ChildError` (with what was
        read) if the stream ends first."""
        wanted = marker.encode()
        while wanted not in self._buffer:
            if not await self._more():
                raise ChildError(f"the child's output ended before {marker!r}: {self._buffer!r}")
        end = self._buffer.index(wanted) + len(wanted)
        text, self._buffer = self._buffer[:end], self._buffer[end:]
        return text.decode(errors="replace")

    def __aiter__(self) -> LineReader:
        return self

    async def __anext__(self) -> str:
        try:
            return await self.read_line()
        except ChildError:  # the end of the stream (a last line without newline is dropped)
            raise StopAsyncIteration from None


@dataclass
class TrioChild:
    """A child process under trio (:func:`started`), with line readers on its piped output."""

    process: trio.Process
    stdout: LineReader | None
    stderr: LineReader | None

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status, None while it runs."""
        return self.process.returncode

    def check_alive(self) -> None:
        """Raise :class:`ChildError` if the child has exited (for :func:`wait_until_serving`)."""
        if self.process.returncode is not None:
            raise ChildError(f"{self.process.args!r} exited with status {self.process.returncode}")

    async def wait_serving(
        self, base_url: str, timeout: float = STARTUP_TIMEOUT, path: str = "/health"
    ) -> None:
        """Poll ``GET base_url + path`` until it answers 200; fail at once if the child dies."""
        await wait_until_serving(base_url, timeout, check_alive=self.check_alive, path=path)

    async def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (unless it has exited), SIGKILL it if it has not exited after ``grace``
        seconds; its exit status (a test that expects 0 after a signal sees -9 if it hung)."""
        if self.process.returncode is None:
            with suppress(ProcessLookupError):
                self.process.send_signal(sig)
            with trio.move_on_after(grace):
                return await self.process.wait()
            self.process.kill()
        return await self.process.wait()


def _reader(stream: trio.abc.ReceiveStream | None) -> LineReader | None:
    return None if stream is None else LineReader(stream)


@asynccontextmanager
async def started(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
    stop_signal: int = signal.SIGTERM,
) -> AsyncIterator[TrioChild]:
    """Run ``command`` as a child under trio (``env`` None: this process's environment); each
    of ``stdin``/``stdout``/``stderr`` is DEVNULL unless given (``subprocess.PIPE``: the child's
    ``stdout``/``stderr`` line reader, ``process.stdin`` to write; or a file descriptor). When
    the block ends the child gets ``stop_signal``, then SIGKILL after ``STOP_TIMEOUT``."""
    process = await trio.lowlevel.open_process(
        list(command),
        env=None if env is None else dict(env),
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop the children
        # No die_with_parent() here: trio forks in a worker thread, and Linux sends the death
        # signal when that *thread* ends (an idle worker thread exits after seconds), which
        # would SIGTERM a child in the middle of its test.
    )
    child = TrioChild(process, _reader(process.stdout), _reader(process.stderr))
    try:
        yield child
    finally:
        # Shielded: a test that failed by a timeout (cancelled) must still not leave its child
        # running; stop() is bounded by its own grace period and the SIGKILL.
        with trio.CancelScope(shield=True):
            await child.stop(stop_signal)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()


# --- one-shot commands -----------------------------------------------------------------------


async def run_command(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` to completion under trio, stdout and stderr captured (bytes), whatever
    its exit status (``env`` None: this process's environment); ``trio.TooSlowError`` after
    ``timeout`` seconds (the child is killed)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            list(command),
            env=None if env is None else dict(env),
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    """:func:`run_command` for ``trio-gateway ARGS`` run by this interpreter."""
    return await run_command(cli_command(*args), env=env, cwd=cwd, timeout=timeout)


def run_python(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` (this interpreter) run to completion outside trio, output captured as
    text, whatever its exit status; ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    return subprocess.run(
        [sys.executable, *args],
        env=None if env is None else dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def run_bench_script(
    script: str, args: Sequence[str], workdir: Path, timeout: float
) -> dict[str, Any]:
    """Run ``bench/SCRIPT ARGS --json FILE`` as a child process (as an operator would; its own
    children die with it), print what it printed, and return the figures it wrote.

    The short tests prove what the benchmarks prove by running the very same scripts, never by
    importing them: a script's command line stays what the docs quote.
    """
    figures = workdir / f"{Path(script).stem}-figures.json"
    command = [sys.executable, str(BENCH_DIR / script), *args, "--json", str(figures)]
    with trio.fail_after(timeout):
        done = await trio.run_process(
            command, cwd=workdir, capture_stdout=True, capture_stderr=True, check=False
        )
    print(done.stdout.decode(errors="replace"))
    assert figures.exists(), done.stderr.decode(errors="replace")[-3000:]
    figures_read: dict[str, Any] = orjson.loads(figures.read_bytes())
    return figures_read
