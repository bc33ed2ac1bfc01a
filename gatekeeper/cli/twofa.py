"""`gatekeeper 2fa enroll|confirm|reset|unlock|status|recovery-codes` (admin side;
users run theirs over SSH: gatekeeper.usercmd)."""

from __future__ import annotations

import sys

import click

from gatekeeper import twofactor
from gatekeeper.cli.common import Context, actor, emit, pass_ctx, when


@click.group("2fa")
def twofa() -> None:
    """Enroll, confirm, reset and inspect users' two-step verification."""


@twofa.command("enroll")
@click.argument("user_name", metavar="USER")
@click.option("--code", help="Confirm at once with this code from the app.")
@click.option("--replace", is_flag=True, help="Replace a confirmed enrollment (admin).")
@click.option("--no-qr", is_flag=True, help="Do not draw the QR code.")
@pass_ctx
def twofa_enroll(
    ctx: Context, user_name: str, code: str | None, replace: bool, no_qr: bool
) -> None:
    """Start enrollment for USER: prints the otpauth:// URI and a QR code."""
    with ctx.store() as store:
        enrollment = twofactor.enroll(store, ctx.policy, user_name, actor=actor(), replace=replace)
        if not no_qr:
            click.echo(enrollment.qr())
        click.echo(enrollment.uri)
        if code is None and sys.stdin.isatty():
            code = click.prompt(
                "code from the app (empty to confirm later)", default="", show_default=False
            )
        if not code:
            click.echo(f"pending: confirm with `gatekeeper 2fa confirm {user_name} CODE`", err=True)
            return
        codes = twofactor.confirm(store, ctx.policy, user_name, code, actor=actor())
    _enrolled(user_name, codes)


def _enrolled(user_name: str, codes: list[str]) -> None:
    click.echo(f"enrolled {user_name}; recovery codes (shown once):")
    for c in codes:
        click.echo(f"  {c}")


@twofa.command("confirm")
@click.argument("user_name", metavar="USER")
@click.argument("code")
@pass_ctx
def twofa_confirm(ctx: Context, user_name: str, code: str) -> None:
    """Confirm USER's pending enrollment with a current CODE."""
    with ctx.store() as store:
        codes = twofactor.confirm(store, ctx.policy, user_name, code, actor=actor())
    _enrolled(user_name, codes)


@twofa.command("reset")
@click.argument("user_name", metavar="USER")
@pass_ctx
def twofa_reset(ctx: Context, user_name: str) -> None:
    """Remove USER's enrollment, recovery codes and sessions (a lost phone)."""
    with ctx.store() as store:
        had = twofactor.reset(store, user_name, actor=actor())
    click.echo(f"reset {user_name}" + ("" if had else " (was not enrolled)"))


@twofa.command("unlock")
@click.argument("user_name", metavar="USER")
@pass_ctx
def twofa_unlock(ctx: Context, user_name: str) -> None:
    """Lift USER's lockout after wrong codes (and forget the failures counted so far),
    keeping their enrollment. Audited."""
    with ctx.store() as store:
        user = store.get_user(user_name)
        until = store.unlock(user, actor=actor())
    if until is None:
        click.echo(f"{user_name} was not locked out; failures counted so far are cleared")
    else:
        click.echo(f"unlocked {user_name} (was locked until {when(until)} UTC)")


@twofa.command("status")
@click.argument("user_name", metavar="[USER]", required=False)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def twofa_status(ctx: Context, user_name: str | None, as_json: bool) -> None:
    """Who has two-step verification, and when they last verified."""
    with ctx.store() as store:
        if user_name:
            store.get_user(user_name)
        rows = [r for r in store.user_status() if user_name in (None, r["user"])]
    if not as_json:
        for row in rows:
            for k in ("enrolled_at", "last_verified", "locked_until"):
                row[k] = when(row[k])
    emit(
        rows,
        ("user", "state", "enrolled_at", "last_verified", "locked_until", "recovery_codes_left"),
        as_json,
    )


@twofa.command("recovery-codes")
@click.argument("user_name", metavar="USER")
@pass_ctx
def twofa_recovery_codes(ctx: Context, user_name: str) -> None:
    """Regenerate USER's recovery codes (shown once; old ones stop working)."""
    with ctx.store() as store:
        codes = twofactor.new_recovery_codes(store, user_name, actor=actor())
    for c in codes:
        click.echo(c)
