"""Checking the audit log: the hash chain, the prune anchor and the head file
(`check_log`), and for each problem which record was edited, deleted, reordered or
cut off (`explain_chain`); pruning only a log that verifies (`prune`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gatekeeper.auditlog import chain
from gatekeeper.auditlog.head import HEAD_NAME, Recovery
from gatekeeper.errors import InputError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gatekeeper.store import Store


@dataclass(frozen=True)
class Finding:
    seq: int | None
    kind: str
    """edited, deleted, reordered, cut-off, relinked, uncovered, head-mismatch,
    head-missing, head-unreadable, or chain (a problem named only by the chain check)."""
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class LogCheck:
    records: int
    first: int | None
    last: int | None
    head: tuple[int, str] | None
    anchor: tuple[int, str] | None
    findings: tuple[Finding, ...]
    recovered: Recovery | None = None
    """A write a crash interrupted, found (and settled) on the way: not a problem."""

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first": self.first,
            "last": self.last,
            "head": {"seq": self.head[0], "hash": self.head[1]} if self.head else None,
            "anchor": {"seq": self.anchor[0], "hash": self.anchor[1]} if self.anchor else None,
            "problems": [f.to_json() for f in self.findings],
            "recovered": _recovery_json(self.recovered),
        }


def _recovery_json(recovered: Recovery | None) -> dict[str, Any] | None:
    if recovered is None:
        return None
    return {
        "outcome": recovered.outcome,
        "old": {"seq": recovered.old[0], "hash": recovered.old[1]},
        "new": {"seq": recovered.new[0], "hash": recovered.new[1]},
        "head_file_settled": recovered.settled,
        "message": describe_recovery(recovered),
    }


def describe_recovery(recovered: Recovery) -> str:
    """In plain words: a crash, what it left, and what was done about it."""
    old, new = recovered.old[0], recovered.new[0]
    records = f"record {new}" if new == old + 1 else f"records {old + 1}-{new}"
    if recovered.outcome == "committed":
        text = (
            f"a writer stopped (crashed or was killed) right after committing {records}: "
            f"{records} {'is' if new == old + 1 else 'are'} in the log"
        )
        settled = f"the head file now names record {new}"
    else:
        text = (
            f"a writer stopped (crashed or was killed) before committing {records}: "
            f"that write is not in the log, which ends where it did before"
        )
        settled = f"the head file is back on record {old}"
    if recovered.settled:
        text += f", and {settled}"
    else:
        text += "; the next write settles the head file"
    return text + ". This is an interrupted write, not tampering."


def check_log(store: Store) -> LogCheck:
    """Verify the chain, the prune anchor and the head file; name every bad record.

    A permission problem (the head file or the database cannot be read) is not a
    finding: `PermissionDenied` goes to the caller, who says so."""
    view = store.audit_view()
    rows, anchor, head = view.records, view.anchor, view.head
    findings: list[Finding] = []
    if view.head_error is not None:
        findings.append(Finding(None, "head-unreadable", view.head_error))
    witness = store.kind != "sqlite"
    problems = chain.verify_chain(rows, head, anchor, head_is_witness=witness)
    if head is None and not findings and (rows or anchor):
        findings.append(
            Finding(
                None,
                "head-missing",
                f"the head file {HEAD_NAME} is missing: records cut off the end of the "
                "log could not be seen",
            )
        )
    if problems:
        explained = explain_chain(rows, head, anchor, head_is_witness=witness)
        findings.extend(explained)
        if not explained:
            findings.extend(Finding(p.seq, "chain", p.message) for p in problems)
    findings.sort(key=lambda f: (f.seq is not None, f.seq or 0))
    return LogCheck(
        records=len(rows),
        first=int(rows[0]["seq"]) if rows else None,
        last=int(rows[-1]["seq"]) if rows else None,
        head=head,
        anchor=anchor,
        findings=tuple(findings),
        recovered=view.recovered,
    )


MAX_MOVE_ANALYSIS = 2000
MAX_SWAP_ANALYSIS = 200


def _span(first: int, last: int) -> str:
    return f"record {first} is" if first == last else f"records {first}-{last} are"


def _about(row: Mapping[str, Any]) -> str:
    who = f" {row['user']}" if row.get("user") else ""
    return f"{str(row['at'])[:19].replace('T', ' ')} {row['event']}{who}"


def explain_chain(
    rows: Sequence[Mapping[str, Any]],
    head: tuple[int, str] | None,
    anchor: tuple[int, str] | None,
    *,
    head_is_witness: bool = False,
) -> list[Finding]:
    """Say what happened to a broken chain, record by record: edited (contents do not
    match the hash), moved or swapped (contents hashed for another position),
    deleted (a gap in the sequence), replaced (a record that does not link to the one
    before it), cut off (the head file names records past the end)."""
    findings: list[Finding] = []
    start_seq, start_hash = (anchor[0] + 1, anchor[1]) if anchor else (1, chain.GENESIS)
    good = [chain.record_hash(str(r["prev_hash"]), r) == r["hash"] for r in rows]

    # Where each bad record's contents belong: follow prev_hash to the record it was
    # chained after (by that record's own original position).
    known: dict[str, int] = {chain.GENESIS: 0}
    if anchor:
        known[anchor[1]] = anchor[0]
    for row, ok in zip(rows, good, strict=True):
        if ok:
            known[str(row["hash"])] = int(row["seq"])
    bad = [r for r, ok in zip(rows, good, strict=True) if not ok]
    origin: dict[int, int] = {}  # position -> the position its contents were hashed for
    if len(bad) <= MAX_MOVE_ANALYSIS:
        progress = True
        while bad and progress:
            progress = False
            rest = []
            for row in bad:
                base = known.get(str(row["prev_hash"]))
                seq = int(row["seq"])
                if (
                    base is not None
                    and base + 1 != seq
                    and chain.record_hash(str(row["prev_hash"]), {**row, "seq": base + 1})
                    == row["hash"]
                ):
                    origin[seq] = base + 1
                    known[str(row["hash"])] = base + 1
                    progress = True
                else:
                    rest.append(row)
            bad = rest
    if 1 < len(bad) <= MAX_SWAP_ANALYSIS:
        # Contents swapped while the hashes stayed: b's contents hash right at a.
        for a in bad:
            for b in bad:
                if a is not b and int(b["seq"]) not in origin:
                    moved = {**b, "seq": a["seq"], "prev_hash": a["prev_hash"]}
                    if chain.record_hash(str(a["prev_hash"]), moved) == a["hash"]:
                        origin[int(b["seq"])] = int(a["seq"])
                        break
        bad = [r for r in bad if int(r["seq"]) not in origin]
    edited = {int(r["seq"]) for r in bad}
    for row in bad:
        findings.append(
            Finding(
                int(row["seq"]),
                "edited",
                f"record {row['seq']} was edited: its contents do not match its hash "
                f"(now reads: {_about(row)})",
            )
        )
    for position, source in sorted(origin.items()):
        if origin.get(source) == position:
            if position < source:
                findings.append(
                    Finding(
                        position,
                        "reordered",
                        f"records {position} and {source} were swapped: each holds the "
                        "other's contents",
                    )
                )
        else:
            findings.append(
                Finding(
                    position,
                    "reordered",
                    f"record {position} holds the contents of record {source} (moved)",
                )
            )

    # Links and gaps, in order.
    expected, prev_hash = start_seq, start_hash
    prev_row: Mapping[str, Any] | None = None
    for row in rows:
        seq = int(row["seq"])
        gap = seq > expected
        if gap:
            if prev_row is not None:
                after = f"record {seq} follows record {prev_row['seq']}"
            elif anchor:
                after = f"record {seq} follows the prune anchor at record {anchor[0]}"
            else:
                after = "deleted from the start without `gatekeeper log prune`"
            findings.append(
                Finding(
                    expected, "deleted", f"{_span(expected, seq - 1)} missing: deleted ({after})"
                )
            )
        elif row["prev_hash"] != prev_hash:
            explained = seq in origin or seq in edited
            explained = explained or (prev_row is not None and int(prev_row["seq"]) in origin)
            if not explained:
                if prev_row is None:
                    where = f"the prune anchor (record {anchor[0]})" if anchor else "the start"
                    findings.append(
                        Finding(
                            seq,
                            "relinked",
                            f"record {seq} does not link to {where}: it was replaced, "
                            "or the anchor was changed",
                        )
                    )
                else:
                    findings.append(
                        Finding(
                            int(prev_row["seq"]),
                            "relinked",
                            f"record {prev_row['seq']} was replaced or re-hashed: record "
                            f"{seq} does not link to it (now reads: {_about(prev_row)})",
                        )
                    )
        expected, prev_hash, prev_row = seq + 1, str(row["hash"]), row

    # The head file: what the newest record must be.
    if head is not None:
        if rows:
            last_seq, last_hash = int(rows[-1]["seq"]), str(rows[-1]["hash"])
        elif anchor:
            last_seq, last_hash = anchor
        else:
            last_seq, last_hash = 0, chain.GENESIS
        if last_seq < head[0]:
            findings.append(
                Finding(
                    last_seq + 1,
                    "cut-off",
                    f"{_span(last_seq + 1, head[0])} missing: cut off the end of the log "
                    f"(the head file names record {head[0]}; the log ends at {last_seq})",
                )
            )
        elif last_seq > head[0] and head_is_witness:
            # A shared database: later records are other front-ends'; the one this
            # host wrote last must still be there as it was.
            named = next((r for r in rows if int(r["seq"]) == head[0]), None)
            if named is not None and named["hash"] != head[1] and head[0] not in origin:
                findings.append(
                    Finding(
                        head[0],
                        "head-mismatch",
                        f"record {head[0]} differs from the head file: it was replaced or "
                        "re-hashed",
                    )
                )
        elif last_seq > head[0]:
            findings.append(
                Finding(
                    head[0] + 1,
                    "uncovered",
                    f"{_span(head[0] + 1, last_seq)} not covered by the head file (it names "
                    f"record {head[0]}): added outside gatekeeper, or the head file was "
                    "replaced by an older copy",
                )
            )
        elif last_hash != head[1] and last_seq not in origin:
            findings.append(
                Finding(
                    last_seq,
                    "head-mismatch",
                    f"record {last_seq} differs from the head file: it was replaced or re-hashed",
                )
            )
    return findings


def prune(store: Store, before: str, *, actor: str | None, force: bool = False) -> int:
    """Delete records older than `before`, leaving an anchor so the rest still verifies.

    Refuses when the log does not verify (pruning could hide the evidence), unless
    `force`."""
    if not force:
        result = check_log(store)
        if not result.ok:
            raise InputError(
                f"the audit log does not verify ({len(result.findings)} problem(s)): "
                "pruning could remove the evidence.",
                hint="see `gatekeeper log verify`; prune anyway with --force.",
            )
    return store.prune_audit(before, actor=actor)


def describe_findings(findings: Iterable[Finding], limit: int = 50) -> list[str]:
    items = list(findings)
    lines = [f.message for f in items[:limit]]
    if len(items) > limit:
        lines.append(f"... and {len(items) - limit} more problem(s) (see --json)")
    return lines
