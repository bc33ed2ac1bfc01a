"""Two-step verification: TOTP enrollment, the replay guard, recovery codes,
verified sessions, and the failure count and lockout.

The lockout is exact under concurrency: the lock check, the evaluation of a code and
the failure it counts are one write transaction (`check_totp_code`), or the attempt is
counted before it is evaluated (`reserve_attempt`). The replay guard is one conditional
UPDATE: a timestep is accepted only if it is strictly greater than the last accepted
one, so of two racing uses one wins."""

from __future__ import annotations

import time

from gatekeeper.auditlog.chain import utc_iso
from gatekeeper.errors import InputError
from gatekeeper.store.audit import AuditMixin
from gatekeeper.store.records import CodeCheck, KeyRecord, Totp, User

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class TwofaMixin(AuditMixin):
    """TOTP, recovery codes, sessions, failures and lockouts."""

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
