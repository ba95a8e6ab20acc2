"""The per-user ledger of bytes detached sessions hold (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_gateway.session.detached import DetachedBudget


def test_charges_up_to_the_limit_per_key_and_refuses_beyond() -> None:
    budget = DetachedBudget(100)
    assert budget.try_charge("alice", 60)
    assert budget.try_charge("alice", 40)
    assert not budget.try_charge("alice", 1)
    assert budget.held("alice") == 100 and budget.room("alice") == 0
    assert budget.try_charge("bob", 100)  # keys are independent
    assert budget.total == 200 and len(budget) == 2


def test_a_charge_larger_than_the_limit_is_never_admitted() -> None:
    budget = DetachedBudget(100)
    assert not budget.try_charge("alice", 101)  # even with nothing held: not slipped in
    assert budget.held("alice") == 0 and budget.total == 0 and len(budget) == 0


def test_a_refused_charge_changes_nothing_and_zero_always_fits() -> None:
    budget = DetachedBudget(10)
    assert budget.try_charge("alice", 8)
    assert not budget.try_charge("alice", 3)
    assert budget.held("alice") == 8
    assert budget.try_charge("alice", 0)
    assert DetachedBudget(0).try_charge("anyone", 0)


def test_release_gives_room_back_and_forgets_empty_keys() -> None:
    budget = DetachedBudget(100)
    budget.try_charge("alice", 70)
    budget.release("alice", 30)
    assert budget.held("alice") == 40 and budget.room("alice") == 60
    budget.release("alice", 40)
    assert len(budget) == 0 and budget.total == 0
    budget.release("alice", 0)  # nothing to give back is fine


def test_releasing_more_than_was_charged_is_an_error() -> None:
    budget = DetachedBudget(100)
    budget.try_charge("alice", 10)
    with pytest.raises(ValueError):
        budget.release("alice", 11)
    with pytest.raises(ValueError):
        budget.release("bob", 1)
    assert budget.held("alice") == 10


def test_negative_sizes_and_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        DetachedBudget(-1)
    with pytest.raises(ValueError):
        DetachedBudget(10).try_charge("alice", -1)
    with pytest.raises(ValueError):
        DetachedBudget(10).release("alice", -1)


@given(
    limit=st.integers(0, 1000),
    steps=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 400), st.booleans()),
        max_size=60,
    ),
)
def test_no_key_ever_holds_more_than_the_limit_and_the_total_adds_up(
    limit: int, steps: list[tuple[str, int, bool]]
) -> None:
    budget = DetachedBudget(limit)
    model: dict[str, int] = {}
    for key, size, charge in steps:
        if charge:
            if budget.try_charge(key, size):
                model[key] = model.get(key, 0) + size
        else:
            size = min(size, model.get(key, 0))
            budget.release(key, size)
            model[key] = model.get(key, 0) - size
        assert all(budget.held(k) == v <= limit for k, v in model.items())
        assert budget.total == sum(model.values())
        assert len(budget) == sum(1 for v in model.values() if v)
