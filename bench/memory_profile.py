"""Where an idle WebSocket session's memory goes: a gateway in this process, traced.

Run ``python bench/memory_profile.py`` (300 idle sessions, about 15 s) or ``--sessions N``;
``--lines`` also lists the top allocation sites by line. ``relay_bench.py --memory-only``
measures the RSS per idle session of a real ``trio-gateway serve``; this script says what it is
made of, the way ``docs/performance.md`` ("Idle memory") reports it.

What it does
------------
A gateway (JWT off, per-user caps lifted, runtime unreachable: idle sessions never call it) is
served by hypercorn in this process on a loopback port. A child process opens ``--sessions``
v1 WebSockets (distinct session ids, 100 handshakes at a time) and holds them open, after a
warm-up of 50 sessions opened and closed. Before and after (each after a 2 s settle and a full
garbage collection) it takes a ``tracemalloc`` snapshot, counts live objects by type
(``gc.get_objects()``) and live trio tasks by name, and prints the differences per session:
bytes by file, objects by type, tasks by name.
"""

from __future__ import annotations

import argparse
import gc
import re
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import trio

if __package__ in (None, ""):  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import UNLIMITED_USER
from tests.support.gateway import gateway_settings, run_gateway
from tests.support.task_tree import task_names

WARM_UP_SESSIONS = 50
SETTLE_SECONDS = 2.0

# The client side, run in a child so that its sockets and tasks are not counted here.
CLIENT = """
import sys, trio, trio_websocket

async def main(port: int, count: int) -> None:
    opened = 0
    all_open = trio.Event()
    async with trio.open_nursery() as nursery:
        handshakes = trio.Semaphore(100)

        async def hold(index: int) -> None:
            nonlocal opened
            async with handshakes:
                await trio_websocket.connect_websocket_url(
                    nursery, f"ws://127.0.0.1:{port}/api/v1/ws/idle-{index}"
                )
            opened += 1
            if opened == count:
                all_open.set()
            await trio.sleep_forever()

        for index in range(count):
            nursery.start_soon(hold, index)
        await all_open.wait()
        print("open", flush=True)
        await trio.sleep_forever()

trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
"""


def short_path(filename: str) -> str:
    """A traced file name without the interpreter's or the checkout's prefix."""
    checkout = str(Path(__file__).resolve().parent.parent) + "/"
    return re.sub(r"^.*/lib/python3\.\d+/(site-packages/)?", "", filename).replace(checkout, "")


def live_tasks() -> Counter[str]:
    """Live trio tasks of this process by short name."""
    return Counter(name.rsplit(".", 1)[-1] for name in task_names(lambda _: True))


def live_objects() -> Counter[str]:
    """Objects the garbage collector tracks, by type name."""
    return Counter(type(thing).__name__ for thing in gc.get_objects())


async def open_clients(port: int, count: int) -> trio.Process:
    """A child holding ``count`` idle sessions open (returns once all are open)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLIENT, str(port), str(count)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    with trio.fail_after(120):
        if not (await process.stdout.receive_some()).startswith(b"open"):
            raise RuntimeError("the client process failed to open its sessions")
    return process


async def profile(sessions: int, lines: bool) -> None:
    """Serve a gateway, hold ``sessions`` idle sessions against it, print what they cost."""
    caps = {k: float(v) if "per_second" in k else int(v) for k, v in UNLIMITED_USER.items()}
    settings = gateway_settings("http://127.0.0.1:9", session_grace_seconds=30.0, **caps)
    async with trio.open_nursery() as nursery, run_gateway(nursery, settings) as gateway:
        port = int(gateway.base_url.rsplit(":", 1)[1])
        warm_up = await open_clients(port, WARM_UP_SESSIONS)
        warm_up.kill()
        await warm_up.wait()
        await trio.sleep(SETTLE_SECONDS)
        gc.collect()
        tasks_before, objects_before = live_tasks(), live_objects()
        before = tracemalloc.take_snapshot()
        clients = await open_clients(port, sessions)
        try:
            await trio.sleep(SETTLE_SECONDS)
            gc.collect()
            tasks_after, objects_after = live_tasks(), live_objects()
            after = tracemalloc.take_snapshot()
        finally:
            clients.kill()
            await clients.wait()
        by_file = after.compare_to(before, "filename")
        traced = sum(stat.size_diff for stat in by_file) / sessions
        print(f"{sessions} idle sessions: {traced / 1024:.2f} KiB traced per session")
        print("bytes per session by file (top 25):")
        for stat in by_file[:25]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / sessions:7.0f} B  {short_path(frame.filename)}")
        if lines:
            print("bytes per session by line (top 40):")
            for stat in after.compare_to(before, "lineno")[:40]:
                frame = stat.traceback[0]
                where = f"{short_path(frame.filename)}:{frame.lineno}"
                print(f"  {stat.size_diff / sessions:7.0f} B  {where}")
        tasks = {
            name: round((tasks_after[name] - tasks_before[name]) / sessions, 2)
            for name in tasks_after
            if tasks_after[name] - tasks_before[name] >= sessions / 2
        }
        print("tasks per session:", tasks)
        objects = objects_after - objects_before
        total = (objects_after.total() - objects_before.total()) / sessions
        print(f"objects per session: {total:.0f}; by type (at least one per two sessions):")
        common = [(name, count / sessions) for name, count in objects.most_common()]
        print("  " + ", ".join(f"{name} {share:.1f}" for name, share in common if share >= 0.5))
        gateway.stop.set()


def main() -> int:
    """Parse the options, run the profile, print it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300, help="idle sessions (300)")
    parser.add_argument("--lines", action="store_true", help="also list allocation sites")
    args = parser.parse_args()
    tracemalloc.start(1)
    trio.run(profile, args.sessions, args.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
