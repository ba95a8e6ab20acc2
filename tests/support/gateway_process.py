"""A gateway in a process of its own, for tests that measure the gateway alone (its RSS).

``python -m tests.support.gateway_process '<settings as JSON>'`` serves on 127.0.0.1, port 0, prints
``PORT <n>`` once it listens, and drains and exits on SIGTERM/SIGINT like ``trio-gateway serve``.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from typing import Any

import trio

from trio_gateway.app import create_app
from trio_gateway.server import serve
from trio_gateway.settings import Settings


async def main(values: dict[str, Any]) -> None:
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    app = create_app(settings)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, settings, host="127.0.0.1", port=0))
        print("PORT", binds[0].rsplit(":", 1)[1], flush=True)


def resident_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in bytes: its resident set now and at its peak."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
