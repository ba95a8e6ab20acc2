"""The trio-gateway command, run as a user would: a real process on loopback."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import jwt
import pytest
import trio
import trio_websocket

from trio_gateway.security.auth import KeySet, TokenPolicy, verify_token
from trio_gateway.tools.commands import self_command
from trio_gateway.tools.dev_auth import (
    DEV_ISSUER_FILE_ENV,
    DevIssuer,
    dev_issuer_file,
    load_dev_issuer,
    save_dev_issuer,
    serve_dev_jwks,
)

from ..conftest import WsClient, close_code
from ..support.ports import free_port
from ..support.processes import (
    TrioChild,
    clean_env,
    cli_command,
    run_cli,
    run_command,
    run_python,
    started,
)

# Commands whose settings are loaded need a real runtime key (the placeholder is refused).
KEY_ENV = {"GATEWAY__INTERNAL_API_KEY": "cli-test-key-0123456789"}
ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CODING_TURN = {"type": "user_message", "content": "write a hello world in python", "role": "user"}


@pytest.fixture(autouse=True)
def private_issuer_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every child (and this process) uses an issuer file under tmp_path, never the user's."""
    path = tmp_path / "default-issuer" / "demo-issuer.json"
    monkeypatch.setenv(DEV_ISSUER_FILE_ENV, str(path))
    return path


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the operator's ``GATEWAY__*``, plus ``env``."""
    return {**clean_env(), **(env or {})}


async def ctrl_c(child: TrioChild) -> int:
    """SIGINT, as a terminal's Ctrl-C; the exit status (SIGKILL after 20 s: then -9)."""
    return await child.stop(signal.SIGINT, grace=20)


@asynccontextmanager
async def running_demo(issuer_file: Path) -> AsyncIterator[tuple[TrioChild, int, str]]:
    """A ``trio-gateway demo`` child, its port and its complete ready banner."""
    port = free_port()
    env = cli_env({DEV_ISSUER_FILE_ENV: str(issuer_file)})
    command = cli_command("demo", "--port", str(port))
    async with started(
        command, env=env, stdout=subprocess.PIPE, stop_signal=signal.SIGKILL
    ) as demo:
        banner = await read_banner(demo)
        await demo.wait_serving(f"http://127.0.0.1:{port}")
        yield demo, port, banner


async def read_banner(demo: TrioChild, timeout: float = 30) -> str:
    """Stdout up to the end of the ready banner (printed once, flushed)."""
    assert demo.stdout is not None
    with trio.fail_after(timeout):
        return await demo.stdout.read_until("Ctrl-C to stop.")


def banner_token(banner: str) -> str:
    match = re.search(r"access token : (\S+)", banner)
    assert match, banner
    return match.group(1)


async def coding_turn(client: WsClient) -> None:
    await client.send(CODING_TURN)
    frames = await client.turn(timeout=20)
    types = [f["type"] for f in frames]
    assert "agent_switched" in types and types[-1] == "tool_call"


async def test_demo_serves_a_chat_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    issuer_file = tmp_path / "state" / "demo-issuer.json"
    async with running_demo(issuer_file) as (demo, port, banner):
        assert f"ws://127.0.0.1:{port}/api/v1/ws/" in banner
        token = banner_token(banner)
        assert f'{{"type":"auth","token":"{token}"}}' in banner
        assert "Authorization: Bearer" in banner
        url = f"ws://127.0.0.1:{port}/api/v1/ws/demo-check"
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[(b"Authorization", f"Bearer {token}".encode())]
        ) as ws:
            await coding_turn(WsClient(ws))
        # The issuer the demo saved is private to the user.
        assert stat.S_IMODE(issuer_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(issuer_file.parent.stat().st_mode) & 0o077 == 0
        assert await ctrl_c(demo) == 0


def test_self_command_names_the_running_executable_quoted(tmp_path: Path) -> None:
    script = tmp_path / "a venv" / "bin" / "trio-gateway"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    assert self_command(str(script), "/usr/bin/python3") == shlex.quote(str(script))
    assert "'" in self_command(str(script), "/usr/bin/python3")  # the space is quoted
    # A relative argv[0] (`.venv/bin/trio-gateway demo`) becomes absolute.
    relative = os.path.relpath(script)
    assert self_command(relative, "/usr/bin/python3") == shlex.quote(str(script))
    # `python -m trio_gateway.cli`: argv[0] is the module's file; the interpreter is named.
    assert (
        self_command("/src/trio_gateway/cli.py", "/opt/my py/bin/python")
        == "'/opt/my py/bin/python' -m trio_gateway.cli"
    )


def demo_launchers() -> list[list[str]]:
    launchers = [[sys.executable, "-m", "trio_gateway.cli"]]
    script = Path(sys.executable).parent / "trio-gateway"
    if script.is_file():
        # As the README runs it: a path relative to the clone, no activated virtualenv.
        launchers.append([os.path.relpath(script, ROOT)])
    return launchers


@pytest.mark.parametrize("launcher", demo_launchers(), ids=lambda cmd: Path(cmd[-1]).name)
async def test_the_demo_banner_prints_commands_that_run_without_an_activated_venv(
    tmp_path: Path, launcher: list[str]
) -> None:
    port = free_port()
    # The issuer file is the autouse fixture's, in this test's environment: the printed
    # `token` command inherits it like a user's shell would.
    async with started(
        [*launcher, "demo", "--port", str(port)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stop_signal=signal.SIGKILL,
    ) as demo:
        banner = await read_banner(demo)
        await demo.wait_serving(f"http://127.0.0.1:{port}")
        match = re.search(r"\$\((.+) token\)", banner)
        assert match, banner
        command = match.group(1)
        assert f"  chat         : {command} chat ws://127.0.0.1:{port} --token-from-demo" in banner
        # A shell that knows nothing of the virtualenv, in another directory.
        bare = {
            name: value
            for name, value in os.environ.items()
            if name not in {"VIRTUAL_ENV", "PYTHONPATH"}
        }
        bare["PATH"] = "/usr/bin:/bin"
        result = await run_command(["sh", "-c", f"{command} token"], cwd=tmp_path, env=bare)
        assert result.returncode == 0, result.stderr
        token = result.stdout.decode().strip()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            agents = await http.get("/api/v1/agents", headers={"Authorization": f"Bearer {token}"})
        assert agents.status_code == 200
        assert await ctrl_c(demo) == 0


async def test_the_readme_client_example_runs_as_printed(tmp_path: Path) -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    match = re.search(
        r"TOKEN=\$\(\.venv/bin/trio-gateway token\) \.venv/bin/python - <<'EOF'\n(.*?\n)EOF\n",
        quick_start,
        flags=re.DOTALL,
    )
    assert match, "the quick start shows a client example run with the virtualenv's python"
    async with running_demo(tmp_path / "issuer.json") as (demo, port, banner):
        script = match.group(1).replace("ws://127.0.0.1:8000/", f"ws://127.0.0.1:{port}/")
        result = await run_command(
            [sys.executable, "-c", script], env=cli_env({"TOKEN": banner_token(banner)})
        )
        assert result.returncode == 0, result.stderr
        printed = result.stdout.decode()
        assert "'agent_switched'" in printed and "'read_file'" in printed
        assert await ctrl_c(demo) == 0


async def test_the_demo_log_shows_the_gateways_lines_as_the_gateways(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    env = cli_env({"GATEWAY__LOG_FORMAT": "json"})
    with log.open("wb") as log_file:
        async with started(
            cli_command("demo", "--port", str(port)),
            env=env,
            stdout=subprocess.PIPE,
            stderr=log_file.fileno(),
            stop_signal=signal.SIGKILL,
        ) as demo:
            banner = await read_banner(demo)
            await demo.wait_serving(f"http://127.0.0.1:{port}")
            token = banner_token(banner)
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                agents = await http.get("/api/v1/agents", headers=headers)
            assert agents.status_code == 200
            async with trio_websocket.open_websocket_url(
                f"ws://127.0.0.1:{port}/api/v1/ws/logged",
                extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
            ) as ws:
                await coding_turn(WsClient(ws))
            assert await ctrl_c(demo) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    # hypercorn's lines under its own names are the gateway's: one "Running on", the gateway's.
    running = [e["message"] for e in entries if e["message"].startswith("Running on")]
    gateway_running = [
        e["message"]
        for e in entries
        if e["logger"] == "hypercorn.error" and e["message"].startswith("Running on")
    ]
    assert gateway_running == [f"Running on http://127.0.0.1:{port} (CTRL + C to quit)"]
    assert len(running) == 3  # the demo runtime's and the JWKS server's, under their own names
    # The gateway's access line for the REST call, with its duration; the demo runtime, which
    # answered the same path behind it, logs none.
    access = [e for e in entries if e.get("event") == "http_access"]
    rest = [e for e in access if e["path"] == "/api/v1/agents"]
    assert len(rest) == 1 and rest[0]["status"] == "200" and rest[0]["user"] == "demo-user"
    assert all(isinstance(e["duration_ms"], float) for e in access), access


async def test_check_next_to_a_running_demo_checks_the_demo_or_says_how(tmp_path: Path) -> None:
    issuer_file = tmp_path / "issuer.json"
    # This shell's settings are not the demo's: no GATEWAY__* at all (no internal key).
    env = cli_env({DEV_ISSUER_FILE_ENV: str(issuer_file)})
    async with running_demo(issuer_file) as (child, port, banner):
        gateway = f"http://127.0.0.1:{port}"
        assert "check --demo" in banner
        plain = await run_check_in(tmp_path, env)
        assert plain.returncode == 2
        assert "BAD CONFIGURATION" in plain.stdout.decode()
        hint = " ".join(plain.stderr.decode().split())
        assert f"`trio-gateway demo` running at {gateway} (pid {child.pid})" in hint
        assert "check --demo` checks that one" in hint

        demo = await run_check_in(tmp_path, env, "--demo")
        report = demo.stdout.decode()
        assert demo.returncode == 0, report + demo.stderr.decode()
        assert f"checking the `trio-gateway demo` at {gateway} (pid {child.pid}, running)" in (
            report
        )
        assert re.search(rf"\[  ok   \] demo gateway +{gateway}/health: HTTP 200", report)
        assert re.search(r"\[  ok   \] agent runtime +http://127\.0\.0\.1:\d+/health", report)
        assert re.search(r"\[  ok   \] JWKS +http://127\.0\.0\.1:\d+/\.well-known/jwks", report)
        assert "verdict: OK" in report
        assert "GATEWAY__USE_JWT_AUTH" in report and "*** (set, 32 characters)" in report
        assert await ctrl_c(child) == 0
    gone = await run_check_in(tmp_path, env, "--demo")
    assert gone.returncode == 1
    assert "NOT running" in gone.stdout.decode()


async def test_check_demo_without_a_demo_says_what_to_do(tmp_path: Path) -> None:
    result = await run_check_in(tmp_path, cli_env(), "--demo")
    assert result.returncode == 2
    assert "no `trio-gateway demo` recorded in" in result.stderr.decode()


async def run_check_in(
    cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[bytes]:
    return await run_cli("check", "--timeout", "5", *args, cwd=cwd, env=env)  # no .env in cwd


async def test_the_demo_refuses_a_websocket_without_a_token(tmp_path: Path) -> None:
    async with running_demo(tmp_path / "issuer.json") as (demo, port, _):
        url = f"ws://127.0.0.1:{port}/api/v1/ws/no-token"
        async with trio_websocket.open_websocket_url(url) as ws:
            client = WsClient(ws)
            await client.send(CODING_TURN)  # not an auth frame
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                with trio.fail_after(20):
                    while True:
                        await client.recv(timeout=20)
        assert close_code(closed.value) == 4401
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/api/v1/agents")).status_code == 401
        assert await ctrl_c(demo) == 0


async def test_the_demo_accepts_the_token_as_the_first_frame(tmp_path: Path) -> None:
    # What `python -m websockets` users do (it cannot set headers): the banner's first frame.
    async with running_demo(tmp_path / "issuer.json") as (demo, port, banner):
        token = banner_token(banner)
        url = f"ws://127.0.0.1:{port}/api/v1/ws/first-frame"
        async with trio_websocket.open_websocket_url(url) as ws:
            client = WsClient(ws)
            await client.send({"type": "auth", "token": token})
            await coding_turn(client)
        assert await ctrl_c(demo) == 0


async def test_token_prints_a_token_the_running_demo_accepts(tmp_path: Path) -> None:
    issuer_file = tmp_path / "issuer.json"
    async with running_demo(issuer_file) as (demo, port, _):
        result = await run_cli(
            "token",
            "--sub",
            "alice",
            "--scope",
            "api:read api:write",
            "--lifetime",
            "600",
            env=cli_env({DEV_ISSUER_FILE_ENV: str(issuer_file)}),
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        lines = result.stdout.decode().splitlines()
        assert len(lines) == 1  # the token and nothing else
        token = lines[0]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sub"] == "alice"
        assert claims["scope"] == "api:read api:write"
        assert claims["exp"] - claims["iat"] == 600

        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/api/v1/agents", headers=headers)).status_code == 200
        url = f"ws://127.0.0.1:{port}/api/v1/ws/token-check"
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[(b"Authorization", f"Bearer {token}".encode())]
        ) as ws:
            await coding_turn(WsClient(ws))
        assert await ctrl_c(demo) == 0


async def test_token_without_a_demo_issuer_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "never-written" / "issuer.json"
    result = await run_cli("token", env=cli_env({DEV_ISSUER_FILE_ENV: str(missing)}))
    assert result.returncode == 2
    assert result.stdout == b""
    message = result.stderr.decode()
    assert message.count("\n") == 1 and "Traceback" not in message
    assert str(missing) in message and "trio-gateway demo" in message
    assert not missing.parent.exists()


@pytest.mark.parametrize("lifetime", ["0", "-5"])
async def test_token_refuses_a_lifetime_that_is_not_positive(tmp_path: Path, lifetime: str) -> None:
    issuer_file = tmp_path / "issuer.json"
    save_dev_issuer(DevIssuer(), issuer_file)
    result = await run_cli(
        "token", "--lifetime", lifetime, env=cli_env({DEV_ISSUER_FILE_ENV: str(issuer_file)})
    )
    assert result.returncode == 2 and result.stdout == b""
    message = result.stderr.decode()
    assert message.count("\n") == 1 and "--lifetime" in message and "Traceback" not in message


async def test_token_help_says_it_is_for_the_demo_only() -> None:
    result = await run_cli("token", "--help", env=cli_env())
    assert result.returncode == 0
    help_text = " ".join(result.stdout.decode().split())
    assert "Only a gateway started by `trio-gateway demo`" in help_text


def test_a_saved_issuer_loads_with_its_key(tmp_path: Path) -> None:
    issuer = DevIssuer(algorithm="ES256", issuer="https://issuer.test", audience="aud-test")
    path = save_dev_issuer(issuer, tmp_path / "new-dir" / "issuer.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    document = json.loads(path.read_text())
    assert set(document) == {"kid", "algorithm", "issuer", "audience", "private_key_pem"}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left

    loaded = load_dev_issuer(path)
    assert (loaded.kid, loaded.algorithm, loaded.issuer, loaded.audience) == (
        issuer.kid,
        "ES256",
        "https://issuer.test",
        "aud-test",
    )
    assert loaded.jwks() == issuer.jwks()  # the same key, not a new one
    policy = TokenPolicy(issuer="https://issuer.test", audience="aud-test")
    identity = verify_token(
        loaded.mint("bob", scopes=["api:read"]),
        KeySet.from_jwks(issuer.jwks()),
        policy,
        time.time(),
    )
    assert identity.sub == "bob" and identity.scopes == {"api:read"}


def test_a_damaged_issuer_file_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "issuer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_dev_issuer(path)
    path.write_text(json.dumps({"kid": "k"}))
    with pytest.raises(ValueError, match="not a demo issuer file"):
        load_dev_issuer(path)
    document = {
        "kid": "k",
        "algorithm": "RS256",
        "issuer": "i",
        "audience": "a",
        "private_key_pem": DevIssuer(algorithm="EdDSA").private_pem().decode(),
    }
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="unusable private key"):
        load_dev_issuer(path)


def test_the_issuer_file_location(monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path.home()
    assert dev_issuer_file({}) == home / ".local/state/trio-gateway/demo-issuer.json"
    assert dev_issuer_file({"XDG_STATE_HOME": "relative"}) == dev_issuer_file({})
    assert dev_issuer_file({"XDG_STATE_HOME": "/xdg"}) == Path("/xdg/trio-gateway/demo-issuer.json")
    assert dev_issuer_file({"XDG_STATE_HOME": "/xdg", DEV_ISSUER_FILE_ENV: "/x/i.json"}) == Path(
        "/x/i.json"
    )
    monkeypatch.setenv(DEV_ISSUER_FILE_ENV, "/from/env.json")
    assert dev_issuer_file() == Path("/from/env.json")


async def test_the_dev_jwks_is_served_with_a_cache_lifetime() -> None:
    issuer = DevIssuer(algorithm="EdDSA")
    stop_jwks = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_dev_jwks, issuer, shutdown_trigger=stop_jwks.wait))
        assert url.startswith("http://127.0.0.1:") and url.endswith("/.well-known/jwks.json")
        async with httpx.AsyncClient() as http:
            answer = await http.get(url)
        assert answer.status_code == 200
        assert answer.headers["cache-control"] == "public, max-age=3600"
        assert answer.json() == issuer.jwks()
        stop_jwks.set()


async def test_demo_runtime_alone_serves_the_runtime_contract() -> None:
    port = free_port()
    args = ("demo-runtime", "--port", str(port), "--instant")
    command = cli_command(*args)
    async with started(command, env=cli_env(KEY_ENV), stop_signal=signal.SIGKILL) as runtime:
        await runtime.wait_serving(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/agents")).status_code == 401
            answer = await http.get(
                "/agents", headers={"X-Internal-Auth": "cli-test-key-0123456789"}
            )
            assert answer.status_code == 200 and answer.json()["total"] >= 5
        assert await runtime.stop(signal.SIGTERM, grace=20) == 0


@pytest.mark.parametrize(
    ("command", "by_env", "advice"),
    [
        ("serve", False, "--port or GATEWAY__PORT"),
        ("serve", True, "--port or GATEWAY__PORT"),
        ("demo", False, "--port"),
        ("demo-runtime", False, "--port"),
        ("dev-issuer", False, "--port"),
    ],
)
async def test_a_port_in_use_is_a_clear_error_naming_the_address(
    tmp_path: Path, command: str, by_env: bool, advice: str
) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    env = {**KEY_ENV, DEV_ISSUER_FILE_ENV: str(tmp_path / "issuer.json")}
    args = [command, "--host", "127.0.0.1"]
    if by_env:
        env["GATEWAY__PORT"] = str(port)
    else:
        args += ["--port", str(port)]
    try:
        result = await run_cli(*args, env=cli_env(env))
    finally:
        await listener.aclose()
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in stderr
    assert f"another port with {advice}." in stderr
    assert "Traceback" not in stderr
    assert "[Errno" not in stderr


def test_a_bind_error_of_another_kind_names_the_address_too() -> None:
    from trio_gateway.cli import _Bind, _bind_advice

    bind = _Bind("::1", 80)
    denied = _bind_advice(OSError(errno.EACCES, "Permission denied"), bind)
    assert denied is not None and denied.startswith("cannot listen on [::1]:80: permission")
    foreign = _bind_advice(OSError(errno.EADDRNOTAVAIL, "x"), _Bind("10.9.9.9", 8000))
    assert foreign is not None and "10.9.9.9 is not an address of this machine" in foreign
    # A file the demo could not write is not a listening failure.
    assert _bind_advice(PermissionError(errno.EACCES, "Permission denied", "/x"), bind) is None


def test_hypercorn_can_import_the_asgi_app() -> None:
    result = run_python(
        "-c", "from trio_gateway.main import app; print(type(app).__name__)", env=cli_env(KEY_ENV)
    )
    assert result.returncode == 0 and result.stdout.strip() == "GatewayApp"


def test_the_hypercorn_entry_point_tunes_the_garbage_collector_too() -> None:
    code = (
        "import gc; from trio_gateway.main import app; "
        "from trio_gateway.server import GC_THRESHOLDS; "
        "assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold(); print('tuned')"
    )
    result = run_python("-c", code, env=cli_env(KEY_ENV))
    assert result.returncode == 0 and result.stdout.strip() == "tuned", result.stderr


def test_an_unknown_gateway_variable_is_reported_at_startup() -> None:
    # The hypercorn entry point logs at import, as `serve` does when it starts.
    env = cli_env({**KEY_ENV, "GATEWAY__USE_JWT_AUTHH": "false", "GATEWAY__LOG_FORMAT": "text"})
    result = run_python("-c", "import trio_gateway.main", env=env)
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert "unknown setting GATEWAY__USE_JWT_AUTHH" in log
    assert "did you mean GATEWAY__USE_JWT_AUTH?" in log


def hypercorn_launchers() -> list[list[str]]:
    launchers = [[sys.executable, "-m", "hypercorn"]]
    script = Path(sys.executable).parent / "hypercorn"
    if script.is_file():
        launchers.append([str(script)])
    return launchers


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("launcher", hypercorn_launchers(), ids=lambda cmd: cmd[-1])
async def test_plain_hypercorn_with_a_bad_configuration_exits_non_zero(
    tmp_path: Path, launcher: list[str], workers: str
) -> None:
    # hypercorn's supervisor loses a worker's exit status: without trio_gateway.main's help
    # this ends in status 0 after printing the error.
    result = await run_command(
        [*launcher, "-k", "trio", "-w", workers, "-b", "127.0.0.1:0", "trio_gateway.main:app"],
        cwd=tmp_path,  # no .env here
        env=clean_env(),
    )
    assert result.returncode != 0
    assert result.returncode == -signal.SIGUSR1  # the documented status: 128 + 10 in a shell
    stderr = result.stderr.decode()
    assert "trio-gateway: invalid configuration" in stderr
    assert "GATEWAY__INTERNAL_API_KEY" in stderr
    assert "Traceback" not in stderr


def test_importing_the_asgi_app_with_a_bad_configuration_exits_2_and_signals_nobody(
    tmp_path: Path,
) -> None:
    result = run_python("-c", "import trio_gateway.main", cwd=tmp_path, env=clean_env())
    assert result.returncode == 2  # and this test process, its parent, is still here
    assert "GATEWAY__INTERNAL_API_KEY" in result.stderr


async def test_dev_issuer_serves_a_key_that_survives_restarts(tmp_path: Path) -> None:
    issuer_file = tmp_path / "state" / "dev-issuer.json"
    env = cli_env({DEV_ISSUER_FILE_ENV: str(issuer_file)})
    kids = []
    for _ in range(2):
        port = free_port()
        args = ("dev-issuer", "--port", str(port))
        async with started(cli_command(*args), env=env, stop_signal=signal.SIGKILL) as issuer:
            jwks = "/.well-known/jwks.json"
            await issuer.wait_serving(f"http://127.0.0.1:{port}", 30, path=jwks)
            async with httpx.AsyncClient() as http:
                answer = await http.get(f"http://127.0.0.1:{port}{jwks}")
            assert answer.status_code == 200
            keys = KeySet.from_jwks(answer.json())
            kids.append(list(keys))
            # A token minted from the same file verifies against the served key set.
            result = await run_cli("token", "--sub", "carol", env=env)
            assert result.returncode == 0, result.stderr
            identity = verify_token(
                result.stdout.decode().strip(), keys, TokenPolicy(), time.time()
            )
            assert identity.sub == "carol"
            assert stat.S_IMODE(issuer_file.stat().st_mode) == 0o600
            assert await issuer.stop(signal.SIGTERM, grace=20) == 0
    assert len(kids[0]) == 1 and kids[0] == kids[1], "the restarted issuer kept its key"


def test_dev_issuer_replaces_a_key_made_for_another_audience(tmp_path: Path) -> None:
    from trio_gateway.tools.dev_auth import load_or_create_dev_issuer

    path = tmp_path / "issuer.json"
    first, created = load_or_create_dev_issuer(path)
    assert created
    again, created = load_or_create_dev_issuer(path)
    assert not created and again.kid == first.kid
    other, created = load_or_create_dev_issuer(path, audience="other-api")
    assert created and other.kid != first.kid and load_dev_issuer(path).audience == "other-api"
    path.write_text("{damaged")
    fresh, created = load_or_create_dev_issuer(path)
    assert created and load_dev_issuer(path).kid == fresh.kid


def test_serve_tunes_the_garbage_collector_for_a_large_long_lived_heap() -> None:
    # Regression (bench/load.py, 2000 sessions): with CPython's default thresholds a turn's
    # objects were promoted to the oldest generation and full collections of ~800k objects
    # stalled the event loop ~2 s in every 5 s. tune_gc() is what `trio-gateway serve` calls
    # once it is listening; the process state is restored afterwards.
    import gc

    from trio_gateway.server import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] >= 10_000  # a turn's objects must be able to die young
        assert gc.get_freeze_count() > 0  # start-up objects are out of every collection
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
