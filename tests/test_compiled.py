"""The compiled policy cache (`dump_compiled` / `load_compiled`): what the forced
command reads on every connection instead of the YAML.

It must give exactly the decisions the policy it was compiled from gives, build only
what a connection needs, and never turn a damaged file into a policy: anything but
its own intact output is a ValueError, and `load_policy` then compiles the YAML again.
"""

from __future__ import annotations

import os
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatekeeper import decision
from gatekeeper.policy import (
    Policy,
    RepoRule,
    ServerSettings,
    Team,
    TwoFactorSettings,
    load_policy,
    model,
)
from gatekeeper.policy import compiled as compiled_module
from gatekeeper.policy.check import compile_policy_text
from gatekeeper.policy.compiled import (
    COMPILED_FORMAT,
    COMPILED_MAGIC,
    dump_compiled,
    load_compiled,
)
from gatekeeper.record import evolve
from testing.reference import glob_regex

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"
NOW = datetime(2027, 1, 15, 12, 0, tzinfo=timezone.utc)


def example() -> Policy:
    return compile_policy_text(EXAMPLE.read_text(), str(EXAMPLE))


def reference_rules(policy: Policy, repo: str) -> tuple[RepoRule, ...]:
    """The straightforward definition: every rule, in file order, tried one by one."""
    return tuple(
        r
        for r in policy.rules
        if (glob_regex(r.match).match(repo) is not None if "*" in r.match else r.match == repo)
    )


def reference_teams(policy: Policy, user: str) -> tuple[Team, ...]:
    return tuple(t for t in policy.teams.values() if user in t.members)


# -- round trip -----------------------------------------------------------------------


def test_round_trip_of_the_example() -> None:
    policy = example()
    loaded = load_compiled(dump_compiled(policy))
    assert loaded == policy
    assert list(loaded.teams) == list(policy.teams)
    assert isinstance(loaded.server.repositories, Path)
    assert loaded.teams["web"].grace_until == date(2027, 1, 31)
    assert isinstance(loaded.rules[0].read, tuple)
    assert dump_compiled(loaded) == dump_compiled(policy)


def test_round_trip_of_defaults() -> None:
    policy = compile_policy_text("{}\n", "p.yaml")
    loaded = load_compiled(dump_compiled(policy))
    assert loaded == policy
    assert loaded.rules == () and loaded.teams == {}
    assert loaded.matching_rules("any/thing") == () and loaded.teams_of("x") == ()


def test_teams_and_rules_are_built_only_when_asked_for() -> None:
    policy = example()
    loaded = load_compiled(dump_compiled(policy))
    assert "rules" not in loaded.__dict__ and "teams" not in loaded.__dict__
    user = next(iter(policy.teams.values())).members[0]
    assert loaded.teams_of(user) == reference_teams(policy, user)
    assert loaded.matching_rules("platform/api") == reference_rules(policy, "platform/api")
    assert "rules" not in loaded.__dict__ and "teams" not in loaded.__dict__
    assert loaded.rules == policy.rules  # now built, and kept
    assert "rules" in loaded.__dict__
    with pytest.raises(AttributeError):
        loaded.no_such_field  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError):
        policy._compiled  # type: ignore[attr-defined]  # noqa: B018


def test_evolve_of_a_loaded_policy_is_a_plain_policy() -> None:
    loaded = load_compiled(dump_compiled(example()))
    changed = evolve(loaded, rules=())
    assert changed.rules == () and changed.teams == loaded.teams
    assert changed.matching_rules("platform/api") == ()


def test_a_large_policy_decodes_only_what_a_connection_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    teams = {
        f"t{i}": Team(f"t{i}", (f"u{i}", "amy") if i % 100 == 0 else (f"u{i}",))
        for i in range(1000)
    }
    rules = [
        RepoRule(f"p{i}/repo" if i % 5 else f"g{i}/*", read=(f"t{i % 1000}",)) for i in range(5000)
    ]
    rules.append(RepoRule("*/shared", read=("t0",)))
    policy = Policy(ServerSettings(), TwoFactorSettings(), teams, tuple(rules))
    loaded = load_compiled(dump_compiled(policy))
    built: list[str] = []
    real_rule, real_team = compiled_module._Compiled.rule, compiled_module._Compiled.team

    def rule(self: compiled_module._Compiled, i: int) -> RepoRule:
        built.append(f"r{i}")
        return real_rule(self, i)

    def team(self: compiled_module._Compiled, i: int) -> Team:
        built.append(f"t{i}")
        return real_team(self, i)

    monkeypatch.setattr(compiled_module._Compiled, "rule", rule)
    monkeypatch.setattr(compiled_module._Compiled, "team", team)
    assert loaded.matching_rules("g10/x") == (rules[10],)
    assert loaded.matching_rules("p7/repo") == (rules[7],)
    assert loaded.matching_rules("p7/shared") == (rules[-1],)
    assert [t.name for t in loaded.teams_of("amy")] == [f"t{i}" for i in range(0, 1000, 100)]
    assert len(built) <= 3 * 2 + 10  # the candidates (each lookup also checks */shared)
    verdict = decision.decide(loaded, decision.UserFacts("u10"), "g10/x", "read", NOW)
    assert verdict.allowed and verdict.access_via == ("t10",)


# -- damage: every change to the bytes is refused -------------------------------------


def test_anything_but_its_own_output_is_refused() -> None:
    good = dump_compiled(example())
    body = good[len(COMPILED_MAGIC) + 4 :]
    for damaged in (
        b"",
        b"{}",
        b"not compiled",
        COMPILED_MAGIC,
        good[: len(good) // 2],  # truncated
        good[:-1],
        good + b"\0",
        b"GKpolicX" + good[8:],
        good[: len(COMPILED_MAGIC)] + b"\0\0\0\0" + body,  # CRC of something else
    ):
        with pytest.raises(ValueError):
            load_compiled(damaged)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    good = _EXAMPLE_BYTES
    i = data.draw(st.integers(0, len(good) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = good[:i] + bytes([good[i] ^ flip]) + good[i + 1 :]
    with pytest.raises(ValueError):
        load_compiled(damaged)


_EXAMPLE_BYTES = dump_compiled(compile_policy_text(EXAMPLE.read_text(), str(EXAMPLE)))


def _resealed(body_obj: Any) -> bytes:
    """Well-formed, CRC-correct bytes around any marshal'd value (a forged cache)."""
    import marshal
    from binascii import crc32

    body = marshal.dumps(body_obj)
    return COMPILED_MAGIC + crc32(body).to_bytes(4, "little") + body


def test_a_sealed_file_with_wrong_contents_is_still_refused() -> None:
    import marshal

    top = list(marshal.loads(_EXAMPLE_BYTES[len(COMPILED_MAGIC) + 4 :]))  # noqa: S302
    for index, value in [
        (0, COMPILED_FORMAT - 1),  # a stale format
        (0, COMPILED_FORMAT + 1),
        (1, None),
        (3, ("h", "22", "git", "/r", "/s", "127.0.0.1", 2222, "")),  # port as text
        (3, ("h", True, "git", "/r", "/s", "127.0.0.1", 2222, "")),  # bool is no int
        (4, ("gk", 12, 5, 15, 15, 1, False)),  # 1 is no bool
        (5, "yes"),
        (6, (-1,)),
        (6, (10_000,)),
        (7, 0),
        (8, b"\0\0\0"),  # bucket offsets cut
        (11, b"x" + top[11]),  # rule blob no longer matches its offsets
    ]:
        forged = list(top)
        forged[index] = value
        with pytest.raises(ValueError):
            load_compiled(_resealed(tuple(forged)))
    for short in (tuple(top[:-1]), [*top], None, (), "x"):
        with pytest.raises(ValueError):
            load_compiled(_resealed(short))


def test_a_damaged_record_fails_closed_when_it_is_used() -> None:
    """A record that passes the CRC (forged by the account itself) but is not what
    `dump_compiled` writes raises when decoded: the connection is refused."""
    import marshal

    top = list(marshal.loads(_EXAMPLE_BYTES[len(COMPILED_MAGIC) + 4 :]))  # noqa: S302
    offsets, blob = top[10], top[11]
    first_end = int.from_bytes(offsets[4:8], "little")
    bad = marshal.dumps(("platform/*", "web", (), False, None, None, None, 3))
    shift = len(bad) - first_end
    top[11] = bad + blob[first_end:]
    top[10] = offsets[:4] + b"".join(
        (int.from_bytes(offsets[i : i + 4], "little") + shift).to_bytes(4, "little")
        for i in range(4, len(offsets), 4)
    )
    loaded = load_compiled(_resealed(tuple(top)))
    with pytest.raises(ValueError):
        loaded.matching_rules("platform/api")
    with pytest.raises(ValueError):
        loaded.rules  # noqa: B018


# -- load_policy falls back to the YAML -----------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "config.yaml"
    path.parent.mkdir()
    path.write_text(EXAMPLE.read_text())
    return path


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 3],
        lambda b: b[:-7],
        lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:],
        lambda b: b"",
        lambda b: _resealed((COMPILED_FORMAT - 1, *[None] * 13)),
    ],
    ids=["truncated", "tail-cut", "bit-flip", "empty", "stale-format"],
)
def test_a_damaged_cache_falls_back_to_the_yaml(
    config: Path, tmp_path: Path, damage: object
) -> None:
    cache = tmp_path / "cache"
    expected = load_policy(config, cache_dir=cache)
    (cached,) = cache.iterdir()
    cached.write_bytes(damage(cached.read_bytes()))  # type: ignore[operator]
    assert load_policy(config, cache_dir=cache) == expected
    assert load_compiled(cached.read_bytes()) == expected  # compiled and written again


def test_a_policy_from_the_cache_decides_like_the_yaml(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fresh = load_policy(config, cache_dir=cache)
    warm = load_policy(config, cache_dir=cache)
    assert "_compiled" in warm.__dict__ and "_compiled" not in fresh.__dict__
    for user in ("alice", "bob", "carol", "dave", "nobody"):
        for repo in ("platform/api", "web/site", "handbook", "docs/a/b", "nothing"):
            for action in ("read", "write"):
                facts = decision.UserFacts(user, enrolled=True)
                assert decision.decide(warm, facts, repo, action, NOW) == decision.decide(
                    fresh, facts, repo, action, NOW
                )


def test_the_cache_is_written_atomically_and_privately(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_policy(config, cache_dir=cache)
    (cached,) = cache.iterdir()
    assert cached.name.endswith(f".v{COMPILED_FORMAT}")
    assert cached.read_bytes().startswith(COMPILED_MAGIC)
    assert cached.stat().st_mode & 0o777 == 0o600
    assert os.stat(cache).st_mode & 0o777 == 0o700


# -- identical decisions: a property against the straightforward definition -----------

COMPONENTS = ["a", "b", "ab", "a.b", "x-y", "a+"]
PATTERN_PARTS = [*COMPONENTS, "*", "**", "a*", "*b", "*.*", "a*b"]
USERS = ["u0", "u1", "u2", "u3"]
TEAM_NAMES = ["t0", "t1", "t2"]
DAY = date(2027, 1, 15)

patterns = st.lists(st.sampled_from(PATTERN_PARTS), min_size=1, max_size=4).map("/".join)
repos = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4).map("/".join)
levels = st.sampled_from(["none", "enrolled", "verified"])
graces = st.one_of(st.none(), st.sampled_from([DAY - timedelta(days=1), DAY, DAY + timedelta(1)]))


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    names = draw(st.lists(st.sampled_from(TEAM_NAMES), unique=True))
    teams = {
        n: Team(
            n,
            tuple(draw(st.lists(st.sampled_from(USERS), unique=True))),
            draw(levels),
            draw(graces),
            draw(st.sampled_from(["enforce", "report"])),
            line=i + 1,
        )
        for i, n in enumerate(names)
    }
    team_lists = st.lists(st.sampled_from(names), unique=True) if names else st.just([])
    rules = tuple(
        RepoRule(
            draw(patterns),
            tuple(draw(team_lists)),
            tuple(draw(team_lists)),
            draw(st.booleans()),
            draw(st.one_of(st.none(), levels)),
            draw(graces),
            draw(st.sampled_from([None, "enforce", "report"])),
            line=100 + i,
        )
        for i in range(draw(st.integers(0, 8)))
    )
    return Policy(ServerSettings(), TwoFactorSettings(), teams, rules, source="p.yaml")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies(),
    repo=repos,
    user=st.sampled_from(USERS),
    action=st.sampled_from(["read", "write"]),
    enrolled=st.booleans(),
    verified=st.booleans(),
)
def test_the_compiled_policy_decides_exactly_like_the_policy(
    policy: Policy, repo: str, user: str, action: str, enrolled: bool, verified: bool
) -> None:
    loaded = load_compiled(dump_compiled(policy))
    assert loaded.matching_rules(repo) == reference_rules(policy, repo)
    assert policy.matching_rules(repo) == reference_rules(policy, repo)
    assert loaded.teams_of(user) == reference_teams(policy, user)
    facts = decision.UserFacts(
        user, enrolled=enrolled, verified_until=NOW + timedelta(hours=1) if verified else None
    )
    assert decision.decide(loaded, facts, repo, action, NOW) == decision.decide(
        policy, facts, repo, action, NOW
    )
    assert loaded == policy


@pytest.mark.parametrize("size", [0, 1, 1000, model._SMALL_FILE, model._SMALL_FILE + 1])
def test_the_policy_file_digest_is_its_sha256(size: int) -> None:
    import hashlib

    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert model.file_digest(data) == hashlib.sha256(data).hexdigest()
