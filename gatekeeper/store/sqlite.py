"""The SQLite side of the store: one file, many short-lived processes.

Rules learned the hard way (docs/design.md, "The store"):
- WAL mode and a busy timeout, so many short-lived processes share the file.
- Every write transaction starts with `BEGIN IMMEDIATE`: a deferred transaction
  that upgrades to a write ignores the busy timeout and fails under concurrency.
- `synchronous = FULL`: a commit is on disk when COMMIT returns (the audit head's
  protocol needs it, auditlog/head.py).
"""

from __future__ import annotations

import os

from gatekeeper.errors import PermissionDenied, StoreError
from gatekeeper.lightstd import sqlite3_module

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Sequence
    from typing import Any
else:
    # `_sqlite3` without `sqlite3`'s and `functools`' imports: lightstd.py.
    sqlite3 = sqlite3_module()


class SqliteDatabase:
    """One connection to a SQLite store file, in the shape `Store` expects."""

    kind = "sqlite"
    errors: tuple[type[Exception], ...] = (sqlite3.DatabaseError,)

    def __init__(
        self, path: str, busy_timeout_ms: int, *, create: bool = False, readonly: bool = False
    ) -> None:
        self.path = path
        self.where = path
        mode = "ro" if readonly else "rwc" if create else "rw"
        try:
            conn = self._open(f"file:{path}?mode={mode}", busy_timeout_ms)
            if readonly:
                conn = self._readable(conn, path, busy_timeout_ms)
        except sqlite3.DatabaseError as exc:
            raise self.error(exc) from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not readonly:
                conn.execute("PRAGMA foreign_keys = ON")
                mode_row = conn.execute("PRAGMA journal_mode").fetchone()
                if mode_row[0] != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                # FULL, not NORMAL: in WAL mode NORMAL syncs the WAL only at checkpoints,
                # so a power loss may take back commits that had returned. The audit head
                # is settled right after COMMIT (auditlog/head.py), and a settled head
                # that outlives its commit reads as records cut off: the commit must be on
                # disk first. One fsync of the WAL per write transaction.
                conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self.error(exc) from exc
        self.conn = conn

    @staticmethod
    def _open(uri: str, busy_timeout_ms: int) -> sqlite3.Connection:
        return sqlite3.connect(
            uri,
            uri=True,
            timeout=busy_timeout_ms / 1000,
            isolation_level=None,  # we issue BEGIN IMMEDIATE ourselves
            check_same_thread=False,
        )

    @classmethod
    def _readable(
        cls, conn: sqlite3.Connection, path: str, busy_timeout_ms: int
    ) -> sqlite3.Connection:
        """A read-only connection that can really read. In WAL mode a reader needs the
        `-shm` file: with read permission alone SQLite cannot create it, and refuses
        ("attempt to write a readonly database") when no writer has it open. Then
        nothing is in a `-wal` file either, and the database file alone is the whole
        state: read it as immutable, which needs no `-shm`."""
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return conn
        except sqlite3.DatabaseError:
            if os.path.exists(path + "-wal"):
                conn.close()
                raise
        conn.close()
        return cls._open(f"file:{path}?mode=ro&immutable=1", busy_timeout_ms)

    @staticmethod
    def check_openable(path: str) -> None:
        """Refuse clearly before connecting: SQLite would create a missing file."""
        try:
            os.stat(path)
        except FileNotFoundError:
            state_dir = os.path.dirname(path)
            if not os.path.exists(state_dir):
                raise StoreError(
                    f"state directory not found: {state_dir}",
                    hint="run `gatekeeper init` (or check state_dir in the policy file).",
                ) from None
            raise StoreError(
                f"state database not found: {path}", hint="run `gatekeeper init`."
            ) from None
        except PermissionError:
            pass  # a directory on the way cannot be searched: said below
        if not os.access(path, os.R_OK):
            from gatekeeper.statedir import ownership_hint

            raise PermissionDenied(
                f"state database is not readable: {path}", hint=ownership_hint(path)
            )

    def exists(self) -> bool:
        return self.schema_version() > 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def insert_id(self, sql: str, params: Sequence[Any]) -> int:
        return int(self.conn.execute(sql, params).lastrowid or 0)

    def begin_write(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def begin_read(self) -> None:
        """A read transaction: every SELECT until `rollback` sees one snapshot (WAL
        mode fixes it at the first)."""
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        # SQLite rolls back by itself on some errors (SQLITE_FULL at COMMIT).
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def schema_version(self) -> int:
        row = self.conn.execute("PRAGMA user_version").fetchone()
        return int(row[0]) if row else 0

    def set_schema_version(self, version: int) -> None:
        self.conn.execute(f"PRAGMA user_version = {int(version)}")

    @staticmethod
    def ddl(script: str) -> str:
        return script.replace("{serial}", "INTEGER PRIMARY KEY")

    def reset_sequences(self, tables: Sequence[str]) -> None:
        """Nothing to do: a rowid picks up after the largest id by itself."""

    def close(self) -> None:
        self.conn.close()

    def error(self, exc: BaseException) -> StoreError:
        text = str(exc)
        path = self.path
        if "locked" in text or "busy" in text:
            return StoreError(
                f"state database is busy: {path} is locked by another process.",
                hint="try again in a moment; if it persists, look for a stuck gatekeeper process.",
                busy=True,
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return StoreError(
                f"state database is corrupt: {path} ({text}).",
                hint="restore it from a backup; gatekeeper refuses all access until then.",
            )
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            denied = _not_ours(path)
            if denied is not None:
                from gatekeeper.statedir import ownership_hint

                return PermissionDenied(
                    f"state database cannot be used: {denied} is not writable by this account "
                    f"({text}).",
                    hint=ownership_hint(denied),
                )
            return StoreError(
                f"state database cannot be written: {path} ({text}).",
                hint="run as the git user; the state directory and database must be writable "
                "by it.",
            )
        if "disk" in text and ("full" in text or "I/O" in text):
            return StoreError(
                f"state database cannot be written: {path} ({text}).",
                hint="free disk space; gatekeeper refuses access while it cannot keep its "
                "audit log.",
            )
        return StoreError(f"state database error: {path}: {text}", hint="see the server log.")


def _not_ours(path: str) -> str | None:
    """The first of the database, its WAL files and its directory that this account
    cannot write, if any: SQLite says only "readonly" or "unable to open"."""
    directory = os.path.dirname(path) or "."
    for name, mode in (
        (directory, os.W_OK | os.X_OK),
        (path, os.R_OK | os.W_OK),
        (path + "-wal", os.R_OK | os.W_OK),
        (path + "-shm", os.R_OK | os.W_OK),
    ):
        if os.path.lexists(name) and not os.access(name, mode):
            return name
    return None
