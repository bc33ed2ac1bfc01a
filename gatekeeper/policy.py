"""The YAML policy: loading, validation with line numbers, and a compiled cache.

Validation walks the YAML node tree (not constructed objects), so every problem
carries its line, and all problems are reported at once. Only plain YAML is
accepted: any tag outside the standard scalar/list/mapping set (`!!python/object`,
`!custom`, `!!binary`) is an error and nothing is ever constructed from one.

On the per-connection path `load_policy` hashes the file and reads a compiled copy
keyed by that hash, so `yaml` is imported only when the file has changed. The
compiled copy (`dump_compiled`) is marshal data with an index, so a connection
builds only the rules that can match its repository and the teams of its user, at
any policy size. This module imports only light standard-library modules at the top
(not `re`, `json` or `hashlib`), and compiles no regular expression at import time.
"""

from __future__ import annotations

import os
import sys

from gatekeeper import pathstr
from gatekeeper.errors import InputError, PolicyError
from gatekeeper.lightstd import date, sha256
from gatekeeper.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import re
    from pathlib import Path
    from typing import Any

LEVELS = ("none", "enrolled", "verified", "security-key", "security-key-pin")  # weakest first
MODES = ("enforce", "report")

# Plain strings: `re` caches what it compiles, and only validation ever needs them.
NAME_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z"
PATTERN_COMPONENT_RE = r"[A-Za-z0-9_.+*-]+\Z"
HOST_RE = r"[A-Za-z0-9_.:\[\]%-]{1,253}\Z"
DATE_RE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z"
DECIMAL_RE = r"[-+]?(?:0|[1-9][0-9_]*)\Z"
CONTROL_RE = r"[\x00-\x1f\x7f]"
MAX_NUMBER = 1_000_000  # minutes, hours and counts beyond this are mistakes (and overflow)

# Bump whenever validation or the JSON layout changes: older caches are then ignored.
CACHE_FORMAT = 3
# The same for the compiled cache (`dump_compiled`), which the hot path reads.
COMPILED_FORMAT = 4


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


def glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` stays within one path component; `**` (a whole component) crosses '/', and
    between slashes it also matches no component at all (`a/**/b` matches `a/b`)."""
    import re

    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        out.append("[^/]*".join(re.escape(p) for p in part.split("*")))
        if not last:
            out.append("/")
    return re.compile("".join(out) + r"\Z")


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
    # state_dir; otherwise a store URL (see gatekeeper.storeurl), e.g. postgresql://...
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

    def to_json(self) -> str:
        import json

        s, tf = self.server, self.two_factor
        return json.dumps(
            {
                "format": CACHE_FORMAT,
                "server": {
                    "host": s.host,
                    "port": s.port,
                    "user": s.user,
                    "repositories": str(s.repositories),
                    "state_dir": str(s.state_dir),
                    "listen_host": s.listen_host,
                    "listen_port": s.listen_port,
                    "store": s.store,
                },
                "two_factor": {
                    "issuer": tf.issuer,
                    "session_hours": tf.session_hours,
                    "max_failures": tf.max_failures,
                    "failure_window_minutes": tf.failure_window_minutes,
                    "lockout_minutes": tf.lockout_minutes,
                    "self_enroll": tf.self_enroll,
                    "keyboard_interactive": tf.keyboard_interactive,
                },
                "teams": [
                    {
                        "name": t.name,
                        "members": list(t.members),
                        "require_2fa": t.require_2fa,
                        "grace_until": _iso(t.grace_until),
                        "mode": t.mode,
                        "line": t.line,
                    }
                    for t in self.teams.values()
                ],
                "rules": [
                    {
                        "match": r.match,
                        "read": list(r.read),
                        "write": list(r.write),
                        "public": r.public,
                        "require_2fa": r.require_2fa,
                        "grace_until": _iso(r.grace_until),
                        "mode": r.mode,
                        "line": r.line,
                    }
                    for r in self.rules
                ],
                "allow_local_push": self.allow_local_push,
                "source": self.source,
                "sha256": self.sha256,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Policy:
        """The policy `to_json` wrote. Raises ValueError for anything else (a corrupt
        or foreign file): every field is type-checked, so a damaged cache can never
        become a different policy."""
        import json

        try:
            data = _obj(json.loads(text), _POLICY_FIELDS)
            if data.get("format") != CACHE_FORMAT:
                raise ValueError("unknown compiled policy format")
            s = _obj(data["server"], _SERVER_FIELDS)
            tf = _obj(data["two_factor"], _TWO_FACTOR_FIELDS)
            server = ServerSettings(
                host=_typed(s["host"], str),
                port=_typed(s["port"], int),
                user=_typed(s["user"], str),
                repositories=_typed(s["repositories"], str),
                state_dir=_typed(s["state_dir"], str),
                listen_host=_typed(s["listen_host"], str),
                listen_port=_typed(s["listen_port"], int),
                store=_typed(s["store"], str),
            )
            two_factor = TwoFactorSettings(
                issuer=_typed(tf["issuer"], str),
                session_hours=_typed(tf["session_hours"], (int, float)),
                max_failures=_typed(tf["max_failures"], int),
                failure_window_minutes=_typed(tf["failure_window_minutes"], int),
                lockout_minutes=_typed(tf["lockout_minutes"], int),
                self_enroll=_typed(tf["self_enroll"], bool),
                keyboard_interactive=_typed(tf["keyboard_interactive"], bool),
            )
            teams: dict[str, Team] = {}
            for raw in _typed(data["teams"], list):
                t = _obj(raw, _TEAM_FIELDS)
                team = Team(
                    name=_typed(t["name"], str),
                    members=_names(t["members"]),
                    require_2fa=_choice(t["require_2fa"], LEVELS),
                    grace_until=_date(t["grace_until"]),
                    mode=_choice(t["mode"], MODES),
                    line=_typed(t["line"], int),
                )
                teams[team.name] = team
            rules = []
            for raw in _typed(data["rules"], list):
                r = _obj(raw, _RULE_FIELDS)
                rules.append(
                    RepoRule(
                        match=_typed(r["match"], str),
                        read=_names(r["read"]),
                        write=_names(r["write"]),
                        public=_typed(r["public"], bool),
                        require_2fa=None
                        if r["require_2fa"] is None
                        else _choice(r["require_2fa"], LEVELS),
                        grace_until=_date(r["grace_until"]),
                        mode=None if r["mode"] is None else _choice(r["mode"], MODES),
                        line=_typed(r["line"], int),
                    )
                )
            return cls(
                server,
                two_factor,
                teams,
                tuple(rules),
                _typed(data["allow_local_push"], bool),
                _typed(data["source"], str),
                _typed(data["sha256"], str),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a compiled policy: {exc!r}") from None


def _obj(value: Any, keys: frozenset[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict) or (keys is not None and value.keys() != keys):
        raise ValueError("expected a JSON object with other keys")
    return value


_POLICY_FIELDS = frozenset({"format", *Policy.__annotations__})
_SERVER_FIELDS = frozenset(ServerSettings.FIELDS)
_TWO_FACTOR_FIELDS = frozenset(TwoFactorSettings.__annotations__)
_TEAM_FIELDS = frozenset(Team.__annotations__)
_RULE_FIELDS = frozenset(RepoRule.__annotations__)


def _typed(value: Any, kind: Any) -> Any:
    # bool is an int in Python: never accept one for the other.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"unexpected value {value!r}")
    return value


def _names(value: Any) -> tuple[str, ...]:
    return tuple(_typed(v, str) for v in _typed(value, list))


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unexpected value {value!r}")
    return str(value)


def _iso(d: date | None) -> str | None:
    return d.isoformat() if d else None


def _date(s: Any) -> date | None:
    return None if s is None else date.fromisoformat(_typed(s, str))


DEFAULT_CONFIG = "/etc/gatekeeper/config.yaml"


def default_config_path() -> Path:
    from pathlib import Path

    return Path(os.environ.get("GATEKEEPER_CONFIG") or DEFAULT_CONFIG)


# -- validation ----------------------------------------------------------------------

SERVER_KEYS = {
    "host": "host",
    "port": "port",
    "user": "name",
    "repositories": "path",
    "state_dir": "path",
    "listen_host": "host",
    "listen_port": "port",
    "store": "string",
}
TWO_FACTOR_KEYS = {
    "issuer": "string",
    "session_hours": "positive number",
    "max_failures": "positive integer",
    "failure_window_minutes": "positive integer",
    "lockout_minutes": "positive integer",
    "self_enroll": "boolean",
    "keyboard_interactive": "boolean",
}
HOOKS_KEYS = {"allow_local_push": "boolean"}
TEAM_KEYS = {
    "members": "list of user names",
    "require_2fa": "level",
    "grace_until": "date",
    "mode": "mode",
}
RULE_KEYS = {
    "match": "pattern",
    "read": "list of team names",
    "write": "list of team names",
    "public": "boolean",
    "require_2fa": "level",
    "grace_until": "date",
    "mode": "mode",
}
TOP_KEYS = ("server", "two_factor", "hooks", "teams", "repositories")

EXPECTED = {
    "string": "a string",
    "host": "a host name or address",
    "port": "a port number (1-65535)",
    "name": "a name (letters, digits, '_', '.', '-'; at most 64 characters)",
    "path": "a path",
    "positive integer": f"a positive integer (at most {MAX_NUMBER})",
    "positive number": f"a positive number (at most {MAX_NUMBER})",
    "boolean": "true or false",
    "date": "a date like 2027-01-31",
    "level": f"one of: {', '.join(LEVELS)}",
    "mode": f"one of: {', '.join(MODES)}",
    "pattern": "a repository name or glob, like platform/* or web/**",
}
# Kinds whose value is text: a number written for them is taken as its text.
TEXT_KINDS = ("string", "host", "name", "path", "pattern")

YAML_TAG = "tag:yaml.org,2002:"
STR_TAG = YAML_TAG + "str"
INT_TAG = YAML_TAG + "int"
FLOAT_TAG = YAML_TAG + "float"
BOOL_TAG = YAML_TAG + "bool"
NULL_TAG = YAML_TAG + "null"
TIMESTAMP_TAG = YAML_TAG + "timestamp"
MERGE_TAG = YAML_TAG + "merge"  # what the resolver gives a plain `<<`
VALUE_TAG = YAML_TAG + "value"  # ... and a plain `=`
MAP_TAG = YAML_TAG + "map"
SEQ_TAG = YAML_TAG + "seq"
STANDARD_TAGS = {
    STR_TAG,
    INT_TAG,
    FLOAT_TAG,
    BOOL_TAG,
    NULL_TAG,
    TIMESTAMP_TAG,
    MERGE_TAG,
    VALUE_TAG,
    MAP_TAG,
    SEQ_TAG,
}
BOOL_VALUES = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(YAML_TAG) :] if tag.startswith(YAML_TAG) else tag


def _quoted(text: str) -> str:
    """A key or name from the file, quoted for a one-line message (escaped if need be)."""
    return f"'{text}'" if text.isprintable() else repr(text)


def _line(node: Any) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _shown(node: Any) -> str:
    """How a value is described in a message: its text, or what it is."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == NULL_TAG and node.value in ("", "~"):
        return "nothing"
    return repr(node.value)


class _Checker:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, node: Any, message: str) -> None:
        self.problems.append(Problem(_line(node), message))

    def warn(self, node: Any, message: str) -> None:
        self.problems.append(Problem(_line(node), message, "warning"))

    def section(self, top: dict[str, tuple[Any, Any]], name: str) -> Any:
        """The value node of a top-level section; None when absent or left empty."""
        if name not in top:
            return None
        node = top[name][1]
        return None if node.tag == NULL_TAG and node.value in ("", "~", "null") else node

    def mapping(
        self, node: Any, where: str, allowed: Any, noun: str = "key"
    ) -> dict[str, tuple[Any, Any]]:
        """The keys of a mapping node as {key: (key node, value node)}. Flags duplicate
        keys (YAML itself keeps the last one silently) and, when `allowed` is given,
        unknown keys."""
        import yaml

        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{where} must be a mapping of keys to values, got {_shown(node)}")
            return {}
        out: dict[str, tuple[Any, Any]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                self.error(key_node, f"{where}: merge keys ('<<') are not supported")
                continue
            text_key = key_node.tag == STR_TAG or (allowed is None and key_node.tag == INT_TAG)
            if not isinstance(key_node, yaml.ScalarNode) or not text_key:
                self.error(key_node, f"{where}: keys must be plain names, got {_shown(key_node)}")
                continue
            key = key_node.value
            if key in out:
                # The duplicate is reported and skipped: YAML would silently keep the last.
                twice = f": {noun} {_quoted(key)} is defined twice" if noun != "key" else ""
                first = _line(out[key][0])
                self.error(
                    key_node,
                    f"duplicate key {_quoted(key)} in {where}{twice} (first on line {first})",
                )
                continue
            if allowed is not None and key not in allowed:
                self.error(
                    key_node,
                    f"unknown key {_quoted(key)} in {where} (expected one of: "
                    f"{', '.join(allowed)})",
                )
                continue
            out[key] = (key_node, value_node)
        return out

    def scalar(self, node: Any, kind: str, where: str, nullable: bool = False) -> Any:
        """One checked value of `kind`; None (after recording a problem) when it is
        wrong, and None without one when it is empty and `nullable`."""
        import yaml

        expected = EXPECTED[kind]
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{where}: expected {expected}, got {_shown(node)}")
            return None
        import re

        tag, value = node.tag, node.value
        if tag in (MERGE_TAG, VALUE_TAG):
            tag = STR_TAG  # a bare `<<` or `=` as a value is just text
        if tag == NULL_TAG and nullable:
            return None
        if re.search(CONTROL_RE, value):
            self.error(node, f"{where}: control characters are not allowed, got {value!r}")
            return None
        if kind == "boolean":
            if tag == BOOL_TAG and value.lower() in BOOL_VALUES:
                return BOOL_VALUES[value.lower()]
            self.error(node, f"{where}: expected true or false, got {_shown(node)}")
            return None
        if kind in ("port", "positive integer"):
            # Length first: int() refuses more than 4300 digits with a ValueError.
            decimal = len(value) <= 32 and re.match(DECIMAL_RE, value)
            number = int(value.replace("_", "")) if decimal else 0
            top = 65535 if kind == "port" else MAX_NUMBER
            if tag == INT_TAG and 0 < number <= top:
                return number
            self.error(node, f"{where}: expected {expected}, got {_shown(node)}")
            return None
        if kind == "positive number":
            real = 0.0
            if tag in (INT_TAG, FLOAT_TAG):
                try:
                    real = float(value.replace("_", ""))
                except ValueError:
                    real = 0.0  # .inf, .nan, sexagesimal: not wanted here
            if 0 < real <= MAX_NUMBER:
                return real
            self.error(node, f"{where}: expected {expected}, got {_shown(node)}")
            return None
        if kind == "date":
            if tag in (TIMESTAMP_TAG, STR_TAG) and re.match(DATE_RE, value.strip()):
                try:
                    return date.fromisoformat(value.strip())
                except ValueError:
                    pass
            self.error(node, f"{where}: expected {expected}, got {_shown(node)}")
            return None
        if tag != STR_TAG and not (tag == INT_TAG and kind in TEXT_KINDS):
            quote = " (quote it if it is meant as text)" if kind in TEXT_KINDS else ""
            self.error(node, f"{where}: expected {expected}, got {_shown(node)}{quote}")
            return None
        if kind == "level":
            if value not in LEVELS:
                self.error(node, f"{where}: unknown level {value!r} (expected {expected})")
                return None
        elif kind == "mode":
            if value not in MODES:
                self.error(node, f"{where}: unknown mode {value!r} (expected {expected})")
                return None
        elif kind == "name":
            if not re.match(NAME_RE, value):
                self.error(node, f"{where}: invalid name {value!r} (expected {expected[2:]})")
                return None
        elif kind == "host":
            if not re.match(HOST_RE, value) or value.startswith("-"):
                self.error(node, f"{where}: expected {expected}, got {value!r}")
                return None
        elif kind == "pattern":
            return self.pattern(node, value, where)
        elif not value.strip():
            self.error(node, f"{where}: expected {expected}, got an empty string")
            return None
        return value

    def pattern(self, node: Any, value: str, where: str) -> str | None:
        """A repository name or glob, with a trailing `.git` dropped; None if invalid."""
        import re

        pattern = value.removesuffix(".git")
        reason = ""
        if not pattern:
            reason = "it is empty"
        elif pattern.startswith("/"):
            reason = "it must not start with '/'"
        else:
            for comp in pattern.split("/"):
                if not comp:
                    reason = "it has an empty path component"
                elif comp in (".", ".."):
                    reason = f"'{comp}' is not allowed as a path component"
                elif comp.startswith("-"):
                    reason = f"component {comp!r} starts with '-'"
                elif "**" in comp and comp != "**":
                    reason = f"'**' must be a whole path component, not part of {comp!r}"
                elif not re.match(PATTERN_COMPONENT_RE, comp):
                    reason = (
                        f"component {comp!r} has characters other than letters, digits, '_.+-*'"
                    )
                if reason:
                    break
        if reason:
            self.error(
                node,
                f"{where}: invalid repository pattern {value!r}: {reason} (expected "
                "names of letters, digits and '_.+-', with '*' and '**', separated by '/')",
            )
            return None
        return pattern

    def names(self, node: Any, where: str, what: str) -> list[tuple[str, Any]]:
        """A list of valid, distinct names, each with its node (for line numbers)."""
        import yaml

        if isinstance(node, yaml.ScalarNode) and node.tag == NULL_TAG:
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{where}: expected a list of {what}, like [a, b], got {_shown(node)}")
            return []
        out: list[tuple[str, Any]] = []
        for item in node.value:
            name = self.scalar(item, "name", where)
            if name is None:
                continue
            if any(name == seen for seen, _ in out):
                self.error(item, f"{where}: '{name}' is listed twice")
                continue
            out.append((name, item))
        return out


def _tags_ok(root: Any, checker: _Checker) -> bool:
    """Refuse every non-standard tag (`!!python/object`, `!x`, `!!binary`): nothing is
    ever constructed from one. Aliases share nodes, so each node is visited once
    (an alias of its own anchor, or a "billion laughs" file, stays cheap)."""
    import yaml

    ok = True
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag not in STANDARD_TAGS:
            checker.error(node, f"tags are not allowed (found {_short_tag(node.tag)!r})")
            ok = False
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return ok


def _malformed(exc: Exception, text: str) -> Problem:
    import yaml

    if isinstance(exc, yaml.reader.ReaderError):
        where = text[: exc.position]
        line, column = where.count("\n") + 1, exc.position - (where.rfind("\n") + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return Problem(
            line, f"malformed YAML at column {column}: unacceptable character #x{char:04x}"
        )
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark is not None:
            what = f"{what} ({exc.context} from line {exc.context_mark.line + 1})"
        if mark is not None:
            return Problem(mark.line + 1, f"malformed YAML at column {mark.column + 1}: {what}")
        return Problem(None, f"malformed YAML: {what}")
    return Problem(None, f"malformed YAML: {exc}")


def check_policy_text(
    text: str, source: str, known_users: set[str] | None = None
) -> tuple[Policy | None, list[Problem]]:
    """Validate a policy and report every problem; never raises.

    Returns (policy, problems); the policy is None when there is any error. Warnings
    are given for rules that grant nothing and, when `known_users` is given, for team
    members who are not users in the store.
    """
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        return None, [_malformed(exc, text)]
    except RecursionError:
        return None, [Problem(None, "malformed YAML: nested too deeply")]
    if root is None:
        return None, [
            Problem(
                None,
                "the policy file is empty (expected a mapping with some of: "
                f"{', '.join(TOP_KEYS)}; see config/example.yaml)",
            )
        ]
    checker = _Checker()
    if not _tags_ok(root, checker):
        return None, sorted(checker.problems, key=lambda p: p.line or 0)
    policy = _check(root, text, source, known_users, checker)
    problems = sorted(checker.problems, key=lambda p: p.line or 0)
    if any(p.severity == "error" for p in problems):
        return None, problems
    return policy, problems


def _check(
    root: Any, text: str, source: str, known_users: set[str] | None, checker: _Checker
) -> Policy:
    import re
    from pathlib import Path

    import yaml

    top = checker.mapping(root, "the policy", TOP_KEYS)
    base = Path(source).absolute().parent if source else Path.cwd()

    # server
    server_kwargs: dict[str, Any] = {}
    path_nodes: dict[str, Any] = {}
    node = checker.section(top, "server")
    if node is not None:
        for key, (_, vnode) in checker.mapping(node, "server", SERVER_KEYS).items():
            value = checker.scalar(
                vnode, SERVER_KEYS[key], f"server.{key}", nullable=key == "store"
            )
            if value is not None:
                server_kwargs[key] = value
                path_nodes[key] = vnode
    for key in ("repositories", "state_dir"):
        raw = server_kwargs.get(key, getattr(ServerSettings(), f"{key}_str"))
        try:
            server_kwargs[key] = (base / Path(raw).expanduser()).resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            checker.error(path_nodes.get(key), f"server.{key}: cannot resolve {raw!r}: {exc}")
            server_kwargs[key] = Path(raw)
    if "store" in server_kwargs:
        from gatekeeper.storeurl import parse_store_url

        try:
            location = parse_store_url(
                server_kwargs["store"], str(server_kwargs["state_dir"]), str(base)
            )
        except InputError as exc:
            checker.error(path_nodes.get("store"), f"server.store: {exc.message}")
        else:
            # Resolved once here, so the hot path never parses a relative path again.
            if not location.is_postgres:
                server_kwargs["store"] = location.path
    server = ServerSettings(**server_kwargs)

    # two_factor
    tf_kwargs: dict[str, Any] = {}
    node = checker.section(top, "two_factor")
    if node is not None:
        for key, (_, vnode) in checker.mapping(node, "two_factor", TWO_FACTOR_KEYS).items():
            value = checker.scalar(vnode, TWO_FACTOR_KEYS[key], f"two_factor.{key}")
            if value is not None:
                tf_kwargs[key] = value
    two_factor = TwoFactorSettings(**tf_kwargs)

    # hooks
    allow_local_push = False
    node = checker.section(top, "hooks")
    if node is not None:
        for key, (_, vnode) in checker.mapping(node, "hooks", HOOKS_KEYS).items():
            allow_local_push = checker.scalar(vnode, "boolean", f"hooks.{key}") is True

    # teams
    teams: dict[str, Team] = {}
    invalid_teams: set[str] = set()  # named wrongly: reported once, not again where used
    node = checker.section(top, "teams")
    if node is not None:
        for name, (knode, vnode) in checker.mapping(node, "teams", None, noun="team").items():
            where = f"team {_quoted(name)}"
            if not re.match(NAME_RE, name):
                checker.error(
                    knode, f"invalid team name {name!r} (expected {EXPECTED['name'][2:]})"
                )
                invalid_teams.add(name)
            fields = checker.mapping(vnode, where, TEAM_KEYS)
            members = (
                checker.names(fields["members"][1], f"{where} members", "user names")
                if "members" in fields
                else []
            )
            kwargs: dict[str, Any] = {"name": name, "line": _line(knode)}
            kwargs["members"] = tuple(m for m, _ in members)
            for key in ("require_2fa", "grace_until", "mode"):
                if key in fields:
                    nullable = key == "grace_until"
                    value = checker.scalar(
                        fields[key][1], TEAM_KEYS[key], f"{where} {key}", nullable
                    )
                    if value is not None:
                        kwargs[key] = value
            team = Team(**kwargs)
            if name not in invalid_teams:
                teams[name] = team
            if team.require_2fa == "none":
                for key in ("grace_until", "mode"):
                    if key in fields and kwargs.get(key) is not None:
                        checker.warn(
                            fields[key][0],
                            f"{where}: {key} has no effect while require_2fa is none",
                        )
            if known_users is not None:
                for member, item in members:
                    if member not in known_users:
                        checker.warn(
                            item,
                            f"{where}: member '{member}' is not a user in the store "
                            "(add it with `gatekeeper user add`)",
                        )

    # repositories
    rules: list[RepoRule] = []
    node = checker.section(top, "repositories")
    if node is not None and not isinstance(node, yaml.SequenceNode):
        checker.error(
            node, f"repositories must be a list of rules (- match: NAME ...), got {_shown(node)}"
        )
    elif node is not None:
        for index, item in enumerate(node.value, 1):
            where = f"repository rule #{index}"
            fields = checker.mapping(item, where, RULE_KEYS)
            if not isinstance(item, yaml.MappingNode):
                continue
            match = None
            if "match" not in fields:
                checker.error(item, f"{where}: 'match' is required (a repository name or glob)")
            else:
                match = checker.scalar(fields["match"][1], "pattern", f"{where} match")
                if match is not None:
                    where = f"repository rule '{match}'"
            kwargs = {"match": match or "", "line": _line(item)}
            for key in ("read", "write"):
                if key in fields:
                    listed = checker.names(fields[key][1], f"{where} {key}", "team names")
                    for team_name, name_node in listed:
                        if team_name not in teams and team_name not in invalid_teams:
                            checker.error(
                                name_node,
                                f"{where} {key}: unknown team '{team_name}'"
                                f" (teams: {', '.join(teams) or 'none defined'})",
                            )
                    kwargs[key] = tuple(t for t, _ in listed)
            for key in ("public", "require_2fa", "grace_until", "mode"):
                if key in fields:
                    nullable = key != "public"
                    value = checker.scalar(
                        fields[key][1], RULE_KEYS[key], f"{where} {key}", nullable
                    )
                    if value is not None:
                        kwargs[key] = value
            rule = RepoRule(**kwargs)
            requires = rule.require_2fa not in (None, "none")
            if match is not None and not (rule.read or rule.write or rule.public or requires):
                checker.warn(item, f"{where} grants nothing and requires nothing")
            for key in ("grace_until", "mode"):
                if getattr(rule, key) is not None and not requires:
                    checker.warn(
                        fields[key][0],
                        f"{where}: {key} applies only to this rule's own require_2fa, "
                        "which it does not set",
                    )
            if match is not None:
                rules.append(rule)

    digest = _file_digest(text.encode("utf-8"))
    return Policy(server, two_factor, teams, tuple(rules), allow_local_push, source, digest)


def compile_policy_text(text: str, source: str) -> Policy:
    """The policy in `text`; raises PolicyError listing every error otherwise."""
    policy, problems = check_policy_text(text, source)
    if policy is None:
        errors = [p.format(source) for p in problems if p.severity == "error"]
        raise PolicyError(
            f"invalid policy file {source}: {len(errors)} problem(s)",
            hint="fix the lines listed; `gatekeeper policy check` shows every problem.",
            problems=errors,
        )
    return policy


# -- loading, with a compiled cache -----------------------------------------------


def load_policy(
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> Policy:
    """The policy at `path` (default: `default_config_path()`).

    This runs on every connection: it hashes the file and, when a compiled copy for
    that hash exists in the cache directory, returns it without importing yaml.
    Otherwise it compiles the file and caches the result (best effort). Paths are
    strings here, spelled as pathlib spells them (`pathstr`): no pathlib import.
    `use_cache=False`: neither read nor write the cache (root, before it becomes the
    state's owner, leaves no file of its own behind)."""
    if path is None:
        path = os.environ.get("GATEKEEPER_CONFIG") or DEFAULT_CONFIG
    path = pathstr.norm(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise PolicyError(
            f"policy file not found: {path}",
            hint="set --config or GATEKEEPER_CONFIG, or create it from config/example.yaml",
        ) from None
    except PermissionError:
        raise PolicyError(
            f"cannot read policy file {path}: permission denied",
            hint="the policy must be readable by the account gatekeeper runs as "
            "(the git user): check its owner, group and mode, and its directories'.",
        ) from None
    except OSError as exc:
        raise PolicyError(
            f"cannot read policy file {path}: {exc.strerror or exc}",
            hint="--config or GATEKEEPER_CONFIG must name a readable YAML file.",
        ) from None
    digest = _file_digest(data)
    source = pathstr.absolute(path)
    cache = _cache_file(cache_dir, digest) if use_cache else None
    if cache is not None:
        cached = _read_cache(cache, source, digest)
        if cached is not None:
            return cached
        # A policy edited in place (`policy install` compiles ahead): of the connections
        # that find no compiled copy, one compiles and the others wait for its result
        # instead of compiling it again each (a 10,000-rule policy is seconds of CPU and
        # tens of MB per compile).
        with _CompileLock(cache):
            cached = _read_cache(cache, source, digest)
            if cached is not None:
                return cached
            policy = _compile(data, path, source)
            _write_cache(cache, dump_compiled(policy))
            return policy
    return _compile(data, path, source)


def _compile(data: bytes, path: str, source: str) -> Policy:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"policy file {path} is not UTF-8 text (byte {exc.start})",
            hint="save it as UTF-8.",
        ) from None
    return compile_policy_text(text, source)


COMPILE_WAIT_SECONDS = 60
"""How long a connection waits for another one's compile before compiling itself."""


class _CompileLock:
    """An exclusive flock on the cache directory itself (no lock file to leave behind),
    best effort: without a cache directory (or a file system without locks) every caller
    just compiles."""

    def __init__(self, cache: str) -> None:
        self.path = os.path.dirname(cache)
        self.fd: int | None = None

    def __enter__(self) -> None:
        import fcntl
        import time

        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        deadline = time.monotonic() + COMPILE_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if time.monotonic() >= deadline:
                    return  # compile without the lock rather than refuse
                time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock


# Small files are hashed quicker with the interpreter's own SHA-256 than by importing
# OpenSSL's hashlib, which pays for its import only on large files.
_SMALL_FILE = 256 * 1024


def _file_digest(data: bytes) -> str:
    if len(data) <= _SMALL_FILE and "hashlib" not in sys.modules:
        return sha256(data).hexdigest()
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _cache_file(cache_dir: str | os.PathLike[str] | None, digest: str) -> str | None:
    if cache_dir is None:
        env = os.environ.get("GATEKEEPER_CACHE_DIR")
        home = os.environ.get("HOME")
        if env:
            cache_dir = env
        elif home:
            cache_dir = pathstr.join(pathstr.join(pathstr.norm(home), ".cache"), "gatekeeper")
        else:
            return None
    return pathstr.join(pathstr.norm(cache_dir), f"policy-{digest}.v{COMPILED_FORMAT}")


def _read_cache(cache: str, source: str, digest: str) -> Policy | None:
    """The cached policy, or None when it is missing, corrupt, compiled from this
    content at another path, or not a file this account wrote and alone can write."""
    try:
        with open(cache, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
            policy = load_compiled(fh.read())
    except (OSError, ValueError):
        return None
    if policy.sha256 != digest or policy.source != source:
        return None
    return policy


def _write_cache(path: str, data: bytes) -> None:
    """Write atomically (a temporary file in the same directory, then rename), mode
    0600. Any failure only means no cache: slower, still correct."""
    import tempfile
    from pathlib import Path

    cache = Path(path)

    tmp = None
    try:
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".policy-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, cache)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# -- the compiled cache's format -----------------------------------------------------
#
# MAGIC, the CRC-32 of the rest, then one marshal'd tuple of plain values: the header
# fields, the index and two tables (rules and teams), each table one bytes blob of
# marshal'd records plus a bytes string of 4-byte offsets, so a record is decoded only
# when it is needed. The index maps keys to tuples of record numbers (file order):
#   "=NAME"  the rules whose match is exactly NAME (no glob),
#   "/FIRST" the glob rules whose first path component is FIRST (no '*' in it),
#   "@USER"  the teams that list USER;
# glob rules whose first component has a '*' are listed in the header ("wild"), and
# every lookup checks them. The index is a hash table on disk: keys are spread over
# buckets by CRC-32, each bucket a marshal'd dict, so a lookup decodes one small bucket
# whatever the policy's size. Only rules that can match are built, and only their
# globs compiled (`re` keeps 512; a policy can have thousands).

COMPILED_MAGIC = b"GKpolicy"
_KEYS_PER_BUCKET = 4
_RULE_FIELDS_N = 8
_TEAM_FIELDS_N = 6


def _rule_key(match: str) -> str | None:
    if "*" not in match:
        return "=" + match
    first = match.split("/", 1)[0]
    if "*" in first or "/" not in match:
        return None
    return "/" + first


def _table(records: list[bytes]) -> tuple[bytes, bytes]:
    offsets = [0]
    for rec in records:
        offsets.append(offsets[-1] + len(rec))
    return b"".join(records), b"".join(o.to_bytes(4, "little") for o in offsets)


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def dump_compiled(policy: Policy) -> bytes:
    """The compiled cache's bytes for `policy` (see above); `load_compiled` reads them."""
    import marshal
    from binascii import crc32

    teams = list(policy.teams.values())
    index: dict[str, list[int]] = {}
    wild: list[int] = []
    for i, rule in enumerate(policy.rules):
        key = _rule_key(rule.match)
        if key is None:
            wild.append(i)
        else:
            index.setdefault(key, []).append(i)
    for i, team in enumerate(teams):
        for member in dict.fromkeys(team.members):
            index.setdefault("@" + member, []).append(i)
    nbuckets = max(1, len(index) // _KEYS_PER_BUCKET)
    buckets: list[dict[str, tuple[int, ...]]] = [{} for _ in range(nbuckets)]
    for key, numbers in index.items():
        buckets[crc32(_key_bytes(key)) % nbuckets][key] = tuple(numbers)
    rule_blob, rule_offsets = _table(
        [
            marshal.dumps(
                (
                    r.match,
                    tuple(r.read),
                    tuple(r.write),
                    r.public,
                    r.require_2fa,
                    _iso(r.grace_until),
                    r.mode,
                    r.line,
                )
            )
            for r in policy.rules
        ]
    )
    team_blob, team_offsets = _table(
        [
            marshal.dumps(
                (t.name, tuple(t.members), t.require_2fa, _iso(t.grace_until), t.mode, t.line)
            )
            for t in teams
        ]
    )
    bucket_blob, bucket_offsets = _table([marshal.dumps(b) for b in buckets])
    s, tf = policy.server, policy.two_factor
    body = marshal.dumps(
        (
            COMPILED_FORMAT,
            policy.source,
            policy.sha256,
            (
                s.host,
                s.port,
                s.user,
                str(s.repositories),
                str(s.state_dir),
                s.listen_host,
                s.listen_port,
                s.store,
            ),
            (
                tf.issuer,
                tf.session_hours,
                tf.max_failures,
                tf.failure_window_minutes,
                tf.lockout_minutes,
                tf.self_enroll,
                tf.keyboard_interactive,
            ),
            policy.allow_local_push,
            tuple(wild),
            nbuckets,
            bucket_offsets,
            bucket_blob,
            rule_offsets,
            rule_blob,
            team_offsets,
            team_blob,
        )
    )
    return COMPILED_MAGIC + crc32(body).to_bytes(4, "little") + body


def compiled_source(data: bytes) -> str | None:
    """The policy file a cache file was compiled from: `load_policy`'s marshal'd cache
    (any COMPILED_FORMAT: the source follows the format number) or the JSON cache of
    earlier releases. None for anything else. For tidying a cache directory, never
    for loading a policy."""
    import marshal
    from binascii import crc32

    start = len(COMPILED_MAGIC) + 4
    if data[: len(COMPILED_MAGIC)] == COMPILED_MAGIC:
        body = memoryview(data)[start:]
        if crc32(body) != int.from_bytes(data[len(COMPILED_MAGIC) : start], "little"):
            return None
        try:
            top = marshal.loads(body)  # noqa: S302 - CRC-checked, only a string is taken
        except (EOFError, TypeError, ValueError):
            return None
        if type(top) is tuple and len(top) > 1 and type(top[1]) is str:
            return top[1]
        return None
    import json

    try:
        value = json.loads(data)
    except ValueError:
        return None
    source = value.get("source") if type(value) is dict else None
    return source if type(source) is str else None


def load_compiled(data: bytes) -> Policy:
    """The policy `dump_compiled` wrote. Raises ValueError for anything else: the
    CRC-32 catches a damaged or truncated file, and every value is type-checked as it
    is used, so a corrupt cache can never become a different policy."""
    import marshal
    from binascii import crc32

    start = len(COMPILED_MAGIC) + 4
    if data[: len(COMPILED_MAGIC)] != COMPILED_MAGIC:
        raise ValueError("not a compiled policy")
    body = memoryview(data)[start:]
    if crc32(body) != int.from_bytes(data[len(COMPILED_MAGIC) : start], "little"):
        raise ValueError("the compiled policy is damaged (CRC mismatch)")
    try:
        # Only a file this account wrote and alone can write (`_read_cache`), CRC-checked;
        # nothing loaded is ever run, every value is type-checked.
        top = marshal.loads(body)  # noqa: S302
    except (EOFError, TypeError, ValueError) as exc:
        raise ValueError(f"not a compiled policy: {exc}") from None
    if type(top) is not tuple or len(top) != 14 or top[0] != COMPILED_FORMAT:
        raise ValueError("unknown compiled policy format")
    (_, source, digest, s, tf, local_push, wild, nbuckets) = top[:8]
    _tuple(s, 8)
    _tuple(tf, 7)
    server = ServerSettings(
        host=_typed(s[0], str),
        port=_typed(s[1], int),
        user=_typed(s[2], str),
        repositories=_typed(s[3], str),
        state_dir=_typed(s[4], str),
        listen_host=_typed(s[5], str),
        listen_port=_typed(s[6], int),
        store=_typed(s[7], str),
    )
    two_factor = TwoFactorSettings(
        issuer=_typed(tf[0], str),
        session_hours=_typed(tf[1], (int, float)),
        max_failures=_typed(tf[2], int),
        failure_window_minutes=_typed(tf[3], int),
        lockout_minutes=_typed(tf[4], int),
        self_enroll=_typed(tf[5], bool),
        keyboard_interactive=_typed(tf[6], bool),
    )
    tables = _Compiled(
        _numbers(wild, None),
        _typed(nbuckets, int),
        *(_typed(part, bytes) for part in top[8:]),
    )
    policy: Policy = object.__new__(Policy)
    for name, value in (
        ("server", server),
        ("two_factor", two_factor),
        ("allow_local_push", _typed(local_push, bool)),
        ("source", _typed(source, str)),
        ("sha256", _typed(digest, str)),
        ("_compiled", tables),
    ):
        object.__setattr__(policy, name, value)
    return policy


def _tuple(value: Any, length: int) -> None:
    if type(value) is not tuple or len(value) != length:
        raise ValueError("unexpected value in the compiled policy")


def _numbers(value: Any, limit: int | None) -> tuple[int, ...]:
    if type(value) is not tuple or not all(
        type(n) is int and 0 <= n and (limit is None or n < limit) for n in value
    ):
        raise ValueError("unexpected record numbers in the compiled policy")
    numbers: tuple[int, ...] = value
    return numbers


class _Compiled:
    """The tables of a compiled policy: records decoded (and checked) on demand."""

    def __init__(
        self,
        wild: tuple[int, ...],
        nbuckets: int,
        bucket_offsets: bytes,
        bucket_blob: bytes,
        rule_offsets: bytes,
        rule_blob: bytes,
        team_offsets: bytes,
        team_blob: bytes,
    ) -> None:
        self.nbuckets = nbuckets
        self.buckets = (bucket_offsets, bucket_blob)
        self.rules = (rule_offsets, rule_blob)
        self.teams = (team_offsets, team_blob)
        self.nrules = self._count(rule_offsets, rule_blob)
        self.nteams = self._count(team_offsets, team_blob)
        if nbuckets < 1 or self._count(bucket_offsets, bucket_blob) != nbuckets:
            raise ValueError("the compiled policy's index is damaged")
        self.wild = _numbers(wild, self.nrules)

    @staticmethod
    def _count(offsets: bytes, blob: bytes) -> int:
        if not offsets or len(offsets) % 4 or int.from_bytes(offsets[-4:], "little") != len(blob):
            raise ValueError("the compiled policy's tables are damaged")
        return len(offsets) // 4 - 1

    @staticmethod
    def _record(table: tuple[bytes, bytes], i: int) -> Any:
        import marshal

        offsets, blob = table
        start = int.from_bytes(offsets[4 * i : 4 * i + 4], "little")
        end = int.from_bytes(offsets[4 * i + 4 : 4 * i + 8], "little")
        try:
            return marshal.loads(blob[start:end])  # noqa: S302 - see load_compiled
        except (EOFError, TypeError, ValueError) as exc:
            raise ValueError(f"a damaged record in the compiled policy: {exc}") from None

    def lookup(self, key: str) -> tuple[int, ...]:
        from binascii import crc32

        bucket = self._record(self.buckets, crc32(_key_bytes(key)) % self.nbuckets)
        if type(bucket) is not dict:
            raise ValueError("the compiled policy's index is damaged")
        return _numbers(bucket.get(key, ()), None)

    def rule(self, i: int) -> RepoRule:
        r = self._record(self.rules, i)
        _tuple(r, _RULE_FIELDS_N)
        return RepoRule(
            match=_typed(r[0], str),
            read=_names_tuple(r[1]),
            write=_names_tuple(r[2]),
            public=_typed(r[3], bool),
            require_2fa=None if r[4] is None else _choice(r[4], LEVELS),
            grace_until=_date(r[5]),
            mode=None if r[6] is None else _choice(r[6], MODES),
            line=_typed(r[7], int),
        )

    def team(self, i: int) -> Team:
        t = self._record(self.teams, i)
        _tuple(t, _TEAM_FIELDS_N)
        return Team(
            name=_typed(t[0], str),
            members=_names_tuple(t[1]),
            require_2fa=_choice(t[2], LEVELS),
            grace_until=_date(t[3]),
            mode=_choice(t[4], MODES),
            line=_typed(t[5], int),
        )

    def matching_rules(self, repo: str) -> tuple[RepoRule, ...]:
        numbers = {*self.lookup("=" + repo), *self.wild}
        if "/" in repo:
            numbers.update(self.lookup("/" + repo.split("/", 1)[0]))
        rules = (self.rule(i) for i in sorted(_numbers(tuple(numbers), self.nrules)))
        return tuple(rule for rule in rules if rule.matches(repo))

    def teams_of(self, user: str) -> tuple[Team, ...]:
        numbers = _numbers(self.lookup("@" + user), self.nteams)
        return tuple(t for t in (self.team(i) for i in numbers) if user in t.members)

    def all_rules(self) -> tuple[RepoRule, ...]:
        return tuple(self.rule(i) for i in range(self.nrules))

    def all_teams(self) -> dict[str, Team]:
        teams = (self.team(i) for i in range(self.nteams))
        return {team.name: team for team in teams}


def _names_tuple(value: Any) -> tuple[str, ...]:
    if type(value) is not tuple or not all(type(v) is str for v in value):
        raise ValueError("unexpected names in the compiled policy")
    return value
