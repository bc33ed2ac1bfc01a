"""`gatekeeper audit` and `gatekeeper log`: thin click commands over `report` (the
rollout) and `auditlog` (the log itself).

They use the `Context` every command gets (which records a changed policy whenever
it opens the store).
"""

from __future__ import annotations

import csv
import io
import json
import os
import select
import signal
import sys
from typing import Any, NoReturn

import click

from gatekeeper import report, rollout, rollout_html
from gatekeeper.auditlog import check, read
from gatekeeper.cli.common import Context, actor, print_table, when
from gatekeeper.errors import InputError, PermissionDenied
from gatekeeper.sshcmd import normalize_repo_name
from gatekeeper.store import Store


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
    "--detail",
    is_flag=True,
    help="Every team and repository rule, and each place someone misses a level.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv", "prometheus"]),
    default="table",
    show_default=True,
    help="prometheus: metrics for node_exporter's textfile collector.",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the rollout as one self-contained HTML page.",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=rollout.REFUSAL_WINDOW_DAYS,
    show_default=True,
    metavar="DAYS",
    help="How far back the refusals by reason look (HTML, JSON, prometheus).",
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
    detail: bool,
    fmt: str,
    html_file: str | None,
    window: int,
    fail_if_missing: bool,
) -> None:
    """Who has two-step verification, and who does not meet the level that applies.

    By default: one line with the rollout's state, a row per user (the level that
    applies to them, whether they meet it, their deadline) and a line per team.
    --detail adds every repository rule and each place someone misses a level."""
    with ctx.store() as store:
        result = report.build_report(
            ctx.policy, store, team=team, repo=repo, missing_only=missing_only
        )
        records = store.audit_records()
    view = rollout.build_rollout(result, records, window_days=window)
    if html_file is not None:
        _write_page(html_file, rollout_html.page(view))
    if would_refuse:
        _show_would_refuse(result, fmt)
    elif fmt == "json":
        click.echo(json.dumps({**result.to_json(), "rollout": view.to_json()}, indent=2))
    elif fmt == "csv":
        _write_csv(_rollout_csv(result, view, missing_only), ROLLOUT_CSV_COLUMNS)
    elif fmt == "prometheus":
        click.echo(rollout.prometheus_text(view), nl=False)
    elif detail:
        click.echo(view.summary() + "\n")
        _show_report(result)
    else:
        click.echo(rollout.text(view), nl=False)
    missing = result.missing_users
    if fail_if_missing and missing:
        click.echo(
            f"gatekeeper: {len(missing)} user(s) do not meet the level that applies: "
            f"{', '.join(missing)}",
            err=True,
        )
        sys.exit(1)


ROLLOUT_CSV_COLUMNS = (*report.CSV_COLUMNS, "applies", "meets", "deadline", "days_left")


def _rollout_csv(
    result: report.Report, view: rollout.Rollout, missing_only: bool
) -> list[dict[str, Any]]:
    """The detail rows, each with its user's rollout columns."""
    by_user = {u.user: u for u in view.users}
    rows = report.csv_rows(result, missing_only=missing_only)
    for row in rows:
        u = by_user[row["user"]]
        left = u.days_left(view.today)
        row.update(
            applies=u.level,
            meets="yes" if u.meets else "no",
            deadline=u.deadline.isoformat() if u.deadline else "",
            days_left="" if left is None else left,
        )
    return rows


def _write_page(path: str, text: str) -> None:
    from gatekeeper.files import replace_file

    try:
        replace_file(path, text.encode("utf-8"))
    except OSError as exc:
        raise InputError(
            f"cannot write {path}: {exc.strerror or exc}",
            hint="choose a file in a directory you can write.",
        ) from exc
    click.echo(f"wrote {path}", err=True)


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
    flt = read.LogFilter(
        user=user,
        repo=normalize_repo_name(repo) if repo else None,
        since=read.parse_when(since, time.time()) if since else None,
        reason=reason,
        event=event,
    )
    with ctx.store() as store:
        for column, value in (("reason", reason), ("event", event)):
            if value is not None:
                _check_code(store, column, value)
    if not follow:
        with ctx.store() as store:
            records = flt.records(store)
        if last is not None:
            records = records[-last:]
        if as_json:
            click.echo(json.dumps([read.readable(r) for r in records], indent=2))
            return
        click.echo(read.log_header())
        _print_records(records, as_json)
        return
    # From before the first read: a signal at any moment after this ends it cleanly.
    with StopSignals() as signals, ctx.store() as store:
        records = flt.records(store)
        after = int(records[-1]["seq"]) if records else 0
        if not as_json:
            click.echo(read.log_header())
        _print_records(records[-(last or 10) :], as_json)
        read.follow(
            store,
            flt,
            after,
            lambda batch: _print_records(batch, as_json),
            interval=interval,
            max_wait=max_wait,
            sleep=signals.wait,
            stopped=signals.caught,
        )


class StopSignals:
    """SIGINT and SIGTERM end `log --follow`, whenever they arrive and however it started.

    Not by the KeyboardInterrupt Python raises by default: Python turns SIGINT into one
    only if SIGINT was at its default disposition when the interpreter started, and a
    command started in the background by a non-interactive shell (`... &` in a script or
    a CI job) inherits SIGINT *ignored*, so `kill -INT` (and Ctrl-C) never stopped it.
    The handlers here only note the signal: nothing is raised in the middle of a
    database call or of a record being printed. The wait between polls watches the
    wakeup fd the signal writes to, so it ends at once, and the loop ends at its next
    check. Main thread only, as Python's signal handling is.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self._signal: int | None = None
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._write)
        self._old = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        # A mask inherited from the parent could hold them back as well.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self._signal = signum

    def caught(self) -> bool:
        return self._signal is not None

    def wait(self, seconds: float) -> None:
        if self._signal is None:
            select.select([self._read], [], [], seconds)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._read)
        os.close(self._write)


def _check_code(store: Store, column: str, value: str) -> None:
    """Refuse a reason or event that gatekeeper never writes and the log has never held,
    naming those that exist: an empty table for a misspelt code would read as "nothing
    happened"."""
    from gatekeeper import codes

    catalog = codes.REASONS if column == "reason" else codes.EVENTS
    known = store.audit_values(column)
    if value in known or value in catalog:
        return
    known = sorted({*known, *catalog})
    import difflib

    close = difflib.get_close_matches(value, known, n=1)
    maybe = f" Did you mean '{close[0]}'?" if close else ""
    raise InputError(
        f"there is no {column} '{value}'.{maybe}",
        hint=f"{column}s: {', '.join(known)}.",
    )


def _print_records(records: list[dict[str, Any]], as_json: bool) -> None:
    for row in records:
        record = read.readable(row)
        if as_json:
            click.echo(json.dumps(record, separators=(",", ":")))
        else:
            click.echo(read.log_line(record))


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
            result = check.check_log(store)
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
                + check.describe_recovery(result.recovered)
            )
        for line in check.describe_findings(result.findings):
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

    cutoff = read.parse_when(before, time.time())
    with ctx.store() as store:
        removed = check.prune(store, cutoff, actor=actor(), force=force)
        anchor = store.audit_anchor()
    if not removed:
        click.echo(f"nothing to prune: no record before {cutoff}")
        return
    assert anchor is not None
    click.echo(
        f"pruned {removed} record(s) before {cutoff}; the log verifies on from "
        f"the anchor at record {anchor[0]}"
    )


@log_cmd.command("export")
@click.argument("target", metavar="FILE.db", type=click.Path(dir_okay=False))
@click.pass_obj
def log_export(ctx: Context, target: str) -> None:
    """Write the audit log, users, keys and 2FA state (no secrets) to a new SQLite
    file, with indexes and full-text search, for sqlite-utils or Datasette."""
    from gatekeeper import export

    with ctx.store() as store:
        counts = export.export(store, target)
    shown = ", ".join(f"{n} {table}" for table, n in counts.items())
    click.echo(f"exported {shown} to {target}")
