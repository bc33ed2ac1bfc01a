"""`gatekeeper log export FILE.db`: the audit log, users, keys and enrollment state
in a standalone SQLite file, for `sqlite-utils`, Datasette or any SQL tool.

Written with the sqlite-utils library (the admin side may import it; the
per-connection path never does). No secret leaves the store: no TOTP secret, no
recovery code hash, no hook token, no key blob (fingerprints identify keys). Times
are ISO 8601 text in UTC, as in the log; counts are integers; each record's `detail`
is JSON text. The free-text fields are searchable (`audit_fts`, SQLite FTS5).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from gatekeeper.errors import InputError
from gatekeeper.store import Store

AUDIT_COLUMNS = {
    "seq": int,
    "at": str,
    "event": str,
    "actor": str,
    "user": str,
    "key_fp": str,
    "repo": str,
    "action": str,
    "reason": str,
    "client": str,
    "detail": str,
    "prev_hash": str,
    "hash": str,
}
SEARCHABLE = ["event", "actor", "user", "repo", "reason", "client", "detail"]


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def export(store: Store, path: str) -> dict[str, int]:
    """Write the export to `path` (a new file: refuse to overwrite one); returns the
    number of rows per table."""
    import sqlite_utils

    if os.path.exists(path):
        raise InputError(
            f"{path} exists; nothing written.",
            hint="choose a new file name, or remove the old export first.",
        )
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        db = sqlite_utils.Database(tmp)
        counts = _write(db, store)
        db.close()
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(
            f"cannot write {path}: {exc.strerror or exc}",
            hint="choose a file in a directory you can write.",
        ) from exc
    finally:
        for leftover in (tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    return counts


def _write(db: Any, store: Store) -> dict[str, int]:
    audit = db.table("audit")
    audit.create(AUDIT_COLUMNS, pk="seq")
    audit.insert_all(
        ({c: r.get(c) for c in AUDIT_COLUMNS} for r in store.audit_records()),
        batch_size=1000,
    )
    for columns in (["user", "seq"], ["repo", "seq"], ["event"], ["reason"], ["at"]):
        audit.create_index(columns)
    audit.enable_fts(SEARCHABLE, fts_version="FTS5")

    users = db.table("users")
    users.create(
        {
            "user": str,
            "created_at": str,
            "state": str,
            "enrolled_at": str,
            "last_verified": str,
            "verified_until": str,
            "locked_until": str,
            "keys": int,
            "recovery_codes_left": int,
        },
        pk="user",
    )
    created = {u.name: u.created_at for u in store.list_users()}
    users.insert_all(
        {
            "user": row["user"],
            "created_at": _iso(created.get(row["user"])),
            "state": row["state"],
            "enrolled_at": _iso(row["enrolled_at"]),
            "last_verified": _iso(row["last_verified"]),
            "verified_until": _iso(row["verified_until"]),
            "locked_until": _iso(row["locked_until"]),
            "keys": row["keys"],
            "recovery_codes_left": row["recovery_codes_left"],
        }
        for row in store.user_status()
    )
    users.create_index(["state"])

    keys = db.table("keys")
    keys.create(
        {
            "id": int,
            "user": str,
            "fingerprint": str,
            "key_type": str,
            "bits": int,
            "comment": str,
            "added_at": str,
        },
        pk="id",
        foreign_keys=[("user", "users", "user")],
    )
    keys.insert_all(
        {
            "id": k.id,
            "user": k.user,
            "fingerprint": k.fingerprint,
            "key_type": k.key_type,
            "bits": k.bits,
            "comment": k.comment,
            "added_at": _iso(k.added_at),
        }
        for k in store.list_keys()
    )
    keys.create_index(["user"])
    keys.create_index(["fingerprint"], unique=True)
    return {name: db.table(name).count for name in ("audit", "users", "keys")}
