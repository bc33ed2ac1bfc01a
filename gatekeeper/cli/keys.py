"""`gatekeeper key add|list|remove|sync-index`, and what sshd reads: the
`authorized-keys` lines, the `keys-script` and `keys-command`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from gatekeeper import authkeys
from gatekeeper.cli.common import (
    Context,
    actor,
    authorized_keys_lines,
    authorized_keys_option,
    emit,
    pass_ctx,
    refresh_authorized_keys,
    tell_sshd,
    when,
)
from gatekeeper.errors import InputError
from gatekeeper.files import replace_file


@click.group()
def key() -> None:
    """Add, list and remove SSH public keys."""


@key.command("add")
@click.argument("user_name", metavar="USER")
@click.argument("source", metavar="FILE|-", type=click.File("r"))
@authorized_keys_option
@click.option(
    "--verify-required",
    is_flag=True,
    help="A security key that must prove its PIN (user verification) on every use.",
)
@click.option("--no-touch-required", is_flag=True, hidden=True)
@pass_ctx
def key_add(
    ctx: Context,
    user_name: str,
    source: Any,
    authorized_keys: Path | None,
    verify_required: bool,
    no_touch_required: bool,
) -> None:
    """Register the public key in FILE (or stdin) for USER; prints its fingerprint.
    A security key (sk-ssh-ed25519, sk-ecdsa) needs a touch on every connection;
    --verify-required makes it need its PIN too."""
    from gatekeeper.sshkeys import parse_public_key, refuse_no_touch

    if no_touch_required:
        refuse_no_touch()
    try:
        text = source.read(64 * 1024)
    except (OSError, UnicodeDecodeError) as exc:
        reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise InputError(
            f"cannot read a public key from {source.name}: {reason}.",
            hint="pass the .pub file ssh-keygen wrote (one line: type, key, comment).",
        ) from None
    parsed = parse_public_key(text)
    with ctx.store() as store:
        store.add_key(
            user_name,
            parsed.key_type,
            parsed.blob_b64,
            parsed.fingerprint,
            parsed.bits,
            parsed.comment,
            actor=actor(),
            verify_required=verify_required,
        )
        click.echo(parsed.fingerprint)
        tell_sshd(ctx, store, authorized_keys, f"added {parsed.fingerprint} for {user_name}")


@key.command("list")
@click.argument("user_name", metavar="[USER]", required=False)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def key_list(ctx: Context, user_name: str | None, as_json: bool) -> None:
    """List keys (of USER)."""
    with ctx.store() as store:
        keys = store.list_keys(user_name)
    rows = [
        {
            "id": k.id,
            "user": k.user,
            "fingerprint": k.fingerprint,
            "type": k.key_type,
            "bits": k.bits,
            "security_key": k.factor or ("-" if not as_json else None),
            "comment": k.comment,
            "added": k.added_at if as_json else when(k.added_at),
        }
        for k in keys
    ]
    columns = ("id", "user", "fingerprint", "type", "bits", "security_key", "added", "comment")
    emit(rows, columns, as_json)


@key.command("remove")
@click.argument("fingerprint")
@authorized_keys_option
@pass_ctx
def key_remove(ctx: Context, fingerprint: str, authorized_keys: Path | None) -> None:
    """Remove the key with FINGERPRINT (SHA256:...)."""
    with ctx.store() as store:
        removed = store.remove_key(fingerprint, actor=actor())
        click.echo(f"removed {fingerprint} ({removed.user})")
        tell_sshd(ctx, store, authorized_keys, f"removed {fingerprint} ({removed.user})")


@click.command("authorized-keys")
@click.option(
    "--write",
    "target",
    # No checks by click: authkeys.write_file names what is wrong in one line with a hint.
    type=click.Path(path_type=Path, readable=False),
    help="Update this file in place between gatekeeper's marker lines.",
)
@pass_ctx
def authorized_keys_cmd(ctx: Context, target: Path | None) -> None:
    """Print (or --write) the authorized_keys lines for every registered key."""
    with ctx.store() as store:
        if target is None:
            click.echo(authkeys.render_block(authorized_keys_lines(ctx, store)), nl=False)
            return
        changed = refresh_authorized_keys(ctx, store, target)
    click.echo(f"{'updated' if changed else 'unchanged'}: {target}")


@key.command("sync-index")
@pass_ctx
def key_sync_index(ctx: Context) -> None:
    """Rebuild this host's key index (what keys-command reads) from the store. Key
    changes keep it up to date; run this after restoring a backup, and from cron on
    front-ends of a shared PostgreSQL store whose AuthorizedKeysCommandUser cannot
    read the database."""
    with ctx.store() as store:
        written, removed = store.sync_key_index()
    click.echo(f"key index: {written} written, {removed} removed")


@click.command("keys-script")
@click.option(
    "--write",
    "target",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write it to this file (mode 0755) instead of printing it.",
)
@pass_ctx
def keys_script_cmd(ctx: Context, target: Path | None) -> None:
    """The AuthorizedKeysCommand as a shell script (`SCRIPT %u %f`): it reads the key
    index with no interpreter start, and hands only a key the index does not have to
    `gatekeeper keys-command`. sshd needs it, and every directory above it, owned by
    root and not writable by others."""
    server = ctx.policy.server
    text = authkeys.keys_script(ctx.config, server.state_dir_str, server.user)
    if target is None:
        click.echo(text, nl=False)
        return
    try:
        # 0755: sshd runs it; it holds no secret.
        replace_file(target, text.encode("utf-8"), mode=0o755, exact_mode=True)
    except OSError as exc:
        raise InputError(
            f"cannot write {target}: {exc.strerror or exc}",
            hint="write it where root keeps programs (sshd wants it root-owned).",
        ) from exc
    click.echo(f"wrote {target}: AuthorizedKeysCommand {target} %u %f")


@click.command("keys-command", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@pass_ctx
def keys_command_cmd(ctx: Context, args: tuple[str, ...]) -> None:
    """For sshd's AuthorizedKeysCommand: `keys-command %u %t %k` (or `%u %f`)."""
    sys.exit(authkeys.keys_command(["--config", str(ctx.config), *args]))
