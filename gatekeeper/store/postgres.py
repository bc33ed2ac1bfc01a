"""The PostgreSQL side of the store: one database shared by several git front-ends.

What SQLite's `BEGIN IMMEDIATE` gives for free, one writer at a time, is taken here
with a transaction-scoped advisory lock at the start of every write transaction. The
store's read-check-write steps (the replay guard, failure counting and lockout,
session creation, appending to the audit chain) then run exactly as they do on
SQLite, whichever front-end they come from: no forked chain, no double use of a
timestep. Writes are a few short statements, so one lock costs little.

Nothing here may hang a git client: connecting has a timeout, and so do waiting for
that lock and every statement.

Two drivers speak the same SQL: psycopg for long-lived processes (the admin CLI, the
embedded server) and libpq through ctypes for the per-connection path, which cannot
afford psycopg's import (see `gatekeeper.store.libpq`).
"""

from __future__ import annotations

from gatekeeper.errors import InputError, PermissionDenied, StoreError
from gatekeeper.store.url import DEFAULT_CONNECT_TIMEOUT, StoreLocation, read_password_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Any

# pg_advisory_xact_lock key for "a gatekeeper write transaction" ("gk" + "wr").
WRITE_LOCK_KEY = 0x676B7772
SCHEMA_TABLE = "gatekeeper_schema"
_SCHEMA_PRESENT = "SELECT to_regclass(?) IS NOT NULL AS present"
_SCHEMA_READ = "SELECT max(version) AS v FROM gatekeeper_schema"
_SCHEMA_WRITE = (
    "CREATE TABLE IF NOT EXISTS gatekeeper_schema (version INTEGER NOT NULL)",
    "DELETE FROM gatekeeper_schema",
    "INSERT INTO gatekeeper_schema (version) VALUES (?)",
)
IN_TRANSACTION = (2, 3)  # libpq's PQTRANS_INTRANS, PQTRANS_INERROR
UNKNOWN = 4  # PQTRANS_UNKNOWN: no usable connection


def _driver() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError(
            "the store is PostgreSQL, but the psycopg driver is not installed.",
            hint="install gatekeeper with its postgres extra: pip install 'gatekeeper[postgres]'.",
        ) from exc
    return psycopg


def connect_params(location: StoreLocation, busy_timeout_ms: int) -> dict[str, str]:
    """libpq connection keywords beside the URL: timeouts so that nothing hangs a git
    client, and the password from its file. The URL's own settings win."""
    url = location.url
    params: dict[str, str] = {}
    if "connect_timeout=" not in url:
        params["connect_timeout"] = str(DEFAULT_CONNECT_TIMEOUT)
    if "application_name=" not in url:
        params["application_name"] = "gatekeeper"
    if "options=" not in url:
        timeout = int(busy_timeout_ms)
        # synchronous_commit=on whatever the server's default: the audit head is
        # settled once COMMIT returns (auditlog/head.py), so a commit must be
        # durable by then.
        params["options"] = (
            f"-c lock_timeout={timeout} -c statement_timeout={timeout * 3}"
            f" -c idle_in_transaction_session_timeout={timeout * 6}"
            " -c synchronous_commit=on"
        )
    if location.password_file:
        try:
            params["password"] = read_password_file(location.password_file)
        except InputError as exc:
            # A server-side fault like any other unreachable store: the forced command
            # logs it and tells the git client only that 2FA state cannot be read.
            raise StoreError(exc.message, hint=exc.hint) from exc
    return params


class _Postgres:
    """What both drivers share: the dialect, the write lock, the schema version table
    and what each error means to the user."""

    kind = "postgresql"
    where = ""
    errors: tuple[type[Exception], ...] = ()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def transaction_status(self) -> int:
        raise NotImplementedError

    def insert_id(self, sql: str, params: Sequence[Any]) -> int:
        row = self.execute(f"{sql} RETURNING id", params).fetchone()
        return int(row["id"])

    def begin_write(self) -> None:
        self.execute("BEGIN")
        try:
            self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))
        except BaseException:
            self.rollback()
            raise

    def begin_read(self) -> None:
        """A read transaction: every SELECT until `rollback` sees one snapshot."""
        self.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        # After a lost connection there is nothing to roll back.
        if self.transaction_status() in IN_TRANSACTION:
            self.execute("ROLLBACK")

    def schema_version(self) -> int:
        if not self.execute(_SCHEMA_PRESENT, (SCHEMA_TABLE,)).fetchone()["present"]:
            return 0
        return int(self.execute(_SCHEMA_READ).fetchone()["v"] or 0)

    def set_schema_version(self, version: int) -> None:
        create, clear, insert = _SCHEMA_WRITE
        self.execute(create)
        self.execute(clear)
        self.execute(insert, (int(version),))

    @staticmethod
    def ddl(script: str) -> str:
        # 64-bit integers throughout (timestamps outlive 2038), identity columns for ids.
        return (
            script.replace("INTEGER", "BIGINT")
            .replace("BLOB", "BYTEA")
            .replace("{serial}", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
        )

    def reset_sequences(self, tables: Sequence[str]) -> None:
        """After rows were copied in with their ids, new ids must start above them."""
        for table in tables:
            self.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"  # noqa: S608
                f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
            )

    def error(self, exc: BaseException) -> StoreError:
        where = self.where
        state = getattr(exc, "sqlstate", None) or ""
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if state in ("28P01", "28000") or "password authentication failed" in text:
            return StoreError(
                f"cannot log in to the state database {where}: {text}",
                hint="check the user in the store URL and its password (password_file=, "
                "PGPASSFILE or PGPASSWORD).",
            )
        if state == "3D000" or ("database" in text and "does not exist" in text):
            return StoreError(
                f"the state database {where} does not exist: {text}",
                hint="create it (createdb -O USER NAME), then run `gatekeeper init`.",
            )
        if state in ("55P03", "57014", "40001", "40P01"):
            return StoreError(
                f"state database is busy: {where} ({text}).",
                hint="try again in a moment; if it persists, look for a stuck gatekeeper "
                "process or a long transaction.",
                busy=True,
            )
        if state == "42501":
            return PermissionDenied(
                f"state database cannot be written: {where} ({text}).",
                hint="grant the store's user rights on gatekeeper's tables (it should own them).",
            )
        if state.startswith("53"):
            return StoreError(
                f"state database cannot be written: {where} ({text}).",
                hint="free space on the database server; gatekeeper refuses access while it "
                "cannot keep its audit log.",
            )
        if state.startswith("08") or not state:
            return StoreError(
                f"cannot reach the state database {where}: {text}",
                hint="check that PostgreSQL is running and reachable from this host; "
                "gatekeeper refuses access until it is.",
            )
        return StoreError(f"state database error: {where}: {text}", hint="see the server log.")


class PostgresDatabase(_Postgres):
    """One psycopg connection to a PostgreSQL store, in the shape `Store` expects."""

    def __init__(self, location: StoreLocation, busy_timeout_ms: int) -> None:
        psycopg = _driver()
        from psycopg.rows import dict_row

        self.errors = (psycopg.Error,)
        self.where = location.describe()
        self._sql: dict[str, str] = {}
        params = connect_params(location, busy_timeout_ms)
        try:
            self.conn = psycopg.connect(
                location.url, autocommit=True, row_factory=dict_row, **params
            )
        except psycopg.Error as exc:
            raise self.error(exc) from exc

    def _translate(self, sql: str) -> str:
        """The store writes SQLite's `?` placeholders; psycopg wants `%s` (and `%%`)."""
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self._translate(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self._translate(sql), [tuple(r) for r in rows])

    def transaction_status(self) -> int:
        return UNKNOWN if self.conn.closed else int(self.conn.info.transaction_status)

    def close(self) -> None:
        self.conn.close()


class LibpqDatabase(_Postgres):
    """The same over libpq directly (see `gatekeeper.store.libpq`), for the per-connection
    path, which cannot afford importing psycopg."""

    def __init__(self, location: StoreLocation, busy_timeout_ms: int) -> None:
        from gatekeeper.store import libpq

        self.errors = (libpq.PgError,)
        self.where = location.describe()
        self._sql: dict[str, str] = {}
        params = {"dbname": location.url, "client_encoding": "UTF8"}
        params.update(connect_params(location, busy_timeout_ms))
        try:
            self.conn = libpq.Connection(params)
        except libpq.PgError as exc:
            raise self.error(exc) from exc

    def _translate(self, sql: str) -> str:
        """`?` placeholders become $1, $2, ... (the store's SQL has no `?` in a literal)."""
        out = self._sql.get(sql)
        if out is None:
            parts = sql.split("?")
            out = parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], 1))
            self._sql[sql] = out
        return out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self._translate(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        for row in rows:
            self.execute(sql, row)

    def transaction_status(self) -> int:
        return self.conn.transaction_status()

    def close(self) -> None:
        self.conn.close()
