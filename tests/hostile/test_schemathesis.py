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
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support.processes import child_env, spawned, wait_until_serving_sync

ST = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
pytestmark = pytest.mark.skipif(ST is None, reason="schemathesis (st) is not installed")
KEY = "schemathesis-internal-key-0123456789"
CHECKS = (
    "not_a_server_error,response_schema_conformance,status_code_conformance,"
    "content_type_conformance"
)


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("schemathesis")
    env = child_env(KEY, log_format="json", access_log="false")
    with spawned("runtime", ["demo-runtime", "--instant"], env, workdir) as runtime:
        wait_until_serving_sync(runtime.url)
        gateway_env = child_env(
            KEY,
            log_format="json",
            access_log="false",
            agent_url=runtime.url,
            rest_requests_per_second="100000",
            rest_request_burst="1000000",
        )
        with spawned("gateway", ["serve"], gateway_env, workdir) as gateway:
            wait_until_serving_sync(gateway.url)
            yield gateway.url


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
