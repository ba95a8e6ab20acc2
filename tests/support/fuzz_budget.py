"""The time and example budget of the hypothesis fuzz modules (``tests/hostile/test_fuzz*.py``),
written once: each module says ``pytestmark = FUZZ_MODULE_TIMEOUT`` and sizes its ``-m slow``
tests with ``SLOW_EXAMPLES``."""

from __future__ import annotations

import os

import pytest

# Dozens of hypothesis examples over real sockets: about a minute, but more than the suite's
# 120 s on a loaded machine (seen once on 3.13 in CI), where pytest-timeout's signal lands
# inside trio.run and leaves this thread unable to start another run, so every later test
# fails too. Each exchange is bounded on its own (trio.fail_after in
# tests/support/fuzzing_exchange.py), so a wedge still fails fast; this bounds only the sum.
FUZZ_MODULE_TIMEOUT = pytest.mark.timeout(300)

# Hypothesis examples of a ``-m slow`` (long) fuzz test: ``FUZZ_EXAMPLES``, 400 by default.
SLOW_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
