"""The ``trio-gateway`` subcommands that start the tools: demo, demo-runtime, dev-issuer, token,
chat and check (``cli.py`` parses the command line and calls them).

``demo`` runs a gateway too, next to the demo runtime and a dev issuer; the rest never start
one.
"""

from __future__ import annotations

import io
import os
import secrets
import shlex
import sys
from collections.abc import Callable, Sequence
from functools import partial

import trio
from pydantic import SecretStr

from ..app import create_app
from ..server import serve, wait_for_signal
from ..settings import Settings, SettingsError, load_settings

__all__ = [
    "DEMO_SCOPES",
    "DEMO_SUB",
    "DEMO_TOKEN_LIFETIME",
    "chat",
    "check",
    "mint_demo_token",
    "run_demo",
    "run_demo_runtime",
    "run_dev_issuer",
    "self_command",
    "token",
]

#: The user, scopes and lifetime of the tokens the demo prints and ``token`` mints.
DEMO_SUB = "demo-user"
DEMO_SCOPES = ("api:read", "api:write")
DEMO_TOKEN_LIFETIME = 3600


async def run_demo(settings: Settings, host: str, port: int) -> None:
    """``trio-gateway demo``: a gateway on ``host:port`` with its own runtime and issuer."""
    from .demo_runtime import DemoRuntimeConfig, create_demo_runtime, serve_demo_runtime
    from .dev_auth import DevIssuer, save_dev_issuer, serve_dev_jwks

    key = secrets.token_urlsafe(24)
    runtime = create_demo_runtime(DemoRuntimeConfig(internal_api_key=key))
    # Key generation and the file write are blocking: keep them off the event loop.
    issuer = await trio.to_thread.run_sync(DevIssuer)
    issuer_file = await trio.to_thread.run_sync(save_dev_issuer, issuer)
    stop_helpers = trio.Event()
    async with trio.open_nursery() as nursery:
        runtime_binds = await nursery.start(
            partial(serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=stop_helpers.wait)
        )
        jwks_url = await nursery.start(
            partial(serve_dev_jwks, issuer, "127.0.0.1", 0, shutdown_trigger=stop_helpers.wait)
        )
        demo_settings = settings.model_copy(
            update={
                "agent_url": runtime_binds[0],
                "internal_api_key": SecretStr(key),
                "use_jwt_auth": True,
                "jwks_url": jwks_url,
                "jwt_issuer": issuer.issuer,
                "jwt_audience": issuer.audience,
            }
        )
        app = create_app(demo_settings)

        async def gateway_then_helpers_stop(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(app, demo_settings, host=host, port=port, task_status=task_status)
            finally:
                stop_helpers.set()  # the gateway has drained: stop the runtime and JWKS too

        binds = await nursery.start(gateway_then_helpers_stop)
        # Now that the addresses are known: what `trio-gateway check --demo` needs to check
        # this demo with the settings it runs with.
        record = {
            "pid": os.getpid(),
            "gateway": binds[0],
            "agent_url": runtime_binds[0],
            "internal_api_key": key,
            "jwks_url": jwks_url,
        }
        await trio.to_thread.run_sync(partial(save_dev_issuer, issuer, issuer_file, demo=record))
        token = issuer.mint(DEMO_SUB, scopes=DEMO_SCOPES, lifetime=DEMO_TOKEN_LIFETIME)
        print(
            _demo_banner(
                runtime=runtime_binds[0],
                gateway=binds[0],
                jwks_url=jwks_url,
                issuer_file=str(issuer_file),
                token=token,
                command=self_command(),
            ),
            flush=True,
        )


def self_command(argv0: str | None = None, executable: str | None = None) -> str:
    """This very ``trio-gateway``, as a shell command that works from any directory.

    A banner that says ``trio-gateway token`` only works when the virtualenv is activated (or
    the command is on ``PATH``); the path of the running executable works as printed. Started
    as a console script, ``argv[0]`` is that script; started as ``python -m trio_gateway.cli``,
    it is this module's file and the interpreter has to be named. Paths with spaces or other
    shell characters are quoted.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    script = os.path.abspath(argv0) if argv0 else ""
    if script and not script.endswith(".py") and os.path.isfile(script):
        return shlex.quote(script)
    return shlex.join([executable or "python3", "-m", "trio_gateway.cli"])


def _demo_banner(
    *,
    runtime: str,
    gateway: str,
    jwks_url: str,
    issuer_file: str,
    token: str,
    command: str = "trio-gateway",
) -> str:
    """The demo's ready banner; ``command`` is how to run ``trio-gateway`` (see self_command)."""
    base = gateway.replace("http://", "ws://", 1)
    user_message = '{"type":"user_message","content":"write a hello world in python","role":"user"}'
    return (
        "\ntrio-gateway demo is ready.\n"
        f"  demo runtime : {runtime}\n"
        f"  gateway      : {gateway}\n"
        f"  dev JWKS     : {jwks_url} (issuer saved to {issuer_file})\n"
        f"  access token : {token}\n"
        f"                 (sub {DEMO_SUB}, scopes {' '.join(DEMO_SCOPES)}, valid "
        f"{DEMO_TOKEN_LIFETIME // 60} min; `{command} token` prints a fresh one)\n"
        "  authenticate : header       Authorization: Bearer <access token>\n"
        "                 subprotocol  bearer.<access token>\n"
        '                 first frame  {"type":"auth","token":"<access token>"}\n'
        f"  chat         : {command} chat {base} --token-from-demo\n"
        f"  check        : {command} check --demo\n"
        f"  any client   : connect to {base}/api/v1/ws/<any-session-id>\n"
        f'    first send : {{"type":"auth","token":"{token}"}}\n'
        f"    then send  : {user_message}\n"
        f'  REST         : curl -H "Authorization: Bearer $({command} token)" '
        f"{gateway}/api/v1/agents\n"
        "  Ctrl-C to stop.\n"
    )


async def run_demo_runtime(host: str, port: int, instant: bool) -> None:
    """``trio-gateway demo-runtime``: the demo runtime alone, until a signal."""
    from .demo_runtime import DemoRuntimeConfig, create_demo_runtime, serve_demo_runtime

    settings_key = load_settings().internal_api_key.get_secret_value()
    runtime = create_demo_runtime(DemoRuntimeConfig(internal_api_key=settings_key, instant=instant))
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(serve_demo_runtime, runtime, host, port, shutdown_trigger=wait_for_signal)
        )
        print(f"demo runtime serving on {', '.join(binds)}", flush=True)


def mint_demo_token(
    sub: str = DEMO_SUB, scopes: Sequence[str] = DEMO_SCOPES, lifetime: int = DEMO_TOKEN_LIFETIME
) -> str:
    """A token signed by the running ``trio-gateway demo``'s issuer (read from its file).

    Raises :class:`FileNotFoundError` or :class:`ValueError` (no usable issuer file: the
    message tells the user what to do) and :class:`OSError` (the file cannot be read).
    """
    from .dev_auth import load_dev_issuer

    return load_dev_issuer().mint(sub, scopes=scopes, lifetime=lifetime)


async def run_dev_issuer(host: str, port: int, issuer_name: str, audience: str) -> None:
    """``trio-gateway dev-issuer``: the dev issuer's JWKS (key kept in its file), until a signal."""
    from .dev_auth import dev_issuer_file, load_or_create_dev_issuer, serve_dev_jwks

    path = dev_issuer_file()
    # Key generation and file I/O are blocking: keep them off the event loop.
    issuer, created = await trio.to_thread.run_sync(
        partial(load_or_create_dev_issuer, path, issuer=issuer_name, audience=audience)
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            partial(serve_dev_jwks, issuer, host, port, shutdown_trigger=wait_for_signal)
        )
        state = "new key" if created else "key reused"
        print(
            f"dev issuer serving {url} (kid {issuer.kid}, {state}, kept in {path}; "
            f"iss {issuer.issuer}, aud {issuer.audience}); `trio-gateway token` mints tokens",
            flush=True,
        )


async def _run_checks(settings: Settings, timeout: float, demo_gateway: str | None = None) -> int:
    from .check import CheckResult, check_http_health, format_report, run_checks
    from .check import exit_code as check_exit_code

    results = await run_checks(settings, timeout)
    if demo_gateway is not None:
        gateway: CheckResult = await check_http_health("demo gateway", demo_gateway, timeout)
        results = [gateway, *results]
    print(format_report(settings, results), end="", flush=True)
    return check_exit_code(results)


def token(sub: str, scope: str, lifetime: int) -> int:
    """``trio-gateway token``: one token on stdout, or one line on stderr and exit 2."""

    def fail(message: str, status: int = 2) -> int:
        print(f"trio-gateway token: {' '.join(message.split())}", file=sys.stderr)
        return status

    if lifetime <= 0:
        return fail(f"--lifetime must be a positive number of seconds, got {lifetime}")
    if not sub.strip():
        return fail("--sub must not be empty")
    try:
        token = mint_demo_token(sub, scope.split(), lifetime)
    except (FileNotFoundError, ValueError) as error:
        return fail(str(error))
    except OSError as error:
        return fail(f"cannot read the demo issuer: {error}", 1)
    max_lifetime = Settings.model_fields["jwt_max_lifetime"].default
    if lifetime > max_lifetime:
        print(
            f"trio-gateway token: warning: a gateway with the default GATEWAY__JWT_MAX_LIFETIME "
            f"({max_lifetime:g} s) refuses this token",
            file=sys.stderr,
        )
    print(token, flush=True)
    return 0


def chat(
    url: str,
    token: str | None,
    token_from_demo: bool,
    session: str | None,
    plain: bool,
    attempts: int,
) -> int:
    """``trio-gateway chat``: the interactive client; usage errors exit 2 before connecting."""
    from .chat import ChatOptions, build_ws_url, run_chat, want_color

    def fail(message: str) -> int:
        print(f"trio-gateway chat: {' '.join(message.split())}", file=sys.stderr)
        return 2

    if attempts < 0:
        return fail(f"--reconnect-attempts must be 0 or more, got {attempts}")
    try:
        ws_url, session_id = build_ws_url(url, session)
    except ValueError as error:
        return fail(str(error))
    provider: Callable[[], str] | None = None
    if token is not None:
        if not token.strip():
            return fail("--token must not be empty")
        fixed = token.strip()

        def provider_of_fixed() -> str:
            return fixed

        provider = provider_of_fixed
    elif token_from_demo:
        try:
            mint_demo_token()  # fail now, with the issuer's own advice, not after connecting
        except (FileNotFoundError, ValueError, OSError) as error:
            return fail(str(error))
        # A fresh token for every connection attempt: a long chat outlives one token.
        provider = mint_demo_token
    # Server text may hold any character; an odd terminal encoding must not crash the chat.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    options = ChatOptions(
        url=ws_url,
        session_id=session_id,
        token_provider=provider,
        color=want_color(sys.stdout, plain=plain),
        max_attempts=attempts,
    )
    try:
        return trio.run(run_chat, options)
    except KeyboardInterrupt:
        # Ctrl-C before the signal handler was installed (startup): leave quietly.
        return 130


def check(timeout: float, *, demo: bool = False) -> int:
    """``trio-gateway check``: report on stdout; exit 0 ok, 1 a check failed, 2 bad config.

    With ``demo``, the settings are those of the running ``trio-gateway demo`` (as ``token``
    finds it: the issuer file), not the environment's alone.
    """
    from .check import EXIT_BAD_CONFIG
    from .dev_auth import dev_issuer_file, load_demo_record

    if not timeout > 0:
        print("trio-gateway check: --timeout must be positive", file=sys.stderr)
        return EXIT_BAD_CONFIG
    record = load_demo_record()
    demo_gateway: str | None = None
    try:
        if demo:
            if record is None:
                print(
                    f"trio-gateway check: no `trio-gateway demo` recorded in {dev_issuer_file()}: "
                    "start one first (or check a gateway's own settings without --demo)",
                    file=sys.stderr,
                )
                return EXIT_BAD_CONFIG
            settings = _demo_settings(record)
            demo_gateway = str(record["gateway"])
            state = "running" if _pid_alive(record["pid"]) else "NOT running"
            print(
                f"checking the `trio-gateway demo` at {demo_gateway} (pid {record['pid']}, "
                f"{state}) with the settings it runs with, recorded in {dev_issuer_file()}",
                flush=True,
            )
        else:
            settings = load_settings()
    except SettingsError as error:
        # The message names variables, never values, so it is safe to print as is.
        print(f"trio-gateway check: {error}", file=sys.stderr)
        if not demo and record is not None and _pid_alive(record["pid"]):
            # The usual first-hour mistake: checking "the gateway" next to a running demo,
            # whose settings are its own, not this shell's.
            print(
                f"trio-gateway check: these are this shell's GATEWAY__* settings. The "
                f"`trio-gateway demo` running at {record['gateway']} (pid {record['pid']}) "
                f"uses its own: `{self_command()} check --demo` checks that one.",
                file=sys.stderr,
            )
        print("verdict: BAD CONFIGURATION (no check was run)", flush=True)
        return EXIT_BAD_CONFIG
    # No configure_logging: stdout is the report, and httpx's per-request INFO lines would
    # only clutter it (warnings still reach stderr through logging's last-resort handler).
    return trio.run(_run_checks, settings, timeout, demo_gateway)


def _demo_settings(record: dict[str, object]) -> Settings:
    """The settings a running ``trio-gateway demo`` runs with (see :func:`run_demo`)."""
    from .dev_auth import load_dev_issuer

    issuer = load_dev_issuer()
    return load_settings(
        agent_url=str(record["agent_url"]),
        internal_api_key=SecretStr(str(record["internal_api_key"])),
        use_jwt_auth=True,
        jwks_url=str(record["jwks_url"]),
        jwt_issuer=issuer.issuer,
        jwt_audience=issuer.audience,
    )


def _pid_alive(pid: object) -> bool:
    """True when a process with this pid exists (it may not be ours to signal)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
