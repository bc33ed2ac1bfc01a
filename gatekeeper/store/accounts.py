"""Users and their SSH keys: adding and removing them (and this host's key index
with them), a security key's signature counter, and what the git-access path and the
status report read about them."""

from __future__ import annotations

import time

from gatekeeper.errors import InputError, NotFound, StoreError
from gatekeeper.store.audit import AuditMixin
from gatekeeper.store.records import ConnectionFacts, KeyRecord, User, validate_user_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class AccountsMixin(AuditMixin):
    """Users, keys, and the facts about them."""

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


def _key_record(row: Any) -> KeyRecord:
    data = dict(row)
    data["sk"] = bool(data["sk"])
    data["verify_required"] = bool(data["verify_required"])
    return KeyRecord(**data)
