"""All SQL lives here: users, keys, TOTP enrollments, sessions, lockouts, audit log.

One set of statements for both stores: SQLite through the standard library (the
default, so the git-access path stays light; see `sqlite`) and PostgreSQL for
several front-ends sharing one state (see `postgres`, and `libpq` for the git-access
path). The SQL is the common subset of the two, with `?` placeholders and `"user"`
quoted (a reserved word in PostgreSQL).
- Every write transaction takes the store's one write lock up front (`_write`), so
  read-check-write steps cannot interleave, whichever process or host runs them.
- Every change is audited inside its own transaction: no record, no change.
- The replay guard is one conditional UPDATE: a timestep is accepted only if it is
  strictly greater than the last accepted one, so of two racing uses one wins.

`Store` is assembled from one class per concern, each a file to read on its own:
`base` (opening, the connection, transactions), `audit` (the audit chain and its head
file), `accounts` (users and keys), `twofa` (TOTP, recovery codes, sessions, and the
failure count and lockout). `records` holds what they hand out, `schema` the tables,
`url` the store URL, `copy` moves a store between databases (`gatekeeper store copy`).
The PostgreSQL modules and `copy` are imported only when used.
"""

from __future__ import annotations

from gatekeeper.auditlog.chain import utc_iso
from gatekeeper.auditlog.head import HEAD_NAME
from gatekeeper.store.accounts import AccountsMixin
from gatekeeper.store.audit import AuditMixin
from gatekeeper.store.base import StoreBase
from gatekeeper.store.records import (
    AuditView,
    CodeCheck,
    ConnectionFacts,
    HookToken,
    KeyRecord,
    Totp,
    User,
    token_digest,
    validate_user_name,
)
from gatekeeper.store.schema import SCHEMA_VERSION
from gatekeeper.store.twofa import TwofaMixin
from gatekeeper.store.url import DB_NAME

__all__ = [
    "DB_NAME",
    "HEAD_NAME",
    "SCHEMA_VERSION",
    "AuditView",
    "CodeCheck",
    "ConnectionFacts",
    "HookToken",
    "KeyRecord",
    "Store",
    "Totp",
    "User",
    "token_digest",
    "utc_iso",
    "validate_user_name",
]


class Store(AccountsMixin, TwofaMixin, AuditMixin, StoreBase):
    """One open connection to the state: a SQLite file or a PostgreSQL database.

    `state_dir` always holds this host's files beside the database: the server key
    (which front-ends sharing a database must share too) and the audit head file."""
