"""Just enough of PostgreSQL's client library, libpq, through ctypes.

The per-connection path (forced command, hooks, keys-command) is a new process for
every git request. Importing psycopg (asyncio, logging, importlib.metadata and its
own adapters) would cost it many times gatekeeper's whole budget; ctypes and libpq
cost little (docs/performance.md). So those short processes speak to PostgreSQL
through libpq directly: text-format parameters and results, converted by
column type, errors with their SQLSTATE. Everything long-lived (the admin CLI, the
embedded server) uses psycopg. Both are checked by the same store tests.

libpq comes from the system (Debian's libpq5) or, failing that, from the copy that
psycopg's binary wheel carries.
"""

from __future__ import annotations

import ctypes
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

CONNECTION_OK = 0
PGRES_COMMAND_OK = 1
PGRES_TUPLES_OK = 2
PG_DIAG_SQLSTATE = ord("C")
# Transaction states (PQtransactionStatus).
TRANS_IDLE, TRANS_ACTIVE, TRANS_INTRANS, TRANS_INERROR, TRANS_UNKNOWN = range(5)

# Column type OIDs and how their text form becomes a Python value.
BOOL, BYTEA, INT8, INT2, INT4, OID = 16, 17, 20, 21, 23, 26
FLOAT4, FLOAT8, NUMERIC = 700, 701, 1700
INTEGER_TYPES = frozenset((INT8, INT2, INT4, OID))
FLOAT_TYPES = frozenset((FLOAT4, FLOAT8, NUMERIC))

_lib: Any = None


class PgError(Exception):
    """A libpq failure: connecting, or a statement. `sqlstate` is None when the
    server never answered (unreachable, connection lost)."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _candidates() -> list[str]:
    names = ["libpq.so.5", "libpq.5.dylib", "libpq.so"]
    # The copy in psycopg's binary wheel (found without importing psycopg). Never
    # relative to the working directory: a library there could be anyone's.
    for entry in sys.path:
        if not os.path.isabs(entry):
            continue
        libs = os.path.join(entry, "psycopg_binary.libs")
        try:
            found = sorted(f for f in os.listdir(libs) if f.startswith("libpq"))
        except OSError:
            continue
        names += [os.path.join(libs, f) for f in found]
    return names


def load() -> Any:
    """libpq, loaded once; PgError if there is none."""
    global _lib
    if _lib is not None:
        return _lib
    lib = None
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise PgError("libpq, PostgreSQL's client library, is not installed")
    p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    for fn, res, args in (
        ("PQconnectdbParams", p, [ctypes.POINTER(s), ctypes.POINTER(s), i]),
        ("PQstatus", i, [p]),
        ("PQerrorMessage", s, [p]),
        ("PQfinish", None, [p]),
        ("PQtransactionStatus", i, [p]),
        ("PQexecParams", p, [p, s, i, p, ctypes.POINTER(s), p, p, i]),
        ("PQresultStatus", i, [p]),
        ("PQresultErrorMessage", s, [p]),
        ("PQresultErrorField", s, [p, i]),
        ("PQntuples", i, [p]),
        ("PQnfields", i, [p]),
        ("PQfname", s, [p, i]),
        ("PQftype", ctypes.c_uint, [p, i]),
        ("PQgetvalue", p, [p, i, i]),
        ("PQgetlength", i, [p, i, i]),
        ("PQgetisnull", i, [p, i, i]),
        ("PQcmdTuples", s, [p]),
        ("PQclear", None, [p]),
    ):
        func = getattr(lib, fn)
        func.restype = res
        func.argtypes = args
    _lib = lib
    return lib


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", "replace").strip()


def _param(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"\\x" + bytes(value).hex().encode()
    return str(value).encode("utf-8")


def _convert(kind: int, raw: bytes) -> Any:
    if kind in INTEGER_TYPES:
        return int(raw)
    if kind == BYTEA:
        return bytes.fromhex(raw[2:].decode()) if raw.startswith(b"\\x") else raw
    if kind == BOOL:
        return raw == b"t"
    if kind in FLOAT_TYPES:
        return float(raw)
    return raw.decode("utf-8")


class Result:
    """A statement's rows (as dicts) and affected-row count, like a DB-API cursor."""

    def __init__(self, rows: list[dict[str, Any]], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def fetchall(self) -> list[dict[str, Any]]:
        return self.rows

    def fetchone(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None


class Connection:
    """One libpq connection. Statements use $1, $2... placeholders."""

    def __init__(self, params: dict[str, str]) -> None:
        lib = load()
        keys = (ctypes.c_char_p * (len(params) + 1))(*[k.encode() for k in params], None)
        values = (ctypes.c_char_p * (len(params) + 1))(
            *[v.encode("utf-8") for v in params.values()], None
        )
        # expand_dbname=1: a `dbname` holding a URL is parsed; the other keys override it.
        self._conn = lib.PQconnectdbParams(keys, values, 1)
        if not self._conn:
            raise PgError("out of memory connecting to PostgreSQL")
        if lib.PQstatus(self._conn) != CONNECTION_OK:
            message = _text(lib.PQerrorMessage(self._conn))
            self.close()
            raise PgError(message or "cannot connect")

    @property
    def closed(self) -> bool:
        return not self._conn

    def transaction_status(self) -> int:
        return int(_lib.PQtransactionStatus(self._conn)) if self._conn else TRANS_UNKNOWN

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        if not self._conn:
            raise PgError("the connection is closed")
        lib = _lib
        values = (ctypes.c_char_p * max(len(params), 1))(*[_param(v) for v in params])
        res = lib.PQexecParams(
            self._conn, sql.encode("utf-8"), len(params), None, values, None, None, 0
        )
        if not res:
            raise PgError(_text(lib.PQerrorMessage(self._conn)) or "no result")
        try:
            status = lib.PQresultStatus(res)
            if status not in (PGRES_COMMAND_OK, PGRES_TUPLES_OK):
                state = lib.PQresultErrorField(res, PG_DIAG_SQLSTATE)
                message = _text(lib.PQresultErrorMessage(res))
                raise PgError(
                    message or _text(lib.PQerrorMessage(self._conn)) or "statement failed",
                    state.decode() if state else None,
                )
            count = lib.PQcmdTuples(res)
            rowcount = int(count) if count else -1
            fields = [
                (lib.PQfname(res, j).decode("utf-8"), int(lib.PQftype(res, j)))
                for j in range(lib.PQnfields(res))
            ]
            rows: list[dict[str, Any]] = []
            for i in range(lib.PQntuples(res)):
                row: dict[str, Any] = {}
                for j, (name, kind) in enumerate(fields):
                    if lib.PQgetisnull(res, i, j):
                        row[name] = None
                    else:
                        raw = ctypes.string_at(
                            lib.PQgetvalue(res, i, j), lib.PQgetlength(res, i, j)
                        )
                        row[name] = _convert(kind, raw)
                rows.append(row)
            return Result(rows, rowcount)
        finally:
            lib.PQclear(res)

    def close(self) -> None:
        if self._conn:
            _lib.PQfinish(self._conn)
            self._conn = None
