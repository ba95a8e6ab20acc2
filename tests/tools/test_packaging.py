"""Dockerfile, docker-compose.yml, deploy/nginx.conf and the lock file, checked without Docker.

No Docker engine runs where these tests run, so ``docker build`` and ``docker compose up`` are
never executed. What can be checked is checked: the compose file's services, ports, commands and
settings (each ``GATEWAY__*`` variable must be a real setting and validate), the nginx config
(``nginx -t`` when nginx is installed), and the image's own COPY, install, start and healthcheck
commands, parsed out of the Dockerfile (not duplicated here) and run in a fresh virtualenv.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from trio_gateway.cli import _parser
from trio_gateway.settings import ENV_PREFIX, Settings, load_settings

from ..support.ports import free_port
from ..support.processes import TrioChild, clean_env, run_command, started

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SERVICES = {"issuer", "runtime", "gateway"}
REPLICA_SERVICES = {"redis", "gateway-1", "gateway-2", "nginx"}
WORKERS_SERVICES = {"gateway-workers", "redis-workers"}


# --- a small Dockerfile reader ---------------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... stage: its instructions in order, as (keyword, argument text)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [text for key, text in self.instructions if key == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for text in self.all("ENV"):
            for item in shlex.split(text):
                name, _, value = item.partition("=")
                values[name] = value
        return values


def read_dockerfile(path: Path = ROOT / "Dockerfile") -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped, ARGs applied."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, text = line.partition(" ")
        keyword, text = keyword.upper(), text.strip()
        if keyword == "ARG" and not stages:
            name, _, default = text.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)
            image, *alias = re.split(r"\s+as\s+", base, flags=re.IGNORECASE)
            stages.append(Stage(image, alias[0] if alias else None))
            continue
        stages[-1].instructions.append((keyword, text))
    return stages


def exec_form(text: str) -> list[str]:
    """An instruction's JSON exec form (``["a", "b"]``); fails on the shell form."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


# --- compose helpers -------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def services() -> dict[str, dict[str, Any]]:
    result = compose()["services"]
    assert isinstance(result, dict)
    return result


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with an environment where VAR is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", lambda m: m.group(1), value)


def service_env(name: str) -> dict[str, str]:
    environment = services()[name].get("environment", {})
    assert isinstance(environment, dict), "environment as a mapping"
    return {key: interpolate(str(value)) for key, value in environment.items()}


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def gateway_services() -> list[str]:
    return [name for name, spec in services().items() if spec.get("command", [])[1:2] == ["serve"]]


@pytest.fixture
def clean_settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    yield


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            field_name = name[len(ENV_PREFIX) :].lower()
            assert field_name in Settings.model_fields, f"{name} is not a setting"
            monkeypatch.setenv(name, value)
    return load_settings()


# --- the Dockerfile ------------------------------------------------------------------------------


def test_the_image_is_small_non_root_and_serves_on_all_interfaces() -> None:
    build, final = read_dockerfile()
    assert build.name == "build" and final.name is None
    for stage in (build, final):
        assert stage.base.startswith("python:") and "-slim" in stage.base
    assert build.base == final.base, "the venv copied between stages needs the same interpreter"
    users = final.all("USER")
    assert users and users[-1] not in ("root", "0"), "the gateway must not run as root"
    env = final.env()
    assert env["GATEWAY__HOST"] == "0.0.0.0"
    assert exec_form(final.all("CMD")[-1]) == ["trio-gateway", "serve"]
    assert not final.all("ENTRYPOINT"), "nothing between PID 1 and trio-gateway (SIGTERM)"
    healthcheck = final.all("HEALTHCHECK")[-1]
    assert "/health" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
    # The venv the build stage fills is the one the final stage copies and puts first on PATH.
    venv = build.env()["VIRTUAL_ENV"]
    assert any(text.split()[-2:] == [venv, venv] for text in final.all("COPY"))
    assert env["PATH"].startswith(f"{venv}/bin:")


def test_the_image_installs_the_project_with_the_lock_file() -> None:
    build, _ = read_dockerfile()
    install = " ".join(build.all("RUN"))
    assert "-c requirements/lock.txt ." in install
    copied = [shlex.split(text) for text in build.all("COPY")]
    assert any("requirements/lock.txt" in parts for parts in copied)


def test_dockerignore_keeps_every_copied_path() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    build, _ = read_dockerfile()
    for text in build.all("COPY"):
        for source in shlex.split(text)[:-1]:
            top = source.split("/")[0]
            assert top not in ignored and source not in ignored, source


def test_every_gateway_variable_the_dockerfile_sets_is_a_valid_setting(
    clean_settings_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, final = read_dockerfile()
    env = {k: v for k, v in final.env().items() if k.startswith(ENV_PREFIX)}
    assert env
    settings_from({**env, "GATEWAY__INTERNAL_API_KEY": "k" * 20}, monkeypatch)


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_has_the_default_system_and_the_replicas_profile() -> None:
    specs = services()
    assert set(specs) == DEFAULT_SERVICES | REPLICA_SERVICES | WORKERS_SERVICES
    for name in DEFAULT_SERVICES:
        assert "profiles" not in specs[name], f"{name} must start with a plain `compose up`"
    for name in REPLICA_SERVICES:
        assert specs[name]["profiles"] == ["replicas"], name
    for name in WORKERS_SERVICES:
        assert specs[name]["profiles"] == ["workers"], name
    assert specs["gateway-workers"]["command"][-2:] == ["--workers", "auto"]
    assert specs["gateway-workers"]["environment"]["GATEWAY__STATE_BACKEND"] == "redis"
    assert specs["gateway"]["ports"] == ["127.0.0.1:8000:8000"]
    assert specs["nginx"]["ports"] == ["127.0.0.1:8080:8080"]
    assert specs["nginx"]["image"].startswith("nginx:")
    assert specs["redis"]["image"].startswith("redis:")


def test_compose_commands_are_real_trio_gateway_commands() -> None:
    parser = _parser()
    expected = {
        "issuer": "dev-issuer",
        "runtime": "demo-runtime",
        "gateway": "serve",
        "gateway-1": "serve",
        "gateway-2": "serve",
        "gateway-workers": "serve",
    }
    for name, command_name in expected.items():
        spec = services()[name]
        command = spec["command"]
        assert command[0] == "trio-gateway", name
        args = parser.parse_args(command[1:])  # exits (fails the test) on a bad option
        assert args.command == command_name
        assert spec["build"] == "." and spec["image"] == "trio-gateway:local"


def test_every_gateway_setting_in_compose_is_real_and_valid(
    clean_settings_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, final = read_dockerfile()
    image_env = {k: v for k, v in final.env().items() if k.startswith(ENV_PREFIX)}
    for name in services():
        env = service_env(name)
        gateway_vars = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        for variable in gateway_vars:
            assert variable[len(ENV_PREFIX) :].lower() in Settings.model_fields, variable
        if name in gateway_services():
            for variable in list(os.environ):
                if variable.startswith(ENV_PREFIX):
                    monkeypatch.delenv(variable)
            settings = settings_from({**image_env, **gateway_vars}, monkeypatch)
            assert settings.use_jwt_auth, f"{name}: JWT must be on"
            assert settings.host == "0.0.0.0" and settings.port == 8000


def test_compose_services_point_at_each_other() -> None:
    specs = services()
    runtime_port = option(specs["runtime"]["command"], "--port")
    issuer_port = option(specs["issuer"]["command"], "--port")
    for name in gateway_services():
        env = service_env(name)
        assert env["GATEWAY__AGENT_URL"] == f"http://runtime:{runtime_port}"
        assert env["GATEWAY__AUTH_SERVICE_URL"] == f"http://issuer:{issuer_port}"
        # Same key on both sides of X-Internal-Auth.
        assert (
            env["GATEWAY__INTERNAL_API_KEY"] == service_env("runtime")["GATEWAY__INTERNAL_API_KEY"]
        )
        # The drain must finish before Docker's SIGKILL.
        grace = int(str(specs[name]["stop_grace_period"]).removesuffix("s"))
        assert grace > float(env["GATEWAY__DRAIN_TIMEOUT"])
        assert set(specs[name]["depends_on"]) >= {"runtime", "issuer"}
    for name in ("gateway-1", "gateway-2"):
        env = service_env(name)
        assert env["GATEWAY__STATE_BACKEND"] == "redis"
        assert env["GATEWAY__REDIS_URL"] == "redis://redis:6379/0"
        assert "redis" in specs[name]["depends_on"]
    assert "GATEWAY__STATE_BACKEND" not in service_env("gateway")
    # Healthchecks probe the port each service listens on.
    assert f":{runtime_port}/health" in " ".join(specs["runtime"]["healthcheck"]["test"])
    assert f":{issuer_port}/.well-known/jwks.json" in " ".join(
        specs["issuer"]["healthcheck"]["test"]
    )


def test_the_issuer_key_lives_on_a_volume_that_token_can_read() -> None:
    spec = services()["issuer"]
    key_file = Path(service_env("issuer")["TRIO_GATEWAY_DEV_ISSUER_FILE"])
    _, final = read_dockerfile()
    assert final.env()["TRIO_GATEWAY_DEV_ISSUER_FILE"] == str(key_file)
    assert f"issuer-state:{key_file.parent}" in spec["volumes"]
    assert "issuer-state" in compose()["volumes"]
    # The image creates the directory (owned by the user) so the fresh volume inherits it.
    assert str(key_file.parent) in " ".join(final.all("RUN"))


# --- deploy/nginx.conf -------------------------------------------------------------------------


def nginx_conf() -> str:
    return (ROOT / "deploy" / "nginx.conf").read_text()


def test_nginx_proxies_websockets_and_streams_to_the_replicas() -> None:
    conf = nginx_conf()
    code = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    assert re.search(r"proxy_http_version\s+1\.1;", code)
    # Upgrade only for WebSockets on the session path (tests/proof/test_nginx_proxy.py runs it).
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$upgrade_to;", code)
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade;", code)
    assert re.search(r'map\s+"\$http_upgrade \$request_uri"\s+\$upgrade_to', code)
    assert "$http_upgrade;" not in code, "never forward the client's Upgrade as is"
    assert re.search(r"proxy_buffering\s+off;", code)
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", code)
    assert (
        read_timeout
        and int(read_timeout.group(1)) > Settings.model_fields["stream_idle_timeout"].default
    ), "a silent turn must not be cut by nginx before the gateway's own timeout"
    # The replicas by one name, resolved per request through Docker's DNS: nginx starts
    # before them (they depend on it, so compose stops them first: drain with 1012).
    assert re.search(r"resolver\s+127\.0\.0\.11\b", code)
    assert not re.search(r"upstream\s+\w+\s*\{", code), "an upstream block resolves at start"
    target = re.search(r"set\s+\$(\w+)\s+([\w.-]+):8000;", code)
    assert target and re.search(rf"proxy_pass\s+http://\${target.group(1)};", code)
    specs = services()
    for name in ("gateway-1", "gateway-2"):
        assert specs[name]["networks"]["default"]["aliases"] == [target.group(2)]
        assert "nginx" in specs[name]["depends_on"]
    assert "depends_on" not in specs["nginx"], "nginx must stop after the replicas"
    assert re.search(r"location\s+=\s+/metrics\s*\{\s*return\s+404;", code)
    assert re.search(r"listen\s+8080;", code)
    volumes = services()["nginx"]["volumes"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in volumes


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    # The replicas' name is resolved per request (Docker's DNS), so the file loads anywhere.
    conf = nginx_conf()
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    result = subprocess.run(
        [
            "nginx",
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(path),
            "-e",
            str(tmp_path / "error.log"),
            "-g",
            f"pid {tmp_path / 'nginx.pid'};",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


# --- the lock file, README and CI ------------------------------------------------------------


def readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, "the quick start is exactly two commands"
    return commands[1]


def test_readme_and_ci_install_the_tests_with_the_lock_file() -> None:
    command = readme_test_command()
    assert "-c requirements/lock.txt" in command
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^TEST_COMMAND='(.*)'$", ci, flags=re.MULTILINE)
    assert match and match.group(1) == command
    pip_installs = [line for line in ci.splitlines() if "pip install" in line]
    assert pip_installs and all("-c requirements/lock.txt" in line for line in pip_installs)


def test_every_pip_install_the_readme_shows_uses_the_lock_file() -> None:
    # The README says every install uses the lock: the quick start's demo command as well as
    # its test command, and any other `pip install` of the project or its extras it shows.
    readme = (ROOT / "README.md").read_text()
    installs = [
        line
        for line in re.findall(r"pip install[^\n`]*", readme)
        if re.search(r"(^|\s)(-e\s+)?(\.|\"\.\[[a-z,]+\]\")(\s|$)", line)
    ]
    assert len(installs) >= 3, installs  # demo, tests, development
    for line in installs:
        assert "-c requirements/lock.txt" in line, line


def test_the_lock_pins_every_dependency_for_both_pythons() -> None:
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pins: dict[str, list[str]] = {}
    for line in lock.splitlines():
        if not line or line.startswith((" ", "#")):
            continue
        requirement = line.split(";")[0].strip()
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[^\s=]+", requirement), line
        name, version = requirement.split("==")
        marker = line.split(";", 1)[1].strip() if ";" in line else ""
        pins.setdefault(name.lower(), []).append(f"{version} ; {marker}" if marker else version)
    # The pair pinned per Python version in pyproject.toml, both present with their markers.
    assert sorted(pins["quart-trio"]) == [
        "0.12.0 ; python_full_version < '3.13'",
        "0.13.0 ; python_full_version >= '3.13'",
    ]
    assert len(pins["quart"]) == 2
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    for requirement in declared:
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()
        if name != "trio-gateway":
            assert name in pins, f"{name} is not in the lock file"
    # The command that made the lock is the one the README tells people to run.
    header = lock.splitlines()[1].lstrip("# ").split("  #")[0].strip()
    assert header in (ROOT / "README.md").read_text()


# --- the image's commands, run in a fresh virtualenv -------------------------------------------


def localize(command: list[str], port: int) -> list[str]:
    """A compose command bound to loopback on ``port`` instead of 0.0.0.0 on its fixed port."""
    result = list(command)
    if "--host" in result:
        result[result.index("--host") + 1] = "127.0.0.1"
    if "--port" in result:
        result[result.index("--port") + 1] = str(port)
    return result


@dataclass
class Installed:
    """A virtualenv made by the Dockerfile's build stage, and the final stage's environment."""

    venv: Path
    env: dict[str, str]

    def argv(self, command: list[str]) -> list[str]:
        executable = self.venv / "bin" / command[0]
        assert executable.exists(), f"{command[0]} is not installed in the image's venv"
        return [str(executable), *command[1:]]


def build_like_docker(tmp_path: Path) -> Installed:
    """Replay the build stage: COPY into a work directory, then its RUN lines, venv relocated."""
    build, final = read_dockerfile()
    workdir = tmp_path / "src"
    workdir.mkdir()
    for text in build.all("COPY"):
        parts = shlex.split(text)
        assert not parts[0].startswith("--"), "build-stage COPY from the context only"
        *sources, destination = parts
        for source in sources:
            origin = ROOT / source
            target = workdir / destination
            if destination.endswith("/"):
                target = target / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, target)
    image_venv = build.env()["VIRTUAL_ENV"]
    venv = tmp_path / "venv"
    env = clean_env()
    env.update(build.env())
    env["VIRTUAL_ENV"] = str(venv)
    # `python` is this test's interpreter (3.11 or 3.13: either side of the lock), as the base
    # image's python is the image's.
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for text in build.all("RUN"):
        assert image_venv not in text, "RUN lines use $VIRTUAL_ENV, so the venv can move"
        # --no-cache-dir keeps the image small; here pip's cache saves a minute of downloads.
        command = text.replace("--no-cache-dir", "")
        done = subprocess.run(
            ["sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    final_env = {k: v.replace(image_venv, str(venv)) for k, v in final.env().items()}
    final_env["PATH"] = final_env["PATH"].replace("$PATH", os.environ["PATH"])
    run_env = clean_env()
    run_env.pop("VIRTUAL_ENV", None)
    run_env.update(final_env)
    # Loopback only in tests; the image's 0.0.0.0 is checked statically above.
    run_env["GATEWAY__HOST"] = "127.0.0.1"
    run_env["TRIO_GATEWAY_DEV_ISSUER_FILE"] = str(tmp_path / "state" / "dev-issuer.json")
    # The image's state volume (/var/lib/trio-gateway) is a directory of the test's here.
    assert final_env["GATEWAY__SQLITE_PATH"].startswith("/var/lib/trio-gateway/")
    run_env["GATEWAY__SQLITE_PATH"] = str(tmp_path / "state" / "trio-gateway.sqlite3")
    return Installed(venv, run_env)


def started_installed(
    installed: Installed, command: list[str], env: dict[str, str], cwd: Path
) -> AbstractAsyncContextManager[TrioChild]:
    """``command`` run from the image's virtualenv (killed at the end if still running)."""
    return started(installed.argv(command), env=env, cwd=cwd, stop_signal=signal.SIGKILL)


async def sigterm(child: TrioChild) -> int:
    """What ``docker stop`` sends; the exit status (SIGKILL after 60 s: then -9)."""
    return await child.stop(signal.SIGTERM, grace=60)


def with_service_urls(env: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    """Compose hostnames (http://runtime:8001) replaced by this test's loopback ports."""
    result = dict(env)
    specs = services()
    for name, port in ports.items():
        if "--port" not in specs[name]["command"]:
            continue  # the gateway: nobody in compose calls it by name
        compose_port = option(specs[name]["command"], "--port")
        for key, value in result.items():
            result[key] = value.replace(f"http://{name}:{compose_port}", f"http://127.0.0.1:{port}")
    return result


# pip installs the whole locked set into a new venv: a minute with pip's cache, more without.
@pytest.mark.timeout(900)
async def test_the_image_commands_install_and_run_from_a_fresh_virtualenv(tmp_path: Path) -> None:
    installed = await trio.to_thread.run_sync(build_like_docker, tmp_path)
    specs = services()
    ports = {"issuer": free_port(), "runtime": free_port(), "gateway": free_port()}
    cwd = tmp_path / "run"
    cwd.mkdir()

    def env_of(name: str) -> dict[str, str]:
        return with_service_urls({**installed.env, **service_env(name)}, ports) | (
            {"TRIO_GATEWAY_DEV_ISSUER_FILE": installed.env["TRIO_GATEWAY_DEV_ISSUER_FILE"]}
        )

    issuer_env, runtime_env, gateway_env = env_of("issuer"), env_of("runtime"), env_of("gateway")
    gateway_env["GATEWAY__PORT"] = str(ports["gateway"])
    _, final = read_dockerfile()
    image_command = exec_form(final.all("CMD")[-1])
    assert specs["gateway"]["command"] == image_command

    async with (
        started_installed(
            installed, localize(specs["issuer"]["command"], ports["issuer"]), issuer_env, cwd
        ) as issuer,
        started_installed(
            installed, localize(specs["runtime"]["command"], ports["runtime"]), runtime_env, cwd
        ) as runtime,
    ):
        issuer_base = f"http://127.0.0.1:{ports['issuer']}"
        await issuer.wait_serving(issuer_base, 60, path="/.well-known/jwks.json")
        await runtime.wait_serving(f"http://127.0.0.1:{ports['runtime']}", 60)
        # The compose healthchecks, with this test's ports, pass.
        for name, process_env in (("issuer", issuer_env), ("runtime", runtime_env)):
            test = specs[name]["healthcheck"]["test"]
            assert test[0] == "CMD"
            compose_port = option(specs[name]["command"], "--port")
            argv = [arg.replace(f":{compose_port}/", f":{ports[name]}/") for arg in test[1:]]
            result = await run_command(installed.argv(argv), env=process_env, cwd=cwd)
            assert result.returncode == 0, result.stderr

        async with started_installed(installed, image_command, gateway_env, cwd) as gateway:
            base = f"http://127.0.0.1:{ports['gateway']}"
            await gateway.wait_serving(base, 60)
            # The image's HEALTHCHECK command, as Docker would run it inside the container.
            healthcheck = final.all("HEALTHCHECK")[-1].split(" CMD ", 1)[1]
            result = await run_command(
                installed.argv(exec_form(healthcheck)), env=gateway_env, cwd=cwd
            )
            assert result.returncode == 0, result.stderr
            # `docker compose exec issuer trio-gateway token`: the gateway accepts the token.
            token = await run_command(
                installed.argv(["trio-gateway", "token"]), env=issuer_env, cwd=cwd
            )
            assert token.returncode == 0, token.stderr
            headers = {"Authorization": f"Bearer {token.stdout.decode().strip()}"}
            async with httpx.AsyncClient(base_url=base, trust_env=False) as http:
                assert (await http.get("/api/v1/agents")).status_code == 401
                assert (await http.get("/api/v1/agents", headers=headers)).status_code == 200
            # `docker compose exec gateway trio-gateway check`: everything reachable.
            check = await run_command(
                installed.argv(["trio-gateway", "check"]), env=gateway_env, cwd=cwd
            )
            assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
            # runtime, JWKS and the SQLite state file (Redis is skipped)
            assert check.stdout.decode().splitlines()[-1] == "verdict: OK (3 checks passed)"
            assert await sigterm(gateway) == 0
        assert await sigterm(runtime) == 0
        assert await sigterm(issuer) == 0
