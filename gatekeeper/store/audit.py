"""The audit chain: appending records, the head file that holds the log's end
(auditlog/head.py), reading the log back as one consistent picture, pruning it. The
hook tokens ride along: one is stored with the audit record of the access it allows.

Every change is audited inside its own transaction: no record, no change. A record
chains on the previous one's hash, read under the store's write lock, so the chain
never forks."""

from __future__ import annotations

import time

from gatekeeper.auditlog import chain
from gatekeeper.auditlog.chain import utc_iso
from gatekeeper.auditlog.head import HEAD_NAME, Head, HeadFile, Recovery
from gatekeeper.errors import PermissionDenied, StoreError
from gatekeeper.store.base import BUSY_TIMEOUT_MS, StoreBase
from gatekeeper.store.records import AuditView, HookToken

TYPE_CHECKING = False
if TYPE_CHECKING:
    import os
    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any

    from gatekeeper.store.base import Database


class AuditMixin(StoreBase):
    """The store's audit log and its head file."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        db: Database,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    ) -> None:
        super().__init__(state_dir, db, busy_timeout_ms)
        self.head = HeadFile(self._state_dir, busy_timeout_ms)
        # The audit ends the write transaction under way moves the head between (see
        # auditlog/head.py): `_head_old` from its first record on, `_head_new` once it
        # appended one.
        self._head_old: tuple[int, str] | None = None
        self._head_new: tuple[int, str] | None = None
        self._ahead: tuple[int, str] | None = None  # a settled head to chain on from
        self._chain_start = (0, chain.GENESIS)  # the log's end when the transaction began

    @property
    def head_path(self) -> Path:
        return self.state_dir / HEAD_NAME

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
