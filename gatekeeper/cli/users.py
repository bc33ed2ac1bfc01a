"""`gatekeeper user add|list|remove`."""

from __future__ import annotations

from pathlib import Path

import click

from gatekeeper.cli.common import (
    Context,
    actor,
    authorized_keys_option,
    emit,
    pass_ctx,
    tell_sshd,
    when,
)


@click.group()
def user() -> None:
    """Add, list and remove users."""


@user.command("add")
@click.argument("name")
@pass_ctx
def user_add(ctx: Context, name: str) -> None:
    """Add a user NAME (as the policy's teams name them)."""
    with ctx.store() as store:
        store.add_user(name, actor=actor())
    click.echo(f"added user {name}")


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def user_list(ctx: Context, as_json: bool) -> None:
    """List users, their teams and 2FA state."""
    with ctx.store() as store:
        rows = store.user_status()
    for row in rows:
        row["teams"] = ",".join(t.name for t in ctx.policy.teams_of(row["user"])) or "-"
        if not as_json:
            row["last_verified"] = when(row["last_verified"])
    emit(rows, ("user", "teams", "state", "keys", "last_verified"), as_json)


@user.command("remove")
@click.argument("name")
@authorized_keys_option
@pass_ctx
def user_remove(ctx: Context, name: str, authorized_keys: Path | None) -> None:
    """Remove a user with their keys, enrollment and sessions."""
    with ctx.store() as store:
        store.remove_user(name, actor=actor())
        click.echo(f"removed user {name}")
        tell_sshd(ctx, store, authorized_keys, f"removed user {name}")
    if name in {m for t in ctx.policy.teams.values() for m in t.members}:
        click.echo(f"note: {name} is still listed in the policy's teams", err=True)
