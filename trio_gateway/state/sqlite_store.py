"""Session ownership in a SQLite file (``STATE_BACKEND=sqlite``, the default): owners survive a
restart.

The memory store forgets every owner when the process ends, and whoever touches an existing
session id first afterwards owns it. This store keeps the same records, with the same rules
(:class:`~trio_gateway.state.ownership.MemoryOwnershipStore`: first claim wins, never evicted early,
``max_sessions`` / ``max_per_user`` caps, expiry ``idle_ttl`` after the last claim), in one
SQLite file, ``SQLITE_PATH``. Connection caps, rates and replay stay in memory: they describe
live connections, which a restart ends anyway.

Two layers, the usual split:

* :class:`OwnershipDB` is the blocking part: the SQL over one ``sqlite3`` connection, with an
  explicit ``now``. Tests drive it directly, without threads.
* :class:`SqliteOwnershipStore` is the async :class:`~trio_gateway.state.ownership.OwnershipStore`
  the security layer uses. Every call runs in a worker thread, never on the event loop (a
  commit waits for the disk, and a claim may wait up to :data:`BUSY_TIMEOUT` for another
  process' write lock).

The file is in WAL mode, so several gateway processes on one host (not on a network file
system, where SQLite's locks do not hold) can share it: readers never wait, writers take turns
within :data:`BUSY_TIMEOUT`. The schema is versioned with ``PRAGMA user_version``; a file
written by a newer schema, a file that is not a trio-gateway database, a corrupt file or a path
that cannot be written stop the gateway at startup with :class:`SqliteStateError`, whose text
names the path and the reason.

Durability: ``synchronous=NORMAL`` (WAL) survives a crash or kill of the process, which is what
a restart needs. A *new* owner is additionally committed with ``synchronous=FULL`` (fsynced
before the claim returns): losing it to a power cut would leave its session unowned, claimable
by whoever touches it next. Refreshes of the last use and deletions stay NORMAL: losing one
only moves an expiry back a little or brings back a record of a deleted session.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Final, TypeVar
from urllib.parse import quote

import trio

from .ownership import MemoryOwnershipStore, OwnershipRefused
from .state import STATE_UNAVAILABLE, StateUnavailable

if TYPE_CHECKING:
    from ..settings import Settings
    from .ownership import OwnershipStore

__all__ = [
    "BUSY_TIMEOUT",
    "SCHEMA_VERSION",
    "OwnershipDB",
    "SqliteOwnershipStore",
    "SqliteStateError",
    "inspect_database",
    "ownership_store_for",
    "preflight",
]

logger = logging.getLogger("trio_gateway.sqlite")

#: ``PRAGMA user_version`` of the schema below; bump it with a migration in :func:`_migrate`.
SCHEMA_VERSION: Final = 1
#: Seconds a write waits for another process' write lock before it counts as a failure (503).
BUSY_TIMEOUT: Final = 5.0

_T = TypeVar("_T")

# One row per owned session. ``used`` is the wall-clock time (time.time) of the last claim:
# a monotonic clock restarts with the machine, and the records outlive the process. WITHOUT
# ROWID: the session id is the key. ``totals`` keeps the row count (maintained by triggers) so
# the ``max_sessions`` check does not count a million rows on every new session.
_SCHEMA: Final = (
    """CREATE TABLE owners (
        session_id TEXT PRIMARY KEY NOT NULL,
        owner TEXT NOT NULL,
        used REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX owners_by_owner ON owners (owner)",
    "CREATE INDEX owners_by_used ON owners (used)",
    """CREATE TABLE totals (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        owners INTEGER NOT NULL
    )""",
    "INSERT INTO totals (id, owners) VALUES (0, 0)",
    """CREATE TRIGGER owners_added AFTER INSERT ON owners
        BEGIN UPDATE totals SET owners = owners + 1 WHERE id = 0; END""",
    """CREATE TRIGGER owners_removed AFTER DELETE ON owners
        BEGIN UPDATE totals SET owners = owners - 1 WHERE id = 0; END""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class SqliteStateError(OSError):
    """The SQLite file cannot serve as the ownership store (startup and ``trio-gateway check``).

    The message names the path and what is wrong with it, for an operator to act on. An
    OSError, like the other problems of the environment at startup (a port in use): the CLI
    reports those in one line, without a traceback.
    """


def _describe(error: sqlite3.Error) -> str:
    """A short reason for a SQLite error, with a hint for the common causes."""
    text = str(error) or type(error).__name__
    hints = {
        "unable to open database file": "does the directory exist, and may this user write it?",
        "file is not a database": "the file holds something else, or is corrupt",
        "database disk image is malformed": "the file is corrupt",
        "attempt to write a readonly database": "the file or its directory is read-only",
        "database is locked": f"another process held the write lock for over {BUSY_TIMEOUT:g} s",
    }
    hint = next((h for known, h in hints.items() if known in text), None)
    return f"{text} ({hint})" if hint else text


def _check_bounds(max_sessions: int, max_per_user: int, idle_ttl: float) -> None:
    """The same ValueErrors as :class:`~trio_gateway.state.ownership.MemoryOwnershipStore`."""
    if max_sessions < 1 or max_per_user < 1:
        raise ValueError("max_sessions and max_per_user must be >= 1")
    if idle_ttl < 0:
        raise ValueError("idle_ttl must be >= 0")


class OwnershipDB:
    """The ownership records in one SQLite connection: blocking calls with an explicit ``now``.

    Same rules as :class:`~trio_gateway.state.ownership.MemoryOwnershipStore` (see there), with
    ``now`` in seconds of wall-clock time. Not safe for concurrent use: one thread at a time
    (:class:`SqliteOwnershipStore` guarantees that). Other *connections*, in this process or
    another, may use the same file at the same time: every check-and-set is one ``BEGIN
    IMMEDIATE`` transaction, so two claims of one session, from anywhere, have one winner.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        max_sessions: int = 1_000_000,
        max_per_user: int = 10_000,
        idle_ttl: float = 0.0,
    ) -> None:
        _check_bounds(max_sessions, max_per_user, idle_ttl)
        self.connection = connection
        self.max_sessions = max_sessions
        self.max_per_user = max_per_user
        self.idle_ttl = idle_ttl
        #: The absolute path of the file (set by :meth:`open`), for messages.
        self.path = ""

    @classmethod
    def open(
        cls,
        path: str,
        max_sessions: int = 1_000_000,
        max_per_user: int = 10_000,
        idle_ttl: float = 0.0,
    ) -> OwnershipDB:
        """Open (creating it if missing) the database at ``path``, in WAL mode, schema current.

        Raises :class:`SqliteStateError` with the path and the reason when the file cannot be
        created or written, is not a trio-gateway database, is corrupt or has a newer schema.
        The connection may then be used from any one thread at a time.
        """
        resolved = os.path.abspath(path)
        try:
            # Created here rather than by SQLite so that it is private to its user (SQLite
            # would use 0644): it names every user and their sessions. The -wal and -shm files
            # SQLite creates next to it copy these permissions.
            os.close(os.open(resolved, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as error:
            reason = error.strerror or str(error)
            if error.errno == errno.ENOENT:
                reason = f"the directory {os.path.dirname(resolved)} does not exist"
            raise SqliteStateError(
                f"cannot open the SQLite state file {resolved}: {reason}"
            ) from None
        try:
            # check_same_thread=False: trio's worker threads take turns on this connection
            # (one at a time, see SqliteOwnershipStore), which sqlite3 allows but checks by
            # default. isolation_level=None: we issue BEGIN/COMMIT ourselves.
            connection = sqlite3.connect(
                resolved, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise SqliteStateError(
                f"cannot open the SQLite state file {resolved}: {_describe(error)}"
            ) from None
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise SqliteStateError(
                    f"the SQLite state file {resolved} cannot use WAL mode (journal mode "
                    f"{mode!r}): put it on a local file system"
                )
            connection.execute("PRAGMA synchronous = NORMAL")
            _migrate(connection, resolved)
            # Prove that we may write (a read-only file or mount opens without complaint and
            # would only fail at the first claim, after the gateway reported ready).
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("UPDATE totals SET owners = owners WHERE id = 0")
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            connection.close()
            raise SqliteStateError(
                f"cannot use the SQLite state file {resolved}: {_describe(error)}"
            ) from None
        except BaseException:
            connection.close()
            raise
        db = cls(connection, max_sessions, max_per_user, idle_ttl)
        db.path = resolved
        return db

    def close(self) -> None:
        """Close the connection (the last one to close folds the WAL back into the file)."""
        self.connection.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the write lock up front (BEGIN IMMEDIATE), so that two
        processes never deadlock upgrading read locks; rolled back if the block raises."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self.connection
            self.connection.execute("COMMIT")
        finally:
            # After an error in the block, or a failed COMMIT (I/O error): never leave the
            # connection inside a transaction, or every later BEGIN would fail too.
            if self.connection.in_transaction:
                with suppress(sqlite3.Error):
                    self.connection.execute("ROLLBACK")

    def _deadline(self, now: float) -> float:
        """Records last used at or before this are expired (-inf: none expire)."""
        return now - self.idle_ttl if self.idle_ttl else -math.inf

    def claim(self, session_id: str, user: str, now: float) -> str:
        """Record ``user`` as owner of ``session_id`` if unowned; return the owner.

        Claiming an owned session (by anyone) counts as using it. Raises ValueError for an
        empty ``session_id`` or ``user``, :class:`OwnershipRefused` when a bound is reached.
        """
        if not session_id:
            raise ValueError("session_id must be a non-empty string")
        if not user:
            raise ValueError("user must be a non-empty string")
        # A new owner is committed with synchronous=FULL (see the module docstring). The level
        # cannot change inside a transaction, so decide from a plain read first; the
        # transaction below checks again, and a claim that lost a race meanwhile is merely
        # fsynced for nothing.
        durable = self.owner(session_id, now) is None
        if durable:
            self.connection.execute("PRAGMA synchronous = FULL")
        try:
            with self._write() as db:
                if self.idle_ttl:
                    db.execute("DELETE FROM owners WHERE used <= ?", (self._deadline(now),))
                row = db.execute(
                    "SELECT owner FROM owners WHERE session_id = ?", (session_id,)
                ).fetchone()
                if row is not None:
                    db.execute("UPDATE owners SET used = ? WHERE session_id = ?", (now, session_id))
                    return str(row[0])
                (total,) = db.execute("SELECT owners FROM totals WHERE id = 0").fetchone()
                if total >= self.max_sessions:
                    raise OwnershipRefused("store_full")
                (mine,) = db.execute(
                    "SELECT COUNT(*) FROM owners WHERE owner = ?", (user,)
                ).fetchone()
                if mine >= self.max_per_user:
                    raise OwnershipRefused("user_limit")
                db.execute(
                    "INSERT INTO owners (session_id, owner, used) VALUES (?, ?, ?)",
                    (session_id, user, now),
                )
                return user
        finally:
            if durable:
                self.connection.execute("PRAGMA synchronous = NORMAL")

    def owner(self, session_id: str, now: float) -> str | None:
        """The owner of ``session_id``, or None if nobody has claimed it (or it expired)."""
        row = self.connection.execute(
            "SELECT owner FROM owners WHERE session_id = ? AND used > ?",
            (session_id, self._deadline(now)),
        ).fetchone()
        return None if row is None else str(row[0])

    def sessions_of(self, user: str, now: float) -> frozenset[str]:
        """The sessions ``user`` owns (empty if none)."""
        rows = self.connection.execute(
            "SELECT session_id FROM owners WHERE owner = ? AND used > ?",
            (user, self._deadline(now)),
        ).fetchall()
        return frozenset(str(session_id) for (session_id,) in rows)

    def forget(self, session_id: str) -> None:
        """Drop the ownership record of ``session_id`` (no-op if there is none)."""
        with self._write() as db:
            db.execute("DELETE FROM owners WHERE session_id = ?", (session_id,))

    def count(self, now: float) -> int:
        """How many sessions have an owner on record (not expired)."""
        (count,) = self.connection.execute(
            "SELECT COUNT(*) FROM owners WHERE used > ?", (self._deadline(now),)
        ).fetchone()
        return int(count)


def _migrate(connection: sqlite3.Connection, path: str) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION` (create it in an empty file), or refuse."""
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise SqliteStateError(_newer_schema(path, version))
    # Several processes may start on a new file at once: the write lock serialises them, and
    # whoever comes second finds the schema in place.
    connection.execute("BEGIN IMMEDIATE")
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version == 0:
            _refuse_foreign(connection, path)
            for statement in _SCHEMA:
                connection.execute(statement)
        elif version > SCHEMA_VERSION:
            raise SqliteStateError(_newer_schema(path, version))
        # (Future versions: migrate version by version here, inside this transaction.)
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _newer_schema(path: str, version: int) -> str:
    return (
        f"the SQLite state file {path} has schema version {version}, newer than this "
        f"trio-gateway's ({SCHEMA_VERSION}): run the newer version, or point "
        "GATEWAY__SQLITE_PATH at another file"
    )


def _refuse_foreign(connection: sqlite3.Connection, path: str) -> None:
    """Raise unless the database has no tables (we never write into someone else's)."""
    tables = [
        str(name)
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        )
    ]
    if tables:
        raise SqliteStateError(
            f"{path} is not a trio-gateway state file (it has tables "
            f"{', '.join(sorted(tables)[:5])}): point GATEWAY__SQLITE_PATH at a new file"
        )


class SqliteOwnershipStore:
    """:class:`~trio_gateway.state.ownership.OwnershipStore` in a SQLite file, off the event loop.

    Start :meth:`run` in the app's nursery (it opens the file, reporting a
    :class:`SqliteStateError` as a startup failure, and closes it on the way out); until then,
    and after, every call raises :class:`~trio_gateway.state.state.StateUnavailable`, as does any
    SQLite failure at run time (disk full, lock held too long, I/O error): callers refuse new
    work with 503, fail closed.

    Threads: one connection, used from ``trio.to_thread.run_sync`` under a
    ``CapacityLimiter(1)`` of its own. A dedicated thread with a queue would pin the
    connection to one thread, but trio's thread cache already reuses idle workers, and the
    limiter gives the one property that matters: never two calls on the connection at once
    (a sqlite3 connection must not be used concurrently), in arrival order. It also keeps this
    store from taking more than one of trio's default worker slots. Calls are not abandoned
    on cancellation: a cancelled caller waits for its statement (bounded by
    :data:`BUSY_TIMEOUT`), so a transaction is never left half-done on the connection.
    """

    def __init__(
        self,
        path: str,
        max_sessions: int = 1_000_000,
        max_per_user: int = 10_000,
        idle_ttl: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_bounds(max_sessions, max_per_user, idle_ttl)  # at construction, not at open
        self.path = path
        self.max_sessions = max_sessions
        self.max_per_user = max_per_user
        self.idle_ttl = idle_ttl
        self._clock = clock
        self._limiter = trio.CapacityLimiter(1)
        self._db: OwnershipDB | None = None
        self._failing = False

    async def open(self) -> None:
        """Open the file (in a worker thread); :class:`SqliteStateError` if it is unusable."""
        if self._db is not None:
            raise RuntimeError("the SQLite ownership store is already open")
        self._db = await trio.to_thread.run_sync(
            partial(
                OwnershipDB.open, self.path, self.max_sessions, self.max_per_user, self.idle_ttl
            ),
            limiter=self._limiter,
        )
        logger.info("session ownership kept in %s", self._db.path, extra={"event": "state_up"})

    async def aclose(self) -> None:
        """Close the file once the calls in flight are done (shielded: safe while cancelled)."""
        db, self._db = self._db, None
        if db is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(db.close, limiter=self._limiter)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the file, report started, keep it open until cancelled, then close it."""
        await self.open()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            await self.aclose()

    async def _call(self, method: Callable[..., _T], *args: object) -> _T:
        """Run ``method`` of the open :class:`OwnershipDB` in the store's worker thread."""
        db = self._db
        if db is None:
            raise StateUnavailable(STATE_UNAVAILABLE)
        try:
            result = await trio.to_thread.run_sync(
                partial(method, db, *args), limiter=self._limiter
            )
        except sqlite3.Error as error:
            # Log the transition only: during an outage (disk full) every request fails.
            if not self._failing:
                self._failing = True
                logger.error(
                    "session ownership store (SQLite) failed: %s; refusing work that needs it",
                    _describe(error),
                    extra={"event": "state_down", "reason": type(error).__name__},
                )
            raise StateUnavailable(STATE_UNAVAILABLE) from error
        if self._failing:
            self._failing = False
            logger.info(
                "session ownership store (SQLite) answers again", extra={"event": "state_up"}
            )
        return result

    async def claim(self, session_id: str, user: str) -> str:
        """See :meth:`OwnershipDB.claim`."""
        if not session_id:  # fail before a thread hop, like the memory store
            raise ValueError("session_id must be a non-empty string")
        if not user:
            raise ValueError("user must be a non-empty string")
        return await self._call(OwnershipDB.claim, session_id, user, self._clock())

    async def owner(self, session_id: str) -> str | None:
        """See :meth:`OwnershipDB.owner`."""
        return await self._call(OwnershipDB.owner, session_id, self._clock())

    async def sessions_of(self, user: str) -> frozenset[str]:
        """See :meth:`OwnershipDB.sessions_of`."""
        return await self._call(OwnershipDB.sessions_of, user, self._clock())

    async def forget(self, session_id: str) -> None:
        """See :meth:`OwnershipDB.forget`."""
        await self._call(OwnershipDB.forget, session_id)

    async def count(self) -> int:
        """See :meth:`OwnershipDB.count`."""
        return await self._call(OwnershipDB.count, self._clock())


async def preflight(settings: Settings) -> None:
    """Open and close the state file once (in a worker thread) when ``STATE_BACKEND=sqlite``:
    raises :class:`SqliteStateError` if the gateway could not use it. For ``serve``, before it
    binds its port."""
    if settings.state_backend == "sqlite":
        db = await trio.to_thread.run_sync(OwnershipDB.open, settings.sqlite_path)
        await trio.to_thread.run_sync(db.close)


def ownership_store_for(settings: Settings) -> OwnershipStore:
    """The in-process ownership store ``STATE_BACKEND`` asks for: a :class:`SqliteOwnershipStore`
    (``sqlite``, not yet open: start its :meth:`~SqliteOwnershipStore.run`) or a
    :class:`~trio_gateway.state.ownership.MemoryOwnershipStore` (``memory``). Not for ``redis``."""
    if settings.state_backend == "sqlite":
        return SqliteOwnershipStore(
            settings.sqlite_path,
            max_per_user=settings.max_sessions_per_user,
            idle_ttl=settings.session_ownership_ttl,
        )
    return MemoryOwnershipStore(
        max_per_user=settings.max_sessions_per_user, idle_ttl=settings.session_ownership_ttl
    )


def inspect_database(path: str) -> str:
    """What ``trio-gateway check`` says about the state file at ``path`` (blocking).

    Never creates or changes the file: a missing one is fine when its directory is writable
    (the gateway creates it at startup). Returns one line of detail; raises
    :class:`SqliteStateError` with the reason the gateway would fail to start. (The messages
    leave the path out: the report shows it next to them.)
    """
    resolved = os.path.abspath(path)
    # A relative path depends on the working directory: say where it leads.
    where = "" if os.path.isabs(path) else f"{resolved}: "
    try:
        return where + _inspect(resolved)
    except SqliteStateError as error:
        raise SqliteStateError(where + str(error)) from None


def _inspect(resolved: str) -> str:
    """:func:`inspect_database` of an absolute path."""
    if not os.path.exists(resolved):
        directory = os.path.dirname(resolved)
        if not os.path.isdir(directory):
            raise SqliteStateError(f"the directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SqliteStateError(f"the directory {directory} is not writable")
        return "not there yet: created at startup (the directory is writable)"
    if not os.path.isfile(resolved):
        raise SqliteStateError("not a regular file")
    if not os.access(resolved, os.R_OK | os.W_OK):
        raise SqliteStateError("not writable by this user")
    try:
        connection = sqlite3.connect(
            f"file:{quote(resolved)}?mode=rw", uri=True, timeout=BUSY_TIMEOUT
        )
    except sqlite3.Error as error:
        raise SqliteStateError(_describe(error)) from None
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise SqliteStateError(_newer_schema(resolved, version))
        if version == 0:
            _refuse_foreign(connection, resolved)
            return "no schema yet: created at startup"
        (integrity,) = connection.execute("PRAGMA quick_check(1)").fetchone()
        if integrity != "ok":
            raise SqliteStateError(f"corrupt: {integrity}")
        (owners,) = connection.execute("SELECT owners FROM totals WHERE id = 0").fetchone()
        return f"schema {version}, {owners} owner record(s)"
    except sqlite3.Error as error:
        raise SqliteStateError(_describe(error)) from None
    finally:
        connection.close()
