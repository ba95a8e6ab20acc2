"""ASGI entry for ``hypercorn -k trio trio_gateway.main:app``, configured from the environment.

Prefer ``trio-gateway serve``: plain hypercorn does not drain sessions on SIGTERM and needs its
own flags for pings, read timeout and message size (see README).
"""

from __future__ import annotations

import logging
import sys

from . import hypercorn_patches
from .app import create_app
from .observability import configure_logging
from .server import tune_gc
from .settings import SettingsError, load_settings, unknown_variables

try:
    _settings = load_settings()
except SettingsError as error:  # pragma: no cover - exercised by the CLI tests
    sys.exit(f"trio-gateway: {error}")

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
