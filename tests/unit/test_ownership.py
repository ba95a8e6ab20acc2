"""Session ownership: the first user to touch a session owns it; the store stays bounded.

The tests of the store's interface run against both in-process backends, memory and SQLite
(``store`` fixture): they must give the same answers. SQLite-only behaviour (restarts, several
processes, the file) is in test_sqlite_state.py.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_gateway.state.ownership import (
    MemoryOwnershipStore,
    OwnershipRefused,
    OwnershipStore,
    check_access,
)
from trio_gateway.state.sqlite_store import SqliteOwnershipStore

Store = MemoryOwnershipStore | SqliteOwnershipStore
NewStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["memory", "sqlite"])
async def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NewStore]:
    """Make stores of one backend, with MemoryOwnershipStore's keyword arguments."""
    opened: list[SqliteOwnershipStore] = []

    async def make(**kwargs: Any) -> Store:
        if request.param == "memory":
            return MemoryOwnershipStore(**kwargs)
        sqlite = SqliteOwnershipStore(str(tmp_path / f"owners-{len(opened)}.sqlite3"), **kwargs)
        await sqlite.open()
        opened.append(sqlite)
        return sqlite

    yield make
    for sqlite in opened:
        await sqlite.aclose()


async def size(store: Store) -> int:
    """How many sessions have an owner on record, whichever the backend."""
    return len(store) if isinstance(store, MemoryOwnershipStore) else await store.count()


# --- check_access ------------------------------------------------------------------------------


def test_an_unowned_session_is_open_to_anyone_who_will_then_claim_it() -> None:
    assert check_access(None, "alice")


def test_only_the_owner_has_access() -> None:
    assert check_access("alice", "alice")
    assert not check_access("alice", "bob")
    assert not check_access("alice", "Alice")  # user ids are compared exactly
    assert not check_access("alice", "")


# --- the stores (memory and SQLite) ----------------------------------------------------------


def test_both_stores_implement_the_protocol(tmp_path: Path) -> None:
    for store in (MemoryOwnershipStore(), SqliteOwnershipStore(str(tmp_path / "s.sqlite3"))):
        assert isinstance(store, OwnershipStore)


async def test_first_claim_wins_and_later_claims_report_the_owner(new_store: NewStore) -> None:
    store = await new_store()
    assert await store.owner("s1") is None
    assert await store.claim("s1", "alice") == "alice"
    assert await store.claim("s1", "bob") == "alice"
    assert await store.claim("s1", "alice") == "alice"
    assert await store.owner("s1") == "alice"
    assert await size(store) == 1


async def test_the_intended_flow_is_check_access_then_claim(new_store: NewStore) -> None:
    store = await new_store()

    async def admit(user: str) -> bool:
        if not check_access(await store.owner("s1"), user):
            return False
        return await store.claim("s1", user) == user  # re-check: another may have won a race

    assert await admit("alice")
    assert not await admit("bob")
    assert await admit("alice")


async def test_sessions_of_lists_a_users_sessions(new_store: NewStore) -> None:
    store = await new_store()
    await store.claim("s1", "alice")
    await store.claim("s2", "alice")
    await store.claim("s3", "bob")
    await store.claim("s3", "alice")  # already bob's: alice gains nothing
    assert await store.sessions_of("alice") == frozenset({"s1", "s2"})
    assert await store.sessions_of("bob") == frozenset({"s3"})
    assert await store.sessions_of("carol") == frozenset()


async def test_sessions_of_returns_a_snapshot(new_store: NewStore) -> None:
    store = await new_store()
    await store.claim("s1", "alice")
    snapshot = await store.sessions_of("alice")
    await store.claim("s2", "alice")
    assert snapshot == frozenset({"s1"})


async def test_forget_releases_the_session_for_a_new_claim(new_store: NewStore) -> None:
    store = await new_store()
    await store.claim("s1", "alice")
    await store.claim("s2", "alice")
    await store.forget("s1")
    assert await store.owner("s1") is None
    assert await store.sessions_of("alice") == frozenset({"s2"})
    assert await store.claim("s1", "bob") == "bob"
    assert await size(store) == 2


async def test_forget_of_an_unknown_session_is_a_no_op(new_store: NewStore) -> None:
    store = await new_store()
    await store.forget("nope")
    assert await size(store) == 0


async def test_a_user_with_no_sessions_left_is_dropped_entirely() -> None:
    store = MemoryOwnershipStore()
    await store.claim("s1", "alice")
    await store.forget("s1")
    assert store._by_user == {}


async def test_empty_ids_cannot_claim(new_store: NewStore) -> None:
    store = await new_store()
    with pytest.raises(ValueError, match="user"):
        await store.claim("s1", "")
    with pytest.raises(ValueError, match="session_id"):
        await store.claim("", "alice")
    assert await size(store) == 0


def test_max_sessions_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryOwnershipStore(max_sessions=0)
    with pytest.raises(ValueError):
        SqliteOwnershipStore("unused.sqlite3", max_sessions=0)
    with pytest.raises(ValueError):
        SqliteOwnershipStore("unused.sqlite3", max_per_user=0)


async def test_a_full_store_refuses_new_claims_and_never_evicts_an_owner(
    new_store: NewStore,
) -> None:
    store = await new_store(max_sessions=2)
    await store.claim("s1", "alice")
    await store.claim("s2", "alice")
    with pytest.raises(OwnershipRefused) as refused:
        await store.claim("s3", "bob")
    assert refused.value.reason == "store_full"
    # existing owners keep their sessions: nobody can take s1 over
    assert await store.claim("s1", "mallory") == "alice"
    await store.forget("s2")
    assert await store.claim("s3", "bob") == "bob"


async def test_one_user_cannot_fill_the_store(new_store: NewStore) -> None:
    store = await new_store(max_sessions=100, max_per_user=3)
    for n in range(3):
        await store.claim(f"s{n}", "mallory")
    with pytest.raises(OwnershipRefused) as refused:
        await store.claim("s9", "mallory")
    assert refused.value.reason == "user_limit"
    assert await store.claim("s9", "alice") == "alice"


async def test_memory_stays_bounded_under_many_sessions() -> None:
    store = MemoryOwnershipStore(max_sessions=1000)
    refused = 0
    for i in range(20_000):
        try:
            await store.claim(f"s{i}", f"user-{i % 7919}")
        except OwnershipRefused:
            refused += 1
    assert len(store) == 1000 and refused == 19_000
    assert len(store._by_user) <= 1000


async def test_concurrent_claims_have_exactly_one_winner(new_store: NewStore) -> None:
    store = await new_store()
    results: list[tuple[str, str]] = []

    async def contender(user: str) -> None:
        await trio.lowlevel.checkpoint()
        results.append((user, await store.claim("s1", user)))

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(contender, f"user-{n}")
    owners = {owner for _, owner in results}
    assert len(owners) == 1
    (winner,) = owners
    assert [user for user, owner in results if user == owner] == [winner]


ops = st.lists(
    st.tuples(
        st.sampled_from(["claim", "forget"]),
        st.sampled_from([f"s{i}" for i in range(8)]),
        st.sampled_from(["alice", "bob", "carol"]),
    ),
    max_size=80,
)


@given(ops=ops, max_sessions=st.integers(1, 10))
def test_store_matches_a_model(ops: list[tuple[str, str, str]], max_sessions: int) -> None:
    async def run() -> None:
        store = MemoryOwnershipStore(max_sessions=max_sessions)
        model: dict[str, str] = {}
        for op, session, user in ops:
            if op == "claim":
                if session not in model and len(model) >= max_sessions:
                    with pytest.raises(OwnershipRefused):
                        await store.claim(session, user)
                    continue
                model.setdefault(session, user)
                assert await store.claim(session, user) == model[session]
            else:
                model.pop(session, None)
                await store.forget(session)
            assert len(store) == len(model) <= max_sessions
            for s in (f"s{i}" for i in range(8)):
                assert await store.owner(s) == model.get(s)
            for u in ("alice", "bob", "carol"):
                expected = frozenset(s for s, o in model.items() if o == u)
                assert await store.sessions_of(u) == expected

    trio.run(run)


# --- idle records expire --------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_record_unused_for_the_idle_ttl_is_forgotten_and_frees_its_users_share(
    new_store: NewStore,
) -> None:
    clock = FakeClock()
    store = await new_store(max_per_user=2, idle_ttl=60, clock=clock)
    await store.claim("s1", "alice")
    await store.claim("s2", "alice")
    with pytest.raises(OwnershipRefused):
        await store.claim("s3", "alice")
    clock.now += 59
    assert await store.owner("s1") == "alice"  # not yet
    clock.now += 2
    assert await store.owner("s1") is None
    assert await store.sessions_of("alice") == frozenset()
    assert await size(store) == 0
    assert not isinstance(store, MemoryOwnershipStore) or not store._by_user
    assert await store.claim("s3", "alice") == "alice"


async def test_using_a_session_keeps_its_record_alive(new_store: NewStore) -> None:
    clock = FakeClock()
    store = await new_store(idle_ttl=60, clock=clock)
    await store.claim("busy", "alice")
    await store.claim("quiet", "alice")
    for _ in range(5):
        clock.now += 40
        # every open and every REST use claims again; a claim by another user is refused
        # but still counts as use of the session
        assert await store.claim("busy", "bob" if clock.now % 80 else "alice") == "alice"
    assert await store.owner("busy") == "alice"
    assert await store.owner("quiet") is None
    assert await store.sessions_of("alice") == frozenset({"busy"})


async def test_without_an_idle_ttl_records_are_kept_until_forgotten(new_store: NewStore) -> None:
    clock = FakeClock()
    store = await new_store(idle_ttl=0, clock=clock)
    await store.claim("s1", "alice")
    clock.now += 10 * 365 * 86_400
    assert await store.owner("s1") == "alice"
    with pytest.raises(ValueError):
        MemoryOwnershipStore(idle_ttl=-1)
    with pytest.raises(ValueError):
        SqliteOwnershipStore("unused.sqlite3", idle_ttl=-1)


async def test_expiry_keeps_the_user_index_consistent_under_random_use() -> None:
    clock = FakeClock()
    store = MemoryOwnershipStore(max_per_user=50, idle_ttl=10, clock=clock)
    rng = random.Random(7)
    for _ in range(5_000):
        clock.now += rng.random()
        sid, user = f"s{rng.randrange(200)}", f"u{rng.randrange(5)}"
        with contextlib.suppress(OwnershipRefused):
            await store.claim(sid, user)
        if rng.random() < 0.05:
            await store.forget(sid)
    indexed = {(s, u) for u, ss in store._by_user.items() for s in ss}
    assert indexed == {(s, record[0]) for s, record in store._owners.items()}
    assert all(clock.now - used < 10 for _, used in store._owners.values())


async def test_the_sqlite_store_answers_like_the_memory_store_under_random_use(
    tmp_path: Path,
) -> None:
    # The same random claims, uses, forgets and clock steps against both stores: every answer
    # (owners, refusals, each user's sessions, the count) must be the same.
    clock = FakeClock()
    bounds: dict[str, Any] = {"max_sessions": 30, "max_per_user": 10, "idle_ttl": 20}
    memory = MemoryOwnershipStore(**bounds, clock=clock)
    sqlite = SqliteOwnershipStore(str(tmp_path / "owners.sqlite3"), **bounds, clock=clock)
    await sqlite.open()
    rng = random.Random(11)
    refusals = 0
    try:
        for _ in range(1_500):
            clock.now += rng.random() * 0.3
            sid, user = f"s{rng.randrange(120)}", f"u{rng.randrange(4)}"
            if rng.random() < 0.05:
                await memory.forget(sid)
                await sqlite.forget(sid)
                continue
            answers: list[str] = []
            for store in (memory, sqlite):
                try:
                    answers.append(await store.claim(sid, user))
                except OwnershipRefused as refused:
                    answers.append(f"refused: {refused.reason}")
            assert answers[0] == answers[1], (sid, user)
            refusals += answers[0].startswith("refused")
            assert await memory.owner(sid) == await sqlite.owner(sid)
            assert await memory.sessions_of(user) == await sqlite.sessions_of(user)
        assert len(memory) == await sqlite.count()
        assert refusals > 0  # the caps were reached, so they were compared too
    finally:
        await sqlite.aclose()
