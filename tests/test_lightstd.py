"""gatekeeper.lightstd: the standard library's C cores behave as the public modules do."""

from __future__ import annotations

import datetime as public_datetime
import functools
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper import lightstd
from gatekeeper.store.sqlite import SqliteDatabase

ROOT = Path(__file__).resolve().parent.parent


def test_the_datetime_classes_are_the_public_ones() -> None:
    assert lightstd.datetime is public_datetime.datetime
    assert lightstd.date is public_datetime.date
    assert lightstd.timezone is public_datetime.timezone
    assert lightstd.timedelta is public_datetime.timedelta


def fresh_interpreter(code: str) -> dict[str, object]:
    """Run `code` in `python -I -S` (nothing imported by site) with gatekeeper importable;
    it leaves its findings in `out`, printed as JSON (json imported only after it)."""
    program = (
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nout = {{}}\n{code}\n"
        "import json\nprint(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, object] = json.loads(result.stdout)
    return found


def test_sqlite_is_loaded_without_functools_and_leaves_no_stand_in() -> None:
    out = fresh_interpreter(
        "before = set(sys.modules)\n"
        "from gatekeeper.lightstd import sqlite3_module\n"
        "mod = sqlite3_module()\n"
        "out['module'] = mod.__name__\n"
        "out['loaded'] = sorted(set(sys.modules) - before)\n"
        "import functools\n"
        "out['functools'] = [hasattr(functools, n) for n in ('partial', 'reduce', 'wraps')]\n"
        "import sqlite3\n"
        "out['same'] = [sqlite3.connect is mod.connect, sqlite3.Row is mod.Row,\n"
        "               sqlite3.OperationalError is mod.OperationalError]\n"
        "out['again'] = sqlite3_module().__name__\n"
    )
    assert out["module"] == "_sqlite3"
    loaded = set(out["loaded"])  # type: ignore[arg-type]
    assert "_sqlite3" in loaded
    assert not {"functools", "collections", "sqlite3", "datetime"} & loaded, sorted(loaded)
    assert out["functools"] == [True, True, True]  # the real module, not the stand-in
    assert out["same"] == [True, True, True]
    assert out["again"] == "sqlite3"  # once imported, the public module is used


def test_with_functools_already_imported_no_stand_in_is_used() -> None:
    out = fresh_interpreter(
        "import functools\n"
        "real = functools.lru_cache\n"
        "from gatekeeper.lightstd import sqlite3_module\n"
        "out['module'] = sqlite3_module().__name__\n"
        "out['kept'] = sys.modules['functools'] is functools and functools.lru_cache is real\n"
    )
    assert out == {"module": "_sqlite3", "kept": True}


def test_the_light_core_runs_statements_as_sqlite3_does() -> None:
    """More distinct statements than the statement cache holds, each run repeatedly:
    the cache built by the stand-in `lru_cache` must answer every one correctly."""
    out = fresh_interpreter(
        "from gatekeeper.lightstd import sqlite3_module\n"
        "db = sqlite3_module().connect(':memory:', isolation_level=None, cached_statements=16)\n"
        "db.execute('CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)')\n"
        "db.executemany('INSERT INTO t VALUES (?, ?)', [(i, str(i * 7)) for i in range(64)])\n"
        "bad = 0\n"
        "for rnd in range(3):\n"
        "    for i in range(64):\n"
        "        sql = f'SELECT v, {i} FROM t WHERE k = ?'\n"
        "        if db.execute(sql, (i,)).fetchone() != (str(i * 7), i):\n"
        "            bad += 1\n"
        "out['bad'] = bad\n"
        "out['loaded'] = 'functools' in sys.modules\n"
    )
    assert out == {"bad": 0, "loaded": False}


@settings(max_examples=200, deadline=None)
@given(
    maxsize=st.sampled_from([None, 0, 1, 2, 3, 128]),
    typed=st.booleans(),
    calls=st.lists(st.sampled_from([1, 2, 3, 1.0, 2.0, "a", "b"]), max_size=30),
)
def test_the_stand_in_caches_as_functools_does(
    maxsize: int | None, typed: bool, calls: list[object]
) -> None:
    seen: dict[str, list[object]] = {"ours": [], "functools": []}

    def make(name: str):  # type: ignore[no-untyped-def]
        def function(arg: object) -> tuple[str, object]:
            seen[name].append(arg)
            return (name, arg)

        return function

    ours = lightstd._lru_cache(maxsize, typed)(make("ours"))
    theirs = functools.lru_cache(maxsize, typed)(make("functools"))
    for arg in calls:
        assert ours(arg)[1] == theirs(arg)[1]
    assert seen["ours"] == seen["functools"]  # the same calls reached the function


def test_the_sqlite_store_speaks_the_public_modules_errors(tmp_path: Path) -> None:
    assert issubclass(SqliteDatabase.errors[0], sqlite3.DatabaseError)
    db = SqliteDatabase(str(tmp_path / "x.db"), 1000, create=True)
    with pytest.raises(sqlite3.OperationalError):
        db.execute("SELECT * FROM missing")
    row = db.execute("SELECT 1 AS one").fetchone()
    assert row["one"] == 1  # sqlite3.Row
    db.conn.close()
