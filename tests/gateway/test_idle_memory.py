"""Idle sessions stay small (docs/performance.md, "Idle memory"): structure, not timings.

RSS per idle session is measured by ``bench/relay_bench.py --memory-only``; these tests pin the
structural reasons it is small, so that a change that quietly brings back a task or a buffer
per idle socket fails here rather than only in a benchmark nobody runs.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack

import pytest
import trio

from trio_gateway.session.connection import Connection
from trio_gateway.session.session import Session

from ..conftest import RunningGateway, task_names, wait_for

IDLE = 4  # idle v1 sockets, one session each


def gateway_tasks() -> Counter[str]:
    """Live tasks running trio_gateway code, by short name."""
    return Counter(
        name.rsplit(".", 1)[-1] for name in task_names(lambda n: n.startswith("trio_gateway."))
    )


async def test_an_idle_session_costs_three_gateway_tasks(gateway: RunningGateway) -> None:
    """Session task (its grace timer), the connection's writer and its guard (heartbeat +
    close guard); the reader runs in the connection's own (hypercorn's) task and the turn
    runner starts with the first message. Before: seven tasks per idle session."""
    manager = gateway.app.gateway.sessions
    assert manager is not None
    baseline = gateway_tasks()
    async with AsyncExitStack() as stack:
        for index in range(IDLE):
            await stack.enter_async_context(gateway.connect(f"idle-{index}"))
        await wait_for(lambda: len(manager.sessions) == IDLE)
        await trio.sleep(0.1)
        added = gateway_tasks() - baseline
        assert sum(added.values()) == 3 * IDLE, added
        assert added == Counter({"run": IDLE, "_writer": IDLE, "_guard": IDLE})

        async with gateway.connect("busy") as client:  # a message starts the turn runner
            await client.send({"type": "user_message", "content": "bench 3"})
            while not (await client.recv()).get("is_final"):
                pass
        assert (gateway_tasks() - baseline)["_turn_runner"] == 1


async def test_an_idle_session_allocates_no_queue_or_replay_storage(
    gateway: RunningGateway,
) -> None:
    manager = gateway.app.gateway.sessions
    assert manager is not None
    async with gateway.connect("bare"):
        await wait_for(lambda: "bare" in manager.sessions)
        session = manager.sessions["bare"]
        assert isinstance(session.connection, Connection)
        # Empty deques cost ~600 bytes each: none until something is queued.
        assert session.queue._items is None
        assert session.outbound._entries == ()
        assert session.replay._entries == ()
        assert session.connection.viewer is None  # no viewer backlog
        # Wake-ups nobody waits on yet are not made: turn runner, blocked producers, resume.
        assert session._messages_ready is None and session._space_ready is None
        assert session.connection.resume_waiter is None
        # Without a cluster the lease and cluster events are one shared pre-set Event.
        assert session.lease.lease_ready is manager.already_set is session.lease.cluster_ready


@pytest.mark.parametrize("cls", [Session, Connection])
def test_per_session_classes_have_slots(cls: type) -> None:
    assert "__slots__" in vars(cls)
    assert "__dict__" not in vars(cls)
