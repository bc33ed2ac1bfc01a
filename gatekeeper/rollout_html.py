"""`gatekeeper audit --html FILE`: the rollout as one page an admin can open or publish.

One self-contained file: inline CSS and SVG, no script, no font, no image, nothing
fetched (its Content-Security-Policy forbids it), so it can be mailed, attached to a
ticket or served as a static file. Every figure carries a `data-` attribute with its
value, so tests (and scripts) can read the rendered page back and hold it to the JSON
report it was made from.
"""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape

from gatekeeper.rollout import Rollout, percent

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2433;
       margin: 2rem auto; max-width: 62rem; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; }
h2 { font-size: 1.1rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #d8dde6; }
.meta { color: #5b6478; font-size: .85rem; }
.summary { font-size: 1.05rem; background: #f3f6fb; border-left: 4px solid #3b6fd8;
           padding: .6rem .9rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #eceff4; }
th { font-size: .8rem; text-transform: uppercase; color: #5b6478; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { width: 100%; height: 14px; }
.ok { color: #1f7a3d; } .grace { color: #a15c00; } .refused { color: #b3261e; }
.report { color: #5b6478; }
svg text { font: 11px system-ui, sans-serif; fill: #5b6478; }
"""


def page(rollout: Rollout, title: str = "Two-step verification rollout") -> str:
    generated = datetime.fromtimestamp(rollout.generated_at, timezone.utc)
    total = len(rollout.users)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">Made by gatekeeper on {generated:%Y-%m-%d %H:%M} UTC.</p>',
        f'<p class="summary" id="summary" data-users="{total}" '
        f'data-meeting="{rollout.meeting}" data-percent="{percent(rollout.meeting, total)}">'
        f"{escape(rollout.summary())}</p>",
        "<h2>Teams</h2>",
        _teams(rollout),
        "<h2>Who does not meet their level yet</h2>",
        _missing(rollout),
        "<h2>Enrolled users over time</h2>",
        _curve(rollout),
        f"<h2>Refusals in the last {rollout.window_days} days, by reason</h2>",
        _refusals(rollout),
        "<h2>Everyone</h2>",
        _everyone(rollout),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _bar(pct: int, color: str = "#3b6fd8") -> str:
    return (
        f'<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" role="img" '
        f'aria-label="{pct}%"><rect width="100" height="10" fill="#e6eaf2"/>'
        f'<rect width="{pct}" height="10" fill="{color}"/></svg>'
    )


def _teams(rollout: Rollout) -> str:
    if not rollout.teams:
        return "<p>No teams in the policy.</p>"
    rows = [
        '<table id="teams"><tr><th>Team</th><th>Level</th><th>Meeting</th>'
        '<th style="width:40%">Progress</th><th>Deadline</th><th>Mode</th></tr>'
    ]
    for t in rollout.teams:
        color = "#1f7a3d" if t.percent == 100 else "#3b6fd8"
        deadline = t.grace_until.isoformat() if t.grace_until else "-"
        rows.append(
            f'<tr class="team" data-team="{escape(t.team)}" data-members="{t.members}" '
            f'data-meeting="{t.meeting}" data-percent="{t.percent}" '
            f'data-security-keys="{t.with_security_key}">'
            f"<td>{escape(t.team)}</td><td>{escape(t.level)}</td>"
            f'<td class="num">{t.meeting} of {t.members} ({t.percent}%)</td>'
            f'<td>{_bar(t.percent, color)}</td><td class="num">{t.with_security_key}</td>'
            f"<td>{deadline}</td><td>{escape(t.mode)}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _missing(rollout: Rollout) -> str:
    missing = rollout.missing
    if not missing:
        return '<p class="ok" id="missing" data-count="0">Everyone meets their level.</p>'
    rows = [
        f'<table id="missing" data-count="{len(missing)}"><tr><th>User</th><th>Teams</th>'
        "<th>2FA</th><th>Needs</th><th>Until</th></tr>"
    ]
    for u in missing:
        when = u.when(rollout.today)
        rows.append(
            f'<tr class="missing" data-user="{escape(u.user)}" data-status="{u.status}" '
            f'data-deadline="{u.deadline.isoformat() if u.deadline else ""}">'
            f"<td>{escape(u.user)}</td><td>{escape(', '.join(u.teams) or '-')}</td>"
            f"<td>{escape(u.state)}</td><td>{escape(u.level)}</td>"
            f'<td class="{u.status}">{escape(when)}</td></tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)


def _curve(rollout: Rollout) -> str:
    points = rollout.enrolled_over_time
    if not points:
        return '<p id="curve" data-points="0">No enrollments in the audit log yet.</p>'
    times = [_epoch(at) for at, _ in points]
    counts = [n for _, n in points]
    width, height, pad = 600.0, 180.0, 30.0
    span = max(times[-1] - times[0], 1.0)
    top = max(max(counts), 1)

    def xy(t: float, n: int) -> str:
        x = pad + (t - times[0]) / span * (width - 2 * pad)
        y = height - pad - n / top * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    # A step line: the count holds until the next change.
    steps = [xy(times[0], counts[0])]
    for i in range(1, len(points)):
        steps.append(xy(times[i], counts[i - 1]))
        steps.append(xy(times[i], counts[i]))
    return (
        f'<svg id="curve" data-points="{len(points)}" data-last="{counts[-1]}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="100%" role="img" '
        f'aria-label="enrolled users over time">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#c5ccd8"/>'
        f'<polyline fill="none" stroke="#3b6fd8" stroke-width="2" points="{" ".join(steps)}"/>'
        f'<text x="{pad}" y="{height - 8}">{escape(_label(points[0][0], points))}</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">'
        f"{escape(_label(points[-1][0], points))}</text>"
        f'<text x="{pad - 6}" y="{pad + 4}" text-anchor="end">{top}</text>'
        f'<text x="{pad - 6}" y="{height - pad + 4}" text-anchor="end">0</text>'
        "</svg>"
    )


def _refusals(rollout: Rollout) -> str:
    if not rollout.refusals:
        return '<p id="refusals" data-total="0">No refusals.</p>'
    most = max(n for _, n in rollout.refusals)
    total = sum(n for _, n in rollout.refusals)
    rows = [
        f'<table id="refusals" data-total="{total}"><tr><th>Reason</th><th>Refusals</th>'
        '<th style="width:50%"></th></tr>'
    ]
    for reason, n in rollout.refusals:
        rows.append(
            f'<tr class="refusal" data-reason="{escape(reason)}" data-count="{n}">'
            f'<td>{escape(reason)}</td><td class="num">{n}</td>'
            f"<td>{_bar(round(100 * n / most), '#b3261e')}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _everyone(rollout: Rollout) -> str:
    rows = [
        '<table id="users"><tr><th>User</th><th>Teams</th><th>2FA</th><th>Level</th>'
        "<th>Meets</th><th>Keys</th><th>Security keys</th></tr>"
    ]
    for u in rollout.users:
        meets = '<span class="ok">yes</span>' if u.meets else f'<span class="{u.status}">no</span>'
        rows.append(
            f'<tr class="user" data-user="{escape(u.user)}" data-meets="{str(u.meets).lower()}" '
            f'data-level="{escape(u.level)}" data-state="{escape(u.state)}" '
            f'data-security-keys="{u.security_keys}">'
            f"<td>{escape(u.user)}</td><td>{escape(', '.join(u.teams) or '-')}</td>"
            f"<td>{escape(u.state)}</td><td>{escape(u.level)}</td><td>{meets}</td>"
            f'<td class="num">{u.keys}</td><td class="num">{u.security_keys}</td></tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)


def _label(at: str, points: tuple[tuple[str, int], ...]) -> str:
    """A date, or a time of day when the whole curve lies within one day."""
    same_day = points[0][0][:10] == points[-1][0][:10]
    return at[11:16] + " UTC" if same_day else at[:10]


def _epoch(at: str) -> float:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
