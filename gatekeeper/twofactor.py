"""Two-step verification operations: enroll, confirm, verify, disable, reset, recovery codes.

The same functions serve the admin CLI and the users' own `ssh git@HOST 2fa ...`
commands, so both follow one set of rules (docs/design.md, "TOTP rules"):
- an enrollment is pending until a first valid code confirms it;
- an accepted timestep is never accepted again (the store's conditional UPDATE);
- only wrong codes count, and too many within the window lock verification; a right
  code whose timestep was used already (a replay, or a race lost to another
  connection) is refused and audited, never counted;
- every change is audited in the same transaction that makes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from gatekeeper import totp
from gatekeeper.errors import GatekeeperError, InputError, Refused
from gatekeeper.policy import Policy
from gatekeeper.store import KeyRecord, Store, Totp, User


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
    """Count a recovery-code attempt before the code is compared with anything (see
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
    return _wrong(message, locked)


def _wrong(message: str, locked: int | None) -> Refused:
    if locked is not None:
        return Refused(
            f"{message} Too many wrong codes: verification is locked until {_fmt(locked)}."
        )
    return Refused(message, hint="use the current code from your authenticator app.")


def _reused() -> Refused:
    """A right code whose timestep was used already: never a failure (see
    `Store.check_totp_code`), so nothing about a lock."""
    return Refused(
        "this code was already used; wait for the next one.",
        hint="each code works once: use the next code your authenticator app shows.",
    )


def _check_totp(
    store: Store,
    policy: Policy,
    user: User,
    code: str,
    now: float,
    *,
    confirmed: bool,
    wrong: str,
    key_fp: str | None = None,
    client: str | None = None,
    what: str = "totp",
) -> tuple[int, bytes]:
    """A TOTP code for `user`'s enrollment (confirmed or pending, as asked): the accepted
    timestep and the encrypted secret it was checked against, or `Refused`."""
    code = totp.normalize_code(code)
    checked: list[bytes] = []

    def evaluate(enrollment: Totp) -> int | None:
        checked.append(enrollment.secret)
        secret = totp.decrypt_secret(_server_key(store), user.id, enrollment.secret)
        return totp.match_timestep(secret, code, now)

    result = store.check_totp_code(
        user,
        now,
        evaluate,
        confirmed=confirmed,
        **_limits(policy),
        key_fp=key_fp,
        client=client,
        what=what,
    )
    if result.outcome == "locked":
        raise _locked(user, result.locked_until or now)
    if result.outcome == "changed":
        raise _not_in_state(store, user, confirmed)
    if result.outcome == "wrong":
        raise _wrong(wrong, result.locked_until)
    if result.outcome == "replayed":
        raise _reused()
    assert result.step is not None and checked
    return result.step, checked[-1]


def _not_in_state(store: Store, user: User, confirmed: bool) -> GatekeeperError:
    record = store.get_totp(user.id)
    if record is None:
        return Refused(
            f"'{user.name}' has not enrolled in two-step verification.",
            hint="enroll first (`2fa enroll`).",
        )
    if record.confirmed and not confirmed:
        return InputError(f"'{user.name}' is already enrolled; nothing to confirm.")
    if not record.confirmed and confirmed:
        return Refused(
            f"'{user.name}' has a pending enrollment; confirm it first.",
            hint="`2fa confirm CODE` with the code your app shows.",
        )
    return Refused("the enrollment changed meanwhile.", hint="try again.")


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
    step, secret = _check_totp(
        store,
        policy,
        user,
        code,
        now,
        confirmed=False,
        wrong="wrong code: enrollment not confirmed.",
        client=client,
        what="confirm",
    )
    codes = totp.new_recovery_codes()
    hashes = [totp.hash_recovery_code(c) for c in codes]
    if not store.confirm_enrollment(user, step, hashes, actor=actor, secret=secret):
        raise Refused(
            "enrollment was not confirmed: it changed meanwhile.",
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

    Raises `Refused` for a wrong, already used or locked-out attempt (each wrong code is
    counted and audited; a right one used already is audited, not counted) and
    `InputError` for something that is not a code at all.
    """
    now = time.time() if now is None else now
    # A read first: during a lockout a flood of attempts never takes the write lock.
    _refuse_if_locked(store, user, now)
    if allow_recovery and totp.looks_like_recovery_code(code):
        return _check_recovery_code(store, policy, user, code, now, key_fp=key_fp, client=client)
    _check_totp(
        store,
        policy,
        user,
        code,
        now,
        confirmed=True,
        wrong="wrong code.",
        key_fp=key_fp,
        client=client,
    )
    return "totp"


def _check_recovery_code(
    store: Store,
    policy: Policy,
    user: User,
    code: str,
    now: float,
    *,
    key_fp: str | None,
    client: str | None,
) -> str:
    # scrypt takes a while per stored code: reserved outside the write lock, not under it.
    attempt = _reserve(store, policy, user, now)
    matched = False
    for code_id, hashed in store.unused_recovery_codes(user.id):
        if not totp.check_recovery_code(code, hashed):
            continue
        if store.use_recovery_code(code_id):
            store.audit(
                "2fa-recovery-code-used", now=now, user=user.name, key_fp=key_fp, client=client
            )
            _succeeded(store, policy, user, attempt)
            return "recovery-code"
        matched = True  # a racing connection used it a moment ago
    if matched:
        _succeeded(store, policy, user, attempt)
        store.audit(
            "2fa-code-reused",
            now=now,
            user=user.name,
            key_fp=key_fp,
            client=client,
            detail={"what": "recovery-code"},
        )
        raise Refused("this recovery code was already used.", hint="each recovery code works once.")
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
    now: float | None = None,
) -> None:
    """A user turning 2FA off: needs a current code (or a recovery code)."""
    user = store.get_user(user_name)
    check_code(store, policy, user, code, now=now, key_fp=key_fp, client=client)
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
