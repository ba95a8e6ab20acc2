"""``trio-gateway check``: configuration report, redaction, and checks against real servers.

The runtime is the real demo runtime, the JWKS a real HTTP server
(tests/support/jwks_server.py), and
Redis a small RESP server on a loopback socket (plus the real ``redis-server`` when installed).
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_gateway.settings import Settings
from trio_gateway.tools.check import (
    CheckResult,
    check_redis,
    configuration_lines,
    encode_redis_command,
    exit_code,
    format_report,
    parse_redis_url,
    redact_url,
    redis_commands,
    run_checks,
    verdict_line,
)
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import INTERNAL_KEY, gateway_settings
from ..support.jwks_server import JWKSServer
from ..support.ports import free_port as closed_port  # bound, then released: nobody listens
from ..support.processes import clean_env, run_cli
from ..support.redis_server import REDIS_SERVER, running_redis

REDIS_PASSWORD = "s3cret-redis-password"


class FakeRedis:
    """Speaks just enough RESP: AUTH (checked against ``password``), SELECT, PING.

    ``mute`` accepts connections and never answers (a black-holed Redis).
    """

    def __init__(self, password: str | None = None, *, mute: bool = False) -> None:
        self.password = password
        self.mute = mute
        self.commands: list[list[str]] = []

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        authed = self.password is None
        async with stream:
            while True:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buffer += chunk
                while (parsed := _parse_resp(buffer)) is not None:
                    command, buffer = parsed
                    self.commands.append(command)
                    if self.mute:
                        continue
                    name = command[0].upper()
                    if name == "AUTH":
                        authed = command[-1] == self.password
                        reply = b"+OK\r\n" if authed else b"-WRONGPASS invalid password\r\n"
                    elif not authed:
                        reply = b"-NOAUTH Authentication required.\r\n"
                    elif name == "PING":
                        reply = b"+PONG\r\n"
                    elif name == "SELECT":
                        reply = b"+OK\r\n"
                    else:
                        reply = b"-ERR unknown command\r\n"
                    await stream.send_all(reply)


def _parse_resp(data: bytes) -> tuple[list[str], bytes] | None:
    """One RESP array of bulk strings from the front of ``data``, or None if incomplete."""
    if b"\r\n" not in data:
        return None
    header, rest = data.split(b"\r\n", 1)
    assert header.startswith(b"*"), header
    items = []
    for _ in range(int(header[1:])):
        if b"\r\n" not in rest:
            return None
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line[1:])
        if len(rest) < size + 2:
            return None
        items.append(rest[:size].decode())
        rest = rest[size + 2 :]
    return items, rest


@pytest.fixture
async def redis(nursery: trio.Nursery) -> AsyncIterator[tuple[FakeRedis, int]]:
    server = FakeRedis(REDIS_PASSWORD)
    port = await nursery.start(server.serve)
    yield server, port


def full_settings(agent_url: str, jwks_url: str, redis_port: int, **overrides: Any) -> Settings:
    """JWT on, Redis on: every check runs."""
    values: dict[str, Any] = {
        "use_jwt_auth": True,
        "jwks_url": jwks_url,
        "state_backend": "redis",
        "redis_url": f"redis://gw:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/3",
    }
    values.update(overrides)
    return gateway_settings(agent_url, **values)


# --- pure part ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://u:p%40ss@h/1", "rediss://u:***@h/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host", "redis://user@host"),
        ("https://a:b@auth.example/jwks?x=1", "https://a:***@auth.example/jwks?x=1"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_configuration_lists_every_setting_and_no_secret() -> None:
    settings = full_settings("http://rt:8001", "http://auth:1/jwks.json", 6379)
    lines = configuration_lines(settings)
    text = "\n".join(lines)
    for name in Settings.model_fields:
        assert any(line.startswith(f"GATEWAY__{name.upper()} ") for line in lines), name
    assert INTERNAL_KEY not in text and REDIS_PASSWORD not in text
    assert f"*** (set, {len(INTERNAL_KEY)} characters)" in text
    assert "redis://gw:***@127.0.0.1:6379/3" in text
    assert "(effective JWKS URL)" in text and "http://auth:1/jwks.json" in text


def test_verdict_and_exit_code() -> None:
    ok = CheckResult("a", "t", "ok", "fine")
    skipped = CheckResult("b", "t", "skipped", "off")
    failed = CheckResult("c", "t", "FAIL", "down")
    assert exit_code([ok, skipped]) == 0
    assert verdict_line([ok, skipped]) == "verdict: OK (1 check passed)"
    assert exit_code([ok, failed, skipped]) == 1
    assert verdict_line([ok, failed, skipped]) == "verdict: FAIL (1 of 2 checks failed)"
    report = format_report(gateway_settings("http://rt:8001"), [ok, failed])
    assert report.endswith("verdict: FAIL (1 of 2 checks failed)\n")
    assert "[ FAIL  ] c  t: down" in report
    assert verdict_line([ok, ok]) == "verdict: OK (2 checks passed)"


def test_the_report_names_unknown_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY__USE_JWT_AUTHH", "false")
    ok = CheckResult("a", "t", "ok", "fine")
    report = format_report(gateway_settings("http://rt:8001"), [ok])
    assert "unknown variables" in report
    assert "GATEWAY__USE_JWT_AUTHH (did you mean GATEWAY__USE_JWT_AUTH?)" in report
    monkeypatch.delenv("GATEWAY__USE_JWT_AUTHH")
    assert "unknown variables" not in format_report(gateway_settings("http://rt:8001"), [ok])


def test_the_redis_wire_format() -> None:
    assert encode_redis_command("PING") == b"*1\r\n$4\r\nPING\r\n"
    assert encode_redis_command("AUTH", "pé") == b"*2\r\n$4\r\nAUTH\r\n$3\r\np\xc3\xa9\r\n"
    target = parse_redis_url("redis://u:p%40ss@h:7000/2")
    assert (target.host, target.port, target.db, target.tls) == ("h", 7000, 2, False)
    assert (target.username, target.password) == ("u", "p@ss")
    assert "p@ss" not in target.display
    assert redis_commands(target) == [("AUTH", "u", "p@ss"), ("SELECT", "2"), ("PING",)]
    plain = parse_redis_url("rediss://cache")
    assert (plain.port, plain.db, plain.tls, plain.password) == (6379, 0, True, None)
    assert redis_commands(plain) == [("PING",)]
    assert redis_commands(parse_redis_url("redis://:pw@h")) == [("AUTH", "pw"), ("PING",)]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("http://h:1", "redis://"), ("redis://", "no host"), ("redis://h/x", "number")],
)
def test_a_bad_redis_url_is_a_clear_error(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_redis_url(url)


# --- against real servers ------------------------------------------------------------------


async def test_every_check_passes_against_live_dependencies(
    demo_runtime: tuple[DemoRuntime, str],
    jwks_server: tuple[JWKSServer, DevIssuer],
    redis: tuple[FakeRedis, int],
) -> None:
    settings = full_settings(demo_runtime[1], jwks_server[0].url, redis[1])
    results = await run_checks(settings)
    assert [(r.name, r.status) for r in results] == [
        ("agent runtime", "ok"),
        ("JWKS", "ok"),
        ("redis", "ok"),
        ("sqlite", "skipped"),
    ]
    assert "service agent-runtime" in results[0].detail
    assert jwks_server[1].kid in results[1].detail
    assert redis[0].commands == [["AUTH", "gw", REDIS_PASSWORD], ["SELECT", "3"], ["PING"]]
    assert exit_code(results) == 0


async def test_checks_that_are_off_are_skipped_not_failed(
    demo_runtime: tuple[DemoRuntime, str],
) -> None:
    # JWT off and memory state: nothing but the runtime is needed (nothing listens for the rest).
    settings = gateway_settings(
        demo_runtime[1], use_jwt_auth=False, auth_service_url=f"http://127.0.0.1:{closed_port()}"
    )
    results = await run_checks(settings)
    assert [r.status for r in results] == ["ok", "skipped", "skipped", "skipped"]
    assert exit_code(results) == 0


async def test_unreachable_dependencies_fail_with_the_reason() -> None:
    settings = full_settings(
        f"http://127.0.0.1:{closed_port()}",
        f"http://127.0.0.1:{closed_port()}/jwks.json",
        closed_port(),
    )
    results = await run_checks(settings)
    assert [r.status for r in results] == ["FAIL", "FAIL", "FAIL", "skipped"]
    for result in results[:3]:
        assert "refused" in result.detail.lower(), result
        assert REDIS_PASSWORD not in result.target + result.detail
    assert exit_code(results) == 1


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"status": 503}, "HTTP 503"),
        ({"raw_body": b"<html>login</html>"}, "not a JWKS"),
        ({"jwks": {"keys": []}}, "no usable signature key"),
        ({"jwks": {"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}}, "1 unusable skipped"),
    ],
)
async def test_a_jwks_that_is_not_usable_fails(
    demo_runtime: tuple[DemoRuntime, str],
    jwks_server: tuple[JWKSServer, DevIssuer],
    change: dict[str, Any],
    fragment: str,
) -> None:
    server = jwks_server[0]
    for name, value in change.items():
        setattr(server, name, value)
    settings = gateway_settings(demo_runtime[1], use_jwt_auth=True, jwks_url=server.url)
    results = await run_checks(settings)
    assert results[1].status == "FAIL" and fragment in results[1].detail, results[1]
    assert exit_code(results) == 1


async def test_a_runtime_that_answers_an_error_fails(
    jwks_server: tuple[JWKSServer, DevIssuer],
) -> None:
    # The JWKS server answers 404 on /health: an HTTP server, but not a healthy runtime.
    agent_url = jwks_server[0].url.removesuffix("/.well-known/jwks.json")
    results = await run_checks(gateway_settings(agent_url))
    assert (results[0].status, results[0].detail) == ("FAIL", "HTTP 404")


async def test_redis_with_a_wrong_password_fails_without_showing_it(
    nursery: trio.Nursery, redis: tuple[FakeRedis, int]
) -> None:
    settings = gateway_settings(
        "http://127.0.0.1:1",
        state_backend="redis",
        redis_url=f"redis://gw:wrong-{REDIS_PASSWORD}@127.0.0.1:{redis[1]}/0",
    )
    result = await check_redis(settings, timeout=10)
    assert result.status == "FAIL"
    assert result.detail == "AUTH: -WRONGPASS invalid password"
    assert REDIS_PASSWORD not in result.target


async def test_something_that_is_not_redis_fails(jwks_server: tuple[JWKSServer, DevIssuer]) -> None:
    # An HTTP server on the Redis port answers garbage (or closes) instead of +PONG.
    port = int(jwks_server[0].url.split(":")[2].split("/")[0])
    settings = gateway_settings(
        "http://127.0.0.1:1", state_backend="redis", redis_url=f"redis://127.0.0.1:{port}/0"
    )
    result = await check_redis(settings, timeout=10)
    assert result.status == "FAIL", result


async def test_a_redis_that_never_answers_fails_at_the_timeout(nursery: trio.Nursery) -> None:
    mute = FakeRedis(mute=True)
    port = await nursery.start(mute.serve)
    settings = gateway_settings(
        "http://127.0.0.1:1", state_backend="redis", redis_url=f"redis://127.0.0.1:{port}/0"
    )
    result = await check_redis(settings, timeout=0.5)
    assert (result.status, result.detail) == ("FAIL", "no answer within 0.5 s")
    assert mute.commands == [["PING"]]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
async def test_a_real_redis_server_answers_the_check(tmp_path: Path) -> None:
    with running_redis(tmp_path, ["--requirepass", REDIS_PASSWORD]) as server:
        port = server.port
        good = gateway_settings(
            "http://127.0.0.1:1",
            state_backend="redis",
            redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/1",
        )
        # Started: it answers (NOAUTH) already.
        result = await check_redis(good, timeout=5)
        assert (result.status, result.detail) == ("ok", "PONG")
        bad = gateway_settings(
            "http://127.0.0.1:1",
            state_backend="redis",
            redis_url=f"redis://127.0.0.1:{port}/0",
        )
        refused = await check_redis(bad, timeout=5)
        assert refused.status == "FAIL" and "NOAUTH" in refused.detail


# --- the command -----------------------------------------------------------------------------


def check_env(**variables: str) -> dict[str, str]:
    """No operator ``GATEWAY__*`` but ``variables`` (full names)."""
    return {**clean_env(), **variables}


async def run_check_command(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return await run_cli("check", "--timeout", "10", env=env, cwd=cwd)


async def test_the_command_reports_and_exits_0_when_all_is_well(
    tmp_path: Path,
    demo_runtime: tuple[DemoRuntime, str],
    jwks_server: tuple[JWKSServer, DevIssuer],
    redis: tuple[FakeRedis, int],
) -> None:
    env = check_env(
        GATEWAY__AGENT_URL=demo_runtime[1],
        GATEWAY__INTERNAL_API_KEY=INTERNAL_KEY,
        GATEWAY__JWKS_URL=jwks_server[0].url,
        GATEWAY__STATE_BACKEND="redis",
        GATEWAY__REDIS_URL=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis[1]}/0",
    )
    result = await run_check_command(env, tmp_path)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert out.splitlines()[-1] == "verdict: OK (3 checks passed)"
    assert "GATEWAY__AGENT_URL" in out and demo_runtime[1] in out
    assert INTERNAL_KEY not in out + result.stderr.decode()
    assert REDIS_PASSWORD not in out + result.stderr.decode()


async def test_the_command_exits_1_when_a_check_fails(
    tmp_path: Path, jwks_server: tuple[JWKSServer, DevIssuer]
) -> None:
    env = check_env(
        GATEWAY__AGENT_URL=f"http://127.0.0.1:{closed_port()}",
        GATEWAY__INTERNAL_API_KEY=INTERNAL_KEY,
        GATEWAY__JWKS_URL=jwks_server[0].url,
    )
    result = await run_check_command(env, tmp_path)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 1
    assert lines[-1] == "verdict: FAIL (1 of 3 checks failed)"
    assert any(line.lstrip().startswith("[ FAIL  ] agent runtime") for line in lines)
    assert any(line.lstrip().startswith("[  ok   ] JWKS") for line in lines)
    assert any(line.lstrip().startswith("[skipped] redis") for line in lines)
    # the default backend: the state file in the working directory, created at startup
    assert any(
        line.split()[:4] == ["[", "ok", "]", "sqlite"]
        and f"trio-gateway.sqlite3: {tmp_path}/trio-gateway.sqlite3: not there yet" in line
        for line in lines
    )
    assert not (tmp_path / "trio-gateway.sqlite3").exists(), "check changes nothing"


@pytest.mark.parametrize(
    "variables",
    [
        {"GATEWAY__PORT": "not-a-port", "GATEWAY__INTERNAL_API_KEY": INTERNAL_KEY},
        {},  # the placeholder internal key is refused
    ],
)
async def test_the_command_exits_2_on_a_bad_configuration(
    tmp_path: Path, variables: dict[str, str]
) -> None:
    result = await run_check_command(check_env(**variables), tmp_path)
    assert result.returncode == 2
    assert result.stdout.decode() == "verdict: BAD CONFIGURATION (no check was run)\n"
    message = result.stderr.decode()
    assert "GATEWAY__" in message and "Traceback" not in message


async def test_check_is_a_listed_command() -> None:
    result = await run_cli("--help", env=check_env())
    listed = result.stdout.decode()
    assert result.returncode == 0 and "check" in listed and "dev-issuer" in listed


async def test_checks_run_concurrently_so_one_slow_dependency_does_not_hide_others(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    # A black-holed Redis and a working runtime: the report still has the runtime's verdict.
    mute = FakeRedis(mute=True)
    port = await nursery.start(mute.serve)
    settings = gateway_settings(
        demo_runtime[1], state_backend="redis", redis_url=f"redis://127.0.0.1:{port}/0"
    )
    results = await run_checks(settings, timeout=0.5)
    assert [r.status for r in results] == ["ok", "skipped", "FAIL", "skipped"]
