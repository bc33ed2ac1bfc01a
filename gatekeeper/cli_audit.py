"""`gatekeeper audit` and `gatekeeper log`: thin click commands over `report`.

Registered on the main group by `cli.py` (`register(cli)`); they reuse its
`Context` (which records a changed policy whenever it opens the store).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any, NoReturn

import click

from gatekeeper import report
from gatekeeper.cli import Context, actor, print_table, when
from gatekeeper.errors import PermissionDenied
from gatekeeper.sshcmd import normalize_repo_name


def _date(d: Any) -> str:
    return d.isoformat() if d else "-"


def _levels(levels: list[str]) -> str:
    return ",".join(levels) or "-"


# -- gatekeeper audit -------------------------------------------------------------


@click.command("audit")
@click.option("--team", help="Only this team's members (and the team).")
@click.option("--repo", help="Only this repository (a name or a glob) and who can reach it.")
@click.option("--missing-only", is_flag=True, help="Only who does not meet a level.")
@click.option(
    "--would-refuse",
    is_flag=True,
    help="List who would be refused if grace periods and report mode were taken away.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
@click.option(
    "--fail-if-missing",
    is_flag=True,
    help="Exit 1 when anyone does not meet the level that applies (for cron and CI).",
)
@click.pass_obj
def audit_cmd(
    ctx: Context,
    team: str | None,
    repo: str | None,
    missing_only: bool,
    would_refuse: bool,
    fmt: str,
    fail_if_missing: bool,
) -> None:
    """Who has two-step verification, and who does not meet the level that applies.

    Every user's 2FA state and keys; then, for each team and each repository rule
    (checked against the repositories under the root), who misses the level that
    applies and until when they are let through (grace date, or report mode)."""
    with ctx.store() as store:
        result = report.build_report(
            ctx.policy, store, team=team, repo=repo, missing_only=missing_only
        )
    if would_refuse:
        _show_would_refuse(result, fmt)
    elif fmt == "json":
        click.echo(json.dumps(result.to_json(), indent=2))
    elif fmt == "csv":
        _write_csv(report.csv_rows(result, missing_only=missing_only), report.CSV_COLUMNS)
    else:
        _show_report(result)
    missing = result.missing_users
    if fail_if_missing and missing:
        click.echo(
            f"gatekeeper: {len(missing)} user(s) do not meet the level that applies: "
            f"{', '.join(missing)}",
            err=True,
        )
        sys.exit(1)


def _write_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    click.echo(out.getvalue(), nl=False)


def _show_report(result: report.Report) -> None:
    click.echo(f"users ({len(result.users)})")
    print_table(
        [
            {
                "user": u.user,
                "teams": ",".join(u.teams) or "-",
                "2fa": u.state,
                "enrolled": when(u.enrolled_at),
                "last_verified": when(u.last_verified),
                "verified_until": when(u.verified_until),
                "locked_until": when(u.locked_until),
                "keys": u.keys,
                "newest_key": when(u.newest_key),
                "oldest_key": when(u.oldest_key),
                "missing": _levels(u.missing),
            }
            for u in result.users
        ],
        (
            "user",
            "teams",
            "2fa",
            "enrolled",
            "last_verified",
            "verified_until",
            "locked_until",
            "keys",
            "newest_key",
            "oldest_key",
            "missing",
        ),
    )
    click.echo(f"\nteams ({len(result.teams)})")
    print_table(
        [
            {
                "team": t.team.name,
                "requires": t.team.require_2fa,
                "mode": t.team.mode,
                "grace_until": _date(t.team.grace_until),
                "members": len(t.members),
                "missing": len(t.shortfalls),
            }
            for t in result.teams
        ],
        ("team", "requires", "mode", "grace_until", "members", "missing"),
    )
    for t in result.teams:
        for name in t.unknown_members:
            click.echo(f"note: team '{t.team.name}' lists '{name}', who is not a user")
    click.echo(f"\nrepository rules ({len(result.rules)})")
    print_table(
        [
            {
                "rule": line.rule.match,
                "line": line.rule.line,
                "requires": line.rule.require_2fa or "-",
                "mode": line.rule.mode or "-",
                "grace_until": _date(line.rule.grace_until),
                "repos": len(line.repos),
                "missing": len(line.shortfalls),
            }
            for line in result.rules
        ],
        ("rule", "line", "requires", "mode", "grace_until", "repos", "missing"),
    )
    shortfalls = result.shortfalls
    click.echo(
        f"\nnot meeting the level that applies ({len(result.missing_users)} user(s), "
        f"{len(shortfalls)} place(s))"
    )
    print_table(
        [
            {
                "scope": s.scope,
                "name": s.name,
                "repo": s.repo or "-",
                "user": s.user,
                "2fa": s.state,
                "level": s.level,
                "status": s.status,
                "by": _date(s.by),
                "reason": s.reason,
            }
            for s in shortfalls
        ],
        ("scope", "name", "repo", "user", "2fa", "level", "status", "by", "reason"),
    )


WOULD_REFUSE_COLUMNS = ("user", "state", "repo", "actions", "now", "reason", "level", "by")


def _show_would_refuse(result: report.Report, fmt: str) -> None:
    rows = [w.to_json() for w in result.would_refuse]
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "generated_at": report.iso(result.generated_at),
                    "policy_sha256": result.policy_sha256,
                    "would_refuse": rows,
                },
                indent=2,
            )
        )
        return
    for row in rows:
        row["actions"] = ",".join(row["actions"])
        row["sources"] = "; ".join(row["sources"])
        if fmt == "table":
            row["by"] = row["by"] or "-"
    if fmt == "csv":
        _write_csv(
            [
                {k: "" if row[k] is None else row[k] for k in (*WOULD_REFUSE_COLUMNS, "sources")}
                for row in rows
            ],
            (*WOULD_REFUSE_COLUMNS, "sources"),
        )
        return
    click.echo(f"would be refused if enforcement were on ({len(rows)})")
    print_table(rows, (*WOULD_REFUSE_COLUMNS, "sources"))


# -- gatekeeper log ---------------------------------------------------------------


@click.group("log", invoke_without_command=True)
@click.option("--user", help="Only records about this user.")
@click.option("--repo", help="Only records about this repository.")
@click.option("--since", metavar="WHEN", help="From this date, ISO time or age (7d, 12h).")
@click.option("--reason", metavar="CODE", help="Only this reason code (2fa-not-enrolled...).")
@click.option("--event", metavar="EVENT", help="Only this event (access, policy-change...).")
@click.option("--last", "last", type=click.IntRange(min=1), help="Only the newest N records.")
@click.option("--json", "as_json", is_flag=True, help="JSON (one object per line with --follow).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records until interrupted.")
@click.option("--interval", type=click.FloatRange(min=0.01), default=1.0, hidden=True)
@click.option("--max-wait", type=click.FloatRange(min=0), default=None, hidden=True)
@click.pass_context
def log_cmd(
    cctx: click.Context,
    user: str | None,
    repo: str | None,
    since: str | None,
    reason: str | None,
    event: str | None,
    last: int | None,
    as_json: bool,
    follow: bool,
    interval: float,
    max_wait: float | None,
) -> None:
    """Show the audit log (or verify or prune it: `log verify`, `log prune`)."""
    if cctx.invoked_subcommand is not None:
        given = [user, repo, since, reason, event, last, as_json or None, follow or None]
        if any(v is not None for v in given):
            raise click.UsageError(
                f"options to `log` go with the listing, not with `log {cctx.invoked_subcommand}`."
            )
        return
    import time

    ctx = cctx.find_object(Context)
    assert ctx is not None
    flt = report.LogFilter(
        user=user,
        repo=normalize_repo_name(repo) if repo else None,
        since=report.parse_when(since, time.time()) if since else None,
        reason=reason,
        event=event,
    )
    if follow and last is None:
        last = 10
    with ctx.store() as store:
        records = flt.records(store)
        after = int(records[-1]["seq"]) if records else 0
        if last is not None:
            records = records[-last:]
        if as_json and not follow:
            click.echo(json.dumps([report.readable(r) for r in records], indent=2))
            return
        if not as_json:
            click.echo(report.log_header())
        _print_records(records, as_json)
        if not follow:
            return
        try:
            report.follow(
                store,
                flt,
                after,
                lambda batch: _print_records(batch, as_json),
                interval=interval,
                max_wait=max_wait,
            )
        except KeyboardInterrupt:
            pass


def _print_records(records: list[dict[str, Any]], as_json: bool) -> None:
    for row in records:
        record = report.readable(row)
        if as_json:
            click.echo(json.dumps(record, separators=(",", ":")))
        else:
            click.echo(report.log_line(record))


@log_cmd.command("verify")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def log_verify(ctx: Context, as_json: bool) -> None:
    """Check the hash chain and the head file; name every edited, deleted, reordered
    or cut-off record. Exit 1 on any problem; 5 when a file of the state cannot be
    read (a permission problem, not tampering). A write that a crash interrupted is
    recovered and said so; it is no problem."""
    try:
        with ctx.store() as store:
            result = report.check_log(store)
    except PermissionDenied as exc:
        _permission_problem(exc, as_json)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        span = f"records {result.first}-{result.last}" if result.records else "no records"
        if result.anchor:
            span += f", after the prune anchor at record {result.anchor[0]}"
        head = f"record {result.head[0]}" if result.head else "nothing (missing)"
        click.echo(f"audit log: {result.records} record(s) ({span}); the head file names {head}")
        if result.recovered is not None:
            click.echo(
                "audit log: recovered an interrupted write: "
                + report.describe_recovery(result.recovered)
            )
        for line in report.describe_findings(result.findings):
            click.echo(f"  {line}")
        if result.ok:
            click.echo("audit log: intact")
        else:
            click.echo(
                f"audit log: NOT intact: {len(result.findings)} problem(s); it was changed "
                "outside gatekeeper, or restored from an older backup",
                err=True,
            )
    sys.exit(0 if result.ok else 1)


def _permission_problem(exc: PermissionDenied, as_json: bool) -> NoReturn:
    """Not tampering, and not "intact" either: the log could not be read. Its own
    words and exit code, so that a cron job does not page anyone about tampering."""
    if as_json:
        click.echo(
            json.dumps(
                {"ok": None, "error": "permission", "message": exc.message, "hint": exc.hint},
                indent=2,
            )
        )
    else:
        click.echo(f"audit log: cannot be checked: {exc.message}", err=True)
        click.echo(
            "audit log: this is a permission problem (owner or mode of a file in the "
            "state directory), not tampering",
            err=True,
        )
        if exc.hint:
            click.echo(f"gatekeeper: hint: {exc.hint}", err=True)
    sys.exit(exc.exit_code)


@log_cmd.command("prune")
@click.option(
    "--before",
    required=True,
    metavar="WHEN",
    help="Remove records older than this date, ISO time or age (90d).",
)
@click.option("--force", is_flag=True, help="Prune even if the log does not verify.")
@click.pass_obj
def log_prune(ctx: Context, before: str, force: bool) -> None:
    """Remove old records; an anchor keeps the rest verifiable."""
    import time

    cutoff = report.parse_when(before, time.time())
    with ctx.store() as store:
        removed = report.prune(store, cutoff, actor=actor(), force=force)
        anchor = store.audit_anchor()
    if not removed:
        click.echo(f"nothing to prune: no record before {cutoff}")
        return
    assert anchor is not None
    click.echo(
        f"pruned {removed} record(s) before {cutoff}; the log verifies on from "
        f"the anchor at record {anchor[0]}"
    )


def register(group: click.Group) -> None:
    group.add_command(audit_cmd)
    group.add_command(log_cmd)
