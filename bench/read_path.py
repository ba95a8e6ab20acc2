"""CPU per runtime event of the turn read path alone: this tree's RuntimeClient against a
baseline commit's, in one process, interleaved.

Run ``python bench/read_path.py`` (about 30 s); ``--baseline REF`` (default ``main``) picks the
commit to compare with, ``--events``/``--rounds`` the sizes. ``--events 1 --turns 300`` measures
the cost of a whole short turn instead (request, response head, one event, end), where the
baseline opens a new connection per turn and this tree reuses a pooled one.

What it measures: ``RuntimeClient.stream_turn`` reading one long turn from a loopback HTTP/1.1
server in the same process, one event per network read (the server sends the next event only
once the client has handed the previous one on, which is what a paced, uncoalescable stream
looks like to the gateway): socket read, HTTP/1.1 chunked parsing, SSE, JSON, the idle
deadline, down to the ``deliver`` callback (which does nothing). The figure is this thread's
CPU time (``time.thread_time``) per event; it includes the server's side (the same code for both
clients), so the *difference* is what the read path change saves per event. Rounds alternate
baseline / tree in one process, so both see the same machine; medians are reported.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h11
import orjson
import trio

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench.harness import baseline_tree  # noqa: E402
from tests.support.scripted_runtime import chunk  # noqa: E402

KEY = "read-path-bench-internal-key"


def event(index: int) -> bytes:
    """One event as today's runtime writes it for a paced bench token."""
    body = chunk(
        type="assistant_message",
        content=f"t{index} ",
        token=f"t{index} ",
        metadata={"emitted_ns": time.time_ns(), "index": index},
    )
    return b"data: " + orjson.dumps(body) + b"\n\n"


class LockstepServer:
    """Answers every turn with ``events`` SSE events, each sent only after the previous one was
    delivered (so each is one network read for the client); keeps connections alive unless the
    client asked to close."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.delivered: trio.MemorySendChannel[None]
        self._wait: trio.MemoryReceiveChannel[None]
        self.delivered, self._wait = trio.open_memory_channel(1)
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                while True:
                    incoming = connection.next_event()
                    if incoming is h11.NEED_DATA:
                        connection.receive_data(await stream.receive_some(65536))
                    elif isinstance(incoming, h11.EndOfMessage):
                        break
                    elif isinstance(incoming, h11.ConnectionClosed):
                        return
                head = h11.Response(
                    status_code=200,
                    headers=[
                        ("Content-Type", "text/event-stream"),
                        ("Transfer-Encoding", "chunked"),
                    ],
                )
                await stream.send_all(connection.send(head))
                for index in range(self.events):
                    await stream.send_all(connection.send(h11.Data(data=event(index))))
                    await self._wait.receive()
                await stream.send_all(connection.send(h11.EndOfMessage()))
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@contextmanager
def baseline_package(ref: str) -> Iterator[str]:
    """Commit ``ref``'s ``trio_gateway`` importable as ``trio_gateway_base``."""
    with baseline_tree(ref, "read-path-base-") as tmp:
        (tmp / "trio_gateway").rename(tmp / "trio_gateway_base")
        sys.path.insert(0, str(tmp))
        try:
            yield "trio_gateway_base"
        finally:
            sys.path.remove(str(tmp))


def make_client(package: str, port: int) -> Any:
    settings_module = importlib.import_module(f"{package}.settings")
    try:  # upstream/ since the package layout; a baseline commit may predate it
        client_module = importlib.import_module(f"{package}.upstream.runtime_client")
    except ModuleNotFoundError:
        client_module = importlib.import_module(f"{package}.runtime_client")
    settings = settings_module.Settings(
        _env_file=None, agent_url=f"http://127.0.0.1:{port}", internal_api_key=KEY
    )
    return client_module.RuntimeClient(settings)


async def bench(args: argparse.Namespace, packages: dict[str, str]) -> dict[str, list[float]]:
    server = LockstepServer(args.events)
    results: dict[str, list[float]] = {name: [] for name in packages}
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        clients = {name: make_client(package, server.port) for name, package in packages.items()}

        async def deliver(batch: list[dict[str, Any]], size: int) -> None:
            server.delivered.send_nowait(None)

        for client in clients.values():  # warm-up
            await client.stream_turn("s", {"type": "user_message", "content": "x"}, deliver)
        for _ in range(args.rounds):
            for name, client in clients.items():
                started = time.thread_time()
                for _ in range(args.turns):
                    relayed = await client.stream_turn(
                        "s", {"type": "user_message", "content": "x"}, deliver
                    )
                    assert relayed == args.events, (name, relayed)
                spent = time.thread_time() - started
                results[name].append(1e6 * spent / args.events / args.turns)
        nursery.cancel_scope.cancel()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main")
    parser.add_argument("--events", type=int, default=3000, help="events per turn")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--turns", type=int, default=1, help="turns per round (with --events 1: cost per turn)"
    )
    args = parser.parse_args(argv)
    with baseline_package(args.baseline) as base:
        results = trio.run(bench, args, {"baseline": base, "tree": "trio_gateway"})
    base_us, tree_us = (statistics.median(results[k]) for k in ("baseline", "tree"))
    print(f"read path, CPU per event incl. the in-process server ({args.rounds} rounds):")
    for name, values in results.items():
        print(
            f"  {name:8s} median {statistics.median(values):6.1f} us  runs "
            + " ".join(f"{v:.1f}" for v in values)
        )
    print(
        f"  saved per event: {base_us - tree_us:.1f} us (tree / baseline {tree_us / base_us:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
