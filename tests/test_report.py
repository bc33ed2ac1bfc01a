"""`gatekeeper audit`, as an admin reads it: who has two-step verification, who does not
meet the level that applies where, and until when they are let through.

One installation, set up like a team mid-rollout: users with none, pending and
enrolled (one with a live verified session), a team in its grace period, a repository
in report mode, a repository that needs `verified`, and a team member who is not a
user. Every output format must say the same thing, and it must match the store."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gatekeeper.cli.main import cli
from gatekeeper.report import CSV_COLUMNS, iso
from gatekeeper.store import Store
from testing.installation import Installation, avoid_step_boundary

POLICY = """\
teams:
  platform:
    members: [alice, frank, bob]
    require_2fa: enrolled
  web:
    members: [carol, dave]
    require_2fa: enrolled
    grace_until: 2099-12-31
  contractors:
    members: [erin, ghost]
  ops:
    members: [alice]
    require_2fa: enrolled
repositories:
  - match: platform/*
    read: [contractors]
    write: [platform]
  - match: platform/secrets
    require_2fa: verified
  - match: web/**
    write: [web]
  - match: pilot
    read: [contractors]
    require_2fa: enrolled
    mode: report
  - match: ops/tools
    write: [ops]
"""

REPOS = ("platform/api", "platform/secrets", "web/site", "pilot")

# (scope, name, repo, user, state, level, status, by, reason): everything the report
# must say about who misses what. ops/tools is not on disk: judged by its own name.
EXPECTED = {
    ("team", "platform", None, "bob", "none", "enrolled", "refused", None, "2fa-not-enrolled"),
    ("team", "web", None, "carol", "pending", "enrolled", "grace", "2099-12-31",
     "2fa-not-enrolled"),
    ("team", "web", None, "dave", "none", "enrolled", "grace", "2099-12-31", "2fa-not-enrolled"),
    *(
        ("rule", rule, "platform/secrets", user, state, "verified", "refused", None, reason)
        for rule in ("platform/*", "platform/secrets")
        for user, state, reason in (
            ("bob", "none", "2fa-not-enrolled"),
            ("erin", "none", "2fa-not-enrolled"),
            ("frank", "enrolled", "2fa-not-verified"),
        )
    ),
    ("rule", "platform/*", "platform/api", "bob", "none", "enrolled", "refused", None,
     "2fa-not-enrolled"),
    ("rule", "web/**", "web/site", "carol", "pending", "enrolled", "grace", "2099-12-31",
     "2fa-not-enrolled"),
    ("rule", "web/**", "web/site", "dave", "none", "enrolled", "grace", "2099-12-31",
     "2fa-not-enrolled"),
    ("rule", "pilot", "pilot", "erin", "none", "enrolled", "report", None, "2fa-not-enrolled"),
}  # fmt: skip
MISSING_USERS = ["bob", "carol", "dave", "erin", "frank"]
STATES = {"alice": "enrolled", "bob": "none", "carol": "pending", "dave": "none",
          "erin": "none", "frank": "enrolled"}  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    gk = Installation(tmp_path_factory.mktemp("report") / "gk", POLICY).init()
    for repo in REPOS:
        gk.repo(repo)
    keys = {name: gk.add_user(name)[1] for name in STATES}
    second = gk.keys / "alice-laptop"  # a second key: count, newest and oldest differ
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(second)], check=True)
    time.sleep(1.1)  # key times are whole seconds
    gk.gk("key", "add", "alice", f"{second}.pub")
    gk.enroll("alice")
    gk.enroll("frank")
    gk.gk("2fa", "enroll", "carol", "--no-qr")  # pending
    avoid_step_boundary()
    verified = gk.shell(keys["alice"], f"2fa verify {gk.code('alice')}")
    assert verified.returncode == 0, verified.stderr
    return gk


def store_rows(gk: Installation) -> dict[str, dict[str, Any]]:
    with Store.open(gk.state) as store:
        return {row["user"]: row for row in store.user_status()}


def shortfalls_from_json(data: dict[str, Any]) -> set[tuple[Any, ...]]:
    found = set()
    for team in data["teams"]:
        for s in team["missing"]:
            assert s["name"] == team["team"] and s["scope"] == "team"
            found.add(_key(s))
    for rule in data["rules"]:
        for repo in rule["repos"]:
            for s in repo["missing"]:
                assert s["name"] == rule["match"] and s["repo"] == repo["repo"]
                found.add(_key(s))
    return found


def _key(s: dict[str, Any]) -> tuple[Any, ...]:
    return (
        s["scope"],
        s["name"],
        s["repo"] or None,
        s["user"],
        s["state"],
        s["level"],
        s["status"],
        s["by"] or None,
        s["reason"],
    )


def audit_json(gk: Installation, *args: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gk.gk("audit", "--format", "json", *args).stdout)
    return data


def audit_csv(gk: Installation, *args: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(gk.gk("audit", "--format", "csv", *args).stdout)))


def table_sections(text: str) -> dict[str, list[dict[str, str]]]:
    """The table output as {section title: rows}, splitting columns on 2+ spaces."""
    sections: dict[str, list[dict[str, str]]] = {}
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        title = re.sub(r"\s*\(.*", "", lines[0])
        if len(lines) < 2 or lines[1] == "(none)":
            sections[title] = []
            continue
        header = [h.lower() for h in re.split(r"\s{2,}", lines[1].strip())]
        rows = [
            dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True))
            for line in lines[2:]
            if not line.startswith("note:")
        ]
        sections[title] = rows
    return sections


# -- what the report says --------------------------------------------------------------


def test_json_lists_every_user_as_the_store_knows_them(site: Installation) -> None:
    data = audit_json(site)
    stored = store_rows(site)
    users = {u["user"]: u for u in data["users"]}
    assert set(users) == set(STATES)
    for name, row in stored.items():
        u = users[name]
        assert u["state"] == STATES[name] == row["state"]
        for key in ("enrolled_at", "last_verified", "verified_until", "locked_until"):
            assert u[key] == iso(row[key]), (name, key)
        assert (u["keys"], u["newest_key"], u["oldest_key"]) == (
            row["keys"],
            iso(row["newest_key"]),
            iso(row["oldest_key"]),
        )
    assert (
        users["alice"]["keys"] == 2 and users["alice"]["newest_key"] >= users["alice"]["oldest_key"]
    )
    # Only alice proved a code: a live session, and it counts as `verified`.
    assert [n for n, u in users.items() if u["verified_until"]] == ["alice"]
    assert users["alice"]["teams"] == ["platform", "ops"]
    assert users["erin"]["teams"] == ["contractors"]
    assert users["alice"]["missing"] == []
    assert users["frank"]["missing"] == ["verified"]
    assert users["bob"]["missing"] == ["enrolled", "verified"]


def test_json_says_who_misses_which_level_where_and_until_when(site: Installation) -> None:
    data = audit_json(site)
    assert shortfalls_from_json(data) == EXPECTED
    assert data["missing_users"] == MISSING_USERS
    teams = {t["team"]: t for t in data["teams"]}
    assert teams["web"]["grace_until"] == "2099-12-31" and teams["web"]["mode"] == "enforce"
    assert teams["contractors"]["unknown_members"] == ["ghost"]
    rules = {r["match"]: r for r in data["rules"]}
    assert [r["repo"] for r in rules["platform/*"]["repos"]] == ["platform/api", "platform/secrets"]
    # A rule without a glob is judged by its own name, even before the repository exists.
    assert rules["ops/tools"]["repos"] == [
        {"repo": "ops/tools", "exists": False, "users": ["alice"], "missing": []}
    ]
    assert rules["pilot"]["mode"] == "report"


def test_csv_says_the_same_as_json(site: Installation) -> None:
    rows = audit_csv(site)
    stored = store_rows(site)
    shortfalls = {
        (
            r["scope"],
            r["name"],
            r["repo"] or None,
            r["user"],
            r["state"],
            r["level"],
            r["status"],
            r["by"] or None,
            r["reason"],
        )
        for r in rows
        if r["scope"]
    }
    assert shortfalls == EXPECTED
    # alice misses nothing: one row with her columns and an empty scope.
    alice = [r for r in rows if r["user"] == "alice"]
    assert len(alice) == 1 and alice[0]["scope"] == ""
    for r in rows:
        row = stored[r["user"]]
        assert r["state"] == row["state"]
        assert r["keys"] == str(row["keys"])
        assert r["verified_until"] == (iso(row["verified_until"]) or "")
        assert r["newest_key"] == iso(row["newest_key"])
        assert r["teams"] == ";".join(
            {"alice": ["platform", "ops"], "frank": ["platform"], "bob": ["platform"]}.get(
                r["user"], ["web"] if r["user"] in ("carol", "dave") else ["contractors"]
            )
        )
    only_missing = audit_csv(site, "--missing-only")
    assert {r["user"] for r in only_missing} == set(MISSING_USERS)
    assert all(r["scope"] for r in only_missing)


def test_the_table_says_the_same_as_json(site: Installation) -> None:
    sections = table_sections(site.gk("audit", "--detail").stdout)
    users = {r["user"]: r for r in sections["users"]}
    assert {n: r["2fa"] for n, r in users.items()} == STATES
    assert users["alice"]["keys"] == "2" and users["alice"]["verified_until"] != "-"
    assert users["frank"]["missing"] == "verified" and users["alice"]["missing"] == "-"
    teams = {r["team"]: r for r in sections["teams"]}
    assert teams["web"]["grace_until"] == "2099-12-31" and teams["web"]["missing"] == "2"
    assert teams["platform"]["missing"] == "1"
    rules = {r["rule"]: r for r in sections["repository rules"]}
    assert rules["pilot"]["mode"] == "report" and rules["platform/*"]["missing"] == "4"
    table = {
        (
            r["scope"],
            r["name"],
            None if r["repo"] == "-" else r["repo"],
            r["user"],
            r["2fa"],
            r["level"],
            r["status"],
            None if r["by"] == "-" else r["by"],
            r["reason"],
        )
        for r in sections["not meeting the level that applies"]
    }
    assert table == EXPECTED
    detail = site.gk("audit", "--detail").stdout
    assert "note: team 'contractors' lists 'ghost', who is not a user" in detail


# -- filters ---------------------------------------------------------------------------


def test_team_keeps_its_members_and_the_places_they_reach(site: Installation) -> None:
    data = audit_json(site, "--team", "web")
    assert [u["user"] for u in data["users"]] == ["carol", "dave"]
    assert [t["team"] for t in data["teams"]] == ["web"]
    assert [r["match"] for r in data["rules"]] == ["web/**"]
    assert shortfalls_from_json(data) == {s for s in EXPECTED if s[3] in ("carol", "dave")}


def test_repo_keeps_that_repository_and_who_reaches_it(site: Installation) -> None:
    data = audit_json(site, "--repo", "platform/secrets.git")
    assert [u["user"] for u in data["users"]] == ["alice", "bob", "erin", "frank"]
    assert [r["match"] for r in data["rules"]] == ["platform/*", "platform/secrets"]
    assert {t["team"] for t in data["teams"]} == {"platform", "contractors"}
    rule_rows = {s for s in shortfalls_from_json(data) if s[0] == "rule"}
    assert rule_rows == {s for s in EXPECTED if s[2] == "platform/secrets"}
    glob = audit_json(site, "--repo", "web/*")
    assert [u["user"] for u in glob["users"]] == ["carol", "dave"]


def test_missing_only_drops_everyone_and_everything_that_is_fine(site: Installation) -> None:
    data = audit_json(site, "--missing-only")
    assert [u["user"] for u in data["users"]] == MISSING_USERS
    assert {t["team"] for t in data["teams"]} == {"platform", "web"}
    assert "ops/tools" not in {r["match"] for r in data["rules"]}
    assert all(repo["missing"] for r in data["rules"] for repo in r["repos"])
    assert shortfalls_from_json(data) == EXPECTED


def test_an_unknown_team_or_repository_is_a_clean_error(site: Installation) -> None:
    for args, text in (
        (("--team", "nope"), "no such team in the policy: 'nope'"),
        (("--repo", "nothing/here"), "no repository rule covers 'nothing/here'"),
        (("--repo", "../etc"), "not a valid repository name"),
    ):
        result = site.gk("audit", *args, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("gatekeeper: error: ") and text in result.stderr
        assert "Traceback" not in result.stderr


# -- for cron and CI -------------------------------------------------------------------


def test_fail_if_missing_exits_1_only_when_someone_misses_a_level(site: Installation) -> None:
    assert site.gk("audit", check=False).returncode == 0
    failing = site.gk("audit", "--fail-if-missing", "--format", "csv", check=False)
    assert failing.returncode == 1
    assert "5 user(s) do not meet the level that applies: bob, carol, dave, erin, frank" in (
        failing.stderr
    )
    assert failing.stdout.startswith("user,teams,state")  # the report is still printed
    # In a grace period still counts as missing: the point is to find them before the date.
    assert site.gk("audit", "--team", "web", "--fail-if-missing", check=False).returncode == 1
    clean = site.gk("audit", "--team", "ops", "--fail-if-missing", check=False)
    assert clean.returncode == 0, clean.stderr
    assert site.gk("audit", "--repo", "ops/tools", "--fail-if-missing").returncode == 0


# -- would refuse ----------------------------------------------------------------------


def test_would_refuse_lists_who_only_grace_or_report_mode_lets_through(
    site: Installation,
) -> None:
    data = json.loads(site.gk("audit", "--would-refuse", "--format", "json").stdout)
    found = {
        (w["user"], w["repo"], tuple(w["actions"]), w["now"], w["reason"], w["by"])
        for w in data["would_refuse"]
    }
    assert found == {
        ("carol", "web/site", ("read", "write"), "grace-period", "2fa-not-enrolled", "2099-12-31"),
        ("dave", "web/site", ("read", "write"), "grace-period", "2fa-not-enrolled", "2099-12-31"),
        ("erin", "pilot", ("read",), "report-only", "2fa-not-enrolled", None),
    }
    rows = list(
        csv.DictReader(io.StringIO(site.gk("audit", "--would-refuse", "--format", "csv").stdout))
    )
    assert {(r["user"], r["repo"], r["actions"]) for r in rows} == {
        ("carol", "web/site", "read,write"),
        ("dave", "web/site", "read,write"),
        ("erin", "pilot", "read"),
    }
    table = site.gk("audit", "--would-refuse").stdout
    assert table.startswith("would be refused if enforcement were on (3)")
    assert "repository rule 'pilot' (line" in table


def test_would_refuse_matches_what_enforcement_would_really_do(
    site: Installation, tmp_path: Path
) -> None:
    """Today `check` allows each listed access; with grace and report mode removed from
    the policy file, `check` refuses exactly those, and every other answer stays."""
    listed = json.loads(site.gk("audit", "--would-refuse", "--format", "json").stdout)
    pairs = {(w["user"], w["repo"], a) for w in listed["would_refuse"] for a in w["actions"]}
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        site.config.read_text()
        .replace("    grace_until: 2099-12-31\n", "")
        .replace("    mode: report\n", "")
    )
    runner = CliRunner()
    env = {"GATEKEEPER_CACHE_DIR": str(tmp_path / "cache")}

    def allowed(config: Path, user: str, repo: str, action: str) -> bool:
        args = ["--config", str(config), "check", user, repo, action]
        result = runner.invoke(cli, args, env=env)
        assert result.exit_code in (0, 1), result.output
        return result.exit_code == 0

    for user in STATES:
        for repo in (*REPOS, "ops/tools"):
            for action in ("read", "write"):
                today = allowed(site.config, user, repo, action)
                enforced = allowed(strict, user, repo, action)
                if (user, repo, action) in pairs:
                    assert today and not enforced, (user, repo, action)
                else:
                    assert today == enforced, (user, repo, action)


def test_a_grace_date_that_has_passed_is_refused_not_grace(tmp_path: Path) -> None:
    gk = Installation(
        tmp_path / "gk",
        "teams:\n  old:\n    members: [bob]\n    require_2fa: enrolled\n"
        "    grace_until: 2020-01-31\nrepositories:\n  - match: legacy\n    write: [old]\n",
    ).init()
    gk.add_user("bob")
    data = audit_json(gk)
    assert shortfalls_from_json(data) == {
        ("team", "old", None, "bob", "none", "enrolled", "refused", None, "2fa-not-enrolled"),
        ("rule", "legacy", "legacy", "bob", "none", "enrolled", "refused", None,
         "2fa-not-enrolled"),
    }  # fmt: skip
    assert (
        json.loads(gk.gk("audit", "--would-refuse", "--format", "json").stdout)["would_refuse"]
        == []
    )


def test_an_empty_installation_reports_nothing_missing(tmp_path: Path) -> None:
    gk = Installation(tmp_path / "gk", "teams: {}\n").init()
    data = audit_json(gk, "--fail-if-missing")
    assert data["users"] == [] and data["missing_users"] == []
    assert gk.gk("audit").stdout.startswith("2FA rollout: 0 of 0 users meet their level")
    table = gk.gk("audit", "--detail").stdout
    assert "not meeting the level that applies (0 user(s), 0 place(s))" in table
    csv = gk.gk("audit", "--format", "csv").stdout.splitlines()
    assert csv == [",".join((*CSV_COLUMNS, "applies", "meets", "deadline", "days_left"))]
