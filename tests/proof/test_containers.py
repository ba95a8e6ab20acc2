"""The image and the compose file, proven by running them on a local Docker daemon.

Marker ``container``: deselected by the default run (pyproject's ``addopts``), run with
``pytest -m container`` (``.ci/run`` does, after the main suite). Each test is skipped, with
the reason, when no Docker daemon answers, when neither ``docker compose`` nor
``docker-compose`` is installed, or when a base image is missing locally: nothing is ever
pulled (``docker build --pull=false``, compose ``--no-build``), and where no registry is
reachable ``deploy/standin-images.sh`` builds stand-ins for the base images.

The image is built once per run from the Dockerfile as it is, under a tag of its own
(``trio-gateway:container-test``), so a developer's ``trio-gateway:local`` is never touched.
The compose stacks run from a copy of docker-compose.yml that differs in three things only:
that image tag (and no ``build``), host ports chosen by Docker (still on 127.0.0.1, so the
tests never collide with a running demo on 8000/8080), and the nginx.conf mount as an absolute
path. Every container, network and volume a test creates is removed when it ends, pass or fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket
import yaml

from ..conftest import close_code

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "trio-gateway:container-test"
BASE_IMAGES = ("python:3.11-slim-bookworm", "redis:7-alpine", "nginx:1.27-alpine")
STANDIN_LABEL = "org.trio-gateway.standin"
INTERNAL_KEY = "container-test-internal-key"
V2 = "codelab.v2"

pytestmark = [pytest.mark.container, pytest.mark.timeout(420)]


# --- docker, bounded -------------------------------------------------------------------------


def docker_env() -> dict[str, str]:
    """This process's environment minus GATEWAY__* (compose interpolates from it)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}


def run(
    argv: list[str], *, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A docker command, bounded; its output in the failure message."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**docker_env(), **(env or {})},
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(argv)} took more than {timeout} s") from exc
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done


def inspect(container: str) -> dict[str, Any]:
    value = json.loads(run(["docker", "inspect", container]).stdout)[0]
    assert isinstance(value, dict)
    return value


def health(container: str) -> str:
    state = inspect(container)["State"]
    if state["Status"] != "running":
        return f"{state['Status']} (exit {state['ExitCode']})"
    return str(state.get("Health", {}).get("Status", "none"))


def wait_healthy(container: str, timeout: float = 90) -> None:
    """Docker's own healthcheck says healthy (its first probe runs after one interval)."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = health(container)
        if status == "healthy":
            return
        if status.startswith("exited"):
            break
        time.sleep(0.5)
    logs = run(["docker", "logs", "--tail", "30", container], check=False)
    raise AssertionError(f"{container}: {status}\n{logs.stdout}{logs.stderr}")


def wait_exited(container: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = inspect(container)["State"]
        if state["Status"] == "exited":
            assert isinstance(state, dict)
            return state
        time.sleep(0.2)
    raise AssertionError(f"{container} still running after {timeout} s")


def host_port(published: str) -> int:
    """The port of ``127.0.0.1:49153`` (``docker port`` / ``compose port`` output)."""
    line = published.strip().splitlines()[0]
    host, _, port = line.rpartition(":")
    assert host == "127.0.0.1", f"published on {host}, not loopback only"
    return int(port)


def access_paths(logs: str, *, answered_only: bool = False) -> list[str]:
    """The paths of the gateway's JSON access lines in ``logs``.

    ``answered_only`` leaves out lines with status "-": hypercorn 0.18 adds one when a client
    closes the connection as soon as it has its answer (a second line for the same request)."""
    paths = []
    for line in logs.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            entry = json.loads(line[start:])
        except ValueError:
            continue
        if (
            isinstance(entry, dict)
            and entry.get("event") == "http_access"
            and not (answered_only and entry.get("status") == "-")
        ):
            paths.append(str(entry.get("path")))
    return paths


# --- what must be here before anything runs ------------------------------------------------------


def compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) if it works, else ``docker-compose`` (v1), else None."""
    if shutil.which("docker") is not None:
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if v2.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    return None


@dataclass(frozen=True)
class Docker:
    """A reachable daemon, the compose command, and which base images are stand-ins."""

    compose: list[str]
    standins: tuple[str, ...]


@pytest.fixture(scope="session")
def docker(request: pytest.FixtureRequest) -> Docker:
    if shutil.which("docker") is None:
        pytest.skip("container tests: the docker CLI is not installed (.ci/run installs docker.io)")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        pytest.skip(
            "container tests: no Docker daemon answers (start dockerd; .ci/run does): "
            + (info.stderr.strip().splitlines() or ["?"])[-1]
        )
    compose = compose_command()
    if compose is None:
        pytest.skip("container tests: neither `docker compose` nor `docker-compose` is installed")
    missing, standins = [], []
    for image in BASE_IMAGES:
        found = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if found.returncode != 0:
            missing.append(image)
        elif STANDIN_LABEL in (json.loads(found.stdout) or {}):
            standins.append(image)
    if missing:
        pytest.skip(
            f"container tests: base images not present locally: {', '.join(missing)} (nothing "
            "is pulled; `docker pull` them, or build stand-ins with deploy/standin-images.sh)"
        )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if standins and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # said in the run's output, not captured
            reporter.write_line(
                f"\ncontainer tests: STAND-IN base images (not the registry's): "
                f"{', '.join(standins)} (label {STANDIN_LABEL}, deploy/standin-images.sh)"
            )
    return Docker(compose, tuple(standins))


@pytest.fixture(scope="session")
def image(docker: Docker) -> str:
    """The image built from the Dockerfile as it is (base images local, never pulled)."""
    label = "org.trio-gateway.container-test=1"
    run(["docker", "build", "--pull=false", "--label", label, "-t", IMAGE, "."], timeout=900)
    # The image this build replaced is left untagged: remove it (ours only, by the label), so
    # repeated runs do not fill the disk. The build cache stays.
    run(["docker", "image", "prune", "--force", "--filter", f"label={label}"], check=False)
    return IMAGE


@pytest.fixture
def name() -> str:
    """A name for this test's containers, networks and compose project."""
    return f"tgtest{os.getpid()}{uuid.uuid4().hex[:6]}"


@contextmanager
def removed_afterwards(containers: list[str], networks: list[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for container in containers:
            run(["docker", "rm", "-f", "-v", container], check=False, timeout=60)
        for network in networks:
            run(["docker", "network", "rm", network], check=False, timeout=60)


# --- WebSocket clients -----------------------------------------------------------------------


@asynccontextmanager
async def session_socket(
    port: int, session_id: str, token: str | None = None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A v2 session socket on a published loopback port; the token as a subprotocol entry."""
    subprotocols = [V2] + ([f"bearer.{token}"] if token else [])
    async with trio_websocket.open_websocket_url(
        f"ws://127.0.0.1:{port}/api/v1/ws/{session_id}",
        subprotocols=subprotocols,
        connect_timeout=30,
        disconnect_timeout=10,
    ) as ws:
        yield ws


async def send(ws: trio_websocket.WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(frame).decode())  # a text frame: JSON is text


async def recv(ws: trio_websocket.WebSocketConnection, timeout: float = 30) -> dict[str, Any]:
    with trio.fail_after(timeout):
        value = orjson.loads(await ws.get_message())
    assert isinstance(value, dict)
    return value


async def until(
    ws: trio_websocket.WebSocketConnection, frame_type: str, timeout: float = 30
) -> list[dict[str, Any]]:
    """Frames up to and including the first of ``frame_type``."""
    frames = []
    with trio.fail_after(timeout):
        while True:
            frames.append(await recv(ws, timeout))
            if frames[-1].get("type") == frame_type:
                return frames


async def close_code_of(ws: trio_websocket.WebSocketConnection, timeout: float) -> tuple[int, int]:
    """Read until the server closes: (close code, frames read meanwhile)."""
    frames = 0
    with trio.fail_after(timeout):
        while True:
            try:
                await ws.get_message()
                frames += 1
            except trio_websocket.ConnectionClosed as closed:
                return close_code(closed), frames


def tokens(frames: list[dict[str, Any]]) -> str:
    return "".join(
        f.get("token") or ""
        for f in frames
        if f.get("type") == "assistant_message" and f.get("is_final") is False
    )


# --- the image -------------------------------------------------------------------------------


def test_the_image_has_no_pip_runs_as_uid_10001_and_exposes_no_fixed_port(image: str) -> None:
    config = inspect(image)["Config"]
    assert config["User"] == "gateway"
    assert not config.get("ExposedPorts"), "the port is configuration; compose declares it"
    assert config["Cmd"] == ["trio-gateway", "serve"] and not config.get("Entrypoint")
    assert "trio-gateway-healthcheck" in " ".join(config["Healthcheck"]["Test"])
    probe = (
        "import importlib.util as u, os, sys; "
        "print(os.getuid(), os.getgid(), sys.prefix, "
        "[m for m in ('pip', 'setuptools', 'wheel', '_distutils_hack') if u.find_spec(m)], "
        "sorted(n for n in os.listdir(sys.prefix + '/bin') if n.startswith(('pip', 'easy'))))"
    )
    out = run(["docker", "run", "--rm", "--network", "none", image, "python", "-c", probe])
    assert out.stdout.split(None, 3)[:3] == ["10001", "10001", "/opt/venv"], out.stdout
    assert out.stdout.strip().endswith("[] []"), f"build tools left in the venv: {out.stdout}"
    # The project itself is there and importable.
    run(["docker", "run", "--rm", "--network", "none", image, "trio-gateway", "--help"])


async def test_a_read_only_container_without_capabilities_is_healthy_and_drains_on_sigterm(
    image: str, name: str
) -> None:
    network, runtime, gateway = name, f"{name}-runtime", f"{name}-gateway"
    with removed_afterwards([gateway, runtime], [network]):
        run(["docker", "network", "create", network])
        hardened = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        key = f"GATEWAY__INTERNAL_API_KEY={INTERNAL_KEY}"
        runtime_command = ["trio-gateway", "demo-runtime", "--host", "0.0.0.0", "--port", "8001"]
        on_network = ["docker", "run", "-d", "--network", network, *hardened]
        run(
            [
                *on_network,
                "--name",
                runtime,
                "--network-alias",
                "runtime",
                "-e",
                key,
                image,
                *runtime_command,
            ]
        )
        settings = {
            "GATEWAY__INTERNAL_API_KEY": INTERNAL_KEY,
            "GATEWAY__AGENT_URL": "http://runtime:8001",
            "GATEWAY__USE_JWT_AUTH": "false",
            "GATEWAY__DRAIN_TIMEOUT": "20",
        }
        env_args = [arg for item in settings.items() for arg in ("-e", "=".join(item))]
        run([*on_network, "--name", gateway, "-p", "127.0.0.1::8000", *env_args, image])
        await trio.to_thread.run_sync(wait_healthy, gateway)
        port = host_port(run(["docker", "port", gateway, "8000"]).stdout)
        state = inspect(gateway)
        assert state["HostConfig"]["ReadonlyRootfs"] is True
        assert state["HostConfig"]["CapDrop"] == ["ALL"]
        top = run(["docker", "exec", gateway, "python", "-c", "import os; print(os.getuid())"])
        assert top.stdout.strip() == "10001"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as h:
            assert (await h.get("/health")).status_code == 200
            assert (await h.get("/api/v1/health")).status_code == 200

        # A session mid-turn (about 3 s of paced tokens) when SIGTERM comes: the turn runs
        # to its end, then the client gets 1012, and the container exits 0.
        async with session_socket(port, "drain-me") as ws:
            assert (await recv(ws))["type"] == "session_ready"
            await send(ws, {"type": "user_message", "content": "bench 60 20"})
            frames = [await recv(ws) for _ in range(8)]
            stopped_at = time.monotonic()
            run(["docker", "kill", "--signal", "TERM", gateway])
            try:
                while True:
                    frames.append(await recv(ws))
            except trio_websocket.ConnectionClosed as closed:
                code = close_code(closed)
        assert code == 1012, "the client is told the gateway restarts"
        assert tokens(frames) == "".join(f"t{i} " for i in range(60)), "the turn ran to its end"
        final = await trio.to_thread.run_sync(wait_exited, gateway, 40)
        assert final["ExitCode"] == 0
        assert time.monotonic() - stopped_at < 30, "drained within the drain timeout"
        output = run(["docker", "logs", gateway])
        logs = output.stdout + output.stderr
        assert "drain complete" in logs
        # The healthcheck probed every 10 s; its successful probes are not access-logged.
        answered = access_paths(logs, answered_only=True)
        assert answered.count("/health") == 1, answered  # this test's own GET /health


# --- compose ---------------------------------------------------------------------------------


@dataclass
class Stack:
    """A compose project from a test copy of docker-compose.yml."""

    command: list[str]
    project: str
    file: Path
    env: dict[str, str]

    def argv(self, *args: str) -> list[str]:
        return [*self.command, "-p", self.project, "-f", str(self.file), *args]

    def __call__(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        done = run(
            self.argv(*args),
            timeout=timeout,
            check=check,
            env=self.env,
        )
        return done.stdout + done.stderr

    def container(self, service: str) -> str:
        ids = self("ps", "-a", "-q", service).split()
        assert ids, f"no container for {service}"
        return ids[0]

    def port(self, service: str, container_port: int) -> int:
        return host_port(self("port", service, str(container_port)))

    def token(self) -> str:
        token = run(self.argv("exec", "-T", "issuer", "trio-gateway", "token")).stdout.strip()
        assert token.count(".") == 2, token
        return token

    def up(self, *services: str, profile: str | None = None) -> None:
        no_pull = ["--pull", "never"] if self.command == ["docker", "compose"] else []
        profiles = ["--profile", profile] if profile else []
        run(self.argv(*profiles, "up", "-d", "--no-build", *no_pull, *services), timeout=240)


def compose_file_for_tests(tmp_path: Path, image: str) -> Path:
    """docker-compose.yml with the test image, Docker-chosen loopback ports, absolute mounts."""
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for spec in document["services"].values():
        if spec.get("image") == "trio-gateway:local":
            spec["image"] = image
            spec.pop("build", None)
        ports = []
        for mapping in spec.get("ports", []):
            host, _, container = str(mapping).rpartition(":")
            assert host.startswith("127.0.0.1:"), f"{mapping}: published beyond loopback"
            ports.append(f"127.0.0.1::{container}")
        if ports:
            spec["ports"] = ports
        if "volumes" in spec:
            spec["volumes"] = [
                f"{ROOT}/{volume[2:]}" if volume.startswith("./") else volume
                for volume in spec["volumes"]
            ]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def stack(docker: Docker, image: str, tmp_path: Path, name: str) -> Iterator[Stack]:
    project = Stack(docker.compose, name, compose_file_for_tests(tmp_path, image), {})
    try:
        yield project
    finally:
        for profile_args in (["--profile", "replicas"], []):
            down = project.argv(*profile_args, "down", "-v", "--remove-orphans", "--timeout", "10")
            run(down, check=False, timeout=180)


async def test_the_compose_stack_serves_a_token_rest_and_a_websocket_turn(stack: Stack) -> None:
    stack.up()
    gateway = stack.container("gateway")
    await trio.to_thread.run_sync(wait_healthy, gateway)
    port = stack.port("gateway", 8000)
    # Each service shows the port it listens on, not the image's.
    for service, ports in (("issuer", {"8002/tcp"}), ("runtime", {"8001/tcp"})):
        assert set(inspect(stack.container(service))["Config"]["ExposedPorts"]) == ports

    token = stack.token()  # `docker compose exec -T issuer trio-gateway token`
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        assert (await http.get("/api/v1/agents")).status_code == 401
        agents = await http.get("/api/v1/agents", headers={"Authorization": f"Bearer {token}"})
        assert agents.status_code == 200, agents.text
    async with session_socket(port, "compose-turn", token) as ws:
        assert (await recv(ws))["type"] == "session_ready"
        await send(ws, {"type": "user_message", "content": "bench 5"})
        frames = await until(ws, "turn_finished")
    assert tokens(frames) == "t0 t1 t2 t3 t4 "

    # Prometheus on the compose network can scrape /metrics (GATEWAY__METRICS_ALLOW).
    scrape = (
        "import urllib.request as r; "
        "print(r.urlopen('http://gateway:8000/metrics', timeout=5).status)"
    )
    assert stack("exec", "-T", "runtime", "python", "-c", scrape).strip().endswith("200")
    check = stack("exec", "-T", "gateway", "trio-gateway", "check")
    assert "verdict: OK" in check, check
    # Docker probed at least once (the container is healthy); no probe was access-logged.
    logs = stack("logs", "--no-color", "gateway")
    assert "/api/v1/agents" in access_paths(logs) and "/health" not in access_paths(logs)

    # A bad configuration: the service ends exited with status 2 and says why.
    stack.env = {"GATEWAY__INTERNAL_API_KEY": "short"}
    stack("up", "-d", "--no-build", "--no-deps", "--force-recreate", "runtime", timeout=120)
    runtime = stack.container("runtime")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = inspect(runtime)
        if state["State"]["Status"] == "exited" and state["RestartCount"] >= 3:
            break
        await trio.sleep(0.3)
    assert state["State"]["Status"] == "exited" and state["State"]["ExitCode"] == 2, state["State"]
    assert state["RestartCount"] == 3, "restart: on-failure:3, then it stays exited"
    listing = stack("ps", "-a", "runtime")
    assert re.search(r"Exit 2|exited \(2\)", listing), listing
    said = stack("logs", "--no-color", "runtime")
    assert "invalid configuration" in said and "GATEWAY__INTERNAL_API_KEY" in said, said


def holder(stack: Stack, session_id: str, replicas: tuple[str, ...]) -> str:
    """The replica whose log shows the session's WebSocket connecting."""
    found = []
    for replica in replicas:
        logs = stack("logs", "--no-color", replica)
        if any(session_id in line and "ws_connected" in line for line in logs.splitlines()):
            found.append(replica)
    assert len(found) >= 1, f"{session_id} is in no replica's log"
    return found[-1]


async def test_replicas_resume_through_nginx_and_a_stopped_stack_drains_in_seconds(
    stack: Stack,
) -> None:
    replicas = ("gateway-1", "gateway-2")
    stack.up(*replicas, "nginx", profile="replicas")
    for replica in replicas:
        await trio.to_thread.run_sync(wait_healthy, stack.container(replica))
    port = stack.port("nginx", 8080)
    token = stack.token()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        agents = await http.get("/api/v1/agents", headers={"Authorization": f"Bearer {token}"})
        assert agents.status_code == 200, agents.text
        assert (await http.get("/metrics")).status_code == 404, "not for the public port"

    # A session through nginx, one turn; then its replica is stopped (drain: 1012).
    async with session_socket(port, "replica-resume", token) as ws:
        assert (await recv(ws))["type"] == "session_ready"
        await send(ws, {"type": "user_message", "content": "bench 4"})
        first = await until(ws, "turn_finished")
        last_seq = max(f["seq"] for f in first if "seq" in f)
        stopped = holder(stack, "replica-resume", replicas)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.to_thread.run_sync,
                lambda: stack("stop", "--timeout", "40", stopped, timeout=60),
            )
            code, _ = await close_code_of(ws, 30)
        assert code == 1012
    # Reconnect through nginx: the other replica resumes the session from Redis.
    async with session_socket(port, "replica-resume", token) as ws:
        ready = await recv(ws)
        assert ready["type"] == "session_ready" and ready["last_seq"] == last_seq, ready
        await send(ws, {"type": "resume", "last_seq": last_seq})
        assert (await until(ws, "resumed"))[-1]["type"] == "resumed"
        await send(ws, {"type": "user_message", "content": "bench 3"})
        second = await until(ws, "turn_finished")
        assert tokens(second) == "t0 t1 t2 "
        assert min(f["seq"] for f in second if "seq" in f) == last_seq + 1, "no gap, no repeat"
    (other,) = set(replicas) - {stopped}
    assert holder(stack, "replica-resume", (other,)) == other
    stack("start", stopped)
    await trio.to_thread.run_sync(wait_healthy, stack.container(stopped))

    # Stopping the whole stack with sessions open (one mid-turn): every client gets 1012 and
    # the stack is down in seconds (the replicas stop first, nginx after them).
    codes: list[int] = []
    async with trio.open_nursery() as nursery:
        sockets = []
        for index in range(4):
            ws = await nursery.start(_held_session, port, f"stop-{index}", token, codes)
            sockets.append(ws)
        await send(sockets[0], {"type": "user_message", "content": "bench 40 20"})
        await trio.sleep(0.5)
        started = time.monotonic()
        await trio.to_thread.run_sync(
            lambda: stack("--profile", "replicas", "stop", "--timeout", "40", timeout=120)
        )
        took = time.monotonic() - started
    assert codes == [1012] * 4, codes
    assert took < 20, f"the stack took {took:.1f} s to stop"
    finished = {
        service: inspect(stack.container(service))["State"] for service in (*replicas, "nginx")
    }
    for service, state in finished.items():
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (service, state)
    last_replica = max(finished[r]["FinishedAt"] for r in replicas)
    assert finished["nginx"]["FinishedAt"] > last_replica, "nginx stops after the replicas"


async def _held_session(
    port: int,
    session_id: str,
    token: str,
    codes: list[int],
    task_status: trio.TaskStatus[trio_websocket.WebSocketConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with session_socket(port, session_id, token) as ws:
        assert (await recv(ws))["type"] == "session_ready"
        task_status.started(ws)
        code, _ = await close_code_of(ws, 60)
        codes.append(code)
