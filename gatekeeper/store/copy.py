"""`gatekeeper store copy`: move a live store from SQLite to PostgreSQL (and back).

The source's write lock is held from the first read to the destination's commit, so
nothing written meanwhile is left behind: git access waits (up to the busy timeout)
instead. The destination is written in one transaction and checked before it
commits: every table's row count, and the audit chain, which must verify and be the
source's record for record. Anything else rolls it back, leaving it as it was.
"""

from __future__ import annotations

from gatekeeper.auditlog import chain
from gatekeeper.errors import InputError, StoreError
from gatekeeper.record import record
from gatekeeper.store.schema import TABLES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gatekeeper.store import Store


@record
class CopyResult:
    rows: dict[str, int]
    audit_last: tuple[int, str] | None
    replaced: bool


def copy_store(source: Store, dest: Store, *, replace: bool = False) -> CopyResult:
    """Copy every row of `source` into `dest` (both open, at the current schema)."""
    if source.kind == dest.kind and source.where == dest.where:
        raise InputError("source and destination are the same store.")
    with source.write_lock():
        problems = source.verify_audit()
        if problems:
            raise StoreError(
                f"the source's audit log does not verify: {problems[0].message}.",
                hint="run `gatekeeper log verify` and resolve it before moving the store.",
            )
        data = {table: source.dump_table(table) for table in TABLES}
        with dest.write_lock():
            was_empty = dest.is_empty()
            if not was_empty:
                if not replace:
                    raise InputError(
                        f"the destination store {dest.where} is not empty.",
                        hint="pass --replace to overwrite everything in it.",
                    )
                dest.clear_tables()
            for table in TABLES:
                dest.load_table(table, data[table])
            _check_copy(dest, data)
    audit = data["audit"]
    last = (int(audit[-1]["seq"]), str(audit[-1]["hash"])) if audit else None
    return CopyResult(
        rows={t: len(data[t]) for t in TABLES}, audit_last=last, replaced=not was_empty
    )


def _check_copy(dest: Store, data: dict[str, list[dict[str, object]]]) -> None:
    """Inside the destination's transaction: raise (and so roll back) unless the copy
    is complete and its audit chain verifies."""
    for table in TABLES:
        count = dest.count_rows(table)
        if count != len(data[table]):
            raise StoreError(
                f"copy check failed: {table} has {count} rows, the source "
                f"{len(data[table])}; nothing was written.",
                hint="see the destination database's server log.",
            )
    rows = dest.dump_table("audit")
    problems = chain.verify_chain(rows, None, dest.audit_anchor())
    if problems or [r["hash"] for r in rows] != [r["hash"] for r in data["audit"]]:
        first = problems[0].message if problems else "records differ from the source"
        raise StoreError(
            f"copy check failed: the copied audit log does not verify ({first}); "
            "nothing was written.",
            hint="see the destination database's server log.",
        )
