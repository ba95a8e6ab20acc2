"""The ``trio-gateway`` command: serve, check, demo, demo-runtime, dev-issuer, token, chat."""

from __future__ import annotations

import argparse
import errno
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import trio
from pydantic import SecretStr

from .app import create_app
from .observability import configure_logging
from .security.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER
from .server import serve, tune_gc, wait_for_signal
from .settings import Settings, SettingsError, load_settings, unknown_variables
from .tools.chat import MAX_RECONNECT_ATTEMPTS
from .tools.commands import (
    DEMO_SCOPES,
    DEMO_SUB,
    DEMO_TOKEN_LIFETIME,
    chat,
    check,
    run_demo,
    run_demo_runtime,
    run_dev_issuer,
    token,
)
from .workers import (
    Supervisor,
    check_worker_settings,
    parent_gone,
    parse_worker_count,
    reserve_address,
    tag_worker_logs,
)

logger = logging.getLogger("trio_gateway.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-gateway",
        description="WebSocket/REST gateway between AI-coding IDEs and an Agent Runtime.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_cmd = commands.add_parser("serve", help="run the gateway (settings from GATEWAY__*)")
    serve_cmd.add_argument("--host", help="bind address (default GATEWAY__HOST)")
    serve_cmd.add_argument("--port", type=int, help="bind port (default GATEWAY__PORT)")
    serve_cmd.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help=(
            "worker processes on the one port (SO_REUSEPORT), a number or 'auto' (one per "
            "core); more than 1 needs GATEWAY__STATE_BACKEND=redis (default 1)"
        ),
    )
    # Internal: how the supervisor of --workers starts each worker.
    serve_cmd.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    check_cmd = commands.add_parser(
        "check",
        help="print the effective configuration and check the runtime, JWKS and Redis",
        description=(
            "Print every setting as the gateway would run with it (secrets redacted), then "
            "check that the Agent Runtime answers GET /health, that the JWKS (when "
            "GATEWAY__USE_JWT_AUTH is true) downloads and holds a usable key, and that Redis "
            "(when GATEWAY__STATE_BACKEND=redis) answers PING. Exit status: 0 all checks "
            "passed, 1 a check failed, 2 the configuration is invalid."
        ),
    )
    check_cmd.add_argument(
        "--demo",
        action="store_true",
        help=(
            "check the running `trio-gateway demo` with the settings it runs with (its runtime, "
            "key and JWKS, recorded next to its issuer), not the environment's"
        ),
    )
    check_cmd.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="bound on each check (default 5)",
    )

    demo_cmd = commands.add_parser(
        "demo",
        help="run the gateway, the demo runtime and a dev token issuer in one process",
        description=(
            "Run the gateway with JWT authentication against a throwaway issuer whose key set "
            "is served on loopback, plus the embedded demo Agent Runtime. A ready token is "
            "printed; the issuer is saved (private key included, mode 0600) to "
            "$TRIO_GATEWAY_DEV_ISSUER_FILE or $XDG_STATE_HOME/trio-gateway/demo-issuer.json "
            "so that `trio-gateway token` can mint more. Each run makes a new key."
        ),
    )
    demo_cmd.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    demo_cmd.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")

    runtime_cmd = commands.add_parser("demo-runtime", help="run the demo Agent Runtime alone")
    runtime_cmd.add_argument("--host", default="127.0.0.1", help="bind address")
    runtime_cmd.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    runtime_cmd.add_argument(
        "--instant", action="store_true", help="no pacing between tokens (benchmarks)"
    )

    issuer_cmd = commands.add_parser(
        "dev-issuer",
        help="serve a development JWKS whose key `trio-gateway token` can use (not for production)",
        description=(
            "A stand-in for the Auth Service, for compose setups and local tests: serves "
            "GET /.well-known/jwks.json for a signing key kept in $TRIO_GATEWAY_DEV_ISSUER_FILE "
            "(default $XDG_STATE_HOME/trio-gateway/demo-issuer.json, mode 0600). The key is "
            "created on first start and reused afterwards, so tokens minted with "
            "`trio-gateway token` (same file) stay valid across restarts. Point a gateway at it "
            "with GATEWAY__AUTH_SERVICE_URL=http://<host>:<port>. Development only: whoever "
            "can read the file can mint tokens."
        ),
    )
    issuer_cmd.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    issuer_cmd.add_argument("--port", type=int, default=8002, help="port (default 8002)")
    issuer_cmd.add_argument(
        "--issuer", default=DEFAULT_ISSUER, help=f"iss of minted tokens (default {DEFAULT_ISSUER})"
    )
    issuer_cmd.add_argument(
        "--audience",
        default=DEFAULT_AUDIENCE,
        help=f"aud of minted tokens (default {DEFAULT_AUDIENCE})",
    )

    token_cmd = commands.add_parser(
        "token",
        help="print a fresh access token for `trio-gateway demo` or `dev-issuer` (dev only)",
        description=(
            "Print one access token on stdout, signed with the key of the most recent "
            "`trio-gateway demo` or of `trio-gateway dev-issuer` (read from "
            "$TRIO_GATEWAY_DEV_ISSUER_FILE, default "
            "$XDG_STATE_HOME/trio-gateway/demo-issuer.json). Only a gateway started by "
            "`trio-gateway demo`, or one that trusts `trio-gateway dev-issuer`, accepts these "
            "tokens; a real deployment gets its tokens from the Auth Service. Example: "
            'curl -H "Authorization: Bearer $(trio-gateway token)" '
            "http://127.0.0.1:8000/api/v1/agents"
        ),
    )
    token_cmd.add_argument(
        "--sub", default=DEMO_SUB, help=f"the user the token speaks for (default {DEMO_SUB})"
    )
    token_cmd.add_argument(
        "--scope",
        default=" ".join(DEMO_SCOPES),
        help=f'space-separated scopes (default "{" ".join(DEMO_SCOPES)}")',
    )
    token_cmd.add_argument(
        "--lifetime",
        type=int,
        default=DEMO_TOKEN_LIFETIME,
        metavar="SECONDS",
        help=(
            f"seconds the token is valid (default {DEMO_TOKEN_LIFETIME}; the gateway refuses "
            "more than GATEWAY__JWT_MAX_LIFETIME, 86400 by default)"
        ),
    )

    chat_cmd = commands.add_parser(
        "chat",
        help="talk to a gateway from the terminal (an interactive WebSocket client)",
        description=(
            "An interactive client speaking protocol v2: type a message, watch the answer "
            "stream, approve or reject tool calls (tools are never executed: the client answers "
            "with a simulated result; Ctrl-C at the question rejects the call), Ctrl-C cancels "
            "a running turn, Ctrl-C when idle, Ctrl-D or /quit leaves. Reopening a session "
            "(--session) asks again about tool calls still waiting for approval; without "
            "--session a new session is created over REST first. A dropped "
            "connection is resumed without losing or repeating output. Example, against "
            "`trio-gateway demo`: trio-gateway chat ws://127.0.0.1:8000 --token-from-demo"
        ),
    )
    chat_cmd.add_argument(
        "url",
        metavar="WS-URL",
        help="the gateway (ws://host:port) or a session's URL (ws://host:port/api/v1/ws/ID)",
    )
    token_source = chat_cmd.add_mutually_exclusive_group()
    token_source.add_argument(
        "--token", metavar="T", help="access token, sent as Authorization: Bearer T"
    )
    token_source.add_argument(
        "--token-from-demo",
        action="store_true",
        help="mint a token (like `trio-gateway token`) for the running `trio-gateway demo`",
    )
    chat_cmd.add_argument(
        "--session",
        metavar="ID",
        help=(
            "session id to open or resume (default: create a new session with "
            "POST /api/v1/sessions, as the IDE does, and print its id)"
        ),
    )
    chat_cmd.add_argument("--plain", action="store_true", help="no colours")
    chat_cmd.add_argument(
        "--reconnect-attempts",
        type=int,
        default=MAX_RECONNECT_ATTEMPTS,
        metavar="N",
        help=(
            "reconnect attempts in a row (0.2 s apart, doubling to 5 s) before giving up "
            f"on a lost connection (default {MAX_RECONNECT_ATTEMPTS})"
        ),
    )
    return parser


def _port(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 65535:
        raise SettingsError(f"--port must be between 0 and 65535, got {value}")
    return value


def warn_about_unknown_variables() -> None:
    """Log, as a warning, every ``GATEWAY__*`` variable that is no setting (a likely typo)."""
    for name in unknown_variables():
        logger.warning("unknown setting %s is ignored", name, extra={"event": "unknown_setting"})


async def _run_serve(
    settings: Settings, host: str | None, port: int | None, reuse_port: bool = False
) -> None:
    if not reuse_port:  # a worker's supervisor has said it once already
        warn_about_unknown_variables()
    app = create_app(settings)

    def announce(binds: list[str]) -> None:
        logger.info("trio-gateway serving on %s (runtime %s)", ", ".join(binds), settings.agent_url)

    trigger = None
    if reuse_port:

        async def trigger() -> None:
            # A worker stops on its signal, or drains by itself once its supervisor is gone.
            async with trio.open_nursery() as nursery:

                async def then_stop(wait: Callable[[], Awaitable[None]]) -> None:
                    await wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(then_stop, wait_for_signal)
                nursery.start_soon(then_stop, parent_gone)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                serve,
                app,
                settings,
                host=host,
                port=port,
                shutdown_trigger=trigger,
                reuse_port=reuse_port,
            )
        )
        tune_gc()  # a process setting: the serve command only, never in-process test servers
        announce(binds)


async def _run_supervisor(settings: Settings, host: str, port: int | None, workers: int) -> int:
    """``serve --workers N``: reserve the address, then run and supervise N workers."""
    warn_about_unknown_variables()
    reserved = reserve_address(host, settings.port if port is None else port)
    with reserved:
        bound_port = reserved.getsockname()[1]
        where = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        logger.info(
            "trio-gateway serving on http://%s with %d workers (runtime %s)",
            where,
            workers,
            settings.agent_url,
            extra={"event": "workers_serving", "workers": workers},
        )
        return await Supervisor(settings, host, bound_port, workers).run()


def _load_settings_for(command: str) -> Settings:
    if command == "demo":
        # The demo runs its own runtime with its own key (set in run_demo): an unset
        # GATEWAY__INTERNAL_API_KEY must not stop it. This value is never used.
        return load_settings(internal_api_key=SecretStr(secrets.token_urlsafe(24)))
    return load_settings()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-gateway`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "token":
        # No settings and no logging: stdout is the token and nothing else.
        return token(args.sub, args.scope, args.lifetime)
    if args.command == "chat":
        # A client: it needs none of the gateway's settings (nor GATEWAY__INTERNAL_API_KEY).
        return chat(
            args.url,
            args.token,
            args.token_from_demo,
            args.session,
            args.plain,
            args.reconnect_attempts,
        )
    if args.command == "check":
        return check(args.timeout, demo=args.demo)
    try:
        port = _port(args.port)
        workers = 1
        if args.command != "dev-issuer":
            settings = _load_settings_for(args.command)
        if args.command == "serve":
            workers = parse_worker_count(args.workers)
            check_worker_settings(settings, workers)
    except SettingsError as error:
        print(f"trio-gateway: {error}", file=sys.stderr)
        return 2
    if args.command == "dev-issuer":
        # The issuer is not a gateway: it needs none of the gateway's settings (a missing
        # internal key must not stop it), only logging defaults.
        configure_logging("INFO", "auto")
        bind = _Bind(args.host, port if port is not None else _DEFAULT_PORTS["dev-issuer"])
        try:
            trio.run(run_dev_issuer, bind.host, bind.port, args.issuer, args.audience)
        except KeyboardInterrupt:
            return 130
        except (OSError, BaseExceptionGroup) as error:
            return _startup_failure(error, bind)
        return 0
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve" and args.reuse_port:
        tag_worker_logs()
    if args.command == "serve":
        bind = _Bind(
            args.host if args.host is not None else settings.host,
            port if port is not None else settings.port,
            "--port or GATEWAY__PORT",
        )
    else:
        bind = _Bind(args.host, port if port is not None else _DEFAULT_PORTS[args.command])
    try:
        if args.command == "serve" and workers > 1:
            return trio.run(_run_supervisor, settings, args.host or settings.host, port, workers)
        if args.command == "serve":
            trio.run(_run_serve, settings, args.host, port, args.reuse_port)
        elif args.command == "demo":
            trio.run(run_demo, settings, bind.host, bind.port)
        else:
            trio.run(run_demo_runtime, bind.host, bind.port, args.instant)
    except KeyboardInterrupt:
        return 130
    except (OSError, BaseExceptionGroup) as error:
        return _startup_failure(error, bind)
    return 0


_DEFAULT_PORTS = {"demo": 8000, "demo-runtime": 8001, "dev-issuer": 8002}
# What cannot listen on an address: the port is taken, the address is not this host's, or a
# privileged port without the right to bind it.
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


@dataclass(frozen=True)
class _Bind:
    """The address a command listens on, and the option that changes its port."""

    host: str
    port: int
    port_option: str = "--port"

    def describe(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _bind_advice(error: OSError, bind: _Bind) -> str | None:
    """A listening failure in words that name the address and what to do; None otherwise.

    The OS's message ("[Errno 98] Address already in use") names neither. A file error
    (the demo's issuer file) carries a file name and is left as it is.
    """
    if error.errno not in _BIND_ERRNOS or error.filename is not None:
        return None
    where = bind.describe()
    if error.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: the address is already in use (another process, "
            f"perhaps another trio-gateway, listens on port {bind.port}). Stop it, or choose "
            f"another port with {bind.port_option}."
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where}: {bind.host} is not an address of this machine "
            "(use 127.0.0.1 for this machine only, 0.0.0.0 for every interface)."
        )
    return (
        f"cannot listen on {where}: permission denied (ports below 1024 need privileges; "
        f"choose another port with {bind.port_option})."
    )


def _startup_failure(error: OSError | BaseExceptionGroup[BaseException], bind: _Bind) -> int:
    """Report a startup OS error in one line and return 1; re-raise anything else.

    Failures such as a port in use arrive wrapped in nurseries' exception groups; anything
    that is not an OS error is a bug and keeps its traceback. A failure to listen names the
    address ``bind`` and what to do about it.
    """
    os_error = _only_os_error(error)
    if os_error is None:
        raise error
    print(f"trio-gateway: {_bind_advice(os_error, bind) or os_error}", file=sys.stderr)
    return 1


def _only_os_error(error: BaseException) -> OSError | None:
    """The OSError an exception (group) consists of, or None if it holds anything else."""
    while isinstance(error, BaseExceptionGroup):
        if len(error.exceptions) != 1:
            return None
        error = error.exceptions[0]
    return error if isinstance(error, OSError) else None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
