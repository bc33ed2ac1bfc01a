"""The audit report and the audit log, for admins: plain functions, no click.

- `build_report`: every user's two-step state and keys, and for each team and each
  repository rule who does not meet the level that applies, and until when they are
  let through (grace date, report mode). Every verdict comes from `decision.decide`.
- `would_refuse`: who is let through today only by a grace period or report mode
  (the same decisions against a copy of the policy with both taken away).
- `check_log`: the hash chain and the head file, and for each problem which record
  was edited, deleted, reordered or cut off.
- `parse_when`, `LogFilter`, `follow`, `prune`: reading and pruning the log.

"Meets verified" here means a currently valid session on any of the user's keys.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from datetime import time as dtime
from pathlib import Path
from typing import Any

from gatekeeper import audit as chain
from gatekeeper import decision
from gatekeeper.decision import Decision, UserFacts, decide
from gatekeeper.errors import InputError
from gatekeeper.policy import Policy, RepoRule, Team
from gatekeeper.record import evolve
from gatekeeper.sshcmd import list_repositories, normalize_repo_name
from gatekeeper.store import HEAD_NAME, Recovery, Store, utc_iso

# -- time ---------------------------------------------------------------------------


def iso(ts: float | None) -> str | None:
    """A Unix time as `2027-01-31T14:00:00Z` (JSON and CSV), None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
WHEN_HINT = (
    "use a date (2027-01-31), a time (2027-01-31T14:00, UTC unless it says +02:00) "
    "or an age (90m, 12h, 7d, 2w)."
)


def parse_when(text: str, now: float) -> str:
    """A date, an ISO time or an age ("7d": seven days before `now`), as the audit
    log's own time format, so it compares with the `at` column as text."""
    value = text.strip()
    age = re.fullmatch(r"([0-9]{1,9})([smhdw])", value)
    if age:
        return utc_iso(now - int(age[1]) * AGE_UNITS[age[2]])
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
            moment = datetime.combine(date.fromisoformat(value), dtime.min, timezone.utc)
        else:
            if value.endswith(("Z", "z")):
                value = value[:-1] + "+00:00"
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
        return utc_iso(moment.timestamp())
    except (ValueError, OverflowError, OSError):
        raise InputError(f"not a date or time: {text!r}", hint=WHEN_HINT) from None


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
    return UserFacts(
        name=row["user"],
        enrolled=row["state"] == "enrolled",
        pending=row["state"] == "pending",
        verified_until=_dt(row["verified_until"]),
        locked_until=_dt(row["locked_until"]),
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


# -- reading the log ----------------------------------------------------------------


@dataclass(frozen=True)
class LogFilter:
    user: str | None = None
    repo: str | None = None
    since: str | None = None
    """In the log's own time format (see `parse_when`)."""
    reason: str | None = None
    event: str | None = None

    def records(self, store: Store, after_seq: int = 0) -> list[dict[str, Any]]:
        """The stored records that pass, in order; `readable` each one you show."""
        return store.audit_records(
            user=self.user,
            repo=self.repo,
            reason=self.reason,
            event=self.event,
            since=self.since,
            after_seq=after_seq,
        )


def readable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored record with its detail as an object (for JSON and the table)."""
    out = dict(row)
    if not isinstance(out["detail"], str):
        return out
    try:
        out["detail"] = json.loads(row["detail"] or "{}")
    except ValueError:
        out["detail"] = {"unparsed": row["detail"]}
    return out


LOG_COLUMNS: tuple[tuple[str, int], ...] = (
    ("seq", 6),
    ("at", 19),
    ("event", 18),
    ("actor", 10),
    ("user", 12),
    ("repo", 20),
    ("action", 6),
    ("reason", 18),
    ("client", 15),
    ("detail", 0),
)


def _short(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text[:12] if re.fullmatch(r"[0-9a-f]{64}", text) else text


def detail_text(record: Mapping[str, Any]) -> str:
    detail = record["detail"]
    if not isinstance(detail, dict):
        return str(detail)
    if record["event"] == "policy-change":
        return f"{_short(detail.get('old'))} -> {_short(detail.get('new'))}"
    return " ".join(f"{k}={_short(v)}" for k, v in detail.items())


def log_header() -> str:
    return "  ".join(
        name.upper().rjust(w) if name == "seq" else name.upper().ljust(w) for name, w in LOG_COLUMNS
    ).rstrip()


def log_line(record: Mapping[str, Any]) -> str:
    cells = []
    for name, width in LOG_COLUMNS:
        if name == "detail":
            value = detail_text(record)
        elif name == "at":
            value = str(record["at"])[:19].replace("T", " ")
        else:
            value = "-" if record[name] is None else str(record[name])
        cells.append(value.rjust(width) if name == "seq" else value.ljust(width))
    return "  ".join(cells).rstrip()


def follow(
    store: Store,
    flt: LogFilter,
    after_seq: int,
    on_records: Callable[[list[dict[str, Any]]], None],
    *,
    interval: float = 1.0,
    max_wait: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    stopped: Callable[[], bool] = lambda: False,
) -> int:
    """Poll for records after `after_seq` that pass `flt`, handing each batch to
    `on_records`, until `max_wait` seconds have passed (forever without it) or `stopped()`
    says so (checked before and after each wait). Returns the last sequence number seen."""
    deadline = None if max_wait is None else clock() + max_wait
    while not stopped():
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                return after_seq
            sleep(min(interval, left))
        else:
            sleep(interval)
        if stopped():
            break
        batch = flt.records(store, after_seq)
        if batch:
            on_records(batch)
            after_seq = int(batch[-1]["seq"])
    return after_seq


# -- checking the log ---------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    seq: int | None
    kind: str
    """edited, deleted, reordered, cut-off, relinked, uncovered, head-mismatch,
    head-missing, head-unreadable, or chain (a problem named only by the chain check)."""
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class LogCheck:
    records: int
    first: int | None
    last: int | None
    head: tuple[int, str] | None
    anchor: tuple[int, str] | None
    findings: tuple[Finding, ...]
    recovered: Recovery | None = None
    """A write a crash interrupted, found (and settled) on the way: not a problem."""

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first": self.first,
            "last": self.last,
            "head": {"seq": self.head[0], "hash": self.head[1]} if self.head else None,
            "anchor": {"seq": self.anchor[0], "hash": self.anchor[1]} if self.anchor else None,
            "problems": [f.to_json() for f in self.findings],
            "recovered": _recovery_json(self.recovered),
        }


def _recovery_json(recovered: Recovery | None) -> dict[str, Any] | None:
    if recovered is None:
        return None
    return {
        "outcome": recovered.outcome,
        "old": {"seq": recovered.old[0], "hash": recovered.old[1]},
        "new": {"seq": recovered.new[0], "hash": recovered.new[1]},
        "head_file_settled": recovered.settled,
        "message": describe_recovery(recovered),
    }


def describe_recovery(recovered: Recovery) -> str:
    """In plain words: a crash, what it left, and what was done about it."""
    old, new = recovered.old[0], recovered.new[0]
    records = f"record {new}" if new == old + 1 else f"records {old + 1}-{new}"
    if recovered.outcome == "committed":
        text = (
            f"a writer stopped (crashed or was killed) right after committing {records}: "
            f"{records} {'is' if new == old + 1 else 'are'} in the log"
        )
        settled = f"the head file now names record {new}"
    else:
        text = (
            f"a writer stopped (crashed or was killed) before committing {records}: "
            f"that write is not in the log, which ends where it did before"
        )
        settled = f"the head file is back on record {old}"
    if recovered.settled:
        text += f", and {settled}"
    else:
        text += "; the next write settles the head file"
    return text + ". This is an interrupted write, not tampering."


def check_log(store: Store) -> LogCheck:
    """Verify the chain, the prune anchor and the head file; name every bad record.

    A permission problem (the head file or the database cannot be read) is not a
    finding: `PermissionDenied` goes to the caller, who says so."""
    view = store.audit_view()
    rows, anchor, head = view.records, view.anchor, view.head
    findings: list[Finding] = []
    if view.head_error is not None:
        findings.append(Finding(None, "head-unreadable", view.head_error))
    witness = store.kind != "sqlite"
    problems = chain.verify_chain(rows, head, anchor, head_is_witness=witness)
    if head is None and not findings and (rows or anchor):
        findings.append(
            Finding(
                None,
                "head-missing",
                f"the head file {HEAD_NAME} is missing: records cut off the end of the "
                "log could not be seen",
            )
        )
    if problems:
        explained = explain_chain(rows, head, anchor, head_is_witness=witness)
        findings.extend(explained)
        if not explained:
            findings.extend(Finding(p.seq, "chain", p.message) for p in problems)
    findings.sort(key=lambda f: (f.seq is not None, f.seq or 0))
    return LogCheck(
        records=len(rows),
        first=int(rows[0]["seq"]) if rows else None,
        last=int(rows[-1]["seq"]) if rows else None,
        head=head,
        anchor=anchor,
        findings=tuple(findings),
        recovered=view.recovered,
    )


MAX_MOVE_ANALYSIS = 2000
MAX_SWAP_ANALYSIS = 200


def _span(first: int, last: int) -> str:
    return f"record {first} is" if first == last else f"records {first}-{last} are"


def _about(row: Mapping[str, Any]) -> str:
    who = f" {row['user']}" if row.get("user") else ""
    return f"{str(row['at'])[:19].replace('T', ' ')} {row['event']}{who}"


def explain_chain(
    rows: Sequence[Mapping[str, Any]],
    head: tuple[int, str] | None,
    anchor: tuple[int, str] | None,
    *,
    head_is_witness: bool = False,
) -> list[Finding]:
    """Say what happened to a broken chain, record by record: edited (contents do not
    match the hash), moved or swapped (contents hashed for another position),
    deleted (a gap in the sequence), replaced (a record that does not link to the one
    before it), cut off (the head file names records past the end)."""
    findings: list[Finding] = []
    start_seq, start_hash = (anchor[0] + 1, anchor[1]) if anchor else (1, chain.GENESIS)
    good = [chain.record_hash(str(r["prev_hash"]), r) == r["hash"] for r in rows]

    # Where each bad record's contents belong: follow prev_hash to the record it was
    # chained after (by that record's own original position).
    known: dict[str, int] = {chain.GENESIS: 0}
    if anchor:
        known[anchor[1]] = anchor[0]
    for row, ok in zip(rows, good, strict=True):
        if ok:
            known[str(row["hash"])] = int(row["seq"])
    bad = [r for r, ok in zip(rows, good, strict=True) if not ok]
    origin: dict[int, int] = {}  # position -> the position its contents were hashed for
    if len(bad) <= MAX_MOVE_ANALYSIS:
        progress = True
        while bad and progress:
            progress = False
            rest = []
            for row in bad:
                base = known.get(str(row["prev_hash"]))
                seq = int(row["seq"])
                if (
                    base is not None
                    and base + 1 != seq
                    and chain.record_hash(str(row["prev_hash"]), {**row, "seq": base + 1})
                    == row["hash"]
                ):
                    origin[seq] = base + 1
                    known[str(row["hash"])] = base + 1
                    progress = True
                else:
                    rest.append(row)
            bad = rest
    if 1 < len(bad) <= MAX_SWAP_ANALYSIS:
        # Contents swapped while the hashes stayed: b's contents hash right at a.
        for a in bad:
            for b in bad:
                if a is not b and int(b["seq"]) not in origin:
                    moved = {**b, "seq": a["seq"], "prev_hash": a["prev_hash"]}
                    if chain.record_hash(str(a["prev_hash"]), moved) == a["hash"]:
                        origin[int(b["seq"])] = int(a["seq"])
                        break
        bad = [r for r in bad if int(r["seq"]) not in origin]
    edited = {int(r["seq"]) for r in bad}
    for row in bad:
        findings.append(
            Finding(
                int(row["seq"]),
                "edited",
                f"record {row['seq']} was edited: its contents do not match its hash "
                f"(now reads: {_about(row)})",
            )
        )
    for position, source in sorted(origin.items()):
        if origin.get(source) == position:
            if position < source:
                findings.append(
                    Finding(
                        position,
                        "reordered",
                        f"records {position} and {source} were swapped: each holds the "
                        "other's contents",
                    )
                )
        else:
            findings.append(
                Finding(
                    position,
                    "reordered",
                    f"record {position} holds the contents of record {source} (moved)",
                )
            )

    # Links and gaps, in order.
    expected, prev_hash = start_seq, start_hash
    prev_row: Mapping[str, Any] | None = None
    for row in rows:
        seq = int(row["seq"])
        gap = seq > expected
        if gap:
            if prev_row is not None:
                after = f"record {seq} follows record {prev_row['seq']}"
            elif anchor:
                after = f"record {seq} follows the prune anchor at record {anchor[0]}"
            else:
                after = "deleted from the start without `gatekeeper log prune`"
            findings.append(
                Finding(
                    expected, "deleted", f"{_span(expected, seq - 1)} missing: deleted ({after})"
                )
            )
        elif row["prev_hash"] != prev_hash:
            explained = seq in origin or seq in edited
            explained = explained or (prev_row is not None and int(prev_row["seq"]) in origin)
            if not explained:
                if prev_row is None:
                    where = f"the prune anchor (record {anchor[0]})" if anchor else "the start"
                    findings.append(
                        Finding(
                            seq,
                            "relinked",
                            f"record {seq} does not link to {where}: it was replaced, "
                            "or the anchor was changed",
                        )
                    )
                else:
                    findings.append(
                        Finding(
                            int(prev_row["seq"]),
                            "relinked",
                            f"record {prev_row['seq']} was replaced or re-hashed: record "
                            f"{seq} does not link to it (now reads: {_about(prev_row)})",
                        )
                    )
        expected, prev_hash, prev_row = seq + 1, str(row["hash"]), row

    # The head file: what the newest record must be.
    if head is not None:
        if rows:
            last_seq, last_hash = int(rows[-1]["seq"]), str(rows[-1]["hash"])
        elif anchor:
            last_seq, last_hash = anchor
        else:
            last_seq, last_hash = 0, chain.GENESIS
        if last_seq < head[0]:
            findings.append(
                Finding(
                    last_seq + 1,
                    "cut-off",
                    f"{_span(last_seq + 1, head[0])} missing: cut off the end of the log "
                    f"(the head file names record {head[0]}; the log ends at {last_seq})",
                )
            )
        elif last_seq > head[0] and head_is_witness:
            # A shared database: later records are other front-ends'; the one this
            # host wrote last must still be there as it was.
            named = next((r for r in rows if int(r["seq"]) == head[0]), None)
            if named is not None and named["hash"] != head[1] and head[0] not in origin:
                findings.append(
                    Finding(
                        head[0],
                        "head-mismatch",
                        f"record {head[0]} differs from the head file: it was replaced or "
                        "re-hashed",
                    )
                )
        elif last_seq > head[0]:
            findings.append(
                Finding(
                    head[0] + 1,
                    "uncovered",
                    f"{_span(head[0] + 1, last_seq)} not covered by the head file (it names "
                    f"record {head[0]}): added outside gatekeeper, or the head file was "
                    "replaced by an older copy",
                )
            )
        elif last_hash != head[1] and last_seq not in origin:
            findings.append(
                Finding(
                    last_seq,
                    "head-mismatch",
                    f"record {last_seq} differs from the head file: it was replaced or re-hashed",
                )
            )
    return findings


def prune(store: Store, before: str, *, actor: str | None, force: bool = False) -> int:
    """Delete records older than `before`, leaving an anchor so the rest still verifies.

    Refuses when the log does not verify (pruning could hide the evidence), unless
    `force`."""
    if not force:
        result = check_log(store)
        if not result.ok:
            raise InputError(
                f"the audit log does not verify ({len(result.findings)} problem(s)): "
                "pruning could remove the evidence.",
                hint="see `gatekeeper log verify`; prune anyway with --force.",
            )
    return store.prune_audit(before, actor=actor)


def describe_findings(findings: Iterable[Finding], limit: int = 50) -> list[str]:
    items = list(findings)
    lines = [f.message for f in items[:limit]]
    if len(items) > limit:
        lines.append(f"... and {len(items) - limit} more problem(s) (see --json)")
    return lines
