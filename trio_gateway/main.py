"""ASGI entry for ``hypercorn -k trio trio_gateway.main:app``, configured from the environment.

Prefer ``trio-gateway serve``: plain hypercorn does not drain sessions on SIGTERM and needs its
own flags for pings, read timeout and message size (see README).

A bad configuration stops the process with the settings' message and a non-zero exit status.
Under hypercorn's worker processes that takes one extra step: hypercorn 0.18's supervisor loses
a worker's exit status (``run.py`` reads it, then overwrites it with a second
``_join_exited`` over the emptied worker list), so a worker that can never start would end in
exit status 0, which an orchestrator reads as a clean stop. See :func:`exit_bad_configuration`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from . import hypercorn_patches
from .app import create_app
from .observability import configure_logging
from .server import tune_gc
from .settings import SettingsError, load_settings, unknown_variables

#: Exit status of a process whose configuration is invalid (as ``trio-gateway serve``).
EXIT_BAD_CONFIG = 2
#: What stops hypercorn's supervisor when its worker cannot start: hypercorn handles SIGINT,
#: SIGTERM, SIGHUP and SIGBREAK (all of which end in status 0 or a restart) but not SIGUSR1,
#: whose default action terminates the process: status 128 + 10 = 138 in a shell or Docker.
SUPERVISOR_STOP_SIGNAL = signal.SIGUSR1


def hypercorn_supervisor_pid() -> int | None:
    """The pid of the hypercorn supervisor that spawned this process, or None.

    Only a ``multiprocessing`` child whose parent runs the hypercorn command (``hypercorn ...``
    or ``python -m hypercorn ...``) has one: any other parent (a test runner, gunicorn, a
    ``python -c`` importing this module) is never signalled.
    """
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None or parent.pid != os.getppid():
        return None
    try:
        argv = Path(f"/proc/{parent.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        # No /proc (macOS): hypercorn's console script is the spawned child's __mp_main__.
        main = sys.modules.get("__mp_main__")
        script = getattr(main, "__file__", None) or ""
        return parent.pid if Path(script).name == "hypercorn" else None
    # [python, .../bin/hypercorn, ...], [.../bin/hypercorn, ...] or [python, -m, hypercorn, ...]
    words = [os.path.basename(arg.decode(errors="replace")) for arg in argv[:3]]
    runs_hypercorn = "hypercorn" in words[:2] or words[1:3] == ["-m", "hypercorn"]
    return parent.pid if runs_hypercorn else None


def exit_bad_configuration(message: str) -> NoReturn:
    """Print ``message`` and end the process with :data:`EXIT_BAD_CONFIG`.

    In a hypercorn worker, the supervisor is stopped first with
    :data:`SUPERVISOR_STOP_SIGNAL`, because it would turn this worker's failure into exit
    status 0 (see the module docstring). Every worker of a ``-w N`` run reads the same
    environment and fails the same way, so no healthy worker is orphaned.
    """
    print(message, file=sys.stderr, flush=True)
    supervisor = hypercorn_supervisor_pid()
    if supervisor == 1:
        # PID 1 of a container: the kernel drops signals it has no handler for.
        print(
            "trio-gateway: hypercorn runs as PID 1 and will exit with status 0 anyway (its "
            "supervisor loses the worker's status); run `trio-gateway serve`, or hypercorn "
            "under an init (docker run --init)",
            file=sys.stderr,
            flush=True,
        )
    elif supervisor is not None:
        os.kill(supervisor, SUPERVISOR_STOP_SIGNAL)
    sys.exit(EXIT_BAD_CONFIG)


try:
    _settings = load_settings()
except SettingsError as error:
    exit_bad_configuration(f"trio-gateway: {error}")

configure_logging(_settings.log_level, _settings.log_format)
for _name in unknown_variables():
    logging.getLogger("trio_gateway.server").warning(
        "unknown setting %s is ignored", _name, extra={"event": "unknown_setting"}
    )
# The same hypercorn fixes as `trio-gateway serve` (see hypercorn_patches.py).
hypercorn_patches.apply()
app = create_app(_settings)
# The same GC settings as `trio-gateway serve` (see server.tune_gc): hypercorn imports this
# module in each worker process, once, before serving.
tune_gc()
