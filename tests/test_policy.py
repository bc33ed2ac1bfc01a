"""The policy: validation with file:line for every problem, globs, and the compiled cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import pytest

from gatekeeper.errors import PolicyError
from gatekeeper.policy import (
    LEVELS,
    MODES,
    Problem,
    RepoRule,
    ServerSettings,
    Team,
    TwoFactorSettings,
    default_config_path,
    load_policy,
)
from gatekeeper.policy import check as check_module
from gatekeeper.policy import model as model_module
from gatekeeper.policy.check import check_policy_text, compile_policy_text
from gatekeeper.policy.compiled import COMPILED_FORMAT, dump_compiled, load_compiled
from gatekeeper.record import evolve

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"


def formatted(text: str, source: str = "p.yaml", **kwargs: object) -> list[str]:
    _, problems = check_policy_text(text, source, **kwargs)  # type: ignore[arg-type]
    return [p.format(source) for p in problems]


def errors_of(text: str) -> list[str]:
    return [line for line in formatted(text) if ": error: " in line]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# -- the example and the defaults ------------------------------------------------------


def test_the_example_compiles_with_no_problem_at_all() -> None:
    policy, problems = check_policy_text(EXAMPLE.read_text(), str(EXAMPLE))
    assert problems == []
    assert policy is not None
    assert policy.server.host == "git.example.com"
    assert policy.server.repositories == Path("/srv/git")
    assert list(policy.teams) == ["platform", "web", "contractors", "everyone"]
    assert policy.teams["web"].grace_until == date(2027, 1, 31)
    assert policy.teams["contractors"].mode == "report"
    assert policy.rules[0].match == "platform/*"
    assert policy.rules[0].read == ("web", "contractors")
    assert any(r.public for r in policy.rules)
    assert any(r.grace_until for r in policy.rules)
    assert any(r.mode == "report" for r in policy.rules)


def test_the_example_uses_every_key_of_the_format() -> None:
    text = EXAMPLE.read_text()
    keys = [
        *check_module.TOP_KEYS,
        *check_module.SERVER_KEYS,
        *check_module.TWO_FACTOR_KEYS,
        *check_module.HOOKS_KEYS,
        *check_module.TEAM_KEYS,
        *check_module.RULE_KEYS,
    ]
    missing = [k for k in keys if f"{k}:" not in text]
    assert missing == []


def test_defaults(tmp_path: Path) -> None:
    source = str(tmp_path / "config.yaml")
    policy = compile_policy_text("{}\n", source)
    assert policy.server == ServerSettings(
        host="localhost",
        port=22,
        user="git",
        repositories=(tmp_path / "repositories").resolve(),
        state_dir=(tmp_path / "state").resolve(),
        listen_host="127.0.0.1",
        listen_port=2222,
    )
    assert policy.two_factor == TwoFactorSettings(
        issuer="gatekeeper",
        session_hours=12,
        max_failures=5,
        failure_window_minutes=15,
        lockout_minutes=15,
        self_enroll=True,
        keyboard_interactive=False,
    )
    assert policy.allow_local_push is False
    assert policy.teams == {} and policy.rules == ()
    assert policy.source == source


def test_defaults_of_teams_and_rules() -> None:
    policy = compile_policy_text(
        "teams:\n  a:\n    members: [x]\nrepositories:\n  - match: r\n    read: [a]\n", "p.yaml"
    )
    assert policy.teams["a"] == Team("a", ("x",), "none", None, "enforce", 2)
    rule = policy.rules[0]
    assert rule == RepoRule("r", ("a",), (), False, None, None, None, 5)


def test_empty_sections_and_null_optional_values_are_accepted() -> None:
    text = """\
        server:
        two_factor:
        hooks:
        teams:
          a:
            members:
        repositories:
          - match: r
            read:
            write: [a]
            require_2fa: ~
            grace_until: null
            mode:
        """
    policy = compile_policy_text(textwrap.dedent(text), "p.yaml")
    assert policy.teams["a"].members == ()
    assert policy.rules[0] == RepoRule("r", (), ("a",), line=8)


def test_values_as_written() -> None:
    text = """\
        server:
          host: 10.0.0.5
          port: 2222
          user: Git_1
          listen_host: "::"
          listen_port: 22022
        two_factor:
          issuer: 2024
          session_hours: 0.5
          max_failures: 3
          self_enroll: no
          keyboard_interactive: yes
        hooks:
          allow_local_push: true
        teams:
          Ops.Team-1:
            members: [Alice, bob.smith, c-d, 123]
            require_2fa: verified
            grace_until: "2027-01-31"
            mode: report
        repositories:
          - match: platform/api.git
            write: [Ops.Team-1]
            public: true
            require_2fa: enrolled
            grace_until: 2027-02-28
            mode: enforce
        """
    policy = compile_policy_text(textwrap.dedent(text), "p.yaml")
    assert policy.server.host == "10.0.0.5" and policy.server.port == 2222
    assert policy.server.user == "Git_1" and policy.server.listen_host == "::"
    assert policy.two_factor.issuer == "2024" and policy.two_factor.session_hours == 0.5
    assert policy.two_factor.self_enroll is False and policy.two_factor.keyboard_interactive is True
    assert policy.allow_local_push is True
    team = policy.teams["Ops.Team-1"]
    assert team.members == ("Alice", "bob.smith", "c-d", "123")
    assert team.grace_until == date(2027, 1, 31) and team.mode == "report"
    rule = policy.rules[0]
    assert rule.match == "platform/api"  # a trailing .git is dropped silently
    assert rule.public and rule.require_2fa == "enrolled" and rule.mode == "enforce"
    assert rule.grace_until == date(2027, 2, 28)


def test_relative_paths_resolve_against_the_directory_of_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "etc" / "gk" / "config.yaml",
        """\
        server:
          repositories: repos
          state_dir: ../state
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    policy = load_policy(config, cache_dir=tmp_path / "cache")
    assert policy.server.repositories == (tmp_path / "etc" / "gk" / "repos").resolve()
    assert policy.server.state_dir == (tmp_path / "etc" / "state").resolve()
    # the defaults too, and absolute paths stay as they are
    write(config, "server:\n  repositories: /srv/git\n")
    policy = load_policy(config, cache_dir=tmp_path / "cache")
    assert policy.server.repositories == Path("/srv/git")
    assert policy.server.state_dir == (tmp_path / "etc" / "gk" / "state").resolve()


def test_teams_of_lists_the_user_s_teams_in_file_order() -> None:
    text = """\
        teams:
          b: {members: [zoe, amy]}
          a: {members: [amy]}
          c: {members: [zoe]}
        """
    policy = compile_policy_text(textwrap.dedent(text), "p.yaml")
    assert [t.name for t in policy.teams_of("amy")] == ["b", "a"]
    assert [t.name for t in policy.teams_of("zoe")] == ["b", "c"]
    assert policy.teams_of("nobody") == ()


def test_levels_and_modes() -> None:
    assert LEVELS == ("none", "enrolled", "verified", "security-key", "security-key-pin")
    assert MODES == ("enforce", "report")


# -- every bad input, with its line --------------------------------------------------

TEAM_A = "teams:\n  a:\n    members: [x]\n"  # lines 1-3

BAD = [
    # YAML itself
    ("teams: [unclosed\n", 2, "malformed YAML at column 1: expected ',' or ']'"),
    ("teams:\n  a: b: c\n", 2, "malformed YAML at column 7: mapping values are not allowed"),
    ("teams:\n\t- x\n", 2, "malformed YAML at column 1: found character '\\t'"),
    ("--- {}\n--- {}\n", 2, "malformed YAML at column 1: but found another document"),
    ("teams: {}\nx: \x07\n", 2, "malformed YAML at column 4: unacceptable character #x0007"),
    # tags: never constructed
    (
        "teams: !!python/object/apply:os.system ['true']\n",
        1,
        "tags are not allowed (found '!!python/object/apply:os.system')",
    ),
    ("teams:\n  a:\n    members: !custom [x]\n", 3, "tags are not allowed (found '!custom')"),
    ("server:\n  host: !!binary aGk=\n", 2, "tags are not allowed (found '!!binary')"),
    # the top level
    ("- a\n- b\n", 1, "the policy must be a mapping of keys to values, got a list"),
    ("hello\n", 1, "the policy must be a mapping of keys to values, got 'hello'"),
    (
        "server: {}\nteam: {}\n",
        2,
        "unknown key 'team' in the policy (expected one of: server, two_factor, hooks, "
        "teams, repositories)",
    ),
    ("teams: {}\nteams: {}\n", 2, "duplicate key 'teams' in the policy"),
    ("two_factor: 5\n", 1, "two_factor must be a mapping of keys to values, got '5'"),
    # server
    (
        "server:\n  hostname: x\n",
        2,
        "unknown key 'hostname' in server (expected one of: host, port, user, repositories, "
        "state_dir, listen_host, listen_port, store)",
    ),
    ("server:\n  port: ssh\n", 2, "server.port: expected a port number (1-65535), got 'ssh'"),
    ("server:\n  port: 70000\n", 2, "server.port: expected a port number (1-65535), got '70000'"),
    ("server:\n  listen_port: 0\n", 2, "server.listen_port: expected a port number (1-65535)"),
    ("server:\n  port: -22\n", 2, "server.port: expected a port number (1-65535), got '-22'"),
    ("server:\n  port: 22.5\n", 2, "server.port: expected a port number (1-65535), got '22.5'"),
    ("server:\n  port: true\n", 2, "server.port: expected a port number (1-65535), got 'true'"),
    ("server:\n  port: 022\n", 2, "server.port: expected a port number (1-65535), got '022'"),
    ("server:\n  user: 'git user'\n", 2, "server.user: invalid name 'git user'"),
    ("server:\n  user: .git\n", 2, "server.user: invalid name '.git'"),
    ("server:\n  host: 'git example'\n", 2, "server.host: expected a host name or address"),
    ("server:\n  host: -oProxyCommand=x\n", 2, "server.host: expected a host name or address"),
    ("server:\n  state_dir: ''\n", 2, "server.state_dir: expected a path, got an empty string"),
    ("server:\n  repositories: [a]\n", 2, "server.repositories: expected a path, got a list"),
    ('server:\n  state_dir: "a\\0b"\n', 2, "server.state_dir: control characters are not allowed"),
    ("server:\n  22: x\n", 2, "server: keys must be plain names, got '22'"),
    # two_factor and hooks
    (
        "two_factor:\n  session_hours: -1\n",
        2,
        "two_factor.session_hours: expected a positive number",
    ),
    (
        "two_factor:\n  session_hours: 0\n",
        2,
        "two_factor.session_hours: expected a positive number",
    ),
    ("two_factor:\n  session_hours: .inf\n", 2, "two_factor.session_hours: expected a positive"),
    ("two_factor:\n  session_hours: twelve\n", 2, "two_factor.session_hours: expected a positive"),
    (
        "two_factor:\n  max_failures: 0\n",
        2,
        "two_factor.max_failures: expected a positive integer (at most 1000000), got '0'",
    ),
    ("two_factor:\n  lockout_minutes: -5\n", 2, "two_factor.lockout_minutes: expected a positive"),
    ("two_factor:\n  lockout_minutes: 99999999\n", 2, "two_factor.lockout_minutes: expected a"),
    ("two_factor:\n  failure_window_minutes: 1.5\n", 2, "two_factor.failure_window_minutes: exp"),
    (
        "two_factor:\n  self_enroll: 'yes'\n",
        2,
        "two_factor.self_enroll: expected true or false, got 'yes'",
    ),
    (
        "two_factor:\n  self_enroll: sometimes\n",
        2,
        "two_factor.self_enroll: expected true or false",
    ),
    (
        "two_factor:\n  keyboard_interactive:\n",
        2,
        "two_factor.keyboard_interactive: expected true or false, got nothing",
    ),
    (
        "hooks:\n  allow_local_push: 1\n",
        2,
        "hooks.allow_local_push: expected true or false, got '1'",
    ),
    (
        "hooks:\n  allow_local_push: !!bool maybe\n",
        2,
        "hooks.allow_local_push: expected true or false, got 'maybe'",
    ),
    ("two_factor:\n  issuer: [a]\n", 2, "two_factor.issuer: expected a string, got a list"),
    (
        'two_factor:\n  issuer: "a\\tb"\n',
        2,
        "two_factor.issuer: control characters are not allowed",
    ),
    (
        "hooks:\n  allow_push: true\n",
        2,
        "unknown key 'allow_push' in hooks (expected one of: allow_local_push)",
    ),
    # teams
    (
        "teams:\n  a:\n    members: [x]\n  a:\n    members: [y]\n",
        4,
        "duplicate key 'a' in teams: team 'a' is defined twice (first on line 2)",
    ),
    ("teams:\n  a:\n    mode: report\n    mode: enforce\n", 4, "duplicate key 'mode' in team 'a'"),
    ("teams:\n  'bad team':\n    members: [x]\n", 2, "invalid team name 'bad team'"),
    ("teams:\n  a: [x, y]\n", 2, "team 'a' must be a mapping of keys to values, got a list"),
    ("teams:\n  a:\n", 2, "team 'a' must be a mapping of keys to values, got nothing"),
    ("teams: [a, b]\n", 1, "teams must be a mapping of keys to values, got a list"),
    (
        "teams:\n  platform:\n    members: [a]\n    requre_2fa: enrolled\n",
        4,
        "unknown key 'requre_2fa' in team 'platform' (expected one of: members, require_2fa, "
        "grace_until, mode)",
    ),
    (
        "teams:\n  a:\n    members: alice\n",
        3,
        "team 'a' members: expected a list of user names, like [a, b], got 'alice'",
    ),
    (
        "teams:\n  a:\n    members:\n      - x\n      - y\n      - x\n",
        6,
        "team 'a' members: 'x' is listed twice",
    ),
    ("teams:\n  a:\n    members: [ok, 'no way']\n", 3, "team 'a' members: invalid name 'no way'"),
    ("teams:\n  a:\n    members: [ok, -x]\n", 3, "team 'a' members: invalid name '-x'"),
    ("teams:\n  a:\n    members: [ok, [x]]\n", 3, "team 'a' members: expected a name"),
    (
        "teams:\n  a:\n    members: [yes]\n",
        3,
        "team 'a' members: expected a name (letters, digits, '_', '.', '-'; at most 64 "
        "characters), got 'yes' (quote it if it is meant as text)",
    ),
    ("teams:\n  a:\n    members: [" + "x" * 65 + "]\n", 3, "team 'a' members: invalid name 'xxx"),
    ("teams:\n  a:\n    <<: {members: [x]}\n", 3, "team 'a': merge keys ('<<') are not supported"),
    (
        "teams:\n  a:\n    require_2fa: always\n",
        3,
        "team 'a' require_2fa: unknown level 'always' (expected one of: none, enrolled, "
        "verified, security-key, security-key-pin)",
    ),
    (
        "teams:\n  a:\n    require_2fa: Verified\n",
        3,
        "team 'a' require_2fa: unknown level 'Verified'",
    ),
    (
        "teams:\n  a:\n    require_2fa:\n",
        3,
        "team 'a' require_2fa: expected one of: none, enrolled, verified, security-key, "
        "security-key-pin, got nothing",
    ),
    (
        "teams:\n  a:\n    mode: loud\n",
        3,
        "team 'a' mode: unknown mode 'loud' (expected one of: enforce, report)",
    ),
    (
        "teams:\n  a:\n    grace_until: 2026-13-45\n",
        3,
        "team 'a' grace_until: expected a date like 2027-01-31, got '2026-13-45'",
    ),
    (
        "teams:\n  a:\n    grace_until: next week\n",
        3,
        "team 'a' grace_until: expected a date like 2027-01-31, got 'next week'",
    ),
    (
        "teams:\n  a:\n    grace_until: 'next week'\n",
        3,
        "team 'a' grace_until: expected a date like",
    ),
    ("teams:\n  a:\n    grace_until: 20270131\n", 3, "team 'a' grace_until: expected a date like"),
    ("teams:\n  a:\n    grace_until: 2027-1-5\n", 3, "team 'a' grace_until: expected a date like"),
    (
        "teams:\n  a:\n    grace_until: 2027-01-31 10:00:00\n",
        3,
        "team 'a' grace_until: expected a date",
    ),
    # repository rules
    (
        "repositories:\n  match: x\n",
        2,
        "repositories must be a list of rules (- match: NAME ...), got a mapping",
    ),
    (
        "repositories:\n  - platform/*\n",
        2,
        "repository rule #1 must be a mapping of keys to values, got 'platform/*'",
    ),
    (TEAM_A + "repositories:\n  - read: [a]\n", 5, "repository rule #1: 'match' is required"),
    ("repositories:\n  - {}\n", 2, "repository rule #1: 'match' is required"),
    (
        TEAM_A + "repositories:\n  - match: x\n    raed: [a]\n",
        6,
        "unknown key 'raed' in repository rule #1 (expected one of: match, read, write, public, "
        "require_2fa, grace_until, mode)",
    ),
    (
        TEAM_A + "repositories:\n  - match: r\n    read: [ghost]\n",
        6,
        "repository rule 'r' read: unknown team 'ghost' (teams: a)",
    ),
    (
        TEAM_A
        + "repositories:\n  - match: r\n    read: [a]\n    write:\n      - a\n      - ghost\n",
        9,
        "repository rule 'r' write: unknown team 'ghost' (teams: a)",
    ),
    (
        "repositories:\n  - match: r\n    write: [ghost]\n",
        3,
        "repository rule 'r' write: unknown team 'ghost' (teams: none defined)",
    ),
    (
        TEAM_A + "repositories:\n  - match: r\n    read: a\n",
        6,
        "repository rule 'r' read: expected a list of team names",
    ),
    (
        TEAM_A + "repositories:\n  - match: r\n    read: [a, a]\n",
        6,
        "repository rule 'r' read: 'a' is listed twice",
    ),
    (
        TEAM_A + "repositories:\n  - match: r\n    read: [a]\n    require_2fa: strict\n",
        7,
        "repository rule 'r' require_2fa: unknown level 'strict'",
    ),
    (
        TEAM_A + "repositories:\n  - match: r\n    read: [a]\n    mode: dry-run\n",
        7,
        "repository rule 'r' mode: unknown mode 'dry-run'",
    ),
    (
        TEAM_A + "repositories:\n  - match: r\n    read: [a]\n    grace_until: soon\n",
        7,
        "repository rule 'r' grace_until: expected a date like 2027-01-31, got 'soon'",
    ),
    (
        "repositories:\n  - match: r\n    public: 'true'\n",
        3,
        "repository rule 'r' public: expected true or false, got 'true'",
    ),
    (
        "repositories:\n  - match: r\n    public:\n",
        3,
        "repository rule 'r' public: expected true or false, got nothing",
    ),
    (
        "repositories:\n  - match: /platform/*\n",
        2,
        "repository rule #1 match: invalid repository pattern '/platform/*': "
        "it must not start with '/'",
    ),
    (
        "repositories:\n  - match: platform/../x\n",
        2,
        "repository rule #1 match: invalid repository pattern 'platform/../x': '..' is not allowed",
    ),
    (
        "repositories:\n  - match: ../x\n",
        2,
        "repository rule #1 match: invalid repository pattern '../x'",
    ),
    (
        "repositories:\n  - match: platform//x\n",
        2,
        "repository rule #1 match: invalid repository pattern 'platform//x': "
        "it has an empty path component",
    ),
    (
        "repositories:\n  - match: platform/\n",
        2,
        "repository rule #1 match: invalid repository pattern 'platform/'",
    ),
    (
        "repositories:\n  - match: 'plat form'\n",
        2,
        "repository rule #1 match: invalid repository pattern 'plat form'",
    ),
    (
        "repositories:\n  - match: 'a;b'\n",
        2,
        "repository rule #1 match: invalid repository pattern 'a;b'",
    ),
    (
        "repositories:\n  - match: web**\n",
        2,
        "repository rule #1 match: invalid repository pattern 'web**': "
        "'**' must be a whole path component",
    ),
    (
        "repositories:\n  - match: -x\n",
        2,
        "repository rule #1 match: invalid repository pattern '-x'",
    ),
    (
        "repositories:\n  - match: .git\n",
        2,
        "repository rule #1 match: invalid repository pattern '.git': it is empty",
    ),
    (
        "repositories:\n  - match:\n",
        2,
        "repository rule #1 match: expected a repository name or glob",
    ),
    (
        "repositories:\n  - match: [a]\n",
        2,
        "repository rule #1 match: expected a repository name or glob",
    ),
]


@pytest.mark.parametrize(("text", "line", "expected"), BAD)
def test_each_bad_input_is_one_error_with_its_line(text: str, line: int, expected: str) -> None:
    policy, problems = check_policy_text(text, "p.yaml")
    assert policy is None
    errors = [p.format("p.yaml") for p in problems if p.severity == "error"]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"p.yaml:{line}: error: {expected}"), errors[0]
    with pytest.raises(PolicyError) as raised:
        compile_policy_text(text, "p.yaml")
    assert raised.value.problems == errors
    assert raised.value.message == "invalid policy file p.yaml: 1 problem(s)"
    assert raised.value.exit_code == 3


def test_the_message_format_of_the_brief() -> None:
    text = "\n" * 9 + "teams:\n  platform:\n    requre_2fa: verified\n"
    assert formatted(text, "config.yaml") == [
        "config.yaml:12: error: unknown key 'requre_2fa' in team 'platform' "
        "(expected one of: members, require_2fa, grace_until, mode)"
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_file_is_an_error(text: str) -> None:
    policy, problems = check_policy_text(text, "p.yaml")
    assert policy is None
    assert [p.format("p.yaml") for p in problems] == [
        "p.yaml: error: the policy file is empty (expected a mapping with some of: server, "
        "two_factor, hooks, teams, repositories; see config/example.yaml)"
    ]


def test_every_problem_is_reported_together_in_line_order() -> None:
    text = """\
        server:
          port: 0
          colour: blue
        two_factor:
          self_enroll: maybe
        teams:
          a:
            members: [x, x]
            require_2fa: always
          a:
            members: [y]
        repositories:
          - match: /abs
            read: [ghost]
          - match: ok
            write: [a]
            grace_until: 2026-02-30
        """
    errors = errors_of(textwrap.dedent(text))
    assert [e.split(": error: ")[0] for e in errors] == [
        f"p.yaml:{n}" for n in (2, 3, 5, 8, 9, 10, 13, 14, 17)
    ]
    assert "unknown key 'colour' in server" in errors[1]
    assert "'x' is listed twice" in errors[3]
    assert "unknown team 'ghost'" in errors[7]
    with pytest.raises(PolicyError) as raised:
        compile_policy_text(textwrap.dedent(text), "p.yaml")
    assert raised.value.problems == errors
    assert "9 problem(s)" in raised.value.message
    assert raised.value.lines()[1 : len(errors) + 1] == errors  # after the message


def test_a_badly_named_team_is_reported_once_not_again_where_it_is_used() -> None:
    text = "teams:\n  'a b':\n    members: [x]\nrepositories:\n  - match: r\n    read: ['a b']\n"
    errors = errors_of(text)
    assert errors[0].startswith("p.yaml:2: error: invalid team name 'a b'")
    assert errors[1].startswith("p.yaml:6: error: repository rule 'r' read: invalid name 'a b'")
    assert len(errors) == 2


def test_an_invalid_rule_is_still_checked_in_full() -> None:
    text = "repositories:\n  - match: ../x\n    read: [ghost]\n    mode: loud\n"
    errors = errors_of(text)
    assert [e.split(": error: ")[0] for e in errors] == ["p.yaml:2", "p.yaml:3", "p.yaml:4"]
    assert "repository rule #1 read: unknown team 'ghost'" in errors[1]


# -- tags are refused and never run -----------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        'teams: !!python/object/apply:os.system ["touch {marker}"]\n',
        'teams:\n  a:\n    members: !!python/object/apply:os.system ["touch {marker}"]\n',
        "server:\n  host: !!python/object/new:os.system [touch {marker}]\n",
        "teams: !!python/name:os.system\n",
    ],
)
def test_python_tags_are_refused_and_never_executed(tmp_path: Path, template: str) -> None:
    marker = tmp_path / "pwned"
    text = template.format(marker=marker)
    policy, problems = check_policy_text(text, "p.yaml")
    assert policy is None
    assert problems and all("tags are not allowed" in p.message for p in problems)
    with pytest.raises(PolicyError):
        compile_policy_text(text, "p.yaml")
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(PolicyError) as raised:
        load_policy(config, cache_dir=tmp_path / "cache")
    assert "tags are not allowed" in "\n".join(raised.value.lines())
    assert not marker.exists()
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_every_tagged_node_is_reported() -> None:
    text = "teams:\n  a:\n    members: !x [y]\n    mode: !!str report\n    grace_until: !y z\n"
    errors = errors_of(text)
    assert errors == [
        "p.yaml:3: error: tags are not allowed (found '!x')",
        "p.yaml:5: error: tags are not allowed (found '!y')",
    ]


def test_standard_tags_are_plain_yaml() -> None:
    policy = compile_policy_text("two_factor:\n  issuer: !!str 2024\n", "p.yaml")
    assert policy.two_factor.issuer == "2024"


# -- never raises, never hangs -------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "text",
    [
        "teams: " + "[" * 5000 + "]" * 5000 + "\n",
        "teams: &a [*a]\n",
        "teams: &a {b: *a}\n",
        "teams: \ud800\n",
        "teams: \x00\n",
        "\ufeffteams: {}\nx: \x07\n",
    ],
    ids=["deep", "self-alias-list", "self-alias-map", "surrogate", "nul", "bell"],
)
def test_hostile_text_is_a_problem_not_an_exception(text: str) -> None:
    policy, problems = check_policy_text(text, "p.yaml")
    assert policy is None
    assert any(p.severity == "error" for p in problems)


@pytest.mark.timeout(20)
def test_a_billion_laughs_file_is_checked_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append("teams:\n  t:\n    members: *a11")
    errors = errors_of("\n".join(lines) + "\n")
    assert any("unknown key 'a0'" in e for e in errors)
    assert any("team 't' members: expected a name" in e for e in errors)


def test_aliases_of_plain_values_are_fine() -> None:
    text = "teams:\n  a:\n    members: &devs [x, y]\n  b:\n    members: *devs\n"
    policy = compile_policy_text(text, "p.yaml")
    assert policy.teams["b"].members == ("x", "y")


# -- warnings ----------------------------------------------------------------------------


def test_members_unknown_to_the_store_are_warnings_only_when_the_store_is_known() -> None:
    text = "teams:\n  platform:\n    members:\n      - alice\n      - bob\n"
    policy, problems = check_policy_text(text, "p.yaml", known_users={"alice"})
    assert policy is not None
    assert [p.format("p.yaml") for p in problems] == [
        "p.yaml:5: warning: team 'platform': member 'bob' is not a user in the store "
        "(add it with `gatekeeper user add`)"
    ]
    assert check_policy_text(text, "p.yaml")[1] == []


def test_rules_that_grant_nothing_are_warnings() -> None:
    text = TEAM_A + (
        "repositories:\n"
        "  - match: nothing\n"  # 5
        "  - match: tighten\n"  # 6
        "    require_2fa: verified\n"
        "  - match: loose\n"  # 8
        "    mode: report\n"  # 9
        "  - match: none\n"  # 10
        "    require_2fa: none\n"
        "    read: [a]\n"
        "    grace_until: 2027-01-31\n"  # 13
    )
    policy, problems = check_policy_text(text, "p.yaml")
    assert policy is not None and len(policy.rules) == 4
    assert [p.format("p.yaml") for p in problems] == [
        "p.yaml:5: warning: repository rule 'nothing' grants nothing and requires nothing",
        "p.yaml:8: warning: repository rule 'loose' grants nothing and requires nothing",
        "p.yaml:9: warning: repository rule 'loose': mode applies only to this rule's own "
        "require_2fa, which it does not set",
        "p.yaml:13: warning: repository rule 'none': grace_until applies only to this rule's "
        "own require_2fa, which it does not set",
    ]


def test_team_rollout_settings_without_a_level_are_warnings() -> None:
    text = "teams:\n  a:\n    members: [x]\n    grace_until: 2027-01-31\n    mode: report\n"
    policy, problems = check_policy_text(text, "p.yaml")
    assert policy is not None
    assert [p.format("p.yaml") for p in problems] == [
        "p.yaml:4: warning: team 'a': grace_until has no effect while require_2fa is none",
        "p.yaml:5: warning: team 'a': mode has no effect while require_2fa is none",
    ]


def test_problem_format() -> None:
    assert Problem(3, "bad").format("x.yaml") == "x.yaml:3: error: bad"
    assert Problem(None, "bad", "warning").format("x.yaml") == "x.yaml: warning: bad"


# -- globs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "repo", "expected"),
    [
        ("platform/*", "platform/api", True),
        ("platform/*", "platform/a/b", False),
        ("platform/*", "platform", False),
        ("platform/*", "platformx/api", False),
        ("platform/*", "other/api", False),
        ("platform/**", "platform/api", True),
        ("platform/**", "platform/a/b/c", True),
        ("platform/**", "platform", False),
        ("**", "x", True),
        ("**", "a/b/c", True),
        ("**/api", "api", True),
        ("**/api", "a/b/api", True),
        ("**/api", "a/b/apix", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/xb", False),
        ("api", "api", True),
        ("api", "api2", False),
        ("api", "x/api", False),
        ("*", "handbook", True),
        ("*", "team/handbook", False),
        ("web-*", "web-app", True),
        ("web-*", "web/app", False),
        ("*-app", "web-app", True),
        ("*.js", "lib.js", True),
        ("*.js", "libjs", False),
        ("lib+", "lib+", True),
        ("lib+", "libb", False),
        ("a.b", "axb", False),
    ],
)
def test_globs(pattern: str, repo: str, expected: bool) -> None:
    assert RepoRule(pattern).matches(repo) is expected


def test_match_patterns_from_the_file() -> None:
    text = (
        "repositories:\n  - match: platform/*.git\n    public: true\n"
        "  - match: handbook.git\n    public: true\n"
    )
    rules = compile_policy_text(text, "p.yaml").rules
    assert [r.match for r in rules] == ["platform/*", "handbook"]
    assert rules[0].matches("platform/api") and rules[1].matches("handbook")


def test_a_glob_is_compiled_once_and_shared() -> None:
    first, second = RepoRule("cache-test/*"), RepoRule("cache-test/*")
    assert first.matches("cache-test/x")
    regex = model_module._GLOBS["cache-test/*"]
    assert second.matches("cache-test/y")
    assert model_module._GLOBS["cache-test/*"] is regex


# -- loading and the compiled cache ----------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write(
        tmp_path / "conf" / "config.yaml",
        """\
        server:
          port: 2200
        teams:
          a:
            members: [x]
        repositories:
          - match: r
            read: [a]
        """,
    )


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("policy-*"))


def cache_name(digest: str) -> str:
    return f"policy-{digest}.v{COMPILED_FORMAT}"


def mark_cache(cached: Path) -> None:
    """Rewrite a cached policy with listen_port 4444: a mark only the cache carries."""
    policy = load_compiled(cached.read_bytes())
    marked = evolve(policy, server=evolve(policy.server, listen_port=4444))
    cached.write_bytes(dump_compiled(marked))


def test_load_writes_the_compiled_policy_keyed_by_the_file_hash(
    config: Path, tmp_path: Path
) -> None:
    import hashlib

    cache = tmp_path / "cache"
    policy = load_policy(config, cache_dir=cache)
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    assert policy.sha256 == digest
    assert policy.source == str(config.absolute())
    assert cache_files(cache) == [cache / cache_name(digest)]
    assert (cache / cache_name(digest)).stat().st_mode & 0o777 == 0o600
    assert load_compiled((cache / cache_name(digest)).read_bytes()) == policy
    assert [p.name for p in cache.iterdir()] == [cache_name(digest)]  # no temporary left
    assert load_policy(config, cache_dir=cache) == policy


def test_a_warm_cache_is_what_is_loaded(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_policy(config, cache_dir=cache)
    (cached,) = cache_files(cache)
    mark_cache(cached)
    assert load_policy(config, cache_dir=cache).server.listen_port == 4444


def test_a_cache_others_could_write_is_not_trusted(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_policy(config, cache_dir=cache)
    (cached,) = cache_files(cache)
    mark_cache(cached)
    cached.chmod(0o666)
    assert load_policy(config, cache_dir=cache).server.listen_port == 2222
    assert cached.stat().st_mode & 0o777 == 0o600  # replaced by a fresh compile


def test_a_cache_compiled_for_another_file_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    text = "server:\n  repositories: repos\n"
    one = write(tmp_path / "one" / "config.yaml", text)
    two = write(tmp_path / "two" / "config.yaml", text)
    assert (
        load_policy(one, cache_dir=cache).server.repositories
        == (tmp_path / "one" / "repos").resolve()
    )
    # same bytes, same hash: the paths differ, so the cached copy must not be reused
    assert (
        load_policy(two, cache_dir=cache).server.repositories
        == (tmp_path / "two" / "repos").resolve()
    )
    assert load_policy(two, cache_dir=cache).source == str(two)


def test_a_changed_file_is_compiled_again(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert load_policy(config, cache_dir=cache).server.port == 2200
    config.write_text(config.read_text().replace("2200", "2201"))
    policy = load_policy(config, cache_dir=cache)
    assert policy.server.port == 2201
    assert len(cache_files(cache)) == 2
    config.write_text(config.read_text().replace("members: [x]", "members: [x, x]"))
    with pytest.raises(PolicyError) as raised:
        load_policy(config, cache_dir=cache)
    assert "'x' is listed twice" in raised.value.problems[0]
    assert len(cache_files(cache)) == 2  # an invalid policy is never cached


@pytest.mark.parametrize(
    "garbage",
    [b"", b"{", b"\xff\xfe", b"[]", b'{"format": 2}', b"null"],
    ids=["empty", "truncated", "binary", "list", "partial", "null"],
)
def test_a_corrupt_cache_is_ignored_and_rewritten(
    config: Path, tmp_path: Path, garbage: bytes
) -> None:
    cache = tmp_path / "cache"
    expected = load_policy(config, cache_dir=cache)
    (cached,) = cache_files(cache)
    cached.write_bytes(garbage)
    assert load_policy(config, cache_dir=cache) == expected
    assert load_compiled(cached.read_bytes()) == expected


def test_no_cache_when_it_cannot_be_written(config: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    expected = compile_policy_text(config.read_text(), str(config))
    assert load_policy(config, cache_dir=blocker / "cache") == expected
    assert load_policy(config, cache_dir=blocker) == expected


def test_the_cache_directory_comes_from_the_environment(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEKEEPER_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_policy(config)
    assert len(cache_files(tmp_path / "env-cache")) == 1
    assert not (tmp_path / "home").exists()
    monkeypatch.delenv("GATEKEEPER_CACHE_DIR")
    load_policy(config)
    assert len(cache_files(tmp_path / "home" / ".cache" / "gatekeeper")) == 1
    monkeypatch.delenv("HOME")
    assert load_policy(config).server.port == 2200  # no cache at all: still loads


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_warm_cache_loads_without_importing_yaml_in_a_fresh_process(
    config: Path, tmp_path: Path
) -> None:
    env = {"GATEKEEPER_CONFIG": str(config), "GATEKEEPER_CACHE_DIR": str(tmp_path / "cache")}
    cold = run_python(
        """\
        import sys
        from gatekeeper.policy import load_policy
        load_policy()
        print("yaml" in sys.modules)
        """,
        env,
    )
    assert cold.returncode == 0, cold.stderr
    assert cold.stdout.strip() == "True"  # the first load compiled the YAML
    warm = run_python(
        """\
        import sys
        from gatekeeper.policy import load_policy
        first = load_policy()
        second = load_policy()
        assert first == second
        print("yaml" in sys.modules, second.server.port)
        """,
        env,
    )
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.split() == ["False", "2200"]


def test_importing_the_module_is_light() -> None:
    result = run_python(
        """\
        import sys
        import gatekeeper.policy
        print(sorted(m for m in ("yaml", "dataclasses", "inspect", "typing") if m in sys.modules))
        """,
        {},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as raised:
        load_policy(path, cache_dir=tmp_path / "cache")
    assert raised.value.message == f"policy file not found: {path}"
    assert raised.value.hint == (
        "set --config or GATEKEEPER_CONFIG, or create it from config/example.yaml"
    )
    assert raised.value.exit_code == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file(config: Path, tmp_path: Path) -> None:
    config.chmod(0)
    try:
        with pytest.raises(PolicyError) as raised:
            load_policy(config, cache_dir=tmp_path / "cache")
    finally:
        config.chmod(0o644)
    assert raised.value.message == f"cannot read policy file {config}: permission denied"
    assert raised.value.hint is not None and "readable" in raised.value.hint


def test_a_permission_error_says_what_to_check(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gatekeeper.policy import load

    def refuse(file: str, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", file)

    # load_policy opens the file with open() (no pathlib on the forced command's path).
    monkeypatch.setattr(load, "open", refuse, raising=False)
    with pytest.raises(PolicyError) as raised:
        load_policy(config, cache_dir=tmp_path / "cache")
    assert raised.value.message == f"cannot read policy file {config}: permission denied"
    assert raised.value.hint is not None and "readable by the account" in raised.value.hint


def test_a_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy(tmp_path, cache_dir=tmp_path / "cache")
    assert raised.value.message.startswith(f"cannot read policy file {tmp_path}: ")
    assert raised.value.hint


def test_an_invalid_file_lists_its_problems_with_its_path(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "teams:\n  a:\n    mode: loud\n    colour: red\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(path, cache_dir=tmp_path / "cache")
    assert raised.value.message == f"invalid policy file {path}: 2 problem(s)"
    assert raised.value.problems == [
        f"{path}:3: error: team 'a' mode: unknown mode 'loud' (expected one of: enforce, report)",
        f"{path}:4: error: unknown key 'colour' in team 'a' (expected one of: members, "
        "require_2fa, grace_until, mode)",
    ]


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"teams:\n  \xff: {}\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(path, cache_dir=tmp_path / "cache")
    assert "is not UTF-8" in raised.value.message


def test_default_config_path(monkeypatch: pytest.MonkeyPatch, config: Path, tmp_path: Path) -> None:
    monkeypatch.delenv("GATEKEEPER_CONFIG", raising=False)
    assert default_config_path() == Path("/etc/gatekeeper/config.yaml")
    monkeypatch.setenv("GATEKEEPER_CONFIG", str(config))
    assert default_config_path() == config
    assert load_policy(cache_dir=tmp_path / "cache").source == str(config)
