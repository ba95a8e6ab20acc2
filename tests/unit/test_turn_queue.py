"""The per-session FIFO of runtime-bound messages."""

from trio_gateway.session.turn_queue import TurnQueue


def test_fifo_order_and_bound() -> None:
    queue: TurnQueue[dict[str, int]] = TurnQueue(limit=2)
    assert queue.offer({"n": 1}) and queue.offer({"n": 2})
    assert not queue.offer({"n": 3})
    assert queue.pop() == {"n": 1}
    assert queue.pop() == {"n": 2}
    assert queue.pop() is None


def test_clear_reports_how_many_were_dropped() -> None:
    queue: TurnQueue[dict[str, int]] = TurnQueue(limit=5)
    queue.offer({})
    queue.offer({})
    assert queue.clear() == 2 and len(queue) == 0


def test_zero_limit_refuses_everything() -> None:
    assert not TurnQueue[dict[str, int]](limit=0).offer({})
