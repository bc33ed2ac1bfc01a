"""The audit report, for admins: plain functions, no click.

- `build_report`: every user's two-step state and keys, and for each team and each
  repository rule who does not meet the level that applies, and until when they are
  let through (grace date, report mode). Every verdict comes from `decision.decide`.
- `would_refuse`: who is let through today only by a grace period or report mode
  (the same decisions against a copy of the policy with both taken away).

The audit log itself (checking, reading, pruning) is gatekeeper.auditlog.

"Meets verified" here means a currently valid session on any of the user's keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from gatekeeper import decision
from gatekeeper.decision import Decision, UserFacts, decide
from gatekeeper.errors import InputError
from gatekeeper.frontend import facts_of
from gatekeeper.policy import Policy, RepoRule, Team
from gatekeeper.record import evolve
from gatekeeper.sshcmd import list_repositories, normalize_repo_name
from gatekeeper.store import Store

# -- time ---------------------------------------------------------------------------


def iso(ts: float | None) -> str | None:
    """A Unix time as `2027-01-31T14:00:00Z` (JSON and CSV), None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the audit report -----------------------------------------------------------------

STATUS_REFUSED = "refused"
STATUS_GRACE = "grace"
STATUS_REPORT = "report"


@dataclass(frozen=True)
class Shortfall:
    """One user who does not meet the level that applies, in one team or one repository."""

    user: str
    state: str
    """The user's two-step state: none, pending or enrolled."""
    scope: str
    """"team" or "rule"."""
    name: str
    """The team's name or the rule's match pattern."""
    repo: str | None
    level: str
    """The level that applies."""
    status: str
    """refused (now), grace (allowed until `by`), report (allowed; logged as would-refuse)."""
    by: date | None
    reason: str
    """The refusal's reason code (what it is, or would be once enforced)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "state": self.state,
            "scope": self.scope,
            "name": self.name,
            "repo": self.repo,
            "level": self.level,
            "status": self.status,
            "by": self.by.isoformat() if self.by else None,
            "reason": self.reason,
        }


@dataclass
class UserLine:
    user: str
    teams: tuple[str, ...]
    state: str
    enrolled_at: int | None
    last_verified: int | None
    verified_until: int | None
    locked_until: int | None
    keys: int
    newest_key: int | None
    oldest_key: int | None
    recovery_codes_left: int
    facts: UserFacts
    security_keys: int = 0
    shortfalls: list[Shortfall] = field(default_factory=list)
    levels: list[str] = field(default_factory=list)
    """The level of every team and repository through which the user reaches anything."""

    @property
    def level(self) -> str:
        """The strictest level that applies to the user anywhere."""
        return decision.strictest(self.levels)

    @property
    def missing(self) -> list[str]:
        """The levels this user misses somewhere, weakest first."""
        levels = {s.level for s in self.shortfalls}
        return sorted(levels, key=decision.LEVEL_ORDER.__getitem__)

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "teams": list(self.teams),
            "state": self.state,
            "enrolled_at": iso(self.enrolled_at),
            "last_verified": iso(self.last_verified),
            "verified_until": iso(self.verified_until),
            "locked_until": iso(self.locked_until),
            "keys": self.keys,
            "security_keys": self.security_keys,
            "newest_key": iso(self.newest_key),
            "oldest_key": iso(self.oldest_key),
            "recovery_codes_left": self.recovery_codes_left,
            "missing": self.missing,
        }


@dataclass
class TeamLine:
    team: Team
    members: list[str]
    unknown_members: list[str]
    shortfalls: list[Shortfall]

    def to_json(self) -> dict[str, Any]:
        t = self.team
        return {
            "team": t.name,
            "line": t.line,
            "require_2fa": t.require_2fa,
            "mode": t.mode,
            "grace_until": t.grace_until.isoformat() if t.grace_until else None,
            "members": self.members,
            "unknown_members": self.unknown_members,
            "missing": [s.to_json() for s in self.shortfalls],
        }


@dataclass
class RepoLine:
    repo: str
    exists: bool
    users: list[str]
    """Who may reach it (read or write; for a public repository, who may write)."""
    shortfalls: list[Shortfall]


@dataclass
class RuleLine:
    rule: RepoRule
    repos: list[RepoLine]

    @property
    def shortfalls(self) -> list[Shortfall]:
        return [s for r in self.repos for s in r.shortfalls]

    def to_json(self) -> dict[str, Any]:
        r = self.rule
        return {
            "match": r.match,
            "line": r.line,
            "require_2fa": r.require_2fa,
            "mode": r.mode,
            "grace_until": r.grace_until.isoformat() if r.grace_until else None,
            "public": r.public,
            "repos": [
                {
                    "repo": x.repo,
                    "exists": x.exists,
                    "users": x.users,
                    "missing": [s.to_json() for s in x.shortfalls],
                }
                for x in self.repos
            ],
        }


@dataclass(frozen=True)
class WouldRefuse:
    """Someone let through today only by a grace period or report mode."""

    user: str
    state: str
    repo: str
    actions: tuple[str, ...]
    now: str
    """Today's reason code: grace-period or report-only."""
    reason: str
    """The refusal's reason code once enforced."""
    level: str
    by: date | None
    sources: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "state": self.state,
            "repo": self.repo,
            "actions": list(self.actions),
            "now": self.now,
            "reason": self.reason,
            "level": self.level,
            "by": self.by.isoformat() if self.by else None,
            "sources": list(self.sources),
        }


@dataclass
class Report:
    generated_at: float
    policy_sha256: str
    users: list[UserLine]
    teams: list[TeamLine]
    rules: list[RuleLine]
    would_refuse: list[WouldRefuse]

    @property
    def shortfalls(self) -> list[Shortfall]:
        return [s for t in self.teams for s in t.shortfalls] + [
            s for r in self.rules for s in r.shortfalls
        ]

    @property
    def missing_users(self) -> list[str]:
        return sorted({s.user for s in self.shortfalls})

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": iso(self.generated_at),
            "policy_sha256": self.policy_sha256,
            "users": [u.to_json() for u in self.users],
            "teams": [t.to_json() for t in self.teams],
            "rules": [r.to_json() for r in self.rules],
            "missing_users": self.missing_users,
        }


CSV_COLUMNS = (
    "user",
    "teams",
    "state",
    "enrolled_at",
    "last_verified",
    "verified_until",
    "locked_until",
    "keys",
    "newest_key",
    "oldest_key",
    "scope",
    "name",
    "repo",
    "level",
    "status",
    "by",
    "reason",
)


def csv_rows(report: Report, *, missing_only: bool = False) -> list[dict[str, Any]]:
    """One row per shortfall (the user's columns repeated), and one row for each user
    who misses nothing (empty scope), unless `missing_only`."""
    rows: list[dict[str, Any]] = []
    by_user: dict[str, list[Shortfall]] = {}
    for s in report.shortfalls:
        by_user.setdefault(s.user, []).append(s)
    for u in report.users:
        base = u.to_json()
        base["teams"] = ";".join(u.teams)
        base = {k: ("" if base.get(k) is None else base[k]) for k in CSV_COLUMNS[:10]}
        found = by_user.get(u.user, [])
        if not found and not missing_only:
            rows.append({**base, **dict.fromkeys(CSV_COLUMNS[10:], "")})
        for s in found:
            js = s.to_json()
            rows.append({**base, **{k: "" if js[k] is None else js[k] for k in CSV_COLUMNS[10:]}})
    return rows


def strict_policy(policy: Policy) -> Policy:
    """The policy with every grace period and report mode taken away."""
    teams = {n: evolve(t, mode="enforce", grace_until=None) for n, t in policy.teams.items()}
    rules = tuple(evolve(r, mode=None, grace_until=None) for r in policy.rules)
    return evolve(policy, teams=teams, rules=rules)


def existing_repos(root: Path) -> list[str]:
    """The repositories under `root` by their canonical names (`platform/api`); an
    alias (a symlink) is not a repository of its own."""
    return [repo.name for repo in list_repositories(root)]


def user_facts(row: Mapping[str, Any]) -> UserFacts:
    """A user_status row as the decision sees it, with a session on any key."""
    return facts_of(
        row["user"],
        enrolled=row["state"] == "enrolled",
        pending=row["state"] == "pending",
        verified_until=row["verified_until"],
        locked_until=row["locked_until"],
    )


def _shortfall(
    actual: Decision, strict: Decision, user: UserLine, scope: str, name: str, repo: str | None
) -> Shortfall | None:
    unmet = [r for r in actual.requirements if not r.met]
    if not unmet:
        return None
    if not actual.allowed:
        status, by = STATUS_REFUSED, None
    elif actual.reason == decision.GRACE_PERIOD:
        graces = [r.grace_until for r in unmet if not r.soft and r.grace_until is not None]
        status, by = STATUS_GRACE, min(graces) if graces else None
    else:
        status, by = STATUS_REPORT, None
    reason = actual.reason if not actual.allowed else strict.reason
    return Shortfall(user.user, user.state, scope, name, repo, actual.level, status, by, reason)


TEAM_PROBE = "team-probe"


def _team_decisions(
    policy: Policy, strict: Policy, team: Team, facts: UserFacts, now: datetime
) -> tuple[Decision, Decision]:
    """The team's own requirement through `decide`: a policy holding only the team and
    a rule that grants it one repository."""
    probe = (RepoRule(match=TEAM_PROBE, read=(team.name,)),)
    own = evolve(policy, teams={team.name: team}, rules=probe)
    hard = evolve(strict, teams={team.name: strict.teams[team.name]}, rules=probe)
    return (
        decide(own, facts, TEAM_PROBE, "read", now),
        decide(hard, facts, TEAM_PROBE, "read", now),
    )


@dataclass(frozen=True)
class _Access:
    action: str
    actual: Decision
    strict: Decision


def _access(
    policy: Policy, strict: Policy, facts: UserFacts, repo: str, now: datetime
) -> _Access | None:
    """How a user reaches `repo`: judged for reading, or for writing when anyone may
    read it (public); None when the user cannot reach it at all."""
    action = "read"
    actual = decide(policy, facts, repo, action, now)
    if actual.reason == decision.PUBLIC_READ:
        action = "write"
        actual = decide(policy, facts, repo, action, now)
    if actual.reason == decision.NOT_AUTHORIZED:
        return None
    return _Access(action, actual, decide(strict, facts, repo, action, now))


def _repo_selector(repo: str | None) -> Callable[[str], bool]:
    if repo is None:
        return lambda name: True
    pattern = repo.strip().strip("/").removesuffix(".git")
    if "*" in pattern:
        rule = RepoRule(match=pattern)
        return rule.matches
    name = normalize_repo_name(pattern)
    return lambda candidate: candidate == name


def build_report(
    policy: Policy,
    store: Store,
    *,
    now: float | None = None,
    team: str | None = None,
    repo: str | None = None,
    missing_only: bool = False,
) -> Report:
    """The audit report: users, teams, repository rules and who misses what.

    `team` keeps that team's members; `repo` (a name or a glob) keeps the
    repositories it names and who can reach them; `missing_only` keeps only users,
    teams, rules and repositories with someone who does not meet their level."""
    now = time.time() if now is None else now
    moment = datetime.fromtimestamp(now, timezone.utc)
    strict = strict_policy(policy)
    if team is not None and team not in policy.teams:
        raise InputError(
            f"no such team in the policy: '{team}'.",
            hint=f"teams: {', '.join(policy.teams) or 'none defined'}.",
        )
    selected = _repo_selector(repo)

    rows = store.user_status()
    known_users = {row["user"] for row in rows}
    users: dict[str, UserLine] = {}
    for row in rows:
        users[row["user"]] = UserLine(
            user=row["user"],
            teams=tuple(t.name for t in policy.teams_of(row["user"])),
            state=row["state"],
            enrolled_at=row["enrolled_at"],
            last_verified=row["last_verified"],
            verified_until=row["verified_until"],
            locked_until=row["locked_until"],
            keys=row["keys"],
            newest_key=row["newest_key"],
            oldest_key=row["oldest_key"],
            recovery_codes_left=row["recovery_codes_left"],
            facts=user_facts(row),
            security_keys=row.get("security_keys", 0),
        )
    if team is not None:
        users = {n: u for n, u in users.items() if team in u.teams}

    # Repository rules: the repositories under the root each covers, and its own name.
    on_disk = existing_repos(policy.server.repositories)
    on_disk_set = set(on_disk)
    access: dict[tuple[str, str], _Access | None] = {}
    rule_lines: list[RuleLine] = []
    reachable: set[str] = set()
    for rule in policy.rules:
        covered = [r for r in on_disk if rule.matches(r)]
        if "*" not in rule.match and rule.match not in on_disk_set:
            covered.append(rule.match)
        repo_lines = []
        for name in (r for r in covered if selected(r)):
            granted = {t for m in policy.rules if m.matches(name) for t in (*m.read, *m.write)}
            candidates = {m for t in granted if t in policy.teams for m in policy.teams[t].members}
            who: list[str] = []
            shortfalls: list[Shortfall] = []
            for user in sorted(candidates & users.keys()):
                key = (user, name)
                if key not in access:
                    access[key] = _access(policy, strict, users[user].facts, name, moment)
                found = access[key]
                if found is None:
                    continue
                users[user].levels.append(found.actual.level)
                who.append(user)
                short = _shortfall(
                    found.actual, found.strict, users[user], "rule", rule.match, name
                )
                if short is not None:
                    shortfalls.append(short)
            reachable.update(who)
            repo_lines.append(RepoLine(name, name in on_disk_set, who, shortfalls))
        rule_lines.append(RuleLine(rule, repo_lines))

    if repo is not None:
        if not any(line.repos for line in rule_lines):
            raise InputError(
                f"no repository rule covers '{repo}'.",
                hint="name a repository under the repositories root, or a rule's pattern.",
            )
        users = {n: u for n, u in users.items() if n in reachable}
        rule_lines = [line for line in rule_lines if line.repos]
    if team is not None or repo is not None:
        for line in rule_lines:
            line.repos = [r for r in line.repos if r.users]
        rule_lines = [line for line in rule_lines if line.repos]

    # Teams: each team's own requirement, for its members who are users.
    team_lines: list[TeamLine] = []
    teams_in_scope = {
        t
        for line in rule_lines
        for r in line.repos
        for m in policy.rules
        if m.matches(r.repo)
        for t in (*m.read, *m.write)
    }
    for t in policy.teams.values():
        if team is not None and t.name != team:
            continue
        if repo is not None and t.name not in teams_in_scope:
            continue
        members = [m for m in t.members if m in users]
        unknown = [m for m in t.members if m not in known_users]
        shortfalls = []
        for m in members:
            actual, hard = _team_decisions(policy, strict, t, users[m].facts, moment)
            users[m].levels.append(actual.level)
            short = _shortfall(actual, hard, users[m], "team", t.name, None)
            if short is not None:
                shortfalls.append(short)
        team_lines.append(TeamLine(t, members, unknown, shortfalls))

    for s in [s for t in team_lines for s in t.shortfalls] + [
        s for line in rule_lines for s in line.shortfalls
    ]:
        users[s.user].shortfalls.append(s)

    user_lines = sorted(users.values(), key=lambda u: u.user)
    if missing_only:
        user_lines = [u for u in user_lines if u.shortfalls]
        team_lines = [t for t in team_lines if t.shortfalls]
        for line in rule_lines:
            line.repos = [r for r in line.repos if r.shortfalls]
        rule_lines = [line for line in rule_lines if line.repos]

    refusals = _would_refuse(policy, strict, users, access, moment)
    return Report(now, policy.sha256, user_lines, team_lines, rule_lines, refusals)


def _would_refuse(
    policy: Policy,
    strict: Policy,
    users: Mapping[str, UserLine],
    access: Mapping[tuple[str, str], _Access | None],
    moment: datetime,
) -> list[WouldRefuse]:
    out = []
    for (user, repo), found in sorted(access.items()):
        if found is None or user not in users:
            continue
        facts = users[user].facts
        actions: list[str] = []
        first: tuple[Decision, Decision] | None = None
        for action in decision.ACTIONS:
            actual = decide(policy, facts, repo, action, moment)
            hard = decide(strict, facts, repo, action, moment)
            if actual.allowed and not hard.allowed:
                actions.append(action)
                first = first or (actual, hard)
        if first is None:
            continue
        actual, hard = first
        unmet = [r for r in actual.requirements if not r.met]
        graces = [r.grace_until for r in unmet if not r.soft and r.grace_until is not None]
        out.append(
            WouldRefuse(
                user=user,
                state=users[user].state,
                repo=repo,
                actions=tuple(actions),
                now=actual.reason,
                reason=hard.reason,
                level=hard.level,
                by=min(graces) if actual.reason == decision.GRACE_PERIOD and graces else None,
                sources=tuple(r.source for r in unmet),
            )
        )
    return out
