"""What the store hands out: users, keys, enrollments, hook tokens, the audit log as
`log verify` reads it, and the facts the git-access path needs about one key."""

from __future__ import annotations

from gatekeeper.errors import InputError
from gatekeeper.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from gatekeeper.auditlog.head import Recovery

USER_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"


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
