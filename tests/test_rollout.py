"""The rollout at a glance: who has 2FA, per team, on one screen, one page and one metric.

An admin rolls two-step verification out over seven people in four teams: platform
enforces it, web has a grace period ending in two weeks, contractors are in report
mode, ops has it, and one user is in no team; docs is public. They ask `gatekeeper
audit` and get the answer in one line and one screen; they publish the HTML page
(rendered here in a real headless Chromium and read back), scrape the Prometheus
metrics (read back with Prometheus' own parser), and export the log for Datasette.
Every figure is held to the JSON report, so the four views cannot disagree. The user in
the grace period sees their date, the days left and the command.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from testing.installation import Installation

CI = os.environ.get("CI") == "true"
TODAY = datetime.now(timezone.utc).date()
GRACE = TODAY + timedelta(days=14)

POLICY = f"""\
teams:
  platform:
    members: [alice, bob]
    require_2fa: enrolled
  web:
    members: [carol, dave]
    require_2fa: enrolled
    grace_until: {GRACE.isoformat()}
  contractors:
    members: [erin]
    require_2fa: enrolled
    mode: report
  ops:
    members: [gina]
    require_2fa: enrolled
repositories:
  - match: platform/*
    read: [contractors, ops]
    write: [platform]
  - match: web/*
    write: [web]
  - match: docs
    public: true
    write: [platform, web]
"""
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "gina")
SUMMARY = (
    "2FA rollout: 5 of 7 users meet their level (71%); 2 missing: "
    f"carol (web, grace ends {GRACE.isoformat()}, in 14 days), erin (contractors, report mode)"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    inst = Installation(tmp_path_factory.mktemp("rollout") / "gk", POLICY).init()
    for repo in ("platform/api", "web/site", "docs"):
        inst.repo(repo)
    keys = {name: inst.add_user(name)[1] for name in USERS}
    for name in ("alice", "bob", "dave", "gina"):
        inst.enroll(name)
    inst.gk("2fa", "enroll", "erin", "--no-qr")  # pending, not confirmed
    # Refusals for the log: frank has no access; a forged repository name.
    inst.shell(keys["frank"], "git-upload-pack 'platform/api'")
    inst.shell(keys["frank"], "git-receive-pack 'web/site'")
    inst.shell(keys["erin"], "git-receive-pack 'platform/api'")
    inst.keys_by_user = keys  # type: ignore[attr-defined]
    return inst


def report_json(site: Installation) -> dict[str, Any]:
    return dict(json.loads(site.gk("audit", "--format", "json").stdout))


def test_the_default_audit_answers_in_one_line_and_one_screen(site: Installation) -> None:
    out = site.gk("audit").stdout
    lines = out.splitlines()
    assert lines[0] == SUMMARY
    assert max(len(line) for line in lines[1:]) <= 100, out
    rows = {line.split()[0]: line.split() for line in lines[3:10]}
    assert sorted(rows) == sorted(USERS)
    assert rows["carol"][1:8] == [
        "web",
        "none",
        "enrolled",
        "no",
        f"{GRACE.isoformat()},",
        "in",
        "14",
    ]
    assert rows["erin"][1:6] == ["contractors", "pending", "enrolled", "no", "report"]
    assert rows["frank"][1:5] == ["-", "none", "none", "yes"]
    team_lines = {line.split()[0]: line.split() for line in lines[12:16]}
    assert team_lines["web"] == [
        "web",
        "enrolled",
        "2",
        "1",
        "50%",
        "0",
        GRACE.isoformat(),
        "enforce",
    ]
    assert team_lines["contractors"][1:5] == ["enrolled", "1", "0", "0%"]
    detail = site.gk("audit", "--detail").stdout
    assert detail.splitlines()[0] == SUMMARY and "repository rules" in detail


def test_json_and_csv_carry_the_summary(site: Installation) -> None:
    data = report_json(site)["rollout"]
    assert data["summary"] == SUMMARY
    assert (data["users"], data["meeting"], data["percent"]) == (7, 5, 71)
    assert [m["user"] for m in data["missing"]] == ["carol", "erin"]
    assert data["missing"][0]["days_left"] == 14
    assert data["nearest_deadline"] == GRACE.isoformat()
    per_team = {t["team"]: (t["members"], t["meeting"]) for t in data["per_team"]}
    assert per_team == {"platform": (2, 2), "web": (2, 1), "contractors": (1, 0), "ops": (1, 1)}
    csv_lines = site.gk("audit", "--format", "csv").stdout.splitlines()
    header = csv_lines[0].split(",")
    assert header[-4:] == ["applies", "meets", "deadline", "days_left"]
    carol = next(line for line in csv_lines if line.startswith("carol,"))
    assert carol.endswith(f",enrolled,no,{GRACE.isoformat()},14")


def test_prometheus_metrics_parse_and_agree_with_the_report(site: Installation) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    data = report_json(site)["rollout"]
    text = site.gk("audit", "--format", "prometheus").stdout
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("gatekeeper_users_missing_level_total", ())] == len(data["missing"])
    for team in data["per_team"]:
        key = ("gatekeeper_users_missing_level", (("team", team["team"]),))
        assert samples[key] == team["members"] - team["meeting"]
    by_state: dict[tuple[str, str], int] = {}
    for user in data["per_user"]:
        for team in user["teams"] or [""]:
            by_state[(team, user["state"])] = by_state.get((team, user["state"]), 0) + 1
    for (team, state), n in by_state.items():
        assert samples[("gatekeeper_users", (("state", state), ("team", team)))] == n
    seconds = samples[("gatekeeper_deadline_seconds", ())]
    assert 14 * 86400 < seconds <= 15 * 86400
    refusals = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "gatekeeper_refusals"
    }
    assert refusals == data["refusals"]["by_reason"]
    assert refusals["not-authorized"] == 3  # frank twice, erin writing


class DomReader(HTMLParser):
    """Every element's `data-` attributes, by id and by class."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.by_class: dict[str, list[dict[str, str]]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        data = {k[5:]: v for k, v in values.items() if k.startswith("data-")}
        if "id" in values:
            self.by_id[values["id"]] = data
        for cls in values.get("class", "").split():
            self.by_class.setdefault(cls, []).append(data)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Chromium is needed to render the HTML page (scripts/test.sh installs it)"
        if CI:
            pytest.fail(message + " (CI=true: not skipping)")
        pytest.skip(message)
    return found


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def test_the_html_page_renders_in_chromium_and_agrees_with_the_report(
    site: Installation, tmp_path: Path
) -> None:
    browser = chromium()
    page = tmp_path / "rollout.html"
    site.gk("audit", "--html", str(page))
    text = page.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    profile = tmp_path / "profile"
    rendered = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    dom = DomReader()
    dom.feed(rendered.stdout)
    data = report_json(site)["rollout"]
    summary = dom.by_id["summary"]
    assert (int(summary["users"]), int(summary["meeting"]), int(summary["percent"])) == (
        data["users"],
        data["meeting"],
        data["percent"],
    )
    assert data["summary"] in rendered.stdout.replace("&amp;", "&")
    teams = {t["team"]: (int(t["members"]), int(t["meeting"])) for t in dom.by_class["team"]}
    assert teams == {t["team"]: (t["members"], t["meeting"]) for t in data["per_team"]}
    missing = [(m["user"], m["deadline"]) for m in dom.by_class["missing"]]
    assert missing == [(m["user"], m["deadline"] or "") for m in data["missing"]]
    users = {u["user"]: u["meets"] == "true" for u in dom.by_class["user"]}
    assert users == {u["user"]: u["meets"] for u in data["per_user"]}
    refusals = {r["reason"]: int(r["count"]) for r in dom.by_class["refusal"]}
    assert refusals == data["refusals"]["by_reason"]
    curve = dom.by_id["curve"]
    assert int(curve["points"]) == len(data["enrolled_over_time"])
    assert int(curve["last"]) == data["enrolled_over_time"][-1][1] == 4
    shot = tmp_path / "rollout.png"
    subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1100,1500",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("GATEKEEPER_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_the_export_is_a_typed_indexed_searchable_sqlite_file(
    site: Installation, tmp_path: Path
) -> None:
    target = tmp_path / "audit.db"
    result = site.gk("log", "export", str(target))
    assert "exported" in result.stdout
    again = site.gk("log", "export", str(target), check=False)
    assert again.returncode != 0 and "exists" in again.stderr
    db = sqlite3.connect(target)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"audit", "users", "keys", "audit_fts"} <= tables
    assert db.execute("SELECT count(*) FROM audit").fetchone()[0] == len(site.audit())
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == len(USERS)
    types = {r[1]: r[2] for r in db.execute("PRAGMA table_info(audit)")}
    assert types["seq"] == "INTEGER" and types["at"] == "TEXT"
    indexes = {r[1] for r in db.execute("PRAGMA index_list(audit)")}
    assert any("user" in name for name in indexes) and any("repo" in name for name in indexes)
    hits = db.execute(
        "SELECT audit.user FROM audit JOIN audit_fts ON audit.rowid = audit_fts.rowid "
        "WHERE audit_fts MATCH 'frank'"
    ).fetchall()
    assert hits and all(h[0] == "frank" for h in hits)
    states = dict(db.execute("SELECT user, state FROM users").fetchall())
    assert states["erin"] == "pending" and states["alice"] == "enrolled"
    dump = "\n".join(db.iterdump())
    assert "secret" not in dump.lower() or "totp" not in dump.lower()
    assert "code_hash" not in dump and "token" not in dump
    db.close()


def test_a_user_in_the_grace_period_sees_the_date_the_days_and_the_command(
    site: Installation,
) -> None:
    carol = site.keys_by_user["carol"]  # type: ignore[attr-defined]
    push = site.shell(carol, "git-receive-pack 'web/site'", stdin="0000")
    assert f"allowed until {GRACE.isoformat()} (grace period, 14 days left)" in push.stderr
    assert "ssh git@git.example.com 2fa enroll" in push.stderr
    info = site.shell(carol, "info").stdout
    line = next(line for line in info.splitlines() if "web/site" in line)
    assert f"ok until {GRACE.isoformat()} (14 days left); then refused." in line
    assert "Enroll with: ssh git@git.example.com 2fa enroll" in line
