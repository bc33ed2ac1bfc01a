"""Reading the audit log: which records (`LogFilter`, `parse_when` for `--since`), as
people and scripts read them (`readable`, `log_line`), and as they come (`follow`)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from datetime import time as dtime
from typing import Any

from gatekeeper.auditlog.chain import utc_iso
from gatekeeper.errors import InputError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gatekeeper.store import Store

AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
WHEN_HINT = (
    "use a date (2027-01-31), a time (2027-01-31T14:00, UTC unless it says +02:00) "
    "or an age (90m, 12h, 7d, 2w)."
)


def parse_when(text: str, now: float) -> str:
    """A date, an ISO time or an age ("7d": seven days before `now`), as the audit
    log's own time format, so it compares with the `at` column as text."""
    value = text.strip()
    age = re.fullmatch(r"([0-9]{1,9})([smhdw])", value)
    if age:
        return utc_iso(now - int(age[1]) * AGE_UNITS[age[2]])
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
            moment = datetime.combine(date.fromisoformat(value), dtime.min, timezone.utc)
        else:
            if value.endswith(("Z", "z")):
                value = value[:-1] + "+00:00"
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
        return utc_iso(moment.timestamp())
    except (ValueError, OverflowError, OSError):
        raise InputError(f"not a date or time: {text!r}", hint=WHEN_HINT) from None


# -- reading the log ----------------------------------------------------------------


@dataclass(frozen=True)
class LogFilter:
    user: str | None = None
    repo: str | None = None
    since: str | None = None
    """In the log's own time format (see `parse_when`)."""
    reason: str | None = None
    event: str | None = None

    def records(self, store: Store, after_seq: int = 0) -> list[dict[str, Any]]:
        """The stored records that pass, in order; `readable` each one you show."""
        return store.audit_records(
            user=self.user,
            repo=self.repo,
            reason=self.reason,
            event=self.event,
            since=self.since,
            after_seq=after_seq,
        )


def readable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored record with its detail as an object (for JSON and the table)."""
    out = dict(row)
    if not isinstance(out["detail"], str):
        return out
    try:
        out["detail"] = json.loads(row["detail"] or "{}")
    except ValueError:
        out["detail"] = {"unparsed": row["detail"]}
    return out


LOG_COLUMNS: tuple[tuple[str, int], ...] = (
    ("seq", 6),
    ("at", 19),
    ("event", 18),
    ("actor", 10),
    ("user", 12),
    ("repo", 20),
    ("action", 6),
    ("reason", 18),
    ("client", 15),
    ("detail", 0),
)


def _short(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text[:12] if re.fullmatch(r"[0-9a-f]{64}", text) else text


def detail_text(record: Mapping[str, Any]) -> str:
    detail = record["detail"]
    if not isinstance(detail, dict):
        return str(detail)
    if record["event"] == "policy-change":
        return f"{_short(detail.get('old'))} -> {_short(detail.get('new'))}"
    return " ".join(f"{k}={_short(v)}" for k, v in detail.items())


def log_header() -> str:
    return "  ".join(
        name.upper().rjust(w) if name == "seq" else name.upper().ljust(w) for name, w in LOG_COLUMNS
    ).rstrip()


def log_line(record: Mapping[str, Any]) -> str:
    cells = []
    for name, width in LOG_COLUMNS:
        if name == "detail":
            value = detail_text(record)
        elif name == "at":
            value = str(record["at"])[:19].replace("T", " ")
        else:
            value = "-" if record[name] is None else str(record[name])
        cells.append(value.rjust(width) if name == "seq" else value.ljust(width))
    return "  ".join(cells).rstrip()


def follow(
    store: Store,
    flt: LogFilter,
    after_seq: int,
    on_records: Callable[[list[dict[str, Any]]], None],
    *,
    interval: float = 1.0,
    max_wait: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    stopped: Callable[[], bool] = lambda: False,
) -> int:
    """Poll for records after `after_seq` that pass `flt`, handing each batch to
    `on_records`, until `max_wait` seconds have passed (forever without it) or `stopped()`
    says so (checked before and after each wait). Returns the last sequence number seen."""
    deadline = None if max_wait is None else clock() + max_wait
    while not stopped():
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                return after_seq
            sleep(min(interval, left))
        else:
            sleep(interval)
        if stopped():
            break
        batch = flt.records(store, after_seq)
        if batch:
            on_records(batch)
            after_seq = int(batch[-1]["seq"])
    return after_seq
