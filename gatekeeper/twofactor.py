"""Two-step verification operations: enroll, confirm, verify, disable, reset, recovery codes.

The same functions serve the admin CLI and the users' own `ssh git@HOST 2fa ...`
commands, so both follow one set of rules (DESIGN.md, "TOTP rules"):
- an enrollment is pending until a first valid code confirms it;
- an accepted timestep is never accepted again (the store's conditional UPDATE);
- only failed attempts count, and too many within the window lock verification;
- every change is audited in the same transaction that makes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from gatekeeper import totp
from gatekeeper.errors import InputError, Refused
from gatekeeper.policy import Policy
from gatekeeper.store import KeyRecord, Store, User


@dataclass(frozen=True)
class Enrollment:
    user: str
    secret: str
    uri: str

    def qr(self) -> str:
        return totp.qr_text(self.uri)


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _server_key(store: Store) -> bytes:
    return totp.load_server_key(store.server_key_path)


def enroll(
    store: Store, policy: Policy, user_name: str, *, actor: str | None, replace: bool = False
) -> Enrollment:
    """Start (or restart) a pending enrollment and return what the app needs."""
    user = store.get_user(user_name)
    key = _server_key(store)
    secret = totp.new_secret()
    store.start_enrollment(
        user, totp.encrypt_secret(key, user.id, secret), actor=actor, replace=replace
    )
    uri = totp.provisioning_uri(secret, user.name, policy.two_factor.issuer)
    return Enrollment(user.name, secret, uri)


def _secret(store: Store, user: User) -> tuple[str, bool, int]:
    record = store.get_totp(user.id)
    if record is None:
        raise Refused(
            f"'{user.name}' has not enrolled in two-step verification.",
            hint="enroll first (`2fa enroll`).",
        )
    return (
        totp.decrypt_secret(_server_key(store), user.id, record.secret),
        record.confirmed,
        record.last_timestep,
    )


def _locked(user: User, until: float) -> Refused:
    return Refused(
        f"verification is locked for '{user.name}' until {_fmt(until)} after repeated wrong codes.",
        hint="wait, or ask an administrator (`gatekeeper 2fa reset`) if the app is lost.",
    )


def _refuse_if_locked(store: Store, user: User, now: float) -> None:
    until = store.locked_until(user.id, now)
    if until is not None:
        raise _locked(user, until)


def _limits(policy: Policy) -> dict[str, int]:
    tf = policy.two_factor
    return {
        "max_failures": tf.max_failures,
        "window_seconds": tf.failure_window_minutes * 60,
        "lockout_seconds": tf.lockout_minutes * 60,
    }


def _reserve(store: Store, policy: Policy, user: User, now: float) -> int:
    """Count this attempt before the code is compared with anything (see
    `Store.reserve_attempt`): parallel guesses cannot exceed `max_failures`."""
    attempt, until = store.reserve_attempt(user, now, **_limits(policy))
    if until is not None:
        raise _locked(user, until)
    return attempt


def _succeeded(store: Store, policy: Policy, user: User, attempt: int) -> None:
    store.release_attempt(user, attempt, max_failures=policy.two_factor.max_failures)


def _fail(
    store: Store,
    policy: Policy,
    user: User,
    now: float,
    message: str,
    *,
    attempt: int,
    key_fp: str | None = None,
    client: str | None = None,
    what: str = "totp",
) -> Refused:
    locked = store.record_failure(
        user,
        now,
        **_limits(policy),
        key_fp=key_fp,
        client=client,
        what=what,
        attempt=attempt,
    )
    if locked is not None:
        return Refused(
            f"{message} Too many wrong codes: verification is locked until {_fmt(locked)}."
        )
    return Refused(message, hint="use the current code from your authenticator app.")


def confirm(
    store: Store,
    policy: Policy,
    user_name: str,
    code: str,
    *,
    actor: str | None,
    now: float | None = None,
    client: str | None = None,
) -> list[str]:
    """Confirm a pending enrollment with a current code; return fresh recovery codes."""
    now = time.time() if now is None else now
    user = store.get_user(user_name)
    code = totp.normalize_code(code)
    _refuse_if_locked(store, user, now)
    secret, confirmed, _ = _secret(store, user)
    if confirmed:
        raise InputError(f"'{user.name}' is already enrolled; nothing to confirm.")
    attempt = _reserve(store, policy, user, now)
    step = totp.match_timestep(secret, code, now)
    if step is None:
        raise _fail(
            store,
            policy,
            user,
            now,
            "wrong code: enrollment not confirmed.",
            attempt=attempt,
            client=client,
            what="confirm",
        )
    codes = totp.new_recovery_codes()
    if not store.confirm_enrollment(
        user, step, [totp.hash_recovery_code(c) for c in codes], actor=actor
    ):
        raise Refused(
            "enrollment was not confirmed: it changed meanwhile or the code was reused.",
            hint="start again with `2fa enroll`.",
        )
    return codes


def check_code(
    store: Store,
    policy: Policy,
    user: User,
    code: str,
    *,
    now: float | None = None,
    key_fp: str | None = None,
    client: str | None = None,
    allow_recovery: bool = True,
) -> str:
    """Check a TOTP or recovery code for a confirmed user; return the method used.

    Raises `Refused` for a wrong, replayed or locked-out attempt (each failure is
    counted and audited) and `InputError` for something that is not a code at all.
    """
    now = time.time() if now is None else now
    _refuse_if_locked(store, user, now)
    if allow_recovery and totp.looks_like_recovery_code(code):
        attempt = _reserve(store, policy, user, now)
        for code_id, hashed in store.unused_recovery_codes(user.id):
            if totp.check_recovery_code(code, hashed) and store.use_recovery_code(code_id):
                store.audit(
                    "2fa-recovery-code-used", now=now, user=user.name, key_fp=key_fp, client=client
                )
                _succeeded(store, policy, user, attempt)
                return "recovery-code"
        raise _fail(
            store,
            policy,
            user,
            now,
            "wrong or already used recovery code.",
            attempt=attempt,
            key_fp=key_fp,
            client=client,
            what="recovery-code",
        )
    code = totp.normalize_code(code)
    secret, confirmed, _ = _secret(store, user)
    if not confirmed:
        raise Refused(
            f"'{user.name}' has a pending enrollment; confirm it first.",
            hint="`2fa confirm CODE` with the code your app shows.",
        )
    attempt = _reserve(store, policy, user, now)
    step = totp.match_timestep(secret, code, now)
    if step is None:
        raise _fail(
            store, policy, user, now, "wrong code.", attempt=attempt, key_fp=key_fp, client=client
        )
    if not store.accept_timestep(user.id, step):
        raise _fail(
            store,
            policy,
            user,
            now,
            "that code was already used; wait for the next one.",
            attempt=attempt,
            key_fp=key_fp,
            client=client,
            what="replay",
        )
    _succeeded(store, policy, user, attempt)
    return "totp"


def verify(
    store: Store,
    policy: Policy,
    key: KeyRecord,
    code: str,
    *,
    client: str | None = None,
    now: float | None = None,
    method: str | None = None,
) -> float:
    """Open a verified session for this key; return when it ends."""
    now = time.time() if now is None else now
    user = store.get_user(key.user)
    used = check_code(store, policy, user, code, now=now, key_fp=key.fingerprint, client=client)
    expires = now + policy.two_factor.session_hours * 3600
    store.open_session(user, key, expires, client, method=method or used)
    return expires


def disable(
    store: Store,
    policy: Policy,
    user_name: str,
    code: str,
    *,
    actor: str | None,
    key_fp: str | None = None,
    client: str | None = None,
) -> None:
    """A user turning 2FA off: needs a current code (or a recovery code)."""
    user = store.get_user(user_name)
    check_code(store, policy, user, code, key_fp=key_fp, client=client)
    store.disable_2fa(user, actor=actor)


def reset(store: Store, user_name: str, *, actor: str | None) -> bool:
    """An admin removing a user's enrollment (lost phone); audited as a reset."""
    user = store.get_user(user_name)
    return store.disable_2fa(user, actor=actor, event="2fa-reset")


def new_recovery_codes(store: Store, user_name: str, *, actor: str | None) -> list[str]:
    user = store.get_user(user_name)
    record = store.get_totp(user.id)
    if record is None or not record.confirmed:
        raise Refused(f"'{user.name}' is not enrolled; recovery codes come with enrollment.")
    codes = totp.new_recovery_codes()
    store.replace_recovery_codes(user, [totp.hash_recovery_code(c) for c in codes], actor=actor)
    return codes
