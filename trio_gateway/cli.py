"""The ``trio-gateway`` command: serve, demo, demo-runtime."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from collections.abc import Sequence
from functools import partial

import trio
from pydantic import SecretStr

from .app import create_app
from .observability import configure_logging
from .server import serve, wait_for_signal
from .settings import Settings, SettingsError, load_settings

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

    demo_cmd = commands.add_parser(
        "demo", help="run the gateway and the embedded demo runtime in one process"
    )
    demo_cmd.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    demo_cmd.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")

    runtime_cmd = commands.add_parser("demo-runtime", help="run the demo Agent Runtime alone")
    runtime_cmd.add_argument("--host", default="127.0.0.1", help="bind address")
    runtime_cmd.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    runtime_cmd.add_argument(
        "--instant", action="store_true", help="no pacing between tokens (benchmarks)"
    )
    return parser


def _port(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 65535:
        raise SettingsError(f"--port must be between 0 and 65535, got {value}")
    return value


async def _run_serve(settings: Settings, host: str | None, port: int | None) -> None:
    app = create_app(settings)

    def announce(binds: list[str]) -> None:
        logger.info("trio-gateway serving on %s (runtime %s)", ", ".join(binds), settings.agent_url)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, settings, host=host, port=port))
        announce(binds)


async def _run_demo(settings: Settings, host: str, port: int) -> None:
    from .demo_runtime import DemoRuntimeConfig, create_demo_runtime, serve_demo_runtime

    key = secrets.token_urlsafe(24)
    runtime = create_demo_runtime(DemoRuntimeConfig(internal_api_key=key))
    stop_runtime = trio.Event()
    async with trio.open_nursery() as nursery:
        runtime_binds = await nursery.start(
            partial(serve_demo_runtime, runtime, "127.0.0.1", 0, shutdown_trigger=stop_runtime.wait)
        )
        demo_settings = settings.model_copy(
            update={"agent_url": runtime_binds[0], "internal_api_key": SecretStr(key)}
        )
        app = create_app(demo_settings)

        async def gateway_then_runtime_stop(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(app, demo_settings, host=host, port=port, task_status=task_status)
            finally:
                stop_runtime.set()  # the gateway has drained: stop the runtime too

        binds = await nursery.start(gateway_then_runtime_stop)
        base = binds[0].replace("http://", "ws://", 1)
        print(
            "\ntrio-gateway demo is ready.\n"
            f"  demo runtime : {runtime_binds[0]}\n"
            f"  gateway      : {binds[0]}\n"
            f"  connect to   : {base}/api/v1/ws/<any-session-id>\n"
            '  then send    : {"type":"user_message","content":"write a hello world in python",'
            '"role":"user"}\n'
            "  Ctrl-C to stop.\n",
            flush=True,
        )


async def _run_demo_runtime(host: str, port: int, instant: bool) -> None:
    from .demo_runtime import DemoRuntimeConfig, create_demo_runtime, serve_demo_runtime

    settings_key = load_settings().internal_api_key.get_secret_value()
    runtime = create_demo_runtime(DemoRuntimeConfig(internal_api_key=settings_key, instant=instant))
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(serve_demo_runtime, runtime, host, port, shutdown_trigger=wait_for_signal)
        )
        print(f"demo runtime serving on {', '.join(binds)}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-gateway`` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        port = _port(args.port)
    except SettingsError as error:
        print(f"trio-gateway: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "serve":
            trio.run(_run_serve, settings, args.host, port)
        elif args.command == "demo":
            trio.run(_run_demo, settings, args.host, port if port is not None else 8000)
        else:
            trio.run(_run_demo_runtime, args.host, port if port is not None else 8001, args.instant)
    except KeyboardInterrupt:
        return 130
    except (OSError, BaseExceptionGroup) as error:
        # Startup failures such as a port in use arrive wrapped in nurseries' exception
        # groups: report the OS error in one line; anything else is a bug and keeps its
        # traceback.
        os_error = _only_os_error(error)
        if os_error is None:
            raise
        print(f"trio-gateway: {os_error}", file=sys.stderr)
        return 1
    return 0


def _only_os_error(error: BaseException) -> OSError | None:
    """The OSError an exception (group) consists of, or None if it holds anything else."""
    while isinstance(error, BaseExceptionGroup):
        if len(error.exceptions) != 1:
            return None
        error = error.exceptions[0]
    return error if isinstance(error, OSError) else None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
