"""What the parts of the session engine need of each other, as Protocols.

The engine's imports run one way (manager > connection > session > replicas); where a lower
part calls back up, it does so through one of these: a session talks to its sockets as
:class:`Socket` (and to the app as ``session.SessionHost``, beside the session it serves); a
connection talks to the app as :class:`ConnectionHost`. ``connection.Connection`` and
``manager.SessionManager`` implement them (mypy checks it where they are passed in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from ..observability import Metrics
from ..security.auth import Identity
from ..security.security import Security
from ..settings import Settings
from .outbound import Frame


class Socket(Protocol):
    """What a session needs of an attached socket (``connection.Connection`` is one)."""

    @property
    def v2(self) -> bool: ...
    @property
    def identity(self) -> Identity: ...
    @property
    def closing(self) -> bool: ...
    @property
    def flush_then_close(self) -> bool: ...
    @property
    def ping_due(self) -> bool: ...
    @property
    def writer_done(self) -> trio.Event: ...

    def shut(self, code: int, reason: str = "", *, flush: bool = False) -> None: ...
    def replace(self, reason: str) -> None: ...
    def become_live(
        self,
        wake: Callable[[], object],
        greeting: Frame | None,
        previous_writer_done: trio.Event | None,
    ) -> None: ...
    def become_viewer(self, wake: Callable[[], object]) -> None: ...
    def promote(self, previous_writer_done: trio.Event) -> None: ...
    def add_to_backlog(self, text: str, limit: int) -> bool: ...


class ConnectionHost(Protocol):
    """What a connection needs of the app (the session manager is one)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def security(self) -> Security: ...

    def count_frame_out(self, frame_type: object) -> None: ...
    def count_frame_in(self, frame_type: object) -> None: ...
