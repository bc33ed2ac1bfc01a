"""All SQL lives here: users, keys, TOTP enrollments, sessions, lockouts, audit log.

One set of statements for both stores: SQLite through the standard library (the
default, so the git-access path stays light; see `sqlite`) and PostgreSQL for
several front-ends sharing one state (see `postgres`). The SQL is the common subset of
the two, with `?` placeholders and `"user"` quoted (a reserved word in PostgreSQL).
- Every write transaction takes the store's one write lock up front (`_write`), so
  read-check-write steps cannot interleave, whichever process or host runs them.
- Every change is audited inside its own transaction: no record, no change.
- The replay guard is one conditional UPDATE: a timestep is accepted only if it is
  strictly greater than the last accepted one, so of two racing uses one wins.
"""

from __future__ import annotations

import os
import time

from gatekeeper import pathstr
from gatekeeper.auditlog import chain
from gatekeeper.auditlog.chain import utc_iso as utc_iso  # re-exported: callers use it
from gatekeeper.auditlog.head import HEAD_NAME as HEAD_NAME
from gatekeeper.auditlog.head import Head, HeadFile, Recovery
from gatekeeper.errors import InputError, NotFound, PermissionDenied, StoreError
from gatekeeper.record import record
from gatekeeper.store.url import DB_NAME, StoreLocation, parse_store_url  # noqa: F401

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from types import TracebackType
    from typing import Any

    from gatekeeper.store.postgres import LibpqDatabase, PostgresDatabase
    from gatekeeper.store.sqlite import SqliteDatabase

    Database = SqliteDatabase | PostgresDatabase | LibpqDatabase

SCHEMA_VERSION = 3
SERVER_KEY_NAME = "server.key"
BUSY_TIMEOUT_MS = 5000
USER_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE users (
        id {serial},
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE keys (
        id {serial},
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        fingerprint TEXT NOT NULL UNIQUE,
        key_type TEXT NOT NULL,
        blob TEXT NOT NULL,
        bits INTEGER NOT NULL,
        comment TEXT NOT NULL DEFAULT '',
        added_at INTEGER NOT NULL
    );
    CREATE INDEX keys_user ON keys(user_id);
    CREATE TABLE totp (
        user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        secret BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        confirmed_at INTEGER,
        last_timestep INTEGER NOT NULL DEFAULT -1
    );
    CREATE TABLE recovery_codes (
        id {serial},
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        code_hash TEXT NOT NULL,
        used_at INTEGER
    );
    CREATE INDEX recovery_codes_user ON recovery_codes(user_id);
    CREATE TABLE sessions (
        id {serial},
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        source TEXT
    );
    CREATE INDEX sessions_user_key ON sessions(user_id, key_id, expires_at);
    CREATE TABLE failures (
        user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        count INTEGER NOT NULL,
        window_start INTEGER NOT NULL,
        locked_until INTEGER
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        event TEXT NOT NULL,
        actor TEXT,
        "user" TEXT,
        key_fp TEXT,
        repo TEXT,
        action TEXT,
        reason TEXT,
        client TEXT,
        detail TEXT NOT NULL DEFAULT '{}',
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_user ON audit("user", seq);
    CREATE INDEX audit_repo ON audit(repo, seq);
    CREATE TABLE audit_anchor (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # Per-connection identities for the git hooks: the forced command records one for
    # each git request it allows (only the token's SHA-256 is stored).
    2: """
    CREATE TABLE hook_tokens (
        token_hash TEXT PRIMARY KEY,
        "user" TEXT NOT NULL,
        key_id INTEGER NOT NULL,
        key_fp TEXT NOT NULL,
        repo TEXT NOT NULL,
        action TEXT NOT NULL,
        client TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX hook_tokens_expires ON hook_tokens(expires_at);
    """,
    # Security keys (FIDO2 `sk-` keys): whether a key is one, whether it must prove user
    # verification (a PIN) on every use, and the authenticator's last signature counter
    # the embedded server saw (a counter that does not increase is a cloned key).
    3: """
    ALTER TABLE keys ADD COLUMN sk INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE keys ADD COLUMN verify_required INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE keys ADD COLUMN sk_counter INTEGER NOT NULL DEFAULT -1;
    ALTER TABLE hook_tokens ADD COLUMN factor TEXT;
    """,
}

# Every table, parents before children (so foreign keys hold at every insert).
TABLES = (
    "users",
    "keys",
    "totp",
    "recovery_codes",
    "sessions",
    "failures",
    "audit_anchor",
    "audit",
    "hook_tokens",
)
ID_TABLES = ("users", "keys", "recovery_codes", "sessions")  # ids from a sequence
TABLE_ORDER = {
    "audit": "seq",
    "totp": "user_id",
    "failures": "user_id",
    "hook_tokens": "token_hash",
}


@record
class User:
    id: int
    name: str
    created_at: int


@record
class KeyRecord:
    id: int
    user_id: int
    user: str
    fingerprint: str
    key_type: str
    blob: str
    bits: int
    comment: str
    added_at: int
    sk: bool = False
    """A FIDO2 security key (`sk-ssh-ed25519@openssh.com`, `sk-ecdsa-...`): every
    signature needs a touch, which every front-end enforces."""
    verify_required: bool = False
    """The key must also prove user verification (a PIN or biometric) on every use."""

    @property
    def factor(self) -> str | None:
        """What a connection signed by this key proves by itself, every front-end
        enforcing it: `touch`, `touch+pin`, or None (not a security key)."""
        if not self.sk:
            return None
        return "touch+pin" if self.verify_required else "touch"


@record
class Totp:
    user_id: int
    secret: bytes
    created_at: int
    confirmed_at: int | None
    last_timestep: int

    @property
    def confirmed(self) -> bool:
        return self.confirmed_at is not None


@record
class CodeCheck:
    """How `Store.check_totp_code` judged a code."""

    outcome: str
    """accepted, replayed (right, but its timestep was used already), wrong, locked (not
    evaluated), or changed (no enrollment, or not in the state asked for)."""
    step: int | None = None
    """The timestep the code matched (accepted, replayed)."""
    locked_until: int | None = None
    """The lock that refused it (locked), or that this failure set (wrong)."""


@record
class HookToken:
    """What the forced command allowed one connection to do, for its git hooks to check."""

    user: str
    key_id: int
    key_fp: str
    repo: str
    action: str
    client: str | None
    created_at: int
    expires_at: int
    factor: str | None = None
    """What the connection's security key proved (`touch`, `touch+pin`), for the hooks'
    re-check of a repository that needs one."""


def token_digest(token: str) -> str:
    """How a hook token is stored: its SHA-256, so reading the database forges nothing."""
    from gatekeeper.auditlog.chain import sha256  # the builtin one, not OpenSSL's hashlib

    return sha256(token.encode("utf-8")).hexdigest()


@record
class AuditView:
    """What `log verify` checks, read as one consistent picture (`Store.audit_view`)."""

    records: list[dict[str, Any]]
    anchor: tuple[int, str] | None
    head: tuple[int, str] | None
    head_error: str | None  # the head file is there but cannot be used
    recovered: Recovery | None


@record
class ConnectionFacts:
    """Everything the git-access path needs about a key, read in one query."""

    key: KeyRecord
    enrolled: bool
    pending: bool
    verified_until: int | None
    locked_until: int | None


def validate_user_name(name: str) -> str:
    import re

    if not re.match(USER_NAME_PATTERN, name):
        raise InputError(
            f"invalid user name {name!r}.",
            hint="use 1-64 letters, digits, '_', '.', '-', starting with a letter, digit or '_'.",
        )
    return name


class Store:
    """One open connection to the state: a SQLite file or a PostgreSQL database.

    `state_dir` always holds this host's files beside the database: the server key
    (which front-ends sharing a database must share too) and the audit head file."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        db: Database,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    ) -> None:
        # Strings spelled as pathlib spells them (`pathstr`): the forced command opens
        # a store and writes the head file without importing pathlib.
        self._state_dir = pathstr.norm(state_dir)
        self.head = HeadFile(self._state_dir, busy_timeout_ms)
        self.db = db
        # The write transaction under way, if any, and the audit ends it moves the head
        # between (see auditlog/head.py): `_head_old` from its first record on,
        # `_head_new` once it appended one.
        self._in_write = False
        self._head_old: tuple[int, str] | None = None
        self._head_new: tuple[int, str] | None = None
        self._ahead: tuple[int, str] | None = None  # a settled head to chain on from
        self._chain_start = (0, chain.GENESIS)  # the log's end when the transaction began
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
    ) -> Store:
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
    ) -> Store:
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

    def __enter__(self) -> Store:
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

    @property
    def head_path(self) -> Path:
        return self.state_dir / HEAD_NAME

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

    # -- audit -----------------------------------------------------------------

    def _append_audit(self, event: str, now: float, **fields: Any) -> int:
        """Append one chained record; must run inside `_write()`, which writes the head
        file for the transaction's last record (auditlog/head.py)."""
        self._begin_audit()
        prev_seq, prev_hash = self._head_new or self._ahead or self._chain_start
        record: dict[str, Any] = {f: fields.get(f) for f in chain.FIELDS}
        record["seq"] = prev_seq + 1
        record["at"] = utc_iso(now)
        record["event"] = event
        record["detail"] = chain.canonical_json(fields.get("detail") or {})
        digest = chain.record_hash(prev_hash, record)
        self._exec(
            'INSERT INTO audit (seq, at, event, actor, "user", key_fp, repo, action, reason,'
            " client, detail, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (*(record[f] for f in chain.FIELDS), prev_hash, digest),
        )
        self._head_new = (int(record["seq"]), digest)
        return int(record["seq"])

    def _begin_audit(self) -> None:
        """Before a transaction's first change to the log: the head's lock, and the
        head as the database says it turned out (a pending head resolved)."""
        if self._head_old is not None:
            return
        self.head.lock()
        head = self._settled_head()
        # Deleting records from the front (`prune_audit`) does not move this end.
        end = self._chain_start = self._chain_end()
        # A settled head ahead of the database means records were cut off (or the
        # newest replaced). Chain on from the head, so the new record keeps that
        # visible to `log verify` instead of covering it. (A pending head was resolved
        # first: its new end is no evidence of anything.)
        if head is not None and head[0] >= end[0] and head != end:
            self._ahead = head
        self._head_old = head if head is not None else end

    def _chain_end(self) -> tuple[int, str]:
        """The newest record's (seq, hash); with none, the prune anchor's or the start's."""
        last = self._read_one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        if last is None:
            last = self._read_one("SELECT seq, hash FROM audit_anchor WHERE id = 1")
        return (int(last["seq"]), str(last["hash"])) if last else (0, chain.GENESIS)

    def _write_pending_head(self) -> None:
        """Step 1 of auditlog/head.py's protocol, right before COMMIT."""
        if self._head_new is not None and self._head_old is not None:
            self.head.write(Head(*self._head_old, pending=self._head_new), durable=True)

    def _settle_head(self) -> None:
        """Step 3, after COMMIT: best effort, as a pending head resolves to the same."""
        if self._head_new is not None:
            try:
                self.head.write(Head(*self._head_new), durable=False)
            except StoreError:
                pass

    def _end_head(self) -> None:
        self._head_old = self._head_new = self._ahead = None
        self.head.unlock()

    def _settled_head(self) -> tuple[int, str] | None:
        """The head file resolved (a pending head as its write turned out); the
        head's lock held. The caller writes the head next, so nothing is written here."""
        try:
            head = self.head.read()
        except PermissionDenied:
            raise
        except StoreError:
            return None  # malformed: as if missing, and this write replaces it
        return None if head is None else self._resolve_head(head)[0]

    def _resolve_head(self, head: Head) -> tuple[tuple[int, str], str | None]:
        """(The end the log is held to, and for a pending head what became of its
        write: "committed", "rolled-back", or None for a head that is no crash's)."""
        if head.pending is None:
            return head.end, None
        if self._audit_hash(head.pending[0]) == head.pending[1]:
            return head.pending, "committed"
        shared = self.kind != "sqlite"
        if not self._still_there(head.end, shared=shared):
            return head.end, None  # the end it was written after is gone or changed
        if shared:
            # Records after the old end are other front-ends' (one may even have taken
            # the number this write would have had): the head witnesses this host's.
            return head.end, "rolled-back"
        # On SQLite records after the old end are a write of a writer killed earlier,
        # inside its COMMIT: its commit record reached the WAL file but not the WAL
        # index, so the connections then open did not see it and a later recovery of
        # the WAL did. They chain on from the old end (`log verify` checks that).
        return self._chain_end(), "rolled-back"

    def _audit_hash(self, seq: int) -> str | None:
        row = self._read_one("SELECT hash FROM audit WHERE seq = ?", (seq,))
        return None if row is None else str(row["hash"])

    def _still_there(self, end: tuple[int, str], *, shared: bool) -> bool:
        """The record (or prune anchor, or start) `end` names is in the log, unchanged;
        on a shared store also one pruned since, by whichever host."""
        seq, digest = end
        anchor = self.audit_anchor()
        if anchor is not None and seq <= anchor[0]:
            return anchor == end or (shared and seq < anchor[0])
        if seq == 0:
            return digest == chain.GENESIS
        return self._audit_hash(seq) == digest

    def adopt_head(self) -> tuple[int, str] | None:
        """A front-end joining a shared store starts its head file at the chain's
        current end, so `log verify` here has a record to hold the log to. Returns the
        head written, or None (a SQLite store, a head already there, an empty log)."""
        if self.kind == "sqlite":
            return None
        with self._write():
            self.head.lock()
            if self.head.read() is not None:
                return None
            last = self._read_one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            end = (int(last["seq"]), str(last["hash"])) if last else self.audit_anchor()
            if end is None:
                return None
            self.head.write(Head(*end), durable=True)
        return end

    def read_head(self) -> tuple[int, str] | None:
        """The end the head file holds the log to (a pending head resolved, not
        rewritten), or None when there is no head file."""
        head = self.head.read()
        return None if head is None else self._resolve_head(head)[0]

    def audit_view(self) -> AuditView:
        """The whole log, the prune anchor and the head as one consistent picture, for
        `log verify`; a pending head left by a crashed writer is resolved and settled.

        Without the head's lock while the head is settled: read it, take the
        database's snapshot, read it again. The same settled head both times means no
        write of this host committed in between (each goes through a pending head),
        so the snapshot and the head agree. A pending head (or one that moved) is
        read again; one that stays pending is a dead writer's, resolved under the
        lock, which writers hold only from before their records to their settled head."""
        if not self._in_write:
            deadline = time.monotonic() + self.head.timeout
            while True:
                view = self._unlocked_view()
                if view is not None:
                    return view
                if self.head.try_lock():
                    break
                if time.monotonic() >= deadline:
                    self.head.lock()  # raises "busy" unless it frees up right now
                    break
                time.sleep(0.002)
        else:
            self.head.lock()  # under the write lock: only a settling writer to wait for
        return self._locked_view()

    def _unlocked_view(self) -> AuditView | None:
        before = self._raw_head()
        self._begin_read()
        try:
            anchor = self.audit_anchor()  # the first read: it fixes the snapshot
            after = self._raw_head()
            if after != before or (after[0] is not None and after[0].pending is not None):
                return None
            rows = self.audit_records()
        finally:
            self._rollback()
        self.head.sweep()
        raw, error = after
        return AuditView(rows, anchor, None if raw is None else raw.end, error, None)

    def _locked_view(self) -> AuditView:
        """`audit_view` holding the head's lock, which it releases (unless the write
        transaction under way took it) before reading the rows from its snapshot."""
        snapshot = not self._in_write
        release = self._head_old is None  # a transaction that appended keeps it
        try:
            if snapshot:
                self._begin_read()
            anchor = self.audit_anchor()  # the first read: it fixes the snapshot
            raw, head_error = self._raw_head()
            head: tuple[int, str] | None = None
            recovered: Recovery | None = None
            if raw is not None:
                head, outcome = self._resolve_head(raw)
                if outcome is not None and raw.pending is not None:
                    # A rolled-back write is final on SQLite only once another commit
                    # has overwritten the WAL behind it (see `_resolve_head`): the
                    # next writer settles it, and until then a write that comes back
                    # still resolves as committed.
                    settled = outcome == "committed" or self.kind != "sqlite"
                    if settled:
                        try:
                            self.head.write(Head(*head), durable=False)
                        except StoreError:
                            settled = False  # read-only here: the next writer settles it
                    recovered = Recovery(outcome, raw.end, raw.pending, settled)
            self.head.sweep()
        except BaseException:
            if snapshot:
                self._rollback()
            raise
        finally:
            if release:
                self.head.unlock()
        try:
            rows = self.audit_records()
        finally:
            if snapshot:
                self._rollback()
        return AuditView(rows, anchor, head, head_error, recovered)

    def _raw_head(self) -> tuple[Head | None, str | None]:
        """The head file as it is, or why it cannot be used (a permission problem is
        raised: it is no finding about the log)."""
        try:
            return self.head.read(), None
        except PermissionDenied:
            raise
        except StoreError as exc:
            return None, exc.message

    def _begin_read(self) -> None:
        try:
            self.db.begin_read()
        except self.db.errors as exc:
            raise self.db.error(exc) from exc

    def audit(self, event: str, *, now: float | None = None, **fields: Any) -> int:
        """Append a record on its own (decisions, failures, policy changes)."""
        with self._write():
            return self._append_audit(event, time.time() if now is None else now, **fields)

    def audit_with_token(
        self, event: str, token_hash: str, token: HookToken, *, now: float, **fields: Any
    ) -> int:
        """Append a record and store a hook token in the same transaction (the forced
        command's allow); expired tokens are deleted on the way."""
        with self._write():
            self._exec("DELETE FROM hook_tokens WHERE expires_at <= ?", (int(now),))
            self._exec(
                'INSERT INTO hook_tokens (token_hash, "user", key_id, key_fp, repo, action, client,'
                " created_at, expires_at, factor) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    token_hash,
                    token.user,
                    token.key_id,
                    token.key_fp,
                    token.repo,
                    token.action,
                    token.client,
                    token.created_at,
                    token.expires_at,
                    token.factor,
                ),
            )
            return self._append_audit(event, now, **fields)

    def hook_token(self, token_hash: str, now: float) -> HookToken | None:
        """The unexpired token with this digest, or None."""
        row = self._read_one(
            'SELECT "user", key_id, key_fp, repo, action, client, created_at, expires_at, factor'
            " FROM hook_tokens WHERE token_hash = ? AND expires_at > ?",
            (token_hash, int(now)),
        )
        return HookToken(**dict(row)) if row else None

    def audit_many(self, event: str, records: Sequence[dict[str, Any]], *, now: float) -> int:
        """Append several records in one transaction: all of them or none (a push's ref
        updates). Returns the last sequence number."""
        seq = 0
        with self._write():
            for fields in records:
                seq = self._append_audit(event, now, **fields)
        return seq

    def audit_records(
        self,
        *,
        user: str | None = None,
        repo: str | None = None,
        reason: str | None = None,
        event: str | None = None,
        since: str | None = None,
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        where: list[str] = ["seq > ?"]
        params: list[Any] = [after_seq]
        for column, value in (("user", user), ("repo", repo), ("reason", reason), ("event", event)):
            if value is not None:
                where.append(f'"{column}" = ?')
                params.append(value)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        # Only fixed column names are joined in; every value is a parameter.
        sql = f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY seq"  # noqa: S608
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [dict(row) for row in self._read(sql, params)]

    def audit_values(self, column: str) -> list[str]:
        """The distinct values of `reason` or `event` in the log, sorted."""
        if column not in ("reason", "event"):
            raise ValueError(f"not a code column: {column!r}")
        rows = self._read(
            f"SELECT DISTINCT {column} AS v FROM audit WHERE {column} IS NOT NULL"  # noqa: S608
        )
        return sorted(str(r["v"]) for r in rows)

    def audit_anchor(self) -> tuple[int, str] | None:
        row = self._read_one("SELECT seq, hash FROM audit_anchor WHERE id = 1")
        return (int(row["seq"]), str(row["hash"])) if row else None

    def verify_audit(self) -> list[chain.ChainProblem]:
        view = self.audit_view()
        problems = chain.verify_chain(
            view.records, view.head, view.anchor, head_is_witness=self.kind != "sqlite"
        )
        if view.head_error is not None:
            problems.insert(0, chain.ChainProblem(None, view.head_error))
        return problems

    def prune_audit(self, before: str, *, actor: str | None = None) -> int:
        """Delete records older than `before` (ISO time), keeping the chain verifiable
        from an anchor: the (seq, hash) of the last deleted record."""
        now = time.time()
        with self._write():
            last = self._read_one(
                "SELECT seq, hash FROM audit WHERE at < ? ORDER BY seq DESC LIMIT 1", (before,)
            )
            if last is None:
                return 0
            self._begin_audit()  # the head resolved against the log before this changes it
            policy = self.last_policy_hash()  # carried on, in case its record goes
            count = self._exec("DELETE FROM audit WHERE seq <= ?", (last["seq"],)).rowcount
            self._exec(
                "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (last["seq"], last["hash"]),
            )
            self._append_audit(
                "log-prune",
                now,
                actor=actor,
                detail={"before": before, "removed": count, "policy": policy},
            )
            return int(count)

    def last_policy_hash(self) -> str | None:
        """The policy hash the log saw last: the newest policy-change's `new`, or the
        hash a log-prune carried on after removing that record."""
        row = self._read_one(
            "SELECT event, detail FROM audit WHERE event = 'policy-change'"
            " OR (event = 'log-prune' AND detail LIKE '%\"policy\": \"%')"
            " ORDER BY seq DESC LIMIT 1"
        )
        if row is None:
            return None
        import json

        detail = json.loads(row["detail"])
        value = detail.get("new" if row["event"] == "policy-change" else "policy")
        return str(value) if value is not None else None

    # -- users -----------------------------------------------------------------

    def add_user(self, name: str, *, actor: str | None = None) -> User:
        validate_user_name(name)
        now = time.time()
        with self._write():
            if self._read_one("SELECT 1 FROM users WHERE name = ?", (name,)):
                raise InputError(f"user '{name}' already exists.")
            user_id = self._insert(
                "INSERT INTO users (name, created_at) VALUES (?, ?)", (name, int(now))
            )
            self._append_audit("user-add", now, actor=actor, user=name)
        return User(user_id, name, int(now))

    def get_user(self, name: str) -> User:
        row = self._read_one("SELECT id, name, created_at FROM users WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"no such user: '{name}'.", hint="see `gatekeeper user list`.")
        return User(row["id"], row["name"], row["created_at"])

    def list_users(self) -> list[User]:
        rows = self._read("SELECT id, name, created_at FROM users ORDER BY name")
        return [User(r["id"], r["name"], r["created_at"]) for r in rows]

    def user_names(self) -> set[str]:
        return {r["name"] for r in self._read("SELECT name FROM users")}

    def remove_user(self, name: str, *, actor: str | None = None) -> None:
        now = time.time()
        with self._write():
            user = self.get_user(name)
            keys = self._read("SELECT fingerprint FROM keys WHERE user_id = ?", (user.id,))
            self._unindex_keys([k["fingerprint"] for k in keys])
            self._exec("DELETE FROM users WHERE id = ?", (user.id,))
            self._append_audit(
                "user-remove",
                now,
                actor=actor,
                user=name,
                detail={"keys": [k["fingerprint"] for k in keys]},
            )

    # -- keys ------------------------------------------------------------------

    _KEY_SELECT = (
        'SELECT k.id, k.user_id, u.name AS "user", k.fingerprint, k.key_type, k.blob, k.bits,'
        " k.comment, k.added_at, k.sk, k.verify_required"
        " FROM keys k JOIN users u ON u.id = k.user_id"
    )

    def add_key(
        self,
        user_name: str,
        key_type: str,
        blob_b64: str,
        fingerprint: str,
        bits: int,
        comment: str = "",
        *,
        actor: str | None = None,
        verify_required: bool = False,
    ) -> KeyRecord:
        from gatekeeper.sshkeys import is_security_key

        sk = is_security_key(key_type)
        if verify_required and not sk:
            raise InputError(
                "only a security key (sk-...) can be required to prove user verification.",
                hint="make one with `ssh-keygen -t ed25519-sk -O verify-required`.",
            )
        now = time.time()
        with self._write():
            user = self.get_user(user_name)
            owner = self._read_one(
                "SELECT u.name FROM keys k JOIN users u ON u.id = k.user_id"
                " WHERE k.fingerprint = ?",
                (fingerprint,),
            )
            if owner is not None:
                whose = "this user" if owner["name"] == user_name else "another user"
                raise InputError(
                    f"key {fingerprint} is already registered to {whose}.",
                    hint="each key identifies one person: generate a new key for this user.",
                )
            key_id = self._insert(
                "INSERT INTO keys (user_id, fingerprint, key_type, blob, bits, comment, added_at,"
                " sk, verify_required) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    user.id,
                    fingerprint,
                    key_type,
                    blob_b64,
                    bits,
                    comment,
                    int(now),
                    int(sk),
                    int(verify_required),
                ),
            )
            detail: dict[str, Any] = {"type": key_type, "bits": bits, "comment": comment}
            if sk:
                detail["security_key"] = "touch+pin" if verify_required else "touch"
            self._append_audit(
                "key-add", now, actor=actor, user=user_name, key_fp=fingerprint, detail=detail
            )
        key = self.key_by_id(key_id)
        assert key is not None
        # After the commit, so the index never names an id the store has not given.
        self._index_key(key)
        return key

    def _index_key(self, key: KeyRecord) -> None:
        from gatekeeper import keyindex

        fingerprint = key.fingerprint
        try:
            keyindex.write_entry(
                self._state_dir, fingerprint, key.id, key.key_type, key.blob, key.factor
            )
        except OSError as exc:
            # The key is in the store; keys-command finds it there when it may read it.
            from gatekeeper import logs

            logs.log("gatekeeper", f"cannot write the key index entry of {fingerprint}: {exc}")

    def _unindex_keys(self, fingerprints: list[str]) -> None:
        """Before the rows go: a failure here rolls the removal back."""
        from gatekeeper import keyindex

        for fingerprint in fingerprints:
            try:
                keyindex.remove_entry(self._state_dir, fingerprint)
            except OSError as exc:
                raise StoreError(
                    f"cannot remove {fingerprint} from the key index: {exc.strerror}",
                    hint="run as the git user; the state directory must be writable by it.",
                ) from exc

    def sync_key_index(self) -> tuple[int, int]:
        """Rebuild this host's key index from the store: (written, removed)."""
        from gatekeeper import keyindex

        keys = [(k.fingerprint, k.id, k.key_type, k.blob, k.factor) for k in self.list_keys()]
        try:
            return keyindex.sync(self._state_dir, keys)
        except OSError as exc:
            raise StoreError(
                f"cannot write the key index in {self._state_dir}: {exc.strerror}",
                hint="run as the git user; the state directory must be writable by it.",
            ) from exc

    def advance_sk_counter(self, key: KeyRecord, counter: int, *, client: str | None) -> bool:
        """Accept a security key's signature counter only if it is greater than the last
        one seen (one conditional UPDATE, as the TOTP replay guard): a counter that does
        not increase is the sign of a cloned authenticator, refused and audited. An
        authenticator that keeps no counter (always 0) is let through."""
        with self._write():
            if counter == 0:
                row = self._read_one("SELECT sk_counter FROM keys WHERE id = ?", (key.id,))
                if row is not None and row["sk_counter"] <= 0:
                    self._exec("UPDATE keys SET sk_counter = 0 WHERE id = ?", (key.id,))
                    return True
            cur = self._exec(
                "UPDATE keys SET sk_counter = ? WHERE id = ? AND sk_counter < ?",
                (counter, key.id, counter),
            )
            if cur.rowcount == 1:
                return True
            row = self._read_one("SELECT sk_counter FROM keys WHERE id = ?", (key.id,))
            self._append_audit(
                "sk-counter",
                time.time(),
                user=key.user,
                key_fp=key.fingerprint,
                client=client,
                detail={"counter": counter, "last": row["sk_counter"] if row else None},
            )
        return False

    def key_by_id(self, key_id: int) -> KeyRecord | None:
        row = self._read_one(f"{self._KEY_SELECT} WHERE k.id = ?", (key_id,))
        return _key_record(row) if row else None

    def key_by_fingerprint(self, fingerprint: str) -> KeyRecord | None:
        row = self._read_one(f"{self._KEY_SELECT} WHERE k.fingerprint = ?", (fingerprint,))
        return _key_record(row) if row else None

    def list_keys(self, user_name: str | None = None) -> list[KeyRecord]:
        if user_name is None:
            rows = self._read(f"{self._KEY_SELECT} ORDER BY u.name, k.id")
        else:
            self.get_user(user_name)
            rows = self._read(f"{self._KEY_SELECT} WHERE u.name = ? ORDER BY k.id", (user_name,))
        return [_key_record(r) for r in rows]

    def remove_key(self, fingerprint: str, *, actor: str | None = None) -> KeyRecord:
        now = time.time()
        with self._write():
            key = self.key_by_fingerprint(fingerprint)
            if key is None:
                raise NotFound(f"no such key: {fingerprint}", hint="see `gatekeeper key list`.")
            self._unindex_keys([fingerprint])
            self._exec("DELETE FROM keys WHERE id = ?", (key.id,))
            self._append_audit("key-remove", now, actor=actor, user=key.user, key_fp=fingerprint)
        return key

    # -- the git-access path ---------------------------------------------------

    def connection_facts(self, key_id: int, now: float) -> ConnectionFacts | None:
        """The key, its user, and their 2FA state in one query (None: unknown key)."""
        row = self._read_one(
            'SELECT k.id, k.user_id, u.name AS "user", k.fingerprint, k.key_type, k.blob, k.bits,'
            " k.comment, k.added_at, k.sk, k.verify_required,"
            " t.confirmed_at, t.user_id AS totp_user,"
            " (SELECT max(s.expires_at) FROM sessions s"
            "   WHERE s.user_id = k.user_id AND s.key_id = k.id) AS verified_until,"
            " f.locked_until"
            " FROM keys k JOIN users u ON u.id = k.user_id"
            " LEFT JOIN totp t ON t.user_id = k.user_id"
            " LEFT JOIN failures f ON f.user_id = k.user_id"
            " WHERE k.id = ?",
            (key_id,),
        )
        if row is None:
            return None
        data = dict(row)
        confirmed_at = data.pop("confirmed_at")
        has_totp = data.pop("totp_user") is not None
        verified_until = data.pop("verified_until")
        locked_until = data.pop("locked_until")
        return ConnectionFacts(
            key=_key_record(data),
            enrolled=confirmed_at is not None,
            pending=has_totp and confirmed_at is None,
            verified_until=verified_until,
            locked_until=locked_until if locked_until and locked_until > now else None,
        )

    # -- TOTP ------------------------------------------------------------------

    def get_totp(self, user_id: int) -> Totp | None:
        row = self._read_one(
            "SELECT user_id, secret, created_at, confirmed_at, last_timestep FROM totp"
            " WHERE user_id = ?",
            (user_id,),
        )
        return Totp(**dict(row)) if row else None

    def start_enrollment(
        self, user: User, secret: bytes, *, actor: str | None = None, replace: bool = False
    ) -> None:
        """Store a pending enrollment; refuse if one is confirmed (unless `replace`)."""
        now = time.time()
        with self._write():
            existing = self.get_totp(user.id)
            if existing is not None and existing.confirmed and not replace:
                raise InputError(
                    f"'{user.name}' is already enrolled in two-step verification.",
                    hint="re-enrolling needs a current code (2fa disable) or an admin reset.",
                )
            self._exec("DELETE FROM totp WHERE user_id = ?", (user.id,))
            self._exec("DELETE FROM sessions WHERE user_id = ?", (user.id,))
            self._exec(
                "INSERT INTO totp (user_id, secret, created_at) VALUES (?, ?, ?)",
                (user.id, secret, int(now)),
            )
            self._append_audit("2fa-enroll-start", now, actor=actor, user=user.name)

    def confirm_enrollment(
        self,
        user: User,
        timestep: int,
        code_hashes: list[str],
        *,
        actor: str | None = None,
        secret: bytes | None = None,
    ) -> bool:
        """Confirm a pending enrollment with an accepted timestep and store recovery codes.

        The timestep may already be the enrollment's last accepted one (`check_totp_code`
        accepted it); `secret`, the encrypted secret the code was checked against, makes
        sure an enrollment restarted meanwhile is not confirmed by the old one's code."""
        now = time.time()
        sql = (
            "UPDATE totp SET confirmed_at = ?, last_timestep = ?"
            " WHERE user_id = ? AND confirmed_at IS NULL AND last_timestep <= ?"
        )
        params: tuple[Any, ...] = (int(now), timestep, user.id, timestep)
        if secret is not None:
            sql, params = sql + " AND secret = ?", (*params, secret)
        with self._write():
            cur = self._exec(sql, params)
            if cur.rowcount != 1:
                return False
            self._replace_recovery_codes(user.id, code_hashes)
            self._clear_failures(user.id)
            self._append_audit("2fa-enabled", now, actor=actor, user=user.name)
        return True

    def accept_timestep(self, user_id: int, timestep: int) -> bool:
        """The replay guard: True only for the first use of a strictly newer timestep."""
        with self._write():
            cur = self._exec(
                "UPDATE totp SET last_timestep = ? WHERE user_id = ? AND confirmed_at IS NOT NULL"
                " AND last_timestep < ?",
                (timestep, user_id, timestep),
            )
        return bool(cur.rowcount == 1)

    def disable_2fa(self, user: User, *, actor: str | None, event: str = "2fa-disabled") -> bool:
        now = time.time()
        with self._write():
            cur = self._exec("DELETE FROM totp WHERE user_id = ?", (user.id,))
            self._exec("DELETE FROM recovery_codes WHERE user_id = ?", (user.id,))
            self._exec("DELETE FROM sessions WHERE user_id = ?", (user.id,))
            self._clear_failures(user.id)
            self._append_audit(
                event,
                now,
                actor=actor,
                user=user.name,
                detail={"had_enrollment": cur.rowcount == 1},
            )
        return bool(cur.rowcount == 1)

    # -- recovery codes --------------------------------------------------------

    def _replace_recovery_codes(self, user_id: int, code_hashes: list[str]) -> None:
        self._exec("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
        try:
            self.db.executemany(
                "INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)",
                [(user_id, h) for h in code_hashes],
            )
        except self.db.errors as exc:
            raise self.db.error(exc) from exc

    def replace_recovery_codes(
        self, user: User, code_hashes: list[str], *, actor: str | None = None
    ) -> None:
        now = time.time()
        with self._write():
            self._replace_recovery_codes(user.id, code_hashes)
            self._append_audit(
                "2fa-recovery-codes",
                now,
                actor=actor,
                user=user.name,
                detail={"count": len(code_hashes)},
            )

    def unused_recovery_codes(self, user_id: int) -> list[tuple[int, str]]:
        rows = self._read(
            "SELECT id, code_hash FROM recovery_codes WHERE user_id = ? AND used_at IS NULL",
            (user_id,),
        )
        return [(r["id"], r["code_hash"]) for r in rows]

    def use_recovery_code(self, code_id: int) -> bool:
        with self._write():
            cur = self._exec(
                "UPDATE recovery_codes SET used_at = ? WHERE id = ? AND used_at IS NULL",
                (int(time.time()), code_id),
            )
        return bool(cur.rowcount == 1)

    # -- verified sessions -----------------------------------------------------

    def open_session(
        self,
        user: User,
        key: KeyRecord,
        expires_at: float,
        source: str | None,
        *,
        method: str = "totp",
    ) -> None:
        now = time.time()
        with self._write():
            self._exec("DELETE FROM sessions WHERE user_id = ? AND key_id = ?", (user.id, key.id))
            self._exec(
                "INSERT INTO sessions (user_id, key_id, created_at, expires_at, source)"
                " VALUES (?,?,?,?,?)",
                (user.id, key.id, int(now), int(expires_at), source),
            )
            self._clear_failures(user.id)
            self._append_audit(
                "2fa-verified",
                now,
                user=user.name,
                key_fp=key.fingerprint,
                client=source,
                detail={"method": method, "expires": utc_iso(expires_at)},
            )

    def session_until(self, user_id: int, key_id: int) -> int | None:
        row = self._read_one(
            "SELECT max(expires_at) AS until FROM sessions WHERE user_id = ? AND key_id = ?",
            (user_id, key_id),
        )
        return int(row["until"]) if row and row["until"] is not None else None

    def last_verified(self, user_id: int) -> int | None:
        row = self._read_one(
            "SELECT max(created_at) AS at FROM sessions WHERE user_id = ?", (user_id,)
        )
        return int(row["at"]) if row and row["at"] is not None else None

    # -- failures and lockout --------------------------------------------------

    def _clear_failures(self, user_id: int) -> None:
        self._exec("DELETE FROM failures WHERE user_id = ?", (user_id,))

    def locked_until(self, user_id: int, now: float) -> int | None:
        row = self._read_one("SELECT locked_until FROM failures WHERE user_id = ?", (user_id,))
        if row is None or row["locked_until"] is None or row["locked_until"] <= now:
            return None
        return int(row["locked_until"])

    def reserve_attempt(
        self,
        user: User,
        now: float,
        *,
        max_failures: int,
        window_seconds: int,
        lockout_seconds: int,
    ) -> tuple[int, int | None]:
        """Count a code check *before* it is evaluated against the secret.

        The lock check and the count are one `BEGIN IMMEDIATE` transaction, so parallel
        connections cannot evaluate more than `max_failures` codes per window (checking
        the lock, evaluating, then recording lets every connection that checked before
        the first record through). The attempt that reaches `max_failures` sets the lock
        at once. Returns (the attempt's number in the window, None), or (0, lock end)
        when verification is locked. Settle the attempt with `record_failure(...,
        attempt=n)` or `release_attempt`; one never settled stays counted as a failure.
        """
        with self._write():
            row = self._read_one(
                "SELECT count, window_start, locked_until FROM failures WHERE user_id = ?",
                (user.id,),
            )
            if row is not None and row["locked_until"] is not None:
                if row["locked_until"] > now:
                    return 0, int(row["locked_until"])
                row = None  # the lock is over: a new window
            if row is None or now - row["window_start"] > window_seconds:
                count, start = 1, int(now)
            else:
                count, start = row["count"] + 1, row["window_start"]
            locked = int(now + lockout_seconds) if count >= max_failures else None
            self._exec(
                "INSERT INTO failures (user_id, count, window_start, locked_until)"
                " VALUES (?,?,?,?) ON CONFLICT(user_id) DO UPDATE SET count = excluded.count,"
                " window_start = excluded.window_start, locked_until = excluded.locked_until",
                (user.id, count, start, locked),
            )
        return count, None

    def release_attempt(self, user: User, attempt: int, *, max_failures: int) -> None:
        """A reserved attempt succeeded: only failures count, so uncount it (and lift the
        lock it set if it was the last one allowed)."""
        with self._write():
            self._exec(
                "UPDATE failures SET count = CASE WHEN count > 1 THEN count - 1 ELSE 0 END,"
                " locked_until = CASE WHEN ? = 1 THEN NULL ELSE locked_until END"
                " WHERE user_id = ?",
                (int(attempt >= max_failures), user.id),
            )

    def record_failure(
        self,
        user: User,
        now: float,
        *,
        max_failures: int,
        window_seconds: int,
        lockout_seconds: int,
        key_fp: str | None = None,
        client: str | None = None,
        what: str = "totp",
        attempt: int | None = None,
    ) -> int | None:
        """Audit a failed code; return the lockout end if this failure locked the user.

        With `attempt` (from `reserve_attempt`) the failure was already counted; without
        it, it is counted here. Either way an active lock is never shortened."""
        with self._write():
            return self._failure(
                user,
                now,
                max_failures=max_failures,
                window_seconds=window_seconds,
                lockout_seconds=lockout_seconds,
                key_fp=key_fp,
                client=client,
                what=what,
                attempt=attempt,
            )

    def _failure(
        self,
        user: User,
        now: float,
        *,
        max_failures: int,
        window_seconds: int,
        lockout_seconds: int,
        key_fp: str | None,
        client: str | None,
        what: str,
        attempt: int | None,
    ) -> int | None:
        """`record_failure`'s work, inside the caller's `_write()`."""
        row = self._read_one(
            "SELECT count, window_start, locked_until FROM failures WHERE user_id = ?",
            (user.id,),
        )
        active = (
            row["locked_until"]
            if row is not None and row["locked_until"] is not None and row["locked_until"] > now
            else None
        )
        if attempt is not None:
            count = attempt
            locked = active if attempt >= max_failures else None
        else:
            if row is None or now - row["window_start"] > window_seconds:
                count, start = 1, int(now)
            else:
                count, start = row["count"] + 1, row["window_start"]
            locked = int(now + lockout_seconds) if count >= max_failures else None
            if active is not None:
                locked = max(active, locked or 0) if locked else None
            self._exec(
                "INSERT INTO failures (user_id, count, window_start, locked_until)"
                " VALUES (?,?,?,?) ON CONFLICT(user_id) DO UPDATE SET count = excluded.count,"
                " window_start = excluded.window_start, locked_until = excluded.locked_until",
                (
                    user.id,
                    0 if locked else count,
                    int(now) if locked else start,
                    locked or active,
                ),
            )
        self._append_audit(
            "2fa-failure",
            now,
            user=user.name,
            key_fp=key_fp,
            client=client,
            detail={"what": what, "count": count},
        )
        if locked:
            self._append_audit(
                "2fa-lockout",
                now,
                user=user.name,
                key_fp=key_fp,
                client=client,
                detail={"until": utc_iso(locked), "failures": count},
            )
        return locked

    def check_totp_code(
        self,
        user: User,
        now: float,
        evaluate: Callable[[Totp], int | None],
        *,
        confirmed: bool,
        max_failures: int,
        window_seconds: int,
        lockout_seconds: int,
        key_fp: str | None = None,
        client: str | None = None,
        what: str = "totp",
    ) -> CodeCheck:
        """Judge a TOTP code in one write transaction: the lock check, the evaluation
        (`evaluate(enrollment)`: the timestep the code matches, or None), then either the
        failure (counted, audited, locking at `max_failures`) or the replay guard.

        Evaluating under the store's write lock makes the count exact however many
        connections guess at once: each sees every failure before it, so no more than
        `max_failures` wrong codes are ever evaluated per window, with no attempt left
        "in flight" (compare `reserve_attempt`, which the slow recovery-code check still
        needs). A process killed before the commit has answered nothing and counted
        nothing. `confirmed`: the enrollment state the caller needs (True to verify, False
        to confirm a pending one); any other state is `changed`, evaluated and counted not.

        A right code whose timestep was already used (a replay, or the loser of a race
        between connections sending the same code) is `replayed`: audited as
        `2fa-code-reused`, not counted as a failure. Leaving it uncounted gives a guesser
        nothing: the answer only says that the code equals one already used and never
        accepted again, and a TOTP code says nothing about the codes of other timesteps;
        every code that is not right for the secret is still counted.
        """
        with self._write():
            row = self._read_one("SELECT locked_until FROM failures WHERE user_id = ?", (user.id,))
            if row is not None and row["locked_until"] is not None and row["locked_until"] > now:
                return CodeCheck("locked", locked_until=int(row["locked_until"]))
            enrollment = self.get_totp(user.id)
            if enrollment is None or enrollment.confirmed != confirmed:
                return CodeCheck("changed")
            step = evaluate(enrollment)
            if step is None:
                locked = self._failure(
                    user,
                    now,
                    max_failures=max_failures,
                    window_seconds=window_seconds,
                    lockout_seconds=lockout_seconds,
                    key_fp=key_fp,
                    client=client,
                    what=what,
                    attempt=None,
                )
                return CodeCheck("wrong", locked_until=locked)
            if step <= enrollment.last_timestep:
                self._append_audit(
                    "2fa-code-reused",
                    now,
                    user=user.name,
                    key_fp=key_fp,
                    client=client,
                    detail={"what": what, "step": step},
                )
                return CodeCheck("replayed", step=step)
            self._exec(
                "UPDATE totp SET last_timestep = ? WHERE user_id = ? AND last_timestep < ?",
                (step, user.id, step),
            )
        return CodeCheck("accepted", step=step)

    def unlock(self, user: User, *, actor: str | None = None) -> int | None:
        """An admin lifts a lockout (and the failures counted towards one); returns the
        end of the lock that was lifted, or None. Audited either way."""
        now = time.time()
        with self._write():
            row = self._read_one(
                "SELECT count, locked_until FROM failures WHERE user_id = ?", (user.id,)
            )
            locked = row["locked_until"] if row is not None else None
            active = int(locked) if locked is not None and locked > now else None
            self._clear_failures(user.id)
            self._append_audit(
                "2fa-unlock",
                now,
                actor=actor,
                user=user.name,
                detail={
                    "was_locked_until": utc_iso(active) if active else None,
                    "failures": row["count"] if row is not None else 0,
                },
            )
        return active

    def check_lock(self, user: User, now: float) -> int | None:
        return self.locked_until(user.id, now)

    # -- reporting -------------------------------------------------------------

    def user_status(self) -> list[dict[str, Any]]:
        """One row per user: 2FA state, keys, last verification, lockout."""
        now = time.time()
        rows = self._read(
            "SELECT u.id, u.name, u.created_at,"
            " t.created_at AS totp_created, t.confirmed_at,"
            " (SELECT count(*) FROM keys k WHERE k.user_id = u.id) AS keys,"
            " (SELECT count(*) FROM keys k WHERE k.user_id = u.id AND k.sk = 1)"
            "   AS security_keys,"
            " (SELECT min(added_at) FROM keys k WHERE k.user_id = u.id) AS oldest_key,"
            " (SELECT max(added_at) FROM keys k WHERE k.user_id = u.id) AS newest_key,"
            " (SELECT max(created_at) FROM sessions s WHERE s.user_id = u.id) AS last_verified,"
            " (SELECT max(expires_at) FROM sessions s WHERE s.user_id = u.id) AS verified_until,"
            " (SELECT count(*) FROM recovery_codes r WHERE r.user_id = u.id"
            "   AND r.used_at IS NULL) AS recovery_codes_left,"
            " f.locked_until"
            " FROM users u LEFT JOIN totp t ON t.user_id = u.id"
            " LEFT JOIN failures f ON f.user_id = u.id ORDER BY u.name"
        )
        out = []
        for r in rows:
            state = (
                "none"
                if r["totp_created"] is None
                else ("enrolled" if r["confirmed_at"] is not None else "pending")
            )
            locked = r["locked_until"] if r["locked_until"] and r["locked_until"] > now else None
            out.append(
                {
                    "user": r["name"],
                    "state": state,
                    "enrolled_at": r["confirmed_at"],
                    "last_verified": r["last_verified"],
                    # The end of the latest session on any key, while it lasts.
                    "verified_until": r["verified_until"]
                    if r["verified_until"] and r["verified_until"] > now
                    else None,
                    "locked_until": locked,
                    "keys": r["keys"],
                    "security_keys": r["security_keys"],
                    "oldest_key": r["oldest_key"],
                    "newest_key": r["newest_key"],
                    "recovery_codes_left": r["recovery_codes_left"],
                }
            )
        return out


class _WriteTransaction:
    """`with store._write():` one write transaction, its lock taken up front; committed
    when the block ends, rolled back when it raises (anything, KeyboardInterrupt too).
    A class rather than `contextlib.contextmanager`: contextlib and its functools and
    collections are a sixth of the forced command's imports."""

    def __init__(self, store: Store) -> None:
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


def _key_record(row: Any) -> KeyRecord:
    data = dict(row)
    data["sk"] = bool(data["sk"])
    data["verify_required"] = bool(data["verify_required"])
    return KeyRecord(**data)


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


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


def _check_version(version: int, where: str) -> None:
    if version == 0:
        raise StoreError(
            f"the state database {where} is not set up.", hint="run `gatekeeper init`."
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"state database {where} has schema version {version}, newer than this "
            f"gatekeeper understands ({SCHEMA_VERSION}).",
            hint="upgrade gatekeeper; do not downgrade a store.",
        )
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"state database {where} has schema version {version}; {SCHEMA_VERSION} is needed.",
            hint="run `gatekeeper migrate`.",
        )
