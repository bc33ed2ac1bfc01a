"""The policy as the decision reads it: teams, repository rules (with their globs),
the server and two-factor settings, and `Policy`, which holds them. Plain values
only; how they are checked (`check`), compiled (`compiled`) and loaded (`load`) is
beside this module.
"""

from __future__ import annotations

import os
import sys

from gatekeeper import pathstr
from gatekeeper.lightstd import date, sha256
from gatekeeper.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from gatekeeper.policy.compiled import _Compiled

LEVELS = ("none", "enrolled", "verified", "security-key", "security-key-pin")  # weakest first
MODES = ("enforce", "report")


@record
class Team:
    name: str
    members: tuple[str, ...]
    require_2fa: str = "none"
    grace_until: date | None = None
    mode: str = "enforce"
    line: int = 0


@record
class RepoRule:
    match: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    public: bool = False
    require_2fa: str | None = None
    grace_until: date | None = None
    mode: str | None = None
    line: int = 0

    def matches(self, repo: str) -> bool:
        """Whether `repo` (like "platform/api", without .git) is covered by this rule."""
        if "*" not in self.match:
            return repo == self.match
        glob = _GLOBS.get(self.match)
        if glob is None:
            glob = _GLOBS[self.match] = glob_tokens(self.match)
        return glob_match(glob, repo)


# Compiled globs, by pattern: built on first use, shared by every rule with that pattern.
_GLOBS: dict[str, tuple[tuple[int, str], ...]] = {}
# glob_tokens' token kinds: literal text, `[^/]*`, `(?:[^/]+/)*`, `.*`.
_TEXT, _STAR, _DIRS, _REST = 0, 1, 2, 3


def glob_tokens(pattern: str) -> tuple[tuple[int, str], ...]:
    """`glob_regex(pattern)` as (kind, text) tokens for `glob_match`, which needs no
    `re` on the forced command's path (tests/test_hotpath.py holds it to the regex)."""
    out: list[tuple[int, str]] = []

    def text(piece: str) -> None:
        if out and out[-1][0] == _TEXT:
            out[-1] = (_TEXT, out[-1][1] + piece)
        elif piece:
            out.append((_TEXT, piece))

    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append((_REST if last else _DIRS, ""))
            continue
        for j, piece in enumerate(part.split("*")):
            if j:
                out.append((_STAR, ""))
            text(piece)
        if not last:
            text("/")
    return tuple(out)


def glob_match(tokens: tuple[tuple[int, str], ...], name: str) -> bool:
    """Whether `glob_regex`'s pattern for `tokens` matches all of `name`."""
    end = len(name)
    seen: set[tuple[int, int]] = set()

    def walk(t: int, pos: int) -> bool:
        if (t, pos) in seen:
            return False
        seen.add((t, pos))
        if t == len(tokens):
            return pos == end  # \Z
        kind, literal = tokens[t]
        if kind == _TEXT:
            return name.startswith(literal, pos) and walk(t + 1, pos + len(literal))
        if kind == _REST:  # `.*`: anything but a newline, to the end
            return "\n" not in name[pos:] and walk(t + 1, end)
        if kind == _STAR:  # `[^/]*`: up to the next "/"
            stop = name.find("/", pos)
            stop = end if stop < 0 else stop
            return any(walk(t + 1, k) for k in range(pos, stop + 1))
        # `(?:[^/]+/)*`: nothing, or whole non-empty components, each with its "/"
        if walk(t + 1, pos):
            return True
        k = pos
        while True:
            slash = name.find("/", k)
            if slash <= k:  # no more "/", or an empty component
                return False
            k = slash + 1
            if walk(t + 1, k):
                return True

    return walk(0, 0)


class ServerSettings:
    """The policy's `server` section: a frozen value like the `@record` classes.

    `repositories` and `state_dir` are `Path`s to everyone, but kept as strings
    spelled as pathlib spells them (`pathstr.norm`): the forced command reads
    `repositories_str` and `state_dir_str` and never imports pathlib."""

    FIELDS = (
        "host",
        "port",
        "user",
        "repositories",
        "state_dir",
        "listen_host",
        "listen_port",
        "store",
    )
    __record_fields__ = FIELDS  # for record.evolve
    __slots__ = (
        "host",
        "listen_host",
        "listen_port",
        "port",
        "repositories_str",
        "state_dir_str",
        "store",
        "user",
    )
    host: str
    port: int
    user: str
    repositories_str: str
    state_dir_str: str
    listen_host: str
    listen_port: int
    # Where users, keys, 2FA state and the audit log live: "" is the SQLite file in
    # state_dir; otherwise a store URL (see gatekeeper.store.url), e.g. postgresql://...
    store: str

    def __init__(
        self,
        host: str = "localhost",
        port: int = 22,
        user: str = "git",
        repositories: str | os.PathLike[str] = "repositories",
        state_dir: str | os.PathLike[str] = "state",
        listen_host: str = "127.0.0.1",
        listen_port: int = 2222,
        store: str = "",
    ) -> None:
        setter = object.__setattr__
        setter(self, "host", host)
        setter(self, "port", port)
        setter(self, "user", user)
        setter(self, "repositories_str", pathstr.norm(repositories))
        setter(self, "state_dir_str", pathstr.norm(state_dir))
        setter(self, "listen_host", listen_host)
        setter(self, "listen_port", listen_port)
        setter(self, "store", store)

    def with_port(self, port: int) -> ServerSettings:
        return ServerSettings(
            self.host,
            port,
            self.user,
            self.repositories_str,
            self.state_dir_str,
            self.listen_host,
            self.listen_port,
            self.store,
        )

    @property
    def repositories(self) -> Path:
        from pathlib import Path

        return Path(self.repositories_str)

    @property
    def state_dir(self) -> Path:
        from pathlib import Path

        return Path(self.state_dir_str)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ServerSettings is frozen: cannot set {name!r}")

    __delattr__ = __setattr__  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, ServerSettings)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.FIELDS)
        return f"ServerSettings({inner})"


@record
class TwoFactorSettings:
    issuer: str = "gatekeeper"
    session_hours: float = 12
    max_failures: int = 5
    failure_window_minutes: int = 15
    lockout_minutes: int = 15
    self_enroll: bool = True
    keyboard_interactive: bool = False


@record
class Problem:
    line: int | None
    message: str
    severity: str = "error"  # "error" | "warning"

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.severity}: {self.message}"


@record
class Policy:
    server: ServerSettings
    two_factor: TwoFactorSettings
    teams: dict[str, Team]
    rules: tuple[RepoRule, ...]
    allow_local_push: bool = False
    source: str = ""
    sha256: str = ""  # of the policy file's bytes

    def served_on(self, port: int) -> Policy:
        """This policy with `port` where users connect (`server.port`), for the embedded
        server listening there: every message names it. A compiled policy stays one."""
        copy: Policy = object.__new__(Policy)
        for name, value in self.__dict__.items():
            object.__setattr__(copy, name, value)
        object.__setattr__(copy, "server", self.server.with_port(port))
        return copy

    def matching_rules(self, repo: str) -> tuple[RepoRule, ...]:
        """The rules that cover `repo`, in file order. A policy loaded from the compiled
        cache looks only at the rules its index names for `repo`."""
        compiled: _Compiled | None = self.__dict__.get("_compiled")
        if compiled is not None and "rules" not in self.__dict__:
            return compiled.matching_rules(repo)
        return tuple(rule for rule in self.rules if rule.matches(repo))

    def teams_of(self, user: str) -> tuple[Team, ...]:
        """The teams that list `user`, in file order."""
        compiled: _Compiled | None = self.__dict__.get("_compiled")
        if compiled is not None and "teams" not in self.__dict__:
            return compiled.teams_of(user)
        return tuple(t for t in self.teams.values() if user in t.members)

    if not TYPE_CHECKING:

        def __getattr__(self, name):
            # Only reached for a missing attribute: the teams and rules of a policy
            # loaded from the compiled cache are built on first use.
            compiled = self.__dict__.get("_compiled")
            if compiled is None or name not in ("teams", "rules"):
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            value = compiled.all_teams() if name == "teams" else compiled.all_rules()
            object.__setattr__(self, name, value)
            return value


# Small files are hashed quicker with the interpreter's own SHA-256 than by importing
# OpenSSL's hashlib, which pays for its import only on large files.
_SMALL_FILE = 256 * 1024


def file_digest(data: bytes) -> str:
    """The policy file's SHA-256 (`Policy.sha256`, and the compiled cache's key)."""
    if len(data) <= _SMALL_FILE and "hashlib" not in sys.modules:
        return sha256(data).hexdigest()
    import hashlib

    return hashlib.sha256(data).hexdigest()
