"""STATE_BACKEND=sqlite (the default): session owners live in a file and survive a restart.

The rules the SQLite store shares with the memory store are tested on both in
test_ownership.py. Here: what only a file can do (reopen, several stores and processes on one
file), the file's problems at startup and in ``trio-gateway check``, the event loop staying
free while SQLite waits, and the end-to-end proof: a user's sessions created over REST through
a real JWT gateway, the gateway stopped and a new one started on the same file, the same list,
and another user refused on those ids at every door.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from trio_gateway.settings import Settings, SettingsError, load_settings
from trio_gateway.state.sqlite_store import (
    SCHEMA_VERSION,
    OwnershipDB,
    SqliteOwnershipStore,
    SqliteStateError,
    inspect_database,
)
from trio_gateway.state.state import StateUnavailable
from trio_gateway.tools.demo_runtime import DemoRuntime
from trio_gateway.tools.dev_auth import DevIssuer

from ..conftest import INTERNAL_KEY, WsClient, gateway_settings, run_gateway
from ..support.jwks_server import JWKSServer
from ..support.processes import clean_env, run_cli, started


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "trio-gateway.sqlite3")


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()


async def open_store(path: str, **kwargs: Any) -> SqliteOwnershipStore:
    store = SqliteOwnershipStore(path, **kwargs)
    await store.open()
    return store


# --- the file ----------------------------------------------------------------------------------


async def test_owners_and_their_expiry_survive_closing_and_reopening_the_file(
    db_path: str,
) -> None:
    clock = FakeClock()
    first = await open_store(db_path, idle_ttl=100, clock=clock)
    await first.claim("s1", "alice")
    await first.claim("s2", "alice")
    await first.claim("s3", "bob")
    await first.aclose()

    clock.now += 60
    second = await open_store(db_path, idle_ttl=100, clock=clock)
    try:
        assert await second.owner("s1") == "alice"
        assert await second.sessions_of("alice") == frozenset({"s1", "s2"})
        assert await second.sessions_of("bob") == frozenset({"s3"})
        assert await second.claim("s1", "mallory") == "alice"  # nobody claims an owned id
        assert await second.count() == 3
        # the expiry clock went on while the gateway was down: s1 was used at +60, s2 and
        # s3 were last used before the restart and lapse 100 s after that
        clock.now += 41
        assert await second.owner("s2") is None and await second.owner("s3") is None
        assert await second.sessions_of("alice") == frozenset({"s1"})
        assert await second.claim("s2", "mallory") == "mallory"
    finally:
        await second.aclose()


def test_a_new_file_is_private_in_wal_mode_with_the_current_schema(db_path: str) -> None:
    db = OwnershipDB.open(db_path)
    try:
        assert db.path == db_path
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
        assert db.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.claim("s1", "alice", now=1.0)
    finally:
        db.close()
    OwnershipDB.open(db_path).close()  # reopening a current file changes nothing
    assert inspect_database(db_path) == "schema 1, 1 owner record(s)"


def _foreign_database(path: str) -> None:
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE invoices (id INTEGER)")


def _parent_is_a_file(path: str) -> None:
    Path(path).parent.rmdir()
    Path(path).parent.write_text("x")


def _newer_database(path: str) -> None:
    OwnershipDB.open(path).close()
    with sqlite3.connect(path) as newer:
        newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


@pytest.mark.parametrize(
    ("prepare", "reason", "check_reason"),
    [
        (lambda p: Path(p).parent.rmdir(), "does not exist", "does not exist"),
        (_parent_is_a_file, "Not a directory", "does not exist"),
        (lambda p: Path(p).write_bytes(b"not a database " * 100), "not a database", None),
        (_foreign_database, "not a trio-gateway state file (it has tables invoices)", None),
        (_newer_database, f"schema version {SCHEMA_VERSION + 1}, newer", None),
        (lambda p: Path(p).mkdir(), "Is a directory", "not a regular file"),
    ],
    ids=["no-directory", "parent-is-a-file", "junk", "foreign", "newer-schema", "a-directory"],
)
def test_an_unusable_file_is_a_clear_error_naming_the_path(
    db_path: str, prepare: Any, reason: str, check_reason: str | None
) -> None:
    prepare(db_path)
    with pytest.raises(SqliteStateError) as opened:
        OwnershipDB.open(db_path)
    assert db_path in str(opened.value) and reason in str(opened.value)
    # `trio-gateway check` finds the same problem, and creates or changes nothing
    directory = Path(db_path).parent

    def listing() -> list[str] | None:
        return sorted(os.listdir(directory)) if directory.is_dir() else None

    before = listing()
    with pytest.raises(SqliteStateError) as inspected:
        inspect_database(db_path)
    assert (check_reason or reason) in str(inspected.value)
    assert listing() == before


def test_check_describes_a_missing_an_empty_and_a_used_file(db_path: str) -> None:
    assert "not there yet: created at startup" in inspect_database(db_path)
    assert not Path(db_path).exists()
    Path(db_path).touch()
    assert inspect_database(db_path) == "no schema yet: created at startup"
    db = OwnershipDB.open(db_path)
    db.claim("s1", "alice", now=1.0)
    db.claim("s2", "bob", now=1.0)
    db.close()
    assert inspect_database(db_path) == "schema 1, 2 owner record(s)"


# --- several stores and processes on one file --------------------------------------------------


async def test_two_stores_on_one_file_race_to_exactly_one_owner_per_session(db_path: str) -> None:
    # Two stores: two connections and two worker threads, as two processes would have.
    left, right = await open_store(db_path), await open_store(db_path)
    answers: dict[tuple[str, str], str] = {}
    try:

        async def contender(store: SqliteOwnershipStore, user: str) -> None:
            for n in range(40):
                answers[(f"s{n}", user)] = await store.claim(f"s{n}", user)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(contender, left, "alice")
            nursery.start_soon(contender, right, "bob")
        for n in range(40):
            owner = await left.owner(f"s{n}")
            assert owner in ("alice", "bob")
            assert await right.owner(f"s{n}") == owner
            assert answers[(f"s{n}", "alice")] == answers[(f"s{n}", "bob")] == owner
        mine = await left.sessions_of("alice") | await right.sessions_of("bob")
        assert len(mine) == 40 and await left.count() == await right.count() == 40
    finally:
        await left.aclose()
        await right.aclose()


CLAIMER = textwrap.dedent(
    """
    import json, sys
    from trio_gateway.state.sqlite_store import OwnershipDB

    path, user = sys.argv[1], sys.argv[2]
    db = OwnershipDB.open(path)
    print("ready", flush=True)
    sys.stdin.readline()  # all start together, on the same ids in the same order
    print(json.dumps({f"s{n}": db.claim(f"s{n}", user, now=1.0) for n in range(150)}))
    db.close()
    """
)


async def test_processes_racing_on_one_file_agree_on_every_owner(db_path: str) -> None:
    users = ("p1", "p2", "p3")
    outputs: dict[str, dict[str, str]] = {}
    async with AsyncExitStack() as stack:
        claimers = [
            await stack.enter_async_context(
                started(
                    [sys.executable, "-c", CLAIMER, db_path, user],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stop_signal=signal.SIGKILL,
                )
            )
            for user in users
        ]
        with trio.fail_after(60):
            for claimer in claimers:
                assert claimer.stdout is not None
                assert (await claimer.stdout.read_line()) == "ready"
            for claimer in claimers:
                assert claimer.process.stdin is not None
                await claimer.process.stdin.send_all(b"go\n")
            for user, claimer in zip(users, claimers, strict=True):
                assert claimer.stdout is not None
                outputs[user] = json.loads(await claimer.stdout.read_line())
                assert await claimer.process.wait() == 0
    db = OwnershipDB.open(db_path)
    try:
        for n in range(150):
            owner = db.owner(f"s{n}", now=1.0)
            # each process was told the one owner the file holds
            assert {outputs[user][f"s{n}"] for user in users} == {owner}
        assert db.count(now=1.0) == 150
        assert sum(len(db.sessions_of(user, now=1.0)) for user in users) == 150
    finally:
        db.close()


# --- the event loop and failures ---------------------------------------------------------------


async def test_a_claim_waiting_for_another_writer_leaves_the_event_loop_free(db_path: str) -> None:
    store = await open_store(db_path)
    other = sqlite3.connect(db_path, isolation_level=None)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.02)
            ticks += 1

    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            claimed = trio.Event()

            async def claim() -> None:
                assert await store.claim("s1", "alice") == "alice"
                claimed.set()

            nursery.start_soon(claim)
            await trio.sleep(0.6)
            assert not claimed.is_set()  # waiting in its thread for the lock...
            assert ticks >= 10  # ...while every other task kept running
            other.execute("COMMIT")
            with trio.fail_after(5):
                await claimed.wait()
            nursery.cancel_scope.cancel()
    finally:
        other.close()
        await store.aclose()


async def test_sqlite_failures_are_state_unavailable_and_it_recovers(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = SqliteOwnershipStore(db_path)
    with pytest.raises(StateUnavailable):  # not open (yet): nothing is answered
        await closed.owner("s1")
    monkeypatch.setattr("trio_gateway.state.sqlite_store.BUSY_TIMEOUT", 0.2)
    store = await open_store(db_path)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StateUnavailable):  # "database is locked" past the busy timeout
            await store.claim("s1", "alice")
        assert await store.owner("s1") is None  # readers are not blocked by a writer (WAL)
        other.execute("COMMIT")
        assert await store.claim("s1", "alice") == "alice"
    finally:
        other.close()
        await store.aclose()
    with pytest.raises(StateUnavailable):  # closed: fail closed
        await store.owner("s1")


# --- settings, startup, check ------------------------------------------------------------------


def test_sqlite_is_the_default_backend_and_memory_is_refused_as_a_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.startswith("GATEWAY__"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(internal_api_key="a-real-key-0123456789")
    assert settings.state_backend == "sqlite"
    assert settings.sqlite_path == "trio-gateway.sqlite3"
    for bad in (":memory:", "", " x.sqlite3"):
        monkeypatch.setenv("GATEWAY__SQLITE_PATH", bad)
        with pytest.raises(SettingsError, match="GATEWAY__SQLITE_PATH"):
            load_settings(internal_api_key="a-real-key-0123456789")


async def test_serve_refuses_to_start_on_an_unusable_file_in_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    env = clean_env(internal_api_key=INTERNAL_KEY, sqlite_path=str(junk))
    served = await run_cli("serve", "--port", "0", env=env)
    checked = await run_cli("check", "--timeout", "2", env=env)
    assert served.returncode == 1
    assert served.stderr.decode().splitlines() == [
        f"trio-gateway: cannot use the SQLite state file {junk}: file is not a database "
        "(the file holds something else, or is corrupt)"
    ]
    assert b"Running on" not in served.stdout + served.stderr  # refused before binding
    assert checked.returncode == 1
    (line,) = [s for s in checked.stdout.decode().splitlines() if "] sqlite" in s]
    assert line.split()[:4] == ["[", "FAIL", "]", "sqlite"] and "not a database" in line


# --- end to end: a restart keeps every owner ---------------------------------------------------


def default_backend_settings(runtime_url: str, jwks_url: str, path: Path) -> Settings:
    """JWT on, and the state backend a deployment gets by default (the test helper pins
    memory), on a file of the test's own."""
    return gateway_settings(
        runtime_url,
        use_jwt_auth=True,
        jwks_url=jwks_url,
        state_backend=Settings.model_fields["state_backend"].default,
        sqlite_path=str(path),
    )


async def test_a_restart_keeps_every_owner(
    nursery: trio.Nursery,
    tmp_path: Path,
    demo_runtime: tuple[DemoRuntime, str],
    jwks_server: tuple[JWKSServer, DevIssuer],
) -> None:
    server, issuer = jwks_server
    alice = {"Authorization": f"Bearer {issuer.mint('alice')}"}
    mallory_token = issuer.mint("mallory")
    mallory = {"Authorization": f"Bearer {mallory_token}"}
    settings = default_backend_settings(demo_runtime[1], server.url, tmp_path / "gw.sqlite3")
    assert settings.state_backend == "sqlite"

    # Before: alice creates sessions as the IDE does (one with an id of her choosing) and
    # mallory one of his own.
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            ids = []
            for body in ({}, {}, {"session_id": "alices-named"}):
                created = await http.post("/api/v1/sessions", json=body, headers=alice)
                assert created.status_code == 201, created.text
                ids.append(created.json()["id"])
            assert (await http.post("/api/v1/sessions", json={}, headers=mallory)).is_success
            before = await http.get("/api/v1/sessions", headers=alice)
    assert before.status_code == 200
    assert sorted(s["id"] for s in before.json()["sessions"]) == sorted(ids)

    # After: a new gateway process state on the same file (the runtime kept its sessions).
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            after = await http.get("/api/v1/sessions", headers=alice)
            assert after.status_code == 200
            assert after.json() == before.json()
            for session_id in ids:
                taken = await http.get(f"/api/v1/sessions/{session_id}", headers=mallory)
                assert taken.status_code == 403, session_id
                history = await http.get(f"/api/v1/sessions/{session_id}/history", headers=mallory)
                assert history.status_code == 403, session_id
            named = {"session_id": "alices-named"}
            squat = await http.post("/api/v1/sessions", json=named, headers=mallory)
            assert squat.status_code == 403
            mine = await http.get("/api/v1/sessions", headers=mallory)
            assert not {s["id"] for s in mine.json()["sessions"]} & set(ids)
        for session_id in ids:
            # the header door and the auth-frame door
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket.open_websocket_url(
                    gw.ws_url(session_id),
                    extra_headers=[(b"Authorization", f"Bearer {mallory_token}".encode())],
                ):
                    pass
            assert rejected.value.status_code == 403
        async with trio_websocket.open_websocket_url(gw.ws_url(ids[0])) as ws:
            client = WsClient(ws)
            await client.send({"type": "auth", "token": mallory_token})
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await client.recv()
        assert closed.value.reason is not None and closed.value.reason.code == 4403
        # alice, of course, still gets in and chats
        async with trio_websocket.open_websocket_url(
            gw.ws_url(ids[0]), extra_headers=[(b"Authorization", alice["Authorization"].encode())]
        ) as ws:
            client = WsClient(ws)
            await client.send({"type": "user_message", "content": "bench 2"})
            frames = await client.turn()
        assert frames[-1]["is_final"] is True


async def test_without_jwt_nothing_is_recorded_in_the_file(
    nursery: trio.Nursery, tmp_path: Path, demo_runtime: tuple[DemoRuntime, str]
) -> None:
    path = tmp_path / "gw.sqlite3"
    settings = gateway_settings(demo_runtime[1], state_backend="sqlite", sqlite_path=str(path))
    async with run_gateway(nursery, settings) as gw:
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            assert (await http.post("/api/v1/sessions", json={})).status_code == 201
            listed = (await http.get("/api/v1/sessions")).json()
    assert listed["total"] >= 1  # the one anonymous principal sees every session
    assert inspect_database(str(path)) == "schema 1, 0 owner record(s)"


def test_gateway_processes_of_the_suite_keep_their_state_file_out_of_the_checkout() -> None:
    # Gateways the suite starts as processes use the default backend; conftest points their
    # file at a temporary directory, never at the working directory.
    root = Path(__file__).resolve().parents[2]
    path = Path(os.environ["GATEWAY__SQLITE_PATH"])
    assert path.is_absolute() and not path.resolve().is_relative_to(root)
