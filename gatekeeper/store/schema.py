"""The schema: its version, the migrations that reach it, and the tables in the order
a copy writes them.

The DDL is the common subset of SQLite and PostgreSQL; each database's `ddl` fills in
`{serial}` and its own types."""

from __future__ import annotations

from gatekeeper.errors import StoreError

SCHEMA_VERSION = 3

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


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


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
