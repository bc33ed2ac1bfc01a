"""Where the state lives: a SQLite file (the default, in the state directory) or a
PostgreSQL database shared by several git front-ends.

A store is named by a URL: a plain path or `sqlite:///absolute/path` for SQLite (a
directory means its `gatekeeper.db`), `postgresql://user@host:port/db?...` for
PostgreSQL. A password never goes in the URL (it would show in process lists, shell
history and the policy file): it comes from `password_file=` (a file holding only
the password), libpq's `passfile=` / PGPASSFILE, or PGPASSWORD.

Standard library only, and no regular expressions: this runs on every connection.
"""

from __future__ import annotations

import os

from gatekeeper.errors import InputError
from gatekeeper.record import record

DB_NAME = "gatekeeper.db"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite://"
# libpq's own parameters that would defeat the point of keeping the password out.
FORBIDDEN_PARAMS = ("password",)
DEFAULT_CONNECT_TIMEOUT = 5


@record
class StoreLocation:
    """A parsed store URL. `path` for SQLite; `url` (without `password_file`) and
    `password_file` for PostgreSQL."""

    kind: str  # "sqlite" | "postgresql"
    path: str = ""
    url: str = ""
    password_file: str = ""

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgresql"

    def describe(self) -> str:
        """What to show in messages and logs: never a password (there is none to show)."""
        if self.kind == "sqlite":
            return self.path
        return self.url.split("?", 1)[0]


HINT = (
    "use a path, sqlite:///absolute/path, or postgresql://user@host:port/database "
    "(password from password_file=FILE, PGPASSFILE or PGPASSWORD)."
)


def parse_store_url(text: str | None, state_dir: str, base: str = "") -> StoreLocation:
    """Parse a store URL; None or "" means the SQLite file in `state_dir`. A relative
    path is taken relative to `base` (the policy file's directory)."""
    if not text:
        return StoreLocation("sqlite", path=os.path.join(state_dir, DB_NAME))
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        raise InputError("store URL: control characters are not allowed.", hint=HINT)
    lowered = text.lower()
    if lowered.startswith(POSTGRES_SCHEMES):
        return _postgres(text)
    if lowered.startswith(SQLITE_SCHEME):
        rest = text[len(SQLITE_SCHEME) :]
        if not rest.startswith("/") or rest.startswith("//") or "?" in rest:
            raise InputError(f"store URL {text!r}: expected sqlite:///absolute/path.", hint=HINT)
        return StoreLocation("sqlite", path=_sqlite_file(rest))
    if "://" in text:
        raise InputError(f"store URL {text!r}: unknown scheme.", hint=HINT)
    path = os.path.expanduser(text)
    if base and not os.path.isabs(path):
        path = os.path.join(base, path)
    return StoreLocation("sqlite", path=_sqlite_file(os.path.abspath(path)))


def _sqlite_file(path: str) -> str:
    return os.path.join(path, DB_NAME) if os.path.isdir(path) else path


def _postgres(text: str) -> StoreLocation:
    rest = text.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    authority = rest.split("/", 1)[0]
    userinfo = authority.rpartition("@")[0] if "@" in authority else ""
    if ":" in userinfo:
        raise InputError(
            "store URL: a password in the URL would show in process lists and files.",
            hint="put it in a file and add ?password_file=FILE, or use PGPASSFILE or PGPASSWORD.",
        )
    kept: list[str] = []
    password_file = ""
    for pair in query.split("&") if query else []:
        name, _, value = pair.partition("=")
        if name.lower() in FORBIDDEN_PARAMS:
            raise InputError(
                "store URL: a password parameter would show in process lists and files.",
                hint="put it in a file and add ?password_file=FILE, or use PGPASSFILE or "
                "PGPASSWORD.",
            )
        if name == "password_file":
            if not value:
                raise InputError("store URL: password_file= needs a file name.", hint=HINT)
            password_file = _unquote(value)
        else:
            kept.append(pair)
    url = f"postgresql://{rest}" + (f"?{'&'.join(kept)}" if kept else "")
    return StoreLocation("postgresql", url=url, password_file=password_file)


def _unquote(value: str) -> str:
    if "%" not in value:
        return value
    from urllib.parse import unquote

    return unquote(value)


def read_password_file(path: str) -> str:
    """The password in `path`: its first line. Refuse a file others can read or its
    group can change; its group may read it (a least-privilege AuthorizedKeysCommandUser
    looking up a key this host's key index does not have yet)."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as fh:
            line = fh.readline()
    except OSError as exc:
        raise InputError(
            f"cannot read the store password file {path}: {exc.strerror}.",
            hint="it must exist and be readable by the git user.",
        ) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"the store password file {path} is not UTF-8 text.") from exc
    if st.st_mode & 0o027:
        raise InputError(
            f"the store password file {path} is open to others (mode {st.st_mode & 0o777:o}).",
            hint=f"chmod 600 {path} (or 640, to let its group read it)",
        )
    password = line.rstrip("\r\n")
    if not password:
        raise InputError(f"the store password file {path} is empty.")
    return password
