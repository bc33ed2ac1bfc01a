"""The rollout at a glance: who meets the level of two-step verification that applies
to them, per team, and until when the others are let through.

This is what `gatekeeper audit` answers by default, and what its HTML page
(`rollout_html`) and Prometheus metrics (`prometheus_text`) show: all three are made
from one `Rollout`, built from the audit report (`report.build_report`, whose every
verdict comes from `decision.decide`) and the audit log. Plain data and functions,
no click.

A user *meets* their level when nothing they can reach refuses them or lets them
through only by a grace period or report mode. Their *deadline* is the first day a
grace period they depend on ends; a user let through only by report mode has none.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from gatekeeper import decision
from gatekeeper.report import STATUS_GRACE, STATUS_REFUSED, Report, UserLine, iso

REFUSAL_WINDOW_DAYS = 7
"""How far back "recent refusals" look by default."""


@dataclass(frozen=True)
class UserRow:
    user: str
    teams: tuple[str, ...]
    state: str
    """none, pending or enrolled."""
    level: str
    """The strictest level that applies to the user anywhere."""
    meets: bool
    status: str
    """ok; refused (now); grace (let through until `deadline`); report (let through,
    logged as would-refuse)."""
    deadline: date | None
    keys: int
    last_verified: int | None
    security_keys: int = 0

    def days_left(self, today: date) -> int | None:
        return None if self.deadline is None else (self.deadline - today).days

    def when(self, today: date) -> str:
        """`grace ends 2026-12-15, in 14 days`, `report mode`, `refused now`, or ``."""
        if self.status == STATUS_GRACE and self.deadline is not None:
            days = (self.deadline - today).days
            left = "today" if days <= 0 else f"in {days} day{'s' if days != 1 else ''}"
            return f"grace ends {self.deadline.isoformat()}, {left}"
        if self.status == "report":
            return "report mode"
        if self.status == STATUS_REFUSED:
            return "refused now"
        return ""

    def to_json(self, today: date) -> dict[str, Any]:
        return {
            "user": self.user,
            "teams": list(self.teams),
            "state": self.state,
            "level": self.level,
            "meets": self.meets,
            "status": self.status,
            "deadline": self.deadline.isoformat() if self.deadline else None,
            "days_left": self.days_left(today),
            "keys": self.keys,
            "security_keys": self.security_keys,
            "last_verified": iso(self.last_verified),
        }


@dataclass(frozen=True)
class TeamRow:
    team: str
    level: str
    mode: str
    grace_until: date | None
    members: int
    meeting: int
    with_security_key: int = 0

    @property
    def percent(self) -> int:
        return percent(self.meeting, self.members)

    def to_json(self) -> dict[str, Any]:
        return {
            "team": self.team,
            "level": self.level,
            "mode": self.mode,
            "grace_until": self.grace_until.isoformat() if self.grace_until else None,
            "members": self.members,
            "meeting": self.meeting,
            "percent": self.percent,
            "with_security_key": self.with_security_key,
        }


@dataclass(frozen=True)
class Rollout:
    generated_at: float
    users: tuple[UserRow, ...]
    teams: tuple[TeamRow, ...]
    enrolled_over_time: tuple[tuple[str, int], ...]
    """(ISO time, users enrolled then), from the audit log."""
    refusals: tuple[tuple[str, int], ...]
    """(reason code, refusals) in the last `window_days`, most first."""
    window_days: int

    @property
    def today(self) -> date:
        return datetime.fromtimestamp(self.generated_at, timezone.utc).date()

    @property
    def meeting(self) -> int:
        return sum(u.meets for u in self.users)

    @property
    def missing(self) -> list[UserRow]:
        """Who does not meet their level, the nearest deadline first (refused now
        before any deadline, report mode last)."""
        order = {STATUS_REFUSED: 0, STATUS_GRACE: 1}
        rows = [u for u in self.users if not u.meets]
        return sorted(rows, key=lambda u: (order.get(u.status, 2), u.deadline or date.max, u.user))

    @property
    def nearest_deadline(self) -> date | None:
        dates = [u.deadline for u in self.missing if u.deadline is not None]
        return min(dates, default=None)

    def summary(self) -> str:
        """The one line that answers "who has 2FA?"."""
        total = len(self.users)
        line = (
            f"2FA rollout: {self.meeting} of {total} users meet their level "
            f"({percent(self.meeting, total)}%)"
        )
        missing = self.missing
        if not missing:
            return line + "."
        shown = ", ".join(
            f"{u.user} ({', '.join(u.teams) or 'no team'}, {u.when(self.today)})" for u in missing
        )
        return f"{line}; {len(missing)} missing: {shown}"

    def to_json(self) -> dict[str, Any]:
        today = self.today
        return {
            "generated_at": iso(self.generated_at),
            "summary": self.summary(),
            "users": len(self.users),
            "meeting": self.meeting,
            "percent": percent(self.meeting, len(self.users)),
            "missing": [{**u.to_json(today), "when": u.when(today)} for u in self.missing],
            "nearest_deadline": iso_date(self.nearest_deadline),
            "per_user": [u.to_json(today) for u in self.users],
            "per_team": [t.to_json() for t in self.teams],
            "enrolled_over_time": [list(p) for p in self.enrolled_over_time],
            "refusals": {
                "window_days": self.window_days,
                "by_reason": dict(self.refusals),
            },
        }


def percent(part: int, whole: int) -> int:
    return round(100 * part / whole) if whole else 100


def iso_date(day: date | None) -> str | None:
    return day.isoformat() if day else None


def user_row(line: UserLine) -> UserRow:
    shortfalls = line.shortfalls
    if not shortfalls:
        status, deadline = "ok", None
    elif any(s.status == STATUS_REFUSED for s in shortfalls):
        status, deadline = STATUS_REFUSED, None
    else:
        graces = [s.by for s in shortfalls if s.status == STATUS_GRACE and s.by is not None]
        status = STATUS_GRACE if graces else "report"
        deadline = min(graces) if graces else None
    return UserRow(
        user=line.user,
        teams=line.teams,
        state=line.state,
        level=line.level,
        meets=not shortfalls,
        status=status,
        deadline=deadline,
        keys=line.keys,
        last_verified=line.last_verified,
        security_keys=line.security_keys,
    )


def build_rollout(
    report: Report,
    records: list[dict[str, Any]],
    *,
    window_days: int = REFUSAL_WINDOW_DAYS,
) -> Rollout:
    """The rollout view of `report`; `records` are the audit log's records (for the
    enrollment curve and the recent refusals)."""
    users = tuple(user_row(u) for u in report.users)
    by_name = {u.user: u for u in users}
    teams = []
    for line in report.teams:
        members = [by_name[m] for m in line.members if m in by_name]
        teams.append(
            TeamRow(
                team=line.team.name,
                level=line.team.require_2fa,
                mode=line.team.mode,
                grace_until=line.team.grace_until,
                members=len(members),
                meeting=sum(m.meets for m in members),
                with_security_key=sum(m.security_keys > 0 for m in members),
            )
        )
    since = iso(report.generated_at - window_days * 86400) or ""
    return Rollout(
        generated_at=report.generated_at,
        users=users,
        teams=tuple(teams),
        enrolled_over_time=enrollment_curve(records, report.generated_at),
        refusals=recent_refusals(records, since),
        window_days=window_days,
    )


ENROLLED = "2fa-enabled"
UNENROLLED = ("2fa-disabled", "2fa-reset", "user-remove")
NOT_REFUSED = (decision.ALLOWED, decision.PUBLIC_READ, decision.GRACE_PERIOD, decision.REPORT_ONLY)


def enrollment_curve(records: list[dict[str, Any]], now: float) -> tuple[tuple[str, int], ...]:
    """Users enrolled after each change, replayed from the log (a pruned log starts
    counting where it starts)."""
    enrolled: set[str] = set()
    points: list[tuple[str, int]] = []
    for record in records:
        event, user = record["event"], record.get("user")
        if user is None or (event != ENROLLED and event not in UNENROLLED):
            continue
        before = len(enrolled)
        if event == ENROLLED:
            enrolled.add(user)
        else:
            enrolled.discard(user)
        if len(enrolled) != before:
            points.append((str(record["at"])[:19] + "Z", len(enrolled)))
    if points:
        points.append((iso(now) or "", len(enrolled)))
    return tuple(points)


def recent_refusals(records: list[dict[str, Any]], since: str) -> tuple[tuple[str, int], ...]:
    """Refused accesses since `since` (ISO), by reason code, most first."""
    counts: Counter[str] = Counter()
    for record in records:
        if record["event"] != "access" or str(record["at"]) < since:
            continue
        reason = record.get("reason")
        if reason is None or reason in NOT_REFUSED:
            continue
        detail = record.get("detail")
        if isinstance(detail, str):
            try:
                detail = json.loads(detail)
            except ValueError:
                detail = {}
        if isinstance(detail, dict) and detail.get("allowed") is True:
            continue
        counts[reason] += 1
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# -- text ----------------------------------------------------------------------------


def text(rollout: Rollout) -> str:
    """The default `gatekeeper audit`: the summary, a row per user, a line per team,
    within 100 columns for any name up to 16 characters."""
    today = rollout.today
    out = [rollout.summary(), ""]
    user_rows = [
        {
            "user": u.user,
            "teams": ",".join(u.teams) or "-",
            "2fa": u.state,
            "level": u.level,
            "meets": "yes" if u.meets else "no",
            "deadline": u.when(today).replace("grace ends ", "") or "-",
            "keys": f"{u.keys}" + (f" ({u.security_keys} sk)" if u.security_keys else ""),
            "last verified": _day(u.last_verified),
        }
        for u in rollout.users
    ]
    out += _table(
        user_rows, ("user", "teams", "2fa", "level", "meets", "deadline", "keys", "last verified")
    )
    out.append("")
    team_rows = [
        {
            "team": t.team,
            "level": t.level,
            "members": str(t.members),
            "meeting": str(t.meeting),
            "%": f"{t.percent}%",
            "security keys": str(t.with_security_key),
            "deadline": t.grace_until.isoformat() if t.grace_until else "-",
            "mode": t.mode,
        }
        for t in rollout.teams
    ]
    columns = ("team", "level", "members", "meeting", "%", "security keys", "deadline", "mode")
    out += _table(team_rows, columns)
    out.append("")
    out.append(
        "Every team and repository rule: --detail; who is let through for now: --would-refuse"
    )
    return "\n".join(out) + "\n"


def _day(ts: int | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _table(rows: list[dict[str, str]], columns: tuple[str, ...]) -> list[str]:
    if not rows:
        return ["(none)"]
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append(
            "  ".join(r[c].ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
        )
    return lines


# -- Prometheus ----------------------------------------------------------------------


def prometheus_text(rollout: Rollout) -> str:
    """The rollout in Prometheus' text exposition format, for node_exporter's textfile
    collector: users by team and state, users missing their level, seconds to the
    nearest deadline, and refusals by reason over the window."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {_number(value)}")

    per_team: Counter[tuple[str, str]] = Counter()
    for u in rollout.users:
        for team in u.teams or ("",):  # "": in no team
            per_team[(team, u.state)] += 1
    missing_team = {t.team: t.members - t.meeting for t in rollout.teams}
    metric(
        "gatekeeper_users",
        "gauge",
        "Users by team and two-step verification state (none, pending, enrolled).",
        [(_labels(team=team, state=state), n) for (team, state), n in sorted(per_team.items())],
    )
    metric(
        "gatekeeper_users_missing_level",
        "gauge",
        "Users who do not meet the level that applies to them, by team.",
        [(_labels(team=team), n) for team, n in sorted(missing_team.items())],
    )
    metric(
        "gatekeeper_users_with_security_key",
        "gauge",
        "Users with at least one registered security key (FIDO2), by team.",
        [(_labels(team=t.team), t.with_security_key) for t in rollout.teams],
    )
    metric(
        "gatekeeper_users_missing_level_total",
        "gauge",
        "Users who do not meet the level that applies to them.",
        [("", len(rollout.missing))],
    )
    nearest = rollout.nearest_deadline
    if nearest is not None:
        end = datetime(nearest.year, nearest.month, nearest.day, tzinfo=timezone.utc).timestamp()
        metric(
            "gatekeeper_deadline_seconds",
            "gauge",
            "Seconds until the nearest grace period of a user who misses their level ends "
            "(the end of that day, UTC).",
            [("", max(0.0, end + 86400 - rollout.generated_at))],
        )
    metric(
        "gatekeeper_refusals",
        "gauge",
        f"Refused git accesses in the last {rollout.window_days} days, by reason.",
        [(_labels(reason=reason), n) for reason, n in rollout.refusals],
    )
    metric(
        "gatekeeper_report_timestamp_seconds",
        "gauge",
        "When this report was made (Unix time).",
        [("", rollout.generated_at)],
    )
    return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
