"""The audit log's hash chain: how a record is hashed and how a chain is checked.

Each record carries the hash of the previous one, so editing, deleting or
reordering a record breaks the chain at a place `verify_chain` names. A chain alone
cannot see a cut-off tail, so the head (sequence and hash of the newest record) is
also kept outside the database, in `audit.head` beside it (auditlog/head.py).
Standard library only.
"""

from __future__ import annotations

import sys

from gatekeeper.lightstd import datetime, timezone
from gatekeeper.lightstd import sha256 as sha256  # re-exported: the store uses it
from gatekeeper.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

GENESIS = "0" * 64
FIELDS = (
    "seq",
    "at",
    "event",
    "actor",
    "user",
    "key_fp",
    "repo",
    "action",
    "reason",
    "client",
    "detail",
)


def utc_iso(ts: float) -> str:
    """A Unix time as a record's `at` (`2027-01-31T14:00:00.000000Z`): fixed width, so
    times compare as text in every database."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    """SHA-256 over the previous hash and the record's canonical JSON."""
    fields = {f: record.get(f) for f in FIELDS}
    json = sys.modules.get("json")
    if json is not None:
        # Already imported (the CLI, a whole chain): its C encoder is quicker
        # (docs/performance.md), and canonical_json writes the same bytes.
        body = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    else:
        body = canonical_json(fields, compact=True)
    return sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


class _Unhandled(Exception):
    """A value `canonical_json` leaves to the json module."""


def canonical_json(value: Any, *, compact: bool = False) -> str:
    """`json.dumps(value, sort_keys=True)`, with `separators=(",", ":")` if `compact`,
    byte for byte, without importing json (which imports `re`) for what the audit log
    holds: dicts with string keys, lists, tuples, strings, ints, floats, bools and None.
    Anything else (other key types, subclasses, deep nesting) goes to json itself.
    tests/test_hotpath.py checks it against json on generated values."""
    try:
        return _encode(value, "," if compact else ", ", ":" if compact else ": ", 0)
    except _Unhandled:
        import json

        separators = (",", ":") if compact else None
        return json.dumps(value, sort_keys=True, separators=separators)


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}


def _encode_str(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif " " <= c <= "~":
            out.append(c)
        else:
            n = ord(c)
            if n > 0xFFFF:
                n -= 0x10000
                out.append(f"\\u{0xD800 | (n >> 10):04x}\\u{0xDC00 | (n & 0x3FF):04x}")
            else:
                out.append(f"\\u{n:04x}")
    return '"' + "".join(out) + '"'


def _encode(value: Any, item_sep: str, key_sep: str, depth: int) -> str:
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "Infinity" if value > 0 else "-Infinity"
        return float.__repr__(value)
    if depth > 50:
        raise _Unhandled
    if kind is dict:
        if not all(type(k) is str for k in value):
            raise _Unhandled
        return (
            "{"
            + item_sep.join(
                _encode_str(k) + key_sep + _encode(v, item_sep, key_sep, depth + 1)
                for k, v in sorted(value.items())
            )
            + "}"
        )
    if kind is list or kind is tuple:
        return "[" + item_sep.join(_encode(v, item_sep, key_sep, depth + 1) for v in value) + "]"
    raise _Unhandled


@record
class ChainProblem:
    seq: int | None
    message: str


def verify_chain(
    records: Iterable[Mapping[str, Any]],
    head: tuple[int, str] | None = None,
    anchor: tuple[int, str] | None = None,
    *,
    head_is_witness: bool = False,
) -> list[ChainProblem]:
    """Check every link; `anchor` is (seq, hash) of the record before the first kept one
    (after pruning), `head` what the head file says the newest record is.

    With `head_is_witness` (a database shared by several front-ends, each with its own
    head file) the head names the newest record *this host* appended: later records
    from other hosts are expected, but the named one must still be there, unchanged."""
    import json  # noqa: F401 - record_hash encodes long chains with json's C encoder

    problems: list[ChainProblem] = []
    witnessed: str | None = None
    expected_seq, prev = (anchor[0] + 1, anchor[1]) if anchor else (1, GENESIS)
    # Where the chain ends so far: a head of (0, GENESIS) is an empty log's (a first
    # write that a crash interrupted, resolved).
    last: tuple[int, str] = anchor if anchor else (0, GENESIS)
    for rec in records:
        seq = int(rec["seq"])
        if seq != expected_seq:
            problems.append(
                ChainProblem(
                    seq,
                    f"record {seq} follows {expected_seq - 1}: "
                    f"{'missing records' if seq > expected_seq else 'out of order'}",
                )
            )
        if rec["prev_hash"] != prev:
            problems.append(
                ChainProblem(
                    seq,
                    f"record {seq} does not link to the record before it "
                    "(deleted, reordered or edited)",
                )
            )
        if record_hash(str(rec["prev_hash"]), rec) != rec["hash"]:
            problems.append(ChainProblem(seq, f"record {seq} was edited (its hash does not match)"))
        prev = str(rec["hash"])
        if head is not None and seq == head[0]:
            witnessed = prev
        expected_seq = seq + 1
        last = (seq, prev)
    if head is not None:
        if last[0] < head[0]:
            problems.append(
                ChainProblem(
                    head[0],
                    f"the log ends before record {head[0]} named by the "
                    "head file: records were cut off",
                )
            )
        elif head_is_witness:
            if witnessed is not None and witnessed != head[1]:
                problems.append(
                    ChainProblem(head[0], f"record {head[0]} differs from the head file's hash")
                )
        elif last[0] > head[0]:
            problems.append(
                ChainProblem(last[0], f"records after {head[0]} are not covered by the head file")
            )
        elif last != head:
            problems.append(
                ChainProblem(head[0], f"record {head[0]} differs from the head file's hash")
            )
    return problems
