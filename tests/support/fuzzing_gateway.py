"""The gateway under test of the hostile-input fuzzing harness (shared by the tests of
``tests/hostile/`` and ``bench/fuzz.py``), its figures, and the helpers that run fuzz tests
against it. Frames on the wire: ``fuzzing_wire``; strategies: ``fuzzing_strategies``; the
client side of one example: ``fuzzing_exchange``.

How hypothesis and trio fit together here (and why):

- hypothesis drives the generation (``@given`` on *sync* test functions), so every input is
  drawn, shrunk on failure and replayable from hypothesis' example database like any other
  property test. ``strategy.example()`` is not used: it is meant for the REPL, draws without
  shrinking and warns.
- The gateway under test is started **once per fuzz run** by :class:`FuzzGateway`: a background
  thread runs its own ``trio.run`` with the demo runtime, the gateway (and, in JWT mode, a real
  JWKS server) on ``127.0.0.1`` with OS-chosen ports, plus a *control session* that streams
  ``bench`` turns and checks every token for the whole run.
- Each hypothesis example runs its client side with a short ``trio.run`` in the test's own
  thread, over real sockets. The client is therefore independent of the gateway's event loop:
  a gateway that wedges its loop makes the example's ``fail_after`` fire instead of hanging.
- Inspection of the gateway's state (live tasks, gauges) happens inside its loop through
  ``trio.from_thread.run_sync``.

Nothing here asserts on time: every wait is bounded (``fail_after``) only so that a wedged
server fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import orjson
import trio
import trio_websocket
from hypothesis import HealthCheck, settings

from trio_gateway.protocol import SUBPROTOCOL_V2
from trio_gateway.server import serve
from trio_gateway.settings import Settings
from trio_gateway.tools.demo_runtime import (
    DemoRuntime,
    DemoRuntimeConfig,
    create_demo_runtime,
    serve_demo_runtime,
)
from trio_gateway.tools.dev_auth import DevIssuer

from .fuzzing_exchange import Exchange, HttpAnswer, check_exchange
from .fuzzing_strategies import FrameBatch, dumps
from .fuzzing_wire import MAX_MESSAGE_BYTES
from .jwks_server import JWKSServer
from .task_tree import format_task_tree, task_names

T = TypeVar("T")

INTERNAL_KEY = "fuzz-internal-key-0123456789"
CONTROL_TOKENS = 40
EXPECTED_CONTROL_TEXT = "".join(f"t{i} " for i in range(CONTROL_TOKENS))


# --- the gateway under test -------------------------------------------------------------------


class ErrorLogCounter(logging.Handler):
    """Counts log records at ERROR or above (an unhandled exception in a handler logs one)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []
        # hypercorn's own per-connection race (its 400 for an upgrade request carrying a body
        # versus the app's answer: h11 LocalProtocolError), logged by hypercorn and contained
        # to that one connection. Counted, reported, not a failure.
        self.contained: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            lines = traceback.format_exception(record.exc_info[1])
            text += " | " + " ".join(line.strip() for line in lines if "Error" in line)[-600:]
        if record.name == "hypercorn.error" and "LocalProtocolError" in text:
            self.contained.append(text)
        else:
            self.records.append(text)


@dataclass
class ControlReport:
    """What the control session saw while the fuzzer ran."""

    turns: int = 0
    problems: list[str] = field(default_factory=list)
    closed: int | None = None


def count_tasks() -> int:
    """Live tasks in the calling trio run."""
    return len(task_names(lambda _: True))


async def control_turn(ws: trio_websocket.WebSocketConnection, tokens: int) -> str | None:
    """One ``bench`` turn on a v2 socket; returns a problem, or None when the text is exact."""
    await ws.send_message(dumps({"type": "user_message", "content": f"bench {tokens}"}))
    text = ""
    with trio.fail_after(30):
        while True:
            frame = orjson.loads(await ws.get_message())
            kind = frame.get("type")
            if kind == "assistant_message":
                text += frame.get("token") or ""
            elif kind == "turn_finished":
                if frame.get("status") != "completed":
                    return f"turn status {frame.get('status')}"
                break
            elif kind not in ("turn_started", "heartbeat", "session_ready"):
                return f"unexpected frame {frame}"
    expected = "".join(f"t{i} " for i in range(tokens))
    return None if text == expected else f"tokens differ: {text[:60]!r}..."


class FuzzGateway:
    """Demo runtime + gateway (+ JWKS server in JWT mode) + control session, in a thread.

    Use as a context manager; :attr:`port` is the gateway's port.
    """

    def __init__(self, *, jwt: bool = False, **overrides: Any) -> None:
        self.jwt = jwt
        self.overrides = overrides
        self.issuer: DevIssuer | None = DevIssuer(kid="fuzz-main") if jwt else None
        self.port = 0
        self.baseline = 0  # task count with only the control session open
        self.baseline_names: dict[str, int] = {}  # and the tasks by name, to explain a diff
        self.control = ControlReport()
        self.errors = ErrorLogCounter()
        self.failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fuzz-gateway", daemon=True)
        self._paused = False
        self._idle = False
        self.settings: Settings | None = None
        self.app: Any = None
        self.runtime: DemoRuntime | None = None  # what reached it: tests/support/smuggling.py

    def __enter__(self) -> FuzzGateway:
        logging.getLogger().addHandler(self.errors)
        self._thread.start()
        if not self._ready.wait(60) or self.failure is not None:
            raise RuntimeError(f"fuzz gateway did not start: {self.failure!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._token is not None and self._stop is not None:
                stop = self._stop
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(stop.set, trio_token=self._token)
            self._thread.join(60)
        finally:
            logging.getLogger().removeHandler(self.errors)

    @property
    def alive(self) -> bool:
        """The gateway's event loop is still running (no crash)."""
        return self._thread.is_alive() and self.failure is None

    def token(self, sub: str = "fuzz", **kwargs: Any) -> str:
        """A valid access token of the JWT-mode issuer."""
        assert self.issuer is not None
        return self.issuer.mint(sub, **kwargs)

    def run_sync_in_loop(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` inside the gateway's event loop (to read its state consistently)."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def run_in_loop(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run async ``fn`` inside the gateway's event loop."""
        assert self._token is not None
        return trio.from_thread.run(fn, trio_token=self._token)

    def gauges(self) -> tuple[int, int, int]:
        """(tasks, open sockets, live sessions) as seen inside the gateway's loop."""
        assert self.app is not None
        metrics = self.app.gateway.metrics

        def read() -> tuple[int, int, int]:
            sockets = metrics.registry.get_sample_value("gateway_active_websockets") or 0
            sessions = metrics.registry.get_sample_value("gateway_active_sessions") or 0
            return count_tasks(), int(sockets), int(sessions)

        return self.run_sync_in_loop(read)

    def pause_control(self, paused: bool) -> None:
        """Hold the control session between turns (True), e.g. to count tasks, or resume."""

        def flip() -> None:
            self._paused = paused

        self.run_sync_in_loop(flip)

    @property
    def control_idle(self) -> bool:
        """The control session is paused between turns."""
        return self._idle

    def task_names(self) -> dict[str, int]:
        """Live tasks of the gateway's loop by name (to say what leaked)."""

        def read() -> dict[str, int]:
            names: dict[str, int] = {}

            def walk(task: trio.lowlevel.Task, server: str) -> None:
                if task.name.endswith(("demo_runtime.app.serve_demo_runtime", "server.serve")):
                    server = task.name.rsplit(".", 1)[-1]
                name = f"{server}: {task.name}" if server else task.name
                names[name] = names.get(name, 0) + 1
                for nursery in task.child_nurseries:
                    for child in nursery.child_tasks:
                        walk(child, server)

            root = trio.lowlevel.current_root_task()
            assert root is not None
            walk(root, "")
            return names

        return self.run_sync_in_loop(read)

    def task_tree(self) -> str:
        """The gateway loop's task tree with where each task waits (tests/support/task_tree.py)."""
        return self.run_sync_in_loop(partial(format_task_tree, skip=("serve_demo_runtime",)))

    def _main(self) -> None:
        try:
            trio.run(self._serve_all)
        except BaseException as error:  # reported through self.failure
            self.failure = error
        finally:
            self._ready.set()

    async def _serve_all(self) -> None:
        from trio_gateway.app import create_app

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            runtime = create_demo_runtime(
                DemoRuntimeConfig(
                    internal_api_key=INTERNAL_KEY,
                    token_delay=0.0,
                    think_delay=0.0,
                    max_bench_tokens=2000,
                )
            )
            self.runtime = runtime
            runtime_binds = await nursery.start(
                partial(
                    serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=self._stop.wait
                )
            )
            values: dict[str, Any] = {
                "agent_url": runtime_binds[0],
                "internal_api_key": INTERNAL_KEY,
                "log_level": "INFO",
                "ws_heartbeat_interval": 5.0,
                "session_grace_seconds": 1.0,
                "drain_timeout": 3.0,
                "ws_close_timeout": 0.5,
                "ws_auth_timeout": 1.0,
                "use_jwt_auth": self.jwt,
                "ws_max_message_bytes": MAX_MESSAGE_BYTES,
                # One anonymous user (JWT off) sends everything: lift the per-user rates so the
                # fuzz measures input handling, not the rate limiter (test_limits.py does).
                "ws_messages_per_second": 10_000,
                "ws_message_burst": 100_000,
                "rest_requests_per_second": 100_000,
                "rest_request_burst": 1_000_000,
                "max_connections_per_user": 10_000,
                "ws_handshakes_per_second": 100_000,
                "ws_handshake_burst": 1_000_000,
                "max_live_sessions_per_user": 100_000,
                "state_backend": "memory",  # nothing kept between fuzz runs
            }
            jwks: JWKSServer | None = None
            if self.jwt:
                assert self.issuer is not None
                jwks = JWKSServer(self.issuer.jwks())
                values["jwks_url"] = await nursery.start(jwks.serve)
                values["jwks_refetch_cooldown"] = 0.5
            values.update(self.overrides)
            self.settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
            self.app = create_app(self.settings)
            gateway_stop = trio.Event()
            gateway_binds = await nursery.start(
                partial(
                    serve,
                    self.app,
                    self.settings,
                    host="127.0.0.1",
                    port=0,
                    shutdown_trigger=gateway_stop.wait,
                )
            )
            self.port = int(gateway_binds[0].rsplit(":", 1)[1])
            control_started = trio.Event()
            nursery.start_soon(self._control, control_started)
            await control_started.wait()
            self._ready.set()
            await self._stop.wait()
            gateway_stop.set()
            if jwks is not None:
                jwks.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 30

    async def _control(self, started: trio.Event) -> None:
        """The control session: exact ``bench`` turns, back to back, until the run stops."""
        headers = None
        if self.jwt:
            headers = [(b"Authorization", f"Bearer {self.token('control')}".encode())]
        url = f"ws://127.0.0.1:{self.port}/api/v1/ws/control-session"
        assert self._stop is not None
        try:
            async with trio_websocket.open_websocket_url(
                url, subprotocols=[SUBPROTOCOL_V2], extra_headers=headers
            ) as ws:
                ready = orjson.loads(await ws.get_message())
                if ready.get("type") != "session_ready":
                    self.control.problems.append(f"first frame {ready}")
                started.set()
                while not self._stop.is_set():
                    while self._paused and not self._stop.is_set():
                        self._idle = True
                        # Keep reading while paused: v2 heartbeat frames fill trio-websocket's
                        # queue otherwise, its reader stops answering pings, and the gateway
                        # rightly drops the control session as a dead peer.
                        with trio.move_on_after(0.05):
                            frame = orjson.loads(await ws.get_message())
                            if frame.get("type") != "heartbeat":
                                self.control.problems.append(f"while paused: {frame}")
                    self._idle = False
                    problem = await control_turn(ws, CONTROL_TOKENS)
                    if problem is not None:
                        self.control.problems.append(problem)
                    else:
                        self.control.turns += 1
                    await trio.sleep(0.005)  # leave the CPU to the fuzzer between turns
        except trio_websocket.ConnectionClosed as closed:
            if not self._stop.is_set():
                self.control.closed = closed.reason.code if closed.reason else -1
                self.control.problems.append(f"control session closed: {closed.reason}")
        except BaseException as error:
            self.control.problems.append(f"control session failed: {error!r}")
            raise
        finally:
            started.set()


@dataclass
class FuzzStats:
    """Figures of a fuzz run (printed by the tests at the end and by ``bench/fuzz.py``)."""

    connections: int = 0
    frames_sent: int = 0
    handshakes: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    close_codes: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    problems: list[str] = field(default_factory=list)

    def count(self, table: dict[str, int], key: object) -> None:
        """Add one to ``table[str(key)]``."""
        table[str(key)] = table.get(str(key), 0) + 1

    def record_exchange(self, batch: FrameBatch, seen: Exchange) -> list[str]:
        """Account for one frame-fuzz connection; returns its problems."""
        self.connections += 1
        self.frames_sent += len(batch.frames) + 1
        self.count(self.close_codes, seen.close_code if seen.close_code else "eof")
        problems = check_exchange(batch, seen)
        self.problems += problems[:3]
        return problems

    def record_answer(self, answer: HttpAnswer, *, allowed: frozenset[int] | None = None) -> str:
        """Account for one handshake answer; returns a problem, or '' when it is acceptable."""
        self.handshakes += 1
        self.count(self.statuses, answer.status)
        problem = ""
        if answer.status is not None and answer.status >= 500:
            self.server_errors += 1
            problem = f"5xx answer: {answer.head!r}"
        elif allowed is not None and answer.status not in allowed:
            problem = f"status {answer.status} not in {sorted(allowed)}: {answer.head!r}"
        if problem:
            self.problems.append(problem)
        return problem


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM) in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# --- running fuzz tests against one FuzzGateway ------------------------------------------------


def fuzz_settings(examples: int) -> settings:
    """Settings of every fuzz test: ``examples`` examples, no deadline (real sockets on a
    shared machine), generation of big inputs allowed."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def settle(gateway: FuzzGateway) -> int:
    """Pause the control session, wait until only it is open; the gateway's task count then."""
    gateway.pause_control(True)
    try:
        trio.run(wait_quiet, gateway)
        gateway.baseline_names = gateway.task_names()
        return gateway_tasks(gateway.baseline_names)
    finally:
        gateway.pause_control(False)


def gateway_tasks(names: dict[str, int]) -> int:
    """Tasks of the loop that are not the demo runtime's. The runtime shares the loop and
    keeps an idle task per keep-alive connection the gateway's pools hold to it, and how
    many of those are pooled depends on timing (each is bounded by the pool's limits)."""
    return sum(count for name, count in names.items() if not name.startswith(RUNTIME_TASKS))


RUNTIME_TASKS = "serve_demo_runtime: "


async def wait_quiet(gateway: FuzzGateway, baseline: int | None = None) -> None:
    """Wait until only the control session is open (and, given a ``baseline``, no more
    gateway tasks than that), or fail with the task tree."""
    # Closed sockets finish their grace period and hypercorn's ping task wakes up once more
    # (at most a heartbeat interval): poll the real server until it is quiet, bounded.
    gauges = (0, 0, 0)
    names: dict[str, int] = {}
    with trio.move_on_after(30):
        while True:
            gauges = await trio.to_thread.run_sync(gateway.gauges)
            _, sockets, sessions = gauges
            quiet = gateway.control_idle and sockets == 1 and sessions == 1
            if quiet:
                if baseline is None:
                    return
                names = await trio.to_thread.run_sync(gateway.task_names)
                if gateway_tasks(names) <= baseline:
                    return
            await trio.sleep(0.05)
    names = names or await trio.to_thread.run_sync(gateway.task_names)
    more = {n: c - gateway.baseline_names.get(n, 0) for n, c in names.items()}
    # Where each task waits says why it is still there (tests/support/task_tree.py).
    tree = await trio.to_thread.run_sync(gateway.task_tree)
    raise AssertionError(
        f"not quiet: (tasks, sockets, sessions)={gauges}, baseline gateway tasks={baseline}, "
        f"control idle={gateway.control_idle}; tasks beyond the baseline: "
        f"{ {n: d for n, d in more.items() if d > 0} }; all tasks: {names}\n"
        f"task tree:\n{tree}"
    )
