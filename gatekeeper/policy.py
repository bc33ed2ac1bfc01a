"""The YAML policy: loading, validation with line numbers, and a compiled cache.

Validation walks the YAML node tree (not the constructed objects) so every problem
carries its line, and reports all problems at once. Only plain YAML is accepted:
any tag (`!!python/object`, `!custom`) is an error, and nothing is constructed from
one. On the per-connection path `load_policy` hashes the file and reads a compiled
JSON copy keyed by that hash, so yaml is imported only when the file changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import date
from pathlib import Path

from gatekeeper.errors import PolicyError
from gatekeeper.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LEVELS = ("none", "enrolled", "verified")
MODES = ("enforce", "report")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
PATTERN_COMPONENT = re.compile(r"(\*\*|[A-Za-z0-9_.+*-]+)\Z")
CACHE_FORMAT = 1


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
        if "*" not in self.match:
            return repo == self.match
        regex = _GLOBS.get(self.match)
        if regex is None:
            regex = _GLOBS[self.match] = glob_regex(self.match)
        return regex.match(repo) is not None


_GLOBS: dict[str, re.Pattern[str]] = {}


def glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` stays within one path component; `**` crosses `/` (and matches zero components
    when it stands alone between slashes)."""
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


@record
class ServerSettings:
    host: str = "localhost"
    port: int = 22
    user: str = "git"
    repositories: Path = Path("repositories")
    state_dir: Path = Path("state")
    listen_host: str = "127.0.0.1"
    listen_port: int = 2222


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
    severity: str = "error"

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
    sha256: str = ""

    def teams_of(self, user: str) -> tuple[Team, ...]:
        return tuple(t for t in self.teams.values() if user in t.members)

    def to_json(self) -> str:
        def team(t: Team) -> dict[str, Any]:
            return {
                "name": t.name,
                "members": list(t.members),
                "require_2fa": t.require_2fa,
                "grace_until": _iso(t.grace_until),
                "mode": t.mode,
                "line": t.line,
            }

        def rule(r: RepoRule) -> dict[str, Any]:
            return {
                "match": r.match,
                "read": list(r.read),
                "write": list(r.write),
                "public": r.public,
                "require_2fa": r.require_2fa,
                "grace_until": _iso(r.grace_until),
                "mode": r.mode,
                "line": r.line,
            }

        server = {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.server).items()}
        return json.dumps(
            {
                "format": CACHE_FORMAT,
                "server": server,
                "two_factor": dict(vars(self.two_factor)),
                "teams": [team(t) for t in self.teams.values()],
                "rules": [rule(r) for r in self.rules],
                "allow_local_push": self.allow_local_push,
                "source": self.source,
                "sha256": self.sha256,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        if data.get("format") != CACHE_FORMAT:
            raise ValueError("unknown compiled policy format")
        server = data["server"]
        server["repositories"] = Path(server["repositories"])
        server["state_dir"] = Path(server["state_dir"])
        teams = {}
        for t in data["teams"]:
            t["members"] = tuple(t["members"])
            t["grace_until"] = _date(t["grace_until"])
            teams[t["name"]] = Team(**t)
        rules = []
        for r in data["rules"]:
            r["read"], r["write"] = tuple(r["read"]), tuple(r["write"])
            r["grace_until"] = _date(r["grace_until"])
            rules.append(RepoRule(**r))
        return cls(
            ServerSettings(**server),
            TwoFactorSettings(**data["two_factor"]),
            teams,
            tuple(rules),
            data["allow_local_push"],
            data["source"],
            data["sha256"],
        )


def _iso(d: date | None) -> str | None:
    return d.isoformat() if d else None


def _date(s: str | None) -> date | None:
    return date.fromisoformat(s) if s else None


def default_config_path() -> Path:
    return Path(os.environ.get("GATEKEEPER_CONFIG") or "/etc/gatekeeper/config.yaml")


# -- validation ----------------------------------------------------------------------

SERVER_KEYS = {
    "host": "string",
    "port": "port",
    "user": "name",
    "repositories": "path",
    "state_dir": "path",
    "listen_host": "string",
    "listen_port": "port",
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
    "members": "list of names",
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


class _Checker:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, node: Any, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(Problem(line, message))

    def warn(self, node: Any, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(Problem(line, message, "warning"))

    def mapping(self, node: Any, where: str, allowed: Any) -> dict[str, tuple[Any, Any]]:
        """The keys of a mapping node: {key: (key node, value node)}; flags duplicates
        and unknown keys."""
        import yaml

        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{where} must be a mapping of keys to values")
            return {}
        out: dict[str, tuple[Any, Any]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != STR_TAG:
                self.error(key_node, f"{where}: keys must be plain names")
                continue
            key = key_node.value
            if key in out:
                self.error(
                    key_node,
                    f"duplicate key '{key}' in {where} (first on line "
                    f"{out[key][0].start_mark.line + 1})",
                )
                continue
            if allowed is not None and key not in allowed:
                self.error(
                    key_node,
                    f"unknown key '{key}' in {where} (expected one of: {', '.join(allowed)})",
                )
                continue
            out[key] = (key_node, value_node)
        return out

    def scalar(self, node: Any, kind: str, where: str) -> Any:
        """Construct and check one scalar of the given kind; None (and a problem) if wrong."""
        import yaml

        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{where}: expected {_article(kind)}")
            return None
        tag, value = node.tag, node.value
        if kind == "boolean":
            if tag == BOOL_TAG:
                return value.lower() in ("true", "yes", "on", "y")
            self.error(node, f"{where}: expected true or false, got {value!r}")
            return None
        if kind in ("port", "positive integer"):
            if tag == INT_TAG:
                try:
                    number = int(value.replace("_", ""), 0)
                except ValueError:
                    number = -1
                if kind == "port" and 1 <= number <= 65535:
                    return number
                if kind == "positive integer" and number > 0:
                    return number
            self.error(
                node,
                f"{where}: expected {_article(kind)}"
                f"{' (1-65535)' if kind == 'port' else ''}, got {value!r}",
            )
            return None
        if kind == "positive number":
            if tag in (INT_TAG, FLOAT_TAG):
                try:
                    real = float(value.replace("_", ""))
                except ValueError:
                    real = -1.0
                if real > 0 and real != float("inf"):
                    return real
            self.error(node, f"{where}: expected a positive number, got {value!r}")
            return None
        if kind == "date":
            if tag in (TIMESTAMP_TAG, STR_TAG):
                try:
                    return date.fromisoformat(value.strip())
                except ValueError:
                    pass
            self.error(node, f"{where}: expected a date like 2027-01-31, got {value!r}")
            return None
        if tag != STR_TAG and not (tag == INT_TAG and kind in ("name", "string")):
            self.error(node, f"{where}: expected {_article(kind)}, got {value!r}")
            return None
        if kind == "level":
            if value not in LEVELS:
                self.error(
                    node, f"{where}: unknown level {value!r} (expected one of: {', '.join(LEVELS)})"
                )
                return None
        elif kind == "mode":
            if value not in MODES:
                self.error(
                    node, f"{where}: unknown mode {value!r} (expected one of: {', '.join(MODES)})"
                )
                return None
        elif kind == "name":
            if not NAME.match(value):
                self.error(
                    node,
                    f"{where}: invalid name {value!r} (letters, digits, '_', '.', '-'; at most 64)",
                )
                return None
        elif kind == "pattern":
            pattern = value.strip("/").removesuffix(".git")
            comps = pattern.split("/")
            if (
                not pattern
                or value.startswith("/")
                or any(
                    c in ("", ".", "..") or not PATTERN_COMPONENT.match(c) or c.startswith("-")
                    for c in comps
                )
            ):
                self.error(
                    node,
                    f"{where}: invalid repository pattern {value!r} (names of "
                    "letters, digits, '_.+-', '*' and '**', separated by '/')",
                )
                return None
            return pattern
        elif kind in ("string", "path") and not value.strip():
            self.error(node, f"{where}: must not be empty")
            return None
        return value

    def names(self, node: Any, where: str, kind: str) -> list[tuple[str, Any]]:
        """A list of valid, distinct names, each with its node (for line numbers)."""
        import yaml

        if isinstance(node, yaml.ScalarNode) and node.tag == NULL_TAG:
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{where}: expected a list of {kind}, like [a, b]")
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


STR_TAG = "tag:yaml.org,2002:str"
INT_TAG = "tag:yaml.org,2002:int"
FLOAT_TAG = "tag:yaml.org,2002:float"
BOOL_TAG = "tag:yaml.org,2002:bool"
NULL_TAG = "tag:yaml.org,2002:null"
TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
STANDARD_TAGS = {
    STR_TAG,
    INT_TAG,
    FLOAT_TAG,
    BOOL_TAG,
    NULL_TAG,
    TIMESTAMP_TAG,
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _tags_ok(node: Any, checker: _Checker) -> bool:
    """Refuse any explicit tag (`!!python/object`, `!x`): never construct from one."""
    import yaml

    ok = True
    stack = [node]
    while stack:
        n = stack.pop()
        if n.tag not in STANDARD_TAGS:
            checker.error(n, f"tags are not allowed (found {n.tag!r})")
            ok = False
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return ok


def check_policy_text(
    text: str, source: str, known_users: set[str] | None = None
) -> tuple[Policy | None, list[Problem]]:
    """Validate a policy; never raises. Returns (policy or None if any error, problems)."""
    import yaml

    checker = _Checker()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = f", column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        return None, [Problem(line, f"malformed YAML{column}: {what}")]
    except yaml.YAMLError as exc:
        return None, [Problem(None, f"malformed YAML: {exc}")]
    if root is None:
        return None, [Problem(None, "the policy file is empty (see config/example.yaml)")]
    if not _tags_ok(root, checker):
        return None, sorted(checker.problems, key=lambda p: p.line or 0)
    top = checker.mapping(root, "the policy", TOP_KEYS)
    base = Path(source).resolve().parent if source else Path.cwd()

    server_kwargs: dict[str, Any] = {}
    if "server" in top:
        for key, (_, vnode) in checker.mapping(top["server"][1], "server", SERVER_KEYS).items():
            value = checker.scalar(vnode, SERVER_KEYS[key], f"server.{key}")
            if value is not None:
                server_kwargs[key] = value
    for key in ("repositories", "state_dir"):
        raw = server_kwargs.get(key, str(getattr(ServerSettings, key)))
        server_kwargs[key] = (base / Path(raw).expanduser()).resolve()
    server = ServerSettings(**server_kwargs)

    tf_kwargs: dict[str, Any] = {}
    if "two_factor" in top:
        section = checker.mapping(top["two_factor"][1], "two_factor", TWO_FACTOR_KEYS)
        for key, (_, vnode) in section.items():
            value = checker.scalar(vnode, TWO_FACTOR_KEYS[key], f"two_factor.{key}")
            if value is not None:
                tf_kwargs[key] = value
    two_factor = TwoFactorSettings(**tf_kwargs)

    allow_local_push = False
    if "hooks" in top:
        for key, (_, vnode) in checker.mapping(top["hooks"][1], "hooks", HOOKS_KEYS).items():
            allow_local_push = bool(checker.scalar(vnode, "boolean", f"hooks.{key}"))

    teams: dict[str, Team] = {}
    if "teams" in top:
        for name, (knode, vnode) in checker.mapping(top["teams"][1], "teams", None).items():
            if not NAME.match(name):
                checker.error(knode, f"invalid team name {name!r}")
                continue
            where = f"team '{name}'"
            fields = checker.mapping(vnode, where, TEAM_KEYS)
            kwargs: dict[str, Any] = {"name": name, "line": knode.start_mark.line + 1}
            members = (
                checker.names(fields["members"][1], f"{where} members", "user names")
                if "members" in fields
                else []
            )
            kwargs["members"] = tuple(m for m, _ in members)
            for key in ("require_2fa", "grace_until", "mode"):
                if key in fields:
                    value = checker.scalar(fields[key][1], TEAM_KEYS[key], f"{where} {key}")
                    if value is not None:
                        kwargs[key] = value
            teams[name] = Team(**kwargs)
            if known_users is not None:
                for member, item in members:
                    if member not in known_users:
                        checker.warn(
                            item,
                            f"{where}: member '{member}' is not a user in the "
                            "store (gatekeeper user add)",
                        )

    rules: list[RepoRule] = []
    if "repositories" in top:
        import yaml

        seq = top["repositories"][1]
        if not isinstance(seq, yaml.SequenceNode):
            checker.error(seq, "repositories must be a list of rules (- match: NAME ...)")
        else:
            for item in seq.value:
                fields = checker.mapping(item, "repository rule", RULE_KEYS)
                if not fields and isinstance(item, yaml.MappingNode):
                    continue
                where = "repository rule"
                if "match" not in fields:
                    if isinstance(item, yaml.MappingNode):
                        checker.error(item, "repository rule: 'match' is required")
                    continue
                match = checker.scalar(fields["match"][1], "pattern", "repository rule match")
                if match is None:
                    continue
                where = f"repository rule '{match}'"
                kwargs = {"match": match, "line": item.start_mark.line + 1}
                for key in ("read", "write"):
                    if key in fields:
                        listed = checker.names(fields[key][1], f"{where} {key}", "team names")
                        for team_name, node in listed:
                            if team_name not in teams:
                                checker.error(
                                    node,
                                    f"{where} {key}: unknown team '{team_name}'"
                                    f" (teams: {', '.join(teams) or 'none'})",
                                )
                        kwargs[key] = tuple(t for t, _ in listed)
                for key in ("public", "require_2fa", "grace_until", "mode"):
                    if key in fields:
                        value = checker.scalar(fields[key][1], RULE_KEYS[key], f"{where} {key}")
                        if value is not None:
                            kwargs[key] = value
                rule = RepoRule(**kwargs)
                if not (rule.read or rule.write or rule.public or rule.require_2fa):
                    checker.warn(item, f"{where} grants nothing and requires nothing")
                if rule.mode and not rule.require_2fa:
                    checker.warn(
                        item,
                        f"{where}: mode applies to this rule's require_2fa, which it does not set",
                    )
                rules.append(rule)

    problems = sorted(checker.problems, key=lambda p: p.line or 0)
    if any(p.severity == "error" for p in problems):
        return None, problems
    digest = hashlib.sha256(text.encode()).hexdigest()
    policy = Policy(server, two_factor, teams, tuple(rules), allow_local_push, source, digest)
    return policy, problems


def compile_policy_text(text: str, source: str) -> Policy:
    policy, problems = check_policy_text(text, source)
    if policy is None:
        errors = [p.format(source) for p in problems if p.severity == "error"]
        raise PolicyError(
            f"invalid policy file {source}: {len(errors)} problem(s)",
            hint="run `gatekeeper policy check` for the details.",
            problems=errors,
        )
    return policy


def load_policy(path: Path | str | None = None, *, cache_dir: Path | None = None) -> Policy:
    """The policy at `path`, from the compiled cache when the file has not changed."""
    path = Path(path) if path is not None else default_config_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(
            f"policy file not found: {path}",
            hint="set --config or GATEKEEPER_CONFIG, or create it from config/example.yaml.",
        ) from None
    except OSError as exc:
        raise PolicyError(
            f"cannot read policy file {path}: {exc.strerror}",
            hint="it must be readable by the git user.",
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    source = str(path.absolute())
    cache = _cache_file(cache_dir, hashlib.sha256(f"{source}\0{digest}".encode()).hexdigest())
    if cache is not None:
        try:
            return Policy.from_json(cache.read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a corrupt cache is ignored and rewritten
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {path} is not UTF-8 text.") from None
    policy = compile_policy_text(text, source)
    if cache is not None:
        _write_cache(cache, policy.to_json())
    return policy


def _cache_file(cache_dir: Path | None, key: str) -> Path | None:
    if cache_dir is None:
        env = os.environ.get("GATEKEEPER_CACHE_DIR")
        home = os.environ.get("HOME")
        if env:
            cache_dir = Path(env)
        elif home:
            cache_dir = Path(home) / ".cache" / "gatekeeper"
        else:
            return None
    return cache_dir / f"policy-{key}.json"


def _write_cache(cache: Path, text: str) -> None:
    try:
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, cache)
    except OSError:
        pass  # no cache: slower, still correct
