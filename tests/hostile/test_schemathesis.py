"""schemathesis against ``/openapi.json`` of a running gateway.

Run as the schemathesis CLI (``st run``) in a subprocess against a gateway subprocess
(``trio-gateway serve``, JWT off) in front of a demo runtime subprocess
(``trio-gateway demo-runtime``): schemathesis' pytest plugin and pytest-trio both want to own
the test function, and a CLI run against real processes is also what an operator would do.
Checks: no 5xx from the gateway (``not_a_server_error``), answers that conform to the
documented schemas, statuses and content types. Skipped when schemathesis is not installed.

Default run: a few examples per operation (fuzzing phase only); ``-m slow`` runs every phase
with ``FUZZ_EXAMPLES`` (default 100) examples per operation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ST = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
pytestmark = pytest.mark.skipif(ST is None, reason="schemathesis (st) is not installed")
KEY = "schemathesis-internal-key-0123456789"
CHECKS = (
    "not_a_server_error,response_schema_conformance,status_code_conformance,"
    "content_type_conformance"
)


def _start(args: list[str], env: dict[str, str], pattern: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``trio-gateway ARGS``; wait (bounded) for a line matching ``pattern``."""
    command = [sys.executable, "-c", "import sys; from trio_gateway.cli import main; main()", *args]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:  # ends at EOF if the process dies
        lines.append(line)
        found = re.search(pattern, line)
        if found:
            return process, found.group(1)
        if len(lines) > 200:
            break
    process.kill()
    raise AssertionError(f"{args[0]} did not start: {''.join(lines)[-2000:]}")


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    env = {
        **os.environ,
        "GATEWAY__INTERNAL_API_KEY": KEY,
        "GATEWAY__LOG_FORMAT": "json",
        "GATEWAY__ACCESS_LOG": "false",
    }
    runtime, runtime_url = _start(
        ["demo-runtime", "--host", "127.0.0.1", "--port", "0", "--instant"],
        env,
        r"demo runtime serving on (http://127\.0\.0\.1:\d+)",
    )
    try:
        gateway_env = {
            **env,
            "GATEWAY__AGENT_URL": runtime_url,
            "GATEWAY__USE_JWT_AUTH": "false",
            "GATEWAY__REST_REQUESTS_PER_SECOND": "100000",
            "GATEWAY__REST_REQUEST_BURST": "1000000",
        }
        gateway, url = _start(
            ["serve", "--host", "127.0.0.1", "--port", "0"],
            gateway_env,
            r"serving on (http://127\.0\.0\.1:\d+)",
        )
        try:
            yield url
        finally:
            _stop(gateway)
    finally:
        _stop(runtime)


def run_schemathesis(url: str, examples: int, phases: str, timeout: float = 850) -> None:
    assert ST is not None
    command = [
        ST, "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples", str(examples),
        "--phases", phases, "--seed", "1", "--no-color", "--request-timeout", "30",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1"},
    )
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    assert "generated" in summary, summary


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(gateway_url: str) -> None:
    run_schemathesis(gateway_url, 5, "examples,fuzzing", timeout=100)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_schemathesis_long(gateway_url: str) -> None:
    examples = int(os.environ.get("FUZZ_EXAMPLES", "100"))
    run_schemathesis(gateway_url, examples, "examples,coverage,fuzzing,stateful")
