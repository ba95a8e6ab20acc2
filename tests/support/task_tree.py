"""The live task tree of a trio run, with where each task is suspended: to explain a hang.

A test that waits for a condition and times out says only *that* something did not happen;
this says *what* every task was doing then (``trio.lowlevel.current_root_task()`` walked down
through ``child_nurseries``, and each coroutine's ``cr_await`` chain down to the innermost
frame that is not trio's own). Call it inside the run, e.g. from a ``fail_after`` handler, or
through ``trio.from_thread.run_sync`` for a run in another thread.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import trio

_TRIO_DIR = trio.__file__.rsplit("/", 1)[0]


def where(task: trio.lowlevel.Task, depth: int = 4) -> str:
    """Where ``task`` is suspended: its innermost ``depth`` frames outside trio itself."""
    frames: list[str] = []
    innermost = "?"
    awaited: Any = task.coro
    while awaited is not None:
        frame: types.FrameType | None = getattr(awaited, "cr_frame", None) or getattr(
            awaited, "gi_frame", None
        )
        if frame is not None:
            code = frame.f_code
            short = "/".join(code.co_filename.rsplit("/", 2)[-2:])
            innermost = f"{code.co_name}@{short}:{frame.f_lineno}"
            if not code.co_filename.startswith(_TRIO_DIR):
                frames.append(innermost)
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " > ".join(frames[-depth:]) or innermost


def format_task_tree(root: trio.lowlevel.Task | None = None, skip: tuple[str, ...] = ()) -> str:
    """Every task under ``root`` (default: the run's root), indented by nursery, with where
    each one waits. Subtrees whose task name contains one of ``skip`` are left out."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, indent: int) -> None:
        if any(part in task.name for part in skip):
            return
        lines.append(f"{'  ' * indent}{task.name}  [{where(task)}]")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, indent + 1)

    start = root or trio.lowlevel.current_root_task()
    assert start is not None
    walk(start, 0)
    return "\n".join(lines)


def count_tasks(name: str, under: str = "") -> int:
    """Live tasks whose name ends with ``name``; with ``under``, only those below a task whose
    name contains ``under`` (e.g. one server's connection handlers, not another's)."""
    found = 0

    def walk(task: trio.lowlevel.Task, inside: bool) -> None:
        nonlocal found
        inside = inside or (bool(under) and under in task.name)
        if inside and task.name.endswith(name):
            found += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, inside)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root, not under)
    return found


def task_names(predicate: Callable[[str], bool]) -> list[str]:
    """Names of every live task in this process whose name satisfies ``predicate``."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if predicate(task.name):
            names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return names
