"""Running a benchmark script, written once: progress on stderr, the environment a run is tied
to (load averages, the gateway sources' digest), failures and the exit status (0, 1 when the
benchmark itself failed, 130 when interrupted), SIGTERM handled as Ctrl-C, figure tables, the
``--json FILE`` option and ``--baseline REF`` unpacking.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import trio

from tests.support.processes import ChildError

ROOT = Path(__file__).resolve().parent.parent

# One exception for "the benchmark itself failed" (wrong text, an error frame, a timeout, a
# child that died or never became healthy): the child launcher shared with the tests raises
# ChildError, the benchmarks' own checks raise it under this name, and every handler of a
# benchmark catches both.
BenchError = ChildError


# ------------------------------------------------------------------------------------------------
# Reports: tables, the environment of a run, errors
# ------------------------------------------------------------------------------------------------


def table(rows: Sequence[tuple[str, str]]) -> str:
    """Two columns, names padded to the longest: the figure tables every script prints."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def write_json(path: Path | None, result: object, **computed: object) -> None:
    """Write ``result`` (a dataclass) and its ``computed`` figures (its properties) to ``path``
    as JSON, when a path was given (``--json FILE``): what the short tests read back."""
    if path is None:
        return
    figures = orjson.loads(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS))
    figures.update(computed)
    path.write_bytes(orjson.dumps(figures, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2))


def log(text: str) -> None:
    """Progress to stderr (stdout carries the figures)."""
    print(text, file=sys.stderr, flush=True)


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as the kernel prints them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def gateway_sources_digest() -> str:
    """SHA-256 over the gateway package's ``.py`` files, to tie the figures to a code version
    (the package is installed editable; this script does not run git)."""
    spec = importlib.util.find_spec("trio_gateway")
    if spec is None or not spec.submodule_search_locations:
        return "unknown"
    package = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256()
    # Every subpackage too (session/, edge/...): a change anywhere changes the figures' tie.
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def leaves(error: BaseException) -> Iterator[BaseException]:
    """Every exception inside ``error``'s groups (``error`` itself when it is no group)."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


def interrupted(error: BaseException) -> bool:
    """Whether a Ctrl-C is among ``error``'s leaves."""
    return any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves(error))


def describe(leaf: BaseException) -> str:
    """One line for a failure: what it was and its message."""
    if isinstance(leaf, trio.TooSlowError):
        return "timed out (a trio.fail_after bound expired)"
    return f"{type(leaf).__name__}: {leaf}"


# ------------------------------------------------------------------------------------------------
# The command line: --json, exit status, signals, the environment of a run
# ------------------------------------------------------------------------------------------------


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json FILE``: also write the figures to FILE (what the short tests read back)."""
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")


def failure_status(script: str, error: BaseException) -> int:
    """The exit status of a run that raised ``error``, said on stderr: 130 when interrupted,
    else 1 with one line per failure (a ``SystemExit`` goes on up)."""
    if interrupted(error):
        print(f"{script}: interrupted", file=sys.stderr)
        return 130
    if isinstance(error, SystemExit):
        raise error
    failures = "\n".join(f"  {describe(leaf)}" for leaf in leaves(error))
    print(f"{script}: FAILED\n{failures}", file=sys.stderr)
    return 1


def run_and_write_json(run: Callable[[], dict[str, Any]], path: Path | None) -> int:
    """Run a paired comparison (it prints its own table); write its summary to ``path`` if
    given. 0, or 1 when the benchmark failed."""
    try:
        summary = run()
    except BenchError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    if path is not None:
        path.write_text(json.dumps(summary, indent=2))
    return 0


def sigterm_as_interrupt() -> None:
    """Make SIGTERM unwind exactly like Ctrl-C (trio delivers SIGINT at a safe point), so the
    children are stopped by the same finally blocks.

    A background job of a non-interactive shell starts with SIGINT ignored, which would make
    both signals no-ops (and trio installs its handler only over the default one): restore it.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: signal.raise_signal(signal.SIGINT))


def run_environment(**extra: Any) -> dict[str, Any]:
    """What a run's figures are tied to, taken at its start: python, CPUs, load average, the
    gateway sources' digest, then ``extra``; :func:`finish_environment` adds the end."""
    return {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "gateway_sources_sha256": gateway_sources_digest(),
        **extra,
    }


def finish_environment(environment: dict[str, Any]) -> None:
    """Add the load average at the end and whether the gateway sources changed meanwhile."""
    environment["loadavg_end"] = loadavg()
    environment["sources_unchanged"] = (
        gateway_sources_digest() == environment["gateway_sources_sha256"]
    )


def environment_lines(title: str, environment: dict[str, Any]) -> list[str]:
    """The first two lines of a report: ``title`` with the machine, then the sources' digest."""
    env = environment
    return [
        f"{title}python {env['python']}, {env['cpus']} CPUs, load average "
        f"{env['loadavg_start']} at start, {env['loadavg_end']} at end",
        f"gateway sources sha256 {env['gateway_sources_sha256'][:12]}"
        + ("" if env["sources_unchanged"] else "  (WARNING: they changed during the run)"),
    ]


# ------------------------------------------------------------------------------------------------
# --baseline REF: another commit's gateway package
# ------------------------------------------------------------------------------------------------


@contextmanager
def baseline_tree(ref: str, prefix: str = "bench-base-") -> Iterator[Path]:
    """The ``trio_gateway`` package of commit ``ref``, unpacked into a temporary directory."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "trio_gateway"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)
