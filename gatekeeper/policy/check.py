"""Checking a policy file: the YAML node tree walked (not constructed objects), so
every problem carries its line and all are reported at once; only plain YAML is
accepted (any tag outside the standard scalar/list/mapping set is an error and
nothing is ever constructed from one). `compile_policy_text` turns a valid file into
a `Policy`. yaml and re are imported only here, and only when a file is checked.
"""

from __future__ import annotations

from gatekeeper.errors import InputError, PolicyError
from gatekeeper.lightstd import date
from gatekeeper.policy.model import (
    LEVELS,
    MODES,
    Policy,
    Problem,
    RepoRule,
    ServerSettings,
    Team,
    TwoFactorSettings,
    file_digest,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Plain strings: `re` caches what it compiles, and only validation ever needs them.
NAME_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z"
PATTERN_COMPONENT_RE = r"[A-Za-z0-9_.+*-]+\Z"
HOST_RE = r"[A-Za-z0-9_.:\[\]%-]{1,253}\Z"
DATE_RE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z"
DECIMAL_RE = r"[-+]?(?:0|[1-9][0-9_]*)\Z"
CONTROL_RE = r"[\x00-\x1f\x7f]"
MAX_NUMBER = 1_000_000  # minutes, hours and counts beyond this are mistakes (and overflow)


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
        from gatekeeper.store.url import parse_store_url

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

    digest = file_digest(text.encode("utf-8"))
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
