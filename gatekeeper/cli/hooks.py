"""`gatekeeper hooks install|uninstall|status`: click over gatekeeper.hooks.install."""

from __future__ import annotations

import sys

import click

from gatekeeper.cli.common import Context, actor, emit
from gatekeeper.hooks.install import (
    Outcome,
    install,
    select_repositories,
    status,
    uninstall,
)


def report(ctx: Context, event: str, outcomes: list[Outcome]) -> None:
    if not outcomes:
        click.echo(f"no repositories under {ctx.policy.server.repositories}")
    changed = {}
    for o in outcomes:
        if o.error is not None:
            click.echo(f"{o.name}: error: {o.error}", err=True)
            if o.hint:
                click.echo(f"{o.name}: hint: {o.hint}", err=True)
        else:
            click.echo(f"{o.name}: {o.result}")
            if not o.result.startswith(("unchanged", "not installed")):
                changed[o.name] = o.result
    if changed:
        with ctx.store() as store:
            store.audit(event, actor=actor(), detail={"repositories": changed})
    if any(o.error is not None for o in outcomes):
        sys.exit(1)


@click.group("hooks")
def hooks_group() -> None:
    """Install the git hooks that re-check every push (README: Hooks)."""


@hooks_group.command("install")
@click.argument("repos", nargs=-1, metavar="[REPO]...")
@click.option("--all", "all_repos", is_flag=True, help="Every repository under the root.")
@click.pass_obj
def install_cmd(ctx: Context, repos: tuple[str, ...], all_repos: bool) -> None:
    """Install the pre-receive hook into repositories (idempotent). An existing hook
    is kept as pre-receive.legacy and chained."""
    targets = select_repositories(ctx.policy, repos, all_repos)
    report(ctx, "hooks-install", install(targets, sys.executable, ctx.config))


@hooks_group.command("uninstall")
@click.argument("repos", nargs=-1, metavar="[REPO]...")
@click.option("--all", "all_repos", is_flag=True, help="Every repository under the root.")
@click.pass_obj
def uninstall_cmd(ctx: Context, repos: tuple[str, ...], all_repos: bool) -> None:
    """Remove gatekeeper's hook and restore the hook it replaced."""
    report(ctx, "hooks-uninstall", uninstall(select_repositories(ctx.policy, repos, all_repos)))


@hooks_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status_cmd(ctx: Context, as_json: bool) -> None:
    """List every repository's hook: ok, missing, stale, foreign or hooks-path.
    Exit 1 when any is not ok."""
    states = status(ctx.policy, sys.executable, ctx.config)
    rows = [
        {
            "repo": s.name,
            "state": s.state,
            "legacy": "yes" if s.legacy else "no",
            "path": str(s.path),
        }
        for s in states
    ]
    emit(rows, ("repo", "state", "legacy"), as_json)
    if any(s.state != "ok" for s in states):
        sys.exit(1)
