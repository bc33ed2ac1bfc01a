"""The standard library's C cores, imported without their Python wrappers.

The forced command starts a fresh interpreter for every git connection, so every
module it imports is paid on every clone and fetch (docs/design.md, "Performance budget"). Two
wrappers cost more than what they wrap:

- `datetime.py` runs its whole pure-Python implementation (every class) and then
  replaces it with `_datetime`'s. Importing `_datetime` directly gives the very same
  classes (`datetime.datetime is _datetime.datetime`) in a fraction of the time.
- `sqlite3` imports `datetime` and `collections.abc` only for default adapters that
  gatekeeper never uses (it stores integers). Its C core `_sqlite3` imports
  `functools`, and with it `collections`, `operator`, `reprlib` and `types`, only to
  fetch `lru_cache`, which each connection calls once to build its statement cache.
  `sqlite3_module()` loads `_sqlite3` beside a stand-in `functools` whose
  `lru_cache` returns the same C cache that `functools.lru_cache` returns
  (`_functools._lru_cache_wrapper`), and removes the stand-in at once, so a later
  `import functools` gets the real module (docs/performance.md has what it saves).

- `hashlib` loads OpenSSL's bindings for one SHA-256: the interpreter's
  own core has it (`_sha256` up to 3.11, `_sha2` from 3.12 on, with the same class).

Where a private core is missing (another Python implementation), the public module
is used instead. tests/test_lightstd.py holds both to the public modules' behaviour.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from datetime import date, datetime, timedelta, timezone
    from hashlib import sha256
    from types import ModuleType
    from typing import Any
else:
    try:
        from _datetime import date, datetime, timedelta, timezone
    except ImportError:  # pragma: no cover - an interpreter without the C core
        from datetime import date, datetime, timedelta, timezone
    try:
        from _sha2 import sha256  # 3.12 and later
    except ImportError:
        try:
            from _sha256 import sha256  # 3.10 and 3.11
        except ImportError:  # pragma: no cover - an interpreter built without either
            from hashlib import sha256

__all__ = ["date", "datetime", "sha256", "sqlite3_module", "timedelta", "timezone"]


def sqlite3_module() -> ModuleType:
    """The module with `connect`, `Row` and the DB-API exceptions: `sqlite3` when it
    is already imported (the admin CLI), otherwise its C core, loaded light."""
    for name in ("sqlite3", "_sqlite3"):
        loaded = sys.modules.get(name)
        if loaded is not None:
            return loaded
    if "functools" in sys.modules:
        return _import_core()
    stand_in = type(sys)("functools")
    stand_in.lru_cache = _lru_cache  # type: ignore[attr-defined]
    sys.modules["functools"] = stand_in
    try:
        return _import_core()
    finally:
        if sys.modules.get("functools") is stand_in:
            del sys.modules["functools"]


def _import_core() -> ModuleType:
    try:
        import _sqlite3
    except ImportError:  # pragma: no cover - an interpreter without the C core
        import sqlite3

        return sqlite3
    return _sqlite3


def _lru_cache(maxsize: int | None = 128, typed: bool = False) -> Any:
    """`functools.lru_cache(maxsize, typed)`, as `_sqlite3` calls it, minus the Python
    around the C cache (whose `cache_info()` would return a plain tuple)."""
    from _functools import _lru_cache_wrapper  # type: ignore[import-not-found]

    def decorate(function: Any) -> Any:
        return _lru_cache_wrapper(function, maxsize, typed, tuple)

    return decorate
