"""The store's ground floor: opening and creating it, its connection, transactions,
and whole tables for `store copy`.

Every write goes through `_write()`: one transaction that takes the store's write lock
up front (`BEGIN IMMEDIATE` on SQLite, an advisory lock on PostgreSQL), so
read-check-write steps cannot interleave, whichever process or host runs them. Its
end steps the audit head (auditlog/head.py), which `audit.AuditMixin` keeps."""

from __future__ import annotations

import os

from gatekeeper import pathstr
from gatekeeper.errors import InputError, StoreError
from gatekeeper.store.schema import (
    ID_TABLES,
    MIGRATIONS,
    SCHEMA_VERSION,
    TABLE_ORDER,
    TABLES,
    _check_version,
    _split_sql,
)
from gatekeeper.store.url import StoreLocation, parse_store_url

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from types import TracebackType
    from typing import Any, Self

    from gatekeeper.store.postgres import LibpqDatabase, PostgresDatabase
    from gatekeeper.store.sqlite import SqliteDatabase

    Database = SqliteDatabase | PostgresDatabase | LibpqDatabase

SERVER_KEY_NAME = "server.key"
BUSY_TIMEOUT_MS = 5000


class StoreBase:
    """What the rest of `Store` stands on: the connection to the state, the state
    directory beside it, and the transactions every statement runs in."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        db: Database,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    ) -> None:
        # Strings spelled as pathlib spells them (`pathstr`): the forced command opens
        # a store and writes the head file without importing pathlib.
        self._state_dir = pathstr.norm(state_dir)
        self.db = db
        self._in_write = False  # a write transaction is under way
        self.schema_before = -1  # the schema version `migrate` found

    # -- opening ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        state_dir: Path | str,
        url: str = "",
        *,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        light: bool = False,
        readonly: bool = False,
    ) -> Self:
        """Open an existing store; refuse clearly if it is missing, unreachable,
        corrupt or not at this schema. `url` is the policy's `server.store`. `light`:
        a short-lived process on the git-access path (PostgreSQL through libpq).
        `readonly`: a lookup that must work with read permission alone (keys-command
        as a least-privilege AuthorizedKeysCommandUser)."""
        state_dir = pathstr.norm(state_dir)
        location = _location(url, state_dir)
        db = _connect(location, busy_timeout_ms, light=light, readonly=readonly)
        store = cls(state_dir, db, busy_timeout_ms)
        try:
            version = store._schema_version()
            _check_version(version, store.where)
        except BaseException:
            db.close()
            raise
        return store

    @classmethod
    def create(
        cls,
        state_dir: Path | str,
        url: str = "",
        *,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        light: bool = False,
    ) -> Self:
        """Create (or migrate) the store, and the state directory with tight permissions."""
        from pathlib import Path

        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create state directory {state_dir}: {exc.strerror}",
                hint="create it as root and give it to the git user, or choose another state_dir.",
            ) from exc
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise StoreError(
                f"state directory is not writable: {state_dir}",
                hint="run as the git user, or fix the directory's owner and mode.",
            )
        location = _location(url, str(state_dir))
        old_umask = os.umask(0o077)
        try:
            db = _connect(location, busy_timeout_ms, create=True, light=light)
        finally:
            os.umask(old_umask)
        store = cls(state_dir, db, busy_timeout_ms)
        try:
            store.migrate()
        except BaseException:
            db.close()
            raise
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> Any:
        """The driver's connection (sqlite3 or psycopg), for tests and tools."""
        return self.db.conn

    @property
    def kind(self) -> str:
        return self.db.kind

    @property
    def where(self) -> str:
        """The database, for messages: a file path or a URL without its query."""
        return self.db.where

    @property
    def state_dir(self) -> Path:
        from pathlib import Path

        return Path(self._state_dir)

    @property
    def path(self) -> Path:
        """The SQLite file (for a PostgreSQL store: what `where` says)."""
        from pathlib import Path

        return Path(self.db.where)

    @property
    def server_key_path(self) -> Path:
        return self.state_dir / SERVER_KEY_NAME

    def _schema_version(self) -> int:
        try:
            return self.db.schema_version()
        except self.db.errors as exc:
            raise self.db.error(exc) from exc

    def migrate(self) -> int:
        """Bring the schema up to date; return the version reached. Safe to run from
        several hosts at once: each step re-reads the version under the write lock."""
        version = self.schema_before = self._schema_version()
        if version > SCHEMA_VERSION:
            _check_version(version, self.where)
        while version < SCHEMA_VERSION:
            with self._write():
                version = self.db.schema_version()
                if version >= SCHEMA_VERSION:
                    break
                target = version + 1
                for statement in _split_sql(self.db.ddl(MIGRATIONS[target])):
                    self.db.execute(statement)
                self.db.set_schema_version(target)
            version = target
        return SCHEMA_VERSION

    # -- whole tables (`store copy`) ---------------------------------------------

    def is_empty(self) -> bool:
        """No row in any table: what `store copy` may write into without --replace."""
        return all(self.count_rows(table) == 0 for table in TABLES)

    def count_rows(self, table: str) -> int:
        row = self._read_one(f"SELECT count(*) AS n FROM {_table(table)}")  # noqa: S608
        return int(row["n"])

    def dump_table(self, table: str) -> list[dict[str, Any]]:
        """Every row of `table`, in key order, as plain values."""
        order = TABLE_ORDER.get(table, "id")
        rows = self._read(f"SELECT * FROM {_table(table)} ORDER BY {order}")  # noqa: S608
        # psycopg may hand BYTEA back as a memoryview.
        return [
            {k: bytes(v) if isinstance(v, memoryview) else v for k, v in dict(r).items()}
            for r in rows
        ]

    def load_table(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows as they are, ids included; run inside `write_lock()`."""
        if not rows:
            return
        columns = list(rows[0])
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join("?" for _ in columns)
        sql = f"INSERT INTO {_table(table)} ({names}) VALUES ({marks})"  # noqa: S608
        try:
            self.db.executemany(sql, [[r[c] for c in columns] for r in rows])
        except self.db.errors as exc:
            raise self.db.error(exc) from exc
        if table in ID_TABLES:
            self.db.reset_sequences([table])

    def clear_tables(self) -> None:
        """Delete every row (children first); run inside `write_lock()`."""
        for table in reversed(TABLES):
            self._exec(f"DELETE FROM {_table(table)}")  # noqa: S608

    def write_lock(self) -> _WriteTransaction:
        """Hold the store's write lock (one transaction): nobody else writes meanwhile."""
        return self._write()

    # -- transactions ----------------------------------------------------------

    def _write(self) -> _WriteTransaction:
        """A write transaction that takes the store's write lock up front."""
        return _WriteTransaction(self)

    def _rollback(self) -> None:
        # A head already written pending stays: it resolves by what the database has.
        try:
            self.db.rollback()
        except self.db.errors:
            pass  # a lost connection: the server rolled back already

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return list(self.db.execute(sql, params).fetchall())
        except self.db.errors as exc:
            raise self.db.error(exc) from exc

    def _read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._read(sql, params)
        return rows[0] if rows else None

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self.db.execute(sql, params)
        except self.db.errors as exc:
            raise self.db.error(exc) from exc

    def _insert(self, sql: str, params: Sequence[Any]) -> int:
        """An INSERT into a table with an `id` column; returns the new id."""
        try:
            return self.db.insert_id(sql, params)
        except self.db.errors as exc:
            raise self.db.error(exc) from exc

    def _begin_read(self) -> None:
        try:
            self.db.begin_read()
        except self.db.errors as exc:
            raise self.db.error(exc) from exc

    if TYPE_CHECKING:
        # The audit head's steps around COMMIT (auditlog/head.py): `AuditMixin`'s.
        def _write_pending_head(self) -> None: ...
        def _settle_head(self) -> None: ...
        def _end_head(self) -> None: ...


class _WriteTransaction:
    """`with store._write():` one write transaction, its lock taken up front; committed
    when the block ends, rolled back when it raises (anything, KeyboardInterrupt too).
    A class rather than `contextlib.contextmanager`: contextlib would bring functools
    and collections onto the forced command's path (docs/performance.md)."""

    def __init__(self, store: StoreBase) -> None:
        self.store = store

    def __enter__(self) -> None:
        db = self.store.db
        try:
            db.begin_write()
        except db.errors as exc:
            raise db.error(exc) from exc
        self.store._in_write = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store, db = self.store, self.store.db
        try:
            if exc_type is not None:
                store._rollback()
                return
            try:
                store._write_pending_head()
                db.commit()
            except db.errors as error:
                # A full disk makes COMMIT fail after the head was written pending.
                store._rollback()
                raise db.error(error) from error
            except BaseException:
                store._rollback()
                raise
            store._settle_head()
        finally:
            store._in_write = False
            store._end_head()


def _table(name: str) -> str:
    if name not in TABLES:
        raise ValueError(f"not a store table: {name!r}")
    return name


def _location(url: str, state_dir: str) -> StoreLocation:
    try:
        return parse_store_url(url, state_dir)
    except InputError as exc:
        raise StoreError(f"invalid store URL: {exc.message}", hint=exc.hint) from exc


def _connect(
    location: StoreLocation,
    busy_timeout_ms: int,
    *,
    create: bool = False,
    light: bool = False,
    readonly: bool = False,
) -> Database:
    if location.is_postgres:
        from gatekeeper.store import postgres

        if light:
            from gatekeeper.store import libpq

            try:
                libpq.load()
            except libpq.PgError:
                pass  # no libpq of its own: psycopg's way, slower but there
            else:
                return postgres.LibpqDatabase(location, busy_timeout_ms)
        return postgres.PostgresDatabase(location, busy_timeout_ms)
    from gatekeeper.store.sqlite import SqliteDatabase

    if not create:
        SqliteDatabase.check_openable(location.path)
    return SqliteDatabase(location.path, busy_timeout_ms, create=create, readonly=readonly)
