"""Several gateway replicas sharing one Redis: resume across replicas, takeover, failover.

Every test runs a real ``redis-server`` on loopback (see ``redis_server``) and two gateways in
front of the same demo runtime: in this process (replica A and B) or, for the SIGKILL test, A
as a ``trio-gateway serve`` child process.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import coredis
import orjson
import pytest
import trio
import trio_websocket

from trio_gateway.session.connection import Connection
from trio_gateway.state.cluster import Cluster
from trio_gateway.tools.demo_runtime import DemoRuntime

from ..conftest import INTERNAL_KEY, close_code, gateway_settings, port_of, run_gateway, wait_for
from ..support.processes import Child, child_env, spawned
from ..support.redis_server import RedisServer
from ..support.resume import ResumingClient


def replica_settings(runtime_url: str, redis: RedisServer, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "state_backend": "redis",
        "redis_url": redis.url(),
        "redis_timeout": 5.0,  # a loaded test machine must not look like a Redis outage
        "session_grace_seconds": 30,
        "session_lease_seconds": 1.5,
        "resume_wait_seconds": 5,
        "outbound_queue_max_bytes": 8 * 1024 * 1024,
    }
    values.update(overrides)
    return gateway_settings(runtime_url, **values)


async def test_a_client_dropped_by_replica_a_resumes_on_replica_b_exactly(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str], redis_server: RedisServer
) -> None:
    runtime, url = demo_runtime
    settings = replica_settings(url, redis_server)
    tokens = 1500
    async with run_gateway(nursery, settings) as a, run_gateway(nursery, settings) as b:
        client = ResumingClient(port_of(a.base_url), "cross-replica")
        await client.connect(resume=False)
        assert client.ws is not None
        await client.ws.send_json({"type": "user_message", "content": f"bench {tokens}"})
        for _ in range(25):
            await client.next()
        client.ws.reset()  # the network blinks; the load balancer picks replica B
        client.port = port_of(b.base_url)
        await client.connect(resume=True)
        await client.until("resumed")
        await client.until("turn_finished")
        # The session moved: A finished its turn, let go, and B runs the next turn.
        sessions = a.app.gateway.sessions
        assert sessions is not None
        await wait_for(lambda: "cross-replica" not in sessions.sessions)
        await client.ws.send_json({"type": "user_message", "content": "bench 3"})
        await client.until("turn_finished")
    expected = "".join(f"t{i} " for i in range(tokens)) + "t0 t1 t2 "
    assert client.tokens() == expected, "nothing lost, nothing twice, across replicas"
    assert not [f for f in client.control if f["type"] == "resync_required"]
    assert runtime.completed_streams == 2


def hold_appends(
    monkeypatch: pytest.MonkeyPatch, cluster: Cluster, after_seq: int
) -> Callable[[], None]:
    """Make ``cluster``'s replica late to append its frames to the shared streams (appends
    are batched and asynchronous: on a loaded machine a client can be faster): frames after
    ``after_seq`` wait until the returned function is called."""
    publish = cluster.publish
    held: list[tuple[str, int, str]] = []
    caught_up = trio.Event()

    def late_publish(session_id: str, seq: int, text: str) -> None:
        if seq > after_seq and not caught_up.is_set():
            held.append((session_id, seq, text))
        else:
            publish(session_id, seq, text)

    def catch_up() -> None:
        caught_up.set()
        for frame in held:
            publish(*frame)

    monkeypatch.setattr(cluster, "publish", late_publish)
    return catch_up


@pytest.mark.parametrize("appended", [3, 0], ids=["some-appended", "none-appended"])
async def test_a_resume_on_the_follower_waits_for_frames_the_holder_has_not_appended_yet(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    appended: int,
) -> None:
    """Replica A writes a frame to its client before its publisher appends it to the shared
    stream (appends are batched and asynchronous). A client that cuts right after it and
    resumes on B is ahead of the stream for a moment: B waits for A's appends and replays
    exactly, never answers unknown_seq (found by bench/resume_bench.py on a loaded machine:
    about one cross-replica resume in several dozen). Here A's appends after seq
    ``appended`` are held until B has the client's resume, so the race is won every time."""
    _, url = demo_runtime
    settings = replica_settings(url, redis_server)
    tokens = 200
    async with run_gateway(nursery, settings) as a, run_gateway(nursery, settings) as b:
        assert a.app.gateway.sessions is not None and b.app.gateway.sessions is not None
        cluster_a, manager_b = a.app.gateway.sessions.cluster, b.app.gateway.sessions
        assert cluster_a is not None and manager_b.cluster is not None
        catch_up = hold_appends(monkeypatch, cluster_a, appended)
        client = ResumingClient(port_of(a.base_url), "late-append")
        await client.connect(resume=False)
        assert client.ws is not None
        await client.ws.send_json({"type": "user_message", "content": f"bench {tokens} 400"})
        while client.last_seq < appended + 5:
            await client.next()
        client.ws.reset()
        with trio.fail_after(8):  # A's publisher appended what it may
            while await manager_b.cluster.last_seq("late-append") < appended:
                await trio.sleep(0.01)
        client.port = port_of(b.base_url)
        await client.connect(resume=True)

        def resume_received() -> bool:
            session = manager_b.sessions.get("late-append")
            connection = None if session is None else session.connection
            return isinstance(connection, Connection) and connection.resume_from == client.last_seq

        await wait_for(resume_received)
        # A's publisher catches up only now.
        catch_up()
        cut = client.last_seq
        with trio.fail_after(10):
            answer = await client.next()
            while answer["type"] not in ("resumed", "resync_required"):
                answer = await client.next()
            # Nothing to replay from B: every missed frame comes through its follower.
            assert answer == {"type": "resumed", "from_seq": cut + 1, "replayed": 0}
            await client.until("turn_finished")
    assert client.tokens() == "".join(f"t{i} " for i in range(tokens))


async def test_a_holder_that_lets_go_while_the_next_replica_starts_leaves_it_the_whole_stream(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replica A lets the session go (grace over, flushing its last appends) at the moment B
    starts it: B must number on from the stream's true end, never from a seq read before A's
    flush (its own frames would reuse seqs the client has, and be refused by the stream)."""
    _, url = demo_runtime
    settings = replica_settings(url, redis_server)
    async with run_gateway(nursery, settings) as a, run_gateway(nursery, settings) as b:
        assert a.app.gateway.sessions is not None and b.app.gateway.sessions is not None
        cluster_a, cluster_b = a.app.gateway.sessions.cluster, b.app.gateway.sessions.cluster
        assert cluster_a is not None and cluster_b is not None
        catch_up = hold_appends(monkeypatch, cluster_a, 3)
        client = ResumingClient(port_of(a.base_url), "letting-go")
        await client.connect(resume=False)
        assert client.ws is not None
        await client.ws.send_json({"type": "user_message", "content": "bench 20"})
        await client.until("turn_finished")
        client.ws.reset()
        session_a = a.app.gateway.sessions.sessions["letting-go"]
        acquire = cluster_b.acquire_lease

        async def acquire_as_a_lets_go(session_id: str) -> bool:
            if not session_a.finished.is_set():  # A's grace ends now: it flushes, lets go
                catch_up()
                session_a.end()
                await session_a.finished.wait()
            return await acquire(session_id)

        monkeypatch.setattr(cluster_b, "acquire_lease", acquire_as_a_lets_go)
        client.port = port_of(b.base_url)
        cut = client.last_seq
        await client.connect(resume=True)
        with trio.fail_after(10):
            answer = await client.next()
            while answer["type"] not in ("resumed", "resync_required"):
                answer = await client.next()
            assert answer == {"type": "resumed", "from_seq": cut + 1, "replayed": 0}
            await client.ws.send_json({"type": "user_message", "content": "bench 3"})
            await client.until("turn_finished")
    assert client.tokens() == "".join(f"t{i} " for i in range(20)) + "t0 t1 t2 "
    assert cluster_b.append_failures == 0


@pytest.mark.parametrize("late", [False, True], ids=["appends-prompt", "appends-late"])
async def test_a_second_connection_on_another_replica_closes_the_first_with_4409(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    late: bool,
) -> None:
    _, url = demo_runtime
    settings = replica_settings(url, redis_server)
    async with run_gateway(nursery, settings) as a, run_gateway(nursery, settings) as b:
        assert a.app.gateway.sessions is not None and a.app.gateway.sessions.cluster is not None
        if late:  # B starts following before A's frames are in the stream (a loaded machine)
            catch_up = hold_appends(monkeypatch, a.app.gateway.sessions.cluster, 0)
        async with a.connect("two-replicas", v2=True) as first:
            await first.recv()
            await first.send({"type": "user_message", "content": "bench 2"})
            done = await first.recv_until(lambda f: f["type"] == "turn_finished")
            async with b.connect("two-replicas", v2=True) as second:
                await second.recv()
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await first.recv()
                assert close_code(closed.value) == 4409
                if late:
                    catch_up()
                # The first turn's turn_finished is missed on purpose. B replays it from the
                # stream before "resumed", or, when A appended it only after B started
                # following, relays it live right after: both exact.
                last = done[-1]["seq"]
                await second.send({"type": "resume", "last_seq": last - 1})
                frames = await second.recv_until(lambda f: f["type"] == "resumed")
                await second.send({"type": "user_message", "content": "bench 2"})
                frames += await second.recv_until(
                    lambda f: f["type"] == "turn_finished" and f["seq"] > last
                )
    numbered = [f for f in frames if "seq" in f]
    seqs = [f["seq"] for f in numbered]
    assert seqs == list(range(last, last + len(seqs)))
    assert [f["type"] for f in numbered[:2]] == ["turn_finished", "turn_started"]


async def test_redis_down_refuses_new_sessions_lets_running_turns_finish_and_recovers(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str], redis_server: RedisServer
) -> None:
    runtime, url = demo_runtime
    settings = replica_settings(url, redis_server)
    async with run_gateway(nursery, settings) as gw:
        async with gw.connect("running-turn", v2=True) as running:
            await running.recv()
            await running.send({"type": "user_message", "content": "bench 300 300"})
            await running.recv_until(lambda f: f["type"] == "turn_started")
            redis_server.kill()
            await wait_for(lambda: not gw.app.gateway.security.state_available)
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with gw.connect("new-while-down", v2=True):
                    pass
            assert refused.value.status_code == 503
            assert b"Redis" in (refused.value.body or b"")
            # The turn that was running finishes.
            frames = await running.recv_until(lambda f: f["type"] == "turn_finished", 20)
            assert frames[-1]["status"] == "completed"
        redis_server.restart()
        with trio.fail_after(20):
            while True:
                try:
                    async with gw.connect("new-after-recovery", v2=True) as client:
                        ready = await client.recv()
                        await client.send({"type": "user_message", "content": "bench 2"})
                        await client.recv_until(lambda f: f["type"] == "turn_finished")
                        break
                except (trio_websocket.ConnectionRejected, trio_websocket.ConnectionClosed):
                    await trio.sleep(0.2)  # 503 until the health probe sees Redis again
    assert ready["type"] == "session_ready"
    assert runtime.completed_streams >= 2


@pytest.fixture
async def gateway_process(
    demo_runtime: tuple[DemoRuntime, str], redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Child]:
    """Replica A as a real process (so it can be SIGKILLed), on a free port."""
    env = child_env(
        INTERNAL_KEY,
        agent_url=demo_runtime[1],
        state_backend="redis",
        redis_url=redis_server.url(),
        redis_timeout="5",
        session_lease_seconds="1.5",
        session_grace_seconds="10",
    )
    with spawned("replica-a", ["serve"], env, tmp_path) as child:
        await child.wait_healthy(20)
        yield child


async def test_the_replica_running_the_turn_is_killed_and_the_client_is_told_never_left_hanging(
    nursery: trio.Nursery,
    demo_runtime: tuple[DemoRuntime, str],
    redis_server: RedisServer,
    gateway_process: Child,
) -> None:
    _, url = demo_runtime
    a_url = gateway_process.url
    async with run_gateway(nursery, replica_settings(url, redis_server)) as b:
        client = ResumingClient(port_of(a_url), "killed-replica")
        await client.connect(resume=False)
        assert client.ws is not None
        await client.ws.send_json({"type": "user_message", "content": "bench 2000 200"})
        for _ in range(20):
            await client.next()
        gateway_process.stop(signal.SIGKILL)  # mid-turn, no cleanup of any kind
        client.ws.reset()
        client.port = port_of(b.base_url)
        await client.connect(resume=True)
        # Whatever A published before it died is replayed exactly; what it streamed but
        # had not published yet is reported, and so is the lost turn, once A's lease expires.
        # Order: an inexact resume gets resync_required(unknown_seq) first; an exact one (A
        # had published all the client saw) gets the error, then resync_required(replica_lost).
        with trio.fail_after(30):
            found = await client.until_all("resync_required", "error")
        resync, broken = found["resync_required"], found["error"]
        tokens = client.tokens()
        await client.ws.send_json({"type": "user_message", "content": "bench 2"})
        await client.until("turn_finished")
    assert resync["reason"] in ("unknown_seq", "replica_lost")
    assert broken["code"] == "runtime_stream_broken" and broken["is_final"] is True
    assert tokens == "".join(f"t{i} " for i in range(len(tokens.split()))), "no silent gap"


async def test_a_gap_in_the_followed_stream_is_announced_at_once_and_a_dead_holder_detected(
    nursery: trio.Nursery, demo_runtime: tuple[DemoRuntime, str], redis_server: RedisServer
) -> None:
    """Another replica ("ghost", only its Redis records) runs the session: the gateway follows
    its stream, says resync_required the moment the stream skips a seq, and when the ghost's
    lease disappears mid-turn it takes over and reports the lost turn."""
    _, url = demo_runtime
    settings = replica_settings(url, redis_server)
    prefix = settings.redis_key_prefix
    stream, lease = f"{prefix}frames:ghosted", f"{prefix}lease:ghosted"

    def token(seq: int) -> dict[str, str]:
        frame = {"type": "assistant_message", "token": f"t{seq} ", "is_final": False, "seq": seq}
        return {"f": orjson.dumps(frame).decode()}

    redis = coredis.Redis.from_url(redis_server.url(), decode_responses=True)
    async with redis, run_gateway(nursery, settings) as gw:
        await redis.set(lease, "ghost", px=60_000)
        client = ResumingClient(port_of(gw.base_url), "ghosted")
        await client.connect(resume=True)
        assert (await client.until("resumed"))["from_seq"] == 1
        for seq in (1, 2):
            await redis.xadd(stream, token(seq), identifier=f"{seq}-1")
        await client.next(), await client.next()
        await redis.xadd(stream, token(4), identifier="4-1")  # seq 3 never made it
        resync = await client.next()
        after = await client.next()
        await redis.delete([lease])  # the ghost is gone, mid-turn
        with trio.fail_after(10):
            broken = await client.until("error")
        await client.ws.send_json({"type": "user_message", "content": "bench 2"})  # type: ignore[union-attr]
        await client.until("turn_finished")
    assert resync == {"type": "resync_required", "reason": "frames_lost"}
    assert after["seq"] == 4 and after["token"] == "t4 "
    assert broken["code"] == "runtime_stream_broken" and broken["is_final"] is True
