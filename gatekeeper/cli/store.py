"""`gatekeeper init`, `migrate` and `store copy`: the state itself."""

from __future__ import annotations

import click

from gatekeeper.cli.common import Context, pass_ctx, record_policy_change
from gatekeeper.store import SCHEMA_VERSION, Store


@click.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Create the state directory, the database and the server key (0600)."""
    from gatekeeper import totp

    ctx.creates_state = True
    server = ctx.policy.server
    store = Store.create(server.state_dir, server.store)
    existed = store.schema_before > 0
    try:
        if not store.server_key_path.exists():
            totp.create_server_key(store.server_key_path)
            click.echo(f"created server key {store.server_key_path} (mode 0600)")
        else:
            totp.load_server_key(store.server_key_path)
        record_policy_change(store, ctx.policy)
        head = store.adopt_head()
        if head is not None:
            click.echo(f"this host's audit head starts at record {head[0]}")
        store.sync_key_index()
    finally:
        store.close()
    click.echo(f"{'store is up to date' if existed else 'created store'}: {store.where}")


@click.command()
@pass_ctx
def migrate(ctx: Context) -> None:
    """Upgrade the state database's schema."""
    store = Store.create(ctx.policy.server.state_dir, ctx.policy.server.store)
    try:
        store.sync_key_index()
    finally:
        store.close()
    before, now = store.schema_before, SCHEMA_VERSION
    change = f"migrated from schema {before} to {now}" if before < now else f"at schema {now}"
    click.echo(f"store {change}: {store.where}")


# -- store copy -----------------------------------------------------------------------

COPY_TIMEOUT_MS = 60_000


@click.group("store")
def store_group() -> None:
    """Where the state lives: a SQLite file or a shared PostgreSQL database."""


@store_group.command("copy")
@click.argument("source")
@click.argument("dest")
@click.option("--replace", is_flag=True, help="Overwrite a destination that has data.")
@pass_ctx
def store_copy(ctx: Context, source: str, dest: str, replace: bool) -> None:
    """Copy every user, key, 2FA state and audit record from SOURCE to DEST.

    Each is a path (a directory means its gatekeeper.db), sqlite:///PATH or
    postgresql://USER@HOST:PORT/DB (password from password_file=, PGPASSFILE or
    PGPASSWORD, never in the URL). DEST is created at the current schema if needed.
    Writes to SOURCE wait while it is copied; the copy is checked (row counts and the
    audit chain) before it commits. Then point server.store at DEST on every host.
    """
    from gatekeeper.store.copy import copy_store

    state_dir = ctx.policy.server.state_dir
    # An admin command may wait longer than a git client: a big log takes a while.
    with (
        Store.open(state_dir, source, busy_timeout_ms=COPY_TIMEOUT_MS) as src,
        Store.create(state_dir, dest, busy_timeout_ms=COPY_TIMEOUT_MS) as dst,
    ):
        result = copy_store(src, dst, replace=replace)
    total = sum(result.rows.values())
    counts = ", ".join(f"{n} {t}" for t, n in result.rows.items() if n)
    click.echo(f"copied {total} rows from {src.where} to {dst.where}: {counts or 'nothing'}")
    if result.audit_last:
        seq, digest = result.audit_last
        click.echo(f"audit chain verified: records up to {seq}, last hash {digest[:16]}")
    if result.replaced:
        click.echo("the destination's earlier contents were replaced")
    click.echo(
        "next: set server.store in the policy file of every front-end to the destination; "
        f"each needs the same server key ({src.server_key_path.name} in its state_dir)."
    )
