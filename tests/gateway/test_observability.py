"""Structured logs and Prometheus metrics, checked after real sessions."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import httpx
import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_gateway.observability import HEALTHCHECK_USER_AGENT, TextFormatter, configure_logging
from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import INTERNAL_KEY, GatewayWith, RunningGateway, gateway_settings, run_gateway


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_after_a_scripted_session(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        before = samples((await http.get("/metrics")).text)
        async with gateway.connect("metrics") as client:
            await client.send({"type": "user_message", "content": "bench 5"})
            await client.turn()
            await client.send("{bad json")
            await client.recv()
            await client.send({"type": "tool_result", "call_id": "call_nope", "result": 1})
            await client.recv()
        await http.get("/api/v1/agents")
        await trio.sleep(0.2)
        after = samples((await http.get("/metrics")).text)
    assert value(after, "gateway_websocket_connections_opened_total") == 1 + value(
        before, "gateway_websocket_connections_opened_total"
    )
    assert value(after, "gateway_frames_in_total", type="user_message") == 1
    assert value(after, "gateway_frames_in_total", type="invalid") == 1
    assert value(after, "gateway_frames_out_total", type="assistant_message") >= 2
    assert value(after, "gateway_turns_total", outcome="completed") == 1
    assert value(after, "gateway_turns_total", outcome="failed") == 1
    assert value(after, "gateway_runtime_stream_errors_total", kind="runtime_error") == 1
    assert value(after, "gateway_turn_duration_seconds_count") == 2
    assert value(after, "gateway_time_to_first_chunk_seconds_count") == 1
    assert value(after, "gateway_runtime_chunks_relayed_total") == 6
    assert (
        value(
            after, "gateway_rest_requests_total", route="/api/v1/agents", method="GET", status="200"
        )
        == 1
    )
    assert value(after, "gateway_rest_request_duration_seconds_count", route="/api/v1/agents") == 1
    assert (
        sum(
            v
            for (name, _), v in after.items()
            if name == "gateway_websocket_connections_closed_total"
        )
        == 1
    )
    assert value(after, "gateway_active_websockets") == 0
    # cardinality: no label ever carries a session id
    assert "metrics" not in str([labels for (_, labels) in after])


async def test_metrics_are_restricted_to_allowed_networks_or_the_internal_key(
    gateway_with: GatewayWith,
) -> None:
    async with gateway_with(metrics_allow="10.0.0.0/8") as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            refused = await http.get("/metrics")
            granted = await http.get("/metrics", headers={"X-Internal-Auth": INTERNAL_KEY})
            wrong = await http.get("/metrics", headers={"X-Internal-Auth": "guess"})
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert wrong.status_code == 403
    assert granted.status_code == 200 and "gateway_turns_total" in granted.text


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("INFO", "json", stream)
    yield stream
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


async def test_every_log_line_of_a_session_is_json_with_the_expected_keys(
    json_logs: io.StringIO, nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    settings = gateway_settings(demo_runtime[1], log_level="INFO")
    async with run_gateway(nursery, settings) as gw:
        async with gw.connect("logged") as client:
            await client.send({"type": "user_message", "content": "secret words here"})
            await client.turn()
            await client.send("{bad")
            await client.recv()
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            await http.get("/api/v1/agents", headers={"X-Request-ID": "req-42"})
    lines = [line for line in json_logs.getvalue().splitlines() if line]
    assert lines
    entries = [orjson.loads(line) for line in lines]  # every line parses
    for entry in entries:
        assert {"timestamp", "level", "logger", "message", "request_id", "session_id",
                "user"} <= entry.keys()  # fmt: skip
    session_events = {e.get("event") for e in entries if e["session_id"] == "logged"}
    assert {"ws_connected", "turn_finished", "frame_refused", "ws_closed"} <= session_events
    access = [e for e in entries if e.get("event") == "http_access"]
    assert any(e["path"] == "/api/v1/agents" and e["request_id"] == "req-42" for e in access)
    # frame payloads never reach the logs at INFO
    assert "secret words here" not in json_logs.getvalue()


async def test_the_healthchecks_successful_probes_stay_out_of_the_access_log(
    json_logs: io.StringIO, nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    probe = {"User-Agent": HEALTHCHECK_USER_AGENT}
    settings = gateway_settings(demo_runtime[1], log_level="INFO")
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            for _ in range(3):
                assert (await http.get("/health", headers=probe)).status_code == 200
            await http.get("/health", headers={"User-Agent": "curl/8"})
            await http.get("/health?x=1", headers=probe)
            await http.post("/health", headers=probe)  # 405: not a successful probe
    entries = [orjson.loads(line) for line in json_logs.getvalue().splitlines() if line]
    access = [e for e in entries if e.get("event") == "http_access" and e["path"] == "/health"]
    # The other caller, and the healthcheck's failing request, are logged; its three 200s
    # and the one with a query (also a 200 to the probe's agent) are not. (Lines with status
    # "-", which hypercorn adds when a client closes right after its answer, are not counted.)
    logged = [(e["method"], e["status"]) for e in access if e["status"] != "-"]
    assert sorted(logged) == [("GET", "200"), ("POST", "405")]


async def test_metrics_count_live_trio_tasks_so_a_soak_can_see_leaks(
    gateway: RunningGateway,
) -> None:
    async def tasks() -> float:
        async with httpx.AsyncClient(base_url=gateway.base_url) as http:
            text = (await http.get("/metrics")).text
        line = next(x for x in text.splitlines() if x.startswith("gateway_trio_tasks "))
        return float(line.split()[1])

    idle = await tasks()
    assert idle > 0
    async with gateway.connect("counted") as client:
        await client.send({"type": "user_message", "content": "bench 2"})
        await client.turn()
        assert await tasks() > idle  # the session's and the connection's tasks


async def get_and_hang_up(port: int, path: str) -> bytes:
    """GET ``path`` and close as soon as the whole answer is in, the way curl does."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            while len(body) < length:
                body += await stream.receive_some(65536)
    return head


async def test_access_lines_have_a_duration_and_one_line_per_request(
    json_logs: io.StringIO, nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    settings = gateway_settings(demo_runtime[1], log_level="INFO")
    async with run_gateway(nursery, settings) as gw:
        port = int(gw.base_url.rsplit(":", 1)[1])
        for n in range(20):
            assert b" 200 " in await get_and_hang_up(port, f"/health?n={n}")
            assert b" 200 " in await get_and_hang_up(port, f"/api/v1/agents?n={n}")
        await trio.sleep(0.2)
    entries = [orjson.loads(line) for line in json_logs.getvalue().splitlines() if line]
    access = [e for e in entries if e.get("event") == "http_access"]
    # One line per request, with its status: a client that hangs up right after reading the
    # answer must not add a second line without one.
    assert [e["status"] for e in access if e["path"] == "/health"] == ["200"] * 20
    assert [e["status"] for e in access if e["path"] == "/api/v1/agents"] == ["200"] * 20
    for entry in access:
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] >= 0, entry


def test_the_text_access_line_shows_the_duration_in_milliseconds() -> None:
    record = logging.LogRecord("hypercorn.access", logging.INFO, __file__, 1, "%(h)s", None, None)
    record.args = {"h": "127.0.0.1:5", "r": "GET /health?x=1 1.1", "s": "200", "D": 1234}
    assert "GET /health 200 1.234ms" in TextFormatter().format(record)
