"""The admin CLI: thin click commands over the library functions.

Each command loads the policy and the store, calls plain functions, and prints a
table (or JSON with --json). Expected failures are `GatekeeperError`s, printed by
`main()` as one line plus a hint, with a non-zero exit; never a traceback.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from gatekeeper import authkeys, decision, installation, twofactor
from gatekeeper.errors import GatekeeperError, InputError, NotFound, PolicyError, render
from gatekeeper.policy import (
    Policy,
    check_policy_text,
    default_config_path,
    load_policy,
)
from gatekeeper.store import SCHEMA_VERSION, Store


def actor() -> str:
    """Who ran the command, for the audit log (the human behind sudo, if any; root,
    not the state's owner the command switched to)."""
    if _invoker:
        return _invoker[0]
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return os.environ.get("SUDO_USER") or name


_invoker: list[str] = []  # actor() as it was before the switch to the state's owner


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def emit(rows: list[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_table(rows, columns)


class Context:
    """What every command gets: the policy and the store. Run as root, the first look
    at the policy also makes the command run as the state directory's owner (see
    gatekeeper.statedir), before anything in the state is touched."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self._policy: Policy | None = None
        self.creates_state = False  # `init`: create a missing state directory for its owner
        self.switch_later = False  # `serve`: listen first (a port below 1024), then switch
        self._switched = False

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            if os.geteuid() == 0 and not self._switched:
                # Only to learn whose the state is: its compiled cache is written by
                # whoever the command then runs as (the git account's is the one the
                # forced command reads).
                self._policy = load_policy(self.config, use_cache=False)
                if not self.switch_later:
                    self.become_state_owner()
            else:
                self._policy = load_policy(self.config)
        return self._policy

    def become_state_owner(self) -> None:
        """As root: run the rest of the command as the state's owner (quietly; said
        only when files had to be given back to it). Otherwise nothing."""
        if self._switched or os.geteuid() != 0:
            return
        from gatekeeper import statedir

        server = self.policy.server
        who = actor()
        self._switched = True
        if statedir.as_state_owner(server.state_dir_str, server.user, create=self.creates_state):
            _invoker[:] = [who]
        try:
            self._policy = load_policy(self.config)
        except PolicyError:
            pass  # unreadable to the account now: the forced command will say so

    def use_policy(self, policy: Policy) -> None:
        """The policy this command is about (`policy install`: the new one)."""
        self._policy = policy

    @contextmanager
    def store(self) -> Iterator[Store]:
        store = Store.open(self.policy.server.state_dir, self.policy.server.store)
        try:
            record_policy_change(store, self.policy)
            yield store
        finally:
            store.close()


def record_policy_change(store: Store, policy: Policy) -> None:
    """Audit a policy whose hash differs from the last one this store has seen: edited
    in place, since `policy install` records its own change. Who edited it is not
    known, so the record names nobody as its actor; it says who noticed, and when the
    file was last written and by whose account it is owned."""
    previous = store.last_policy_hash()
    if previous is None:
        detail0 = {"old": None, "new": policy.sha256, "file": policy.source, "how": "first seen"}
        store.audit("policy-change", actor=actor(), detail=detail0)
        return
    if previous != policy.sha256:
        detail: dict[str, Any] = {
            "old": previous,
            "new": policy.sha256,
            "file": policy.source,
            "how": f"edited in place; noticed by {actor()}",
        }
        try:
            st = os.stat(policy.source)
            detail["modified"] = datetime.fromtimestamp(st.st_mtime, timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            detail["file_owner"] = _account_name(st.st_uid)
        except OSError:
            pass
        store.audit("policy-change", actor=None, detail=detail)


def _account_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="GATEKEEPER_CONFIG",
    default=None,
    help="Policy file (default: $GATEKEEPER_CONFIG or /etc/gatekeeper/config.yaml).",
)
@click.version_option(package_name="gatekeeper")
@click.pass_context
def cli(ctx: click.Context, config: Path | None) -> None:
    """gatekeeper: two-step verification as a condition of reaching Git over SSH."""
    ctx.obj = Context((config or default_config_path()).absolute())


# -- init / migrate --------------------------------------------------------------


@cli.command()
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


@cli.command()
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


# -- store -----------------------------------------------------------------------

COPY_TIMEOUT_MS = 60_000


@cli.group("store")
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
    from gatekeeper.storecopy import copy_store

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


# -- users -----------------------------------------------------------------------


@cli.group()
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
@click.option(
    "--authorized-keys",
    "authorized_keys",
    type=click.Path(path_type=Path, readable=False),
    help="Also rewrite this authorized_keys file (install.sh's own is rewritten anyway).",
)
@pass_ctx
def user_remove(ctx: Context, name: str, authorized_keys: Path | None) -> None:
    """Remove a user with their keys, enrollment and sessions."""
    with ctx.store() as store:
        store.remove_user(name, actor=actor())
        click.echo(f"removed user {name}")
        tell_sshd(ctx, store, authorized_keys, f"removed user {name}")
    if name in {m for t in ctx.policy.teams.values() for m in t.members}:
        click.echo(f"note: {name} is still listed in the policy's teams", err=True)


# -- keys ------------------------------------------------------------------------


@cli.group()
def key() -> None:
    """Add, list and remove SSH public keys."""


@key.command("add")
@click.argument("user_name", metavar="USER")
@click.argument("source", metavar="FILE|-", type=click.File("r"))
@click.option(
    "--authorized-keys",
    "authorized_keys",
    type=click.Path(path_type=Path, readable=False),
    help="Also rewrite this authorized_keys file (install.sh's own is rewritten anyway).",
)
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
@click.option(
    "--authorized-keys",
    "authorized_keys",
    type=click.Path(path_type=Path, readable=False),
    help="Also rewrite this authorized_keys file (install.sh's own is rewritten anyway).",
)
@pass_ctx
def key_remove(ctx: Context, fingerprint: str, authorized_keys: Path | None) -> None:
    """Remove the key with FINGERPRINT (SHA256:...)."""
    with ctx.store() as store:
        removed = store.remove_key(fingerprint, actor=actor())
        click.echo(f"removed {fingerprint} ({removed.user})")
        tell_sshd(ctx, store, authorized_keys, f"removed {fingerprint} ({removed.user})")


def authorized_keys_lines(ctx: Context, store: Store) -> list[str]:
    return [
        authkeys.key_line(
            k.id, k.key_type, k.blob, ctx.config, fingerprint=k.fingerprint, factor=k.factor
        )
        for k in store.list_keys()
    ]


def refresh_authorized_keys(
    ctx: Context, store: Store, path: Path, *, done: str | None = None
) -> bool:
    """Rewrite gatekeeper's block in `path`. `done`: the store change already made, which
    a failure to write must not hide (it stays, and sshd still sees the old lines)."""
    lines = authorized_keys_lines(ctx, store)
    try:
        return authkeys.write_file(path, authkeys.render_block(lines))
    except GatekeeperError as exc:
        if done is None:
            raise
        raise GatekeeperError(
            f"{done}, but {exc.message}",
            hint=f"{(exc.hint or 'fix that').rstrip('.')}; then run "
            f"`gatekeeper authorized-keys --write {path}`.",
        ) from None


def tell_sshd(ctx: Context, store: Store, explicit: Path | None, done: str) -> None:
    """After a key change (`done`, already in the store): rewrite the authorized_keys
    file(s) sshd reads, as install.sh recorded them (gatekeeper/installation.py), or
    say what to run."""
    follow_up = installation.after_key_change(ctx.config, explicit)
    for path in follow_up.rewrite:
        refresh_authorized_keys(ctx, store, path, done=done)
    if follow_up.note:
        click.echo(follow_up.note, err=True)


@cli.command("authorized-keys")
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


@cli.command("keys-script")
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
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o755)  # noqa: S103 - sshd runs it; it holds no secret
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"cannot write {target}: {exc.strerror or exc}",
            hint="write it where root keeps programs (sshd wants it root-owned).",
        ) from exc
    click.echo(f"wrote {target}: AuthorizedKeysCommand {target} %u %f")


@cli.command("keys-command", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@pass_ctx
def keys_command_cmd(ctx: Context, args: tuple[str, ...]) -> None:
    """For sshd's AuthorizedKeysCommand: `keys-command %u %t %k` (or `%u %f`)."""
    sys.exit(authkeys.keys_command(["--config", str(ctx.config), *args]))


# -- two-step verification -------------------------------------------------------


@cli.group("2fa")
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
    click.echo(f"enrolled {user_name}; recovery codes (shown once):")
    for c in codes:
        click.echo(f"  {c}")


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


# -- policy ----------------------------------------------------------------------


@cli.group()
def policy() -> None:
    """Check the policy file."""


@policy.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def policy_check(ctx: Context, file: Path | None) -> None:
    """Validate FILE (default: the configured policy); list every problem."""
    path = file or ctx.config
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"policy file {path} is not UTF-8 text (byte {exc.start})", hint="save it as UTF-8."
        ) from None
    known: set[str] | None = None
    loaded, _ = check_policy_text(text, str(path))
    if loaded is not None:
        try:
            with Store.open(loaded.server.state_dir, loaded.server.store) as store:
                known = store.user_names()
        except GatekeeperError:
            known = None
    result, problems = check_policy_text(text, str(path), known_users=known)
    for p in problems:
        click.echo(p.format(str(path)), err=p.severity == "error")
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    if errors:
        click.echo(f"{path}: {errors} error(s), {warnings} warning(s)", err=True)
        sys.exit(1)
    assert result is not None
    click.echo(
        f"{path}: ok ({len(result.teams)} teams, {len(result.rules)} repository rules, "
        f"{warnings} warning(s))"
    )


@policy.command("install")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def policy_install(ctx: Context, file: Path) -> None:
    """Check FILE and, only if it is valid, make it the live policy in one atomic
    swap, compiled for the forced command and recorded in the audit log with who did
    it. A policy with an error never goes live: every connection would be refused."""
    from gatekeeper import policyinstall

    result = policyinstall.install(ctx.config, file)
    for line in result.problems:
        click.echo(line, err=True)
    if result.policy is None:
        click.echo(f"{file}: not installed; {ctx.config} is unchanged", err=True)
        sys.exit(1)
    if not result.changed:
        click.echo(f"{ctx.config} already is {file}: nothing to install")
        return
    # The new policy names the state (its owner, as root, runs the rest).
    ctx.use_policy(result.policy)
    ctx.become_state_owner()
    compiled = policyinstall.compile_for_connections(ctx.config)
    with Store.open(result.policy.server.state_dir, result.policy.server.store) as store:
        previous = store.last_policy_hash()
        store.audit(
            "policy-change",
            actor=actor(),
            detail={
                "old": previous,
                "new": result.policy.sha256,
                "file": str(ctx.config),
                "how": f"policy install {file}",
            },
        )
    click.echo(
        f"installed {file} as {ctx.config} ({len(result.policy.teams)} teams, "
        f"{len(result.policy.rules)} repository rules){'; compiled' if compiled else ''}"
    )


@cli.command()
@click.argument("user_name", metavar="USER")
@click.argument("repo")
@click.argument("action", type=click.Choice(["read", "write"]))
@click.option("--key", "fingerprint", help="Judge as this key (for verified sessions).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def check(
    ctx: Context, user_name: str, repo: str, action: str, fingerprint: str | None, as_json: bool
) -> None:
    """Explain whether USER may ACTION REPO: rules, level, reason. Exit 0 allow, 1 refuse,
    2 for an unknown user or key or an invalid repository name."""
    from gatekeeper.frontend import best_user_facts
    from gatekeeper.sshcmd import locate_repo, normalize_repo_name

    requested = normalize_repo_name(repo)
    # The forced command's identity of the repository: an alias is judged as the
    # repository it points to.
    located = locate_repo(ctx.policy.server.repositories, requested)
    name = located.name if located is not None else requested
    now = time.time()
    with ctx.store() as store:
        try:
            store.get_user(user_name)
        except NotFound as exc:
            # Exit 2, not 1: a script must tell "refused" from "asked about nobody".
            raise InputError(exc.message, hint=exc.hint) from exc
        keys = store.list_keys(user_name)
        if fingerprint:
            keys = [k for k in keys if k.fingerprint == fingerprint]
            if not keys:
                raise InputError(f"{user_name} has no key {fingerprint}.")
        ufacts = best_user_facts(store, user_name, keys, now)
    verdict = decision.decide(
        ctx.policy, ufacts, name, action, datetime.fromtimestamp(now, timezone.utc)
    )
    # The verdict is the policy's, so a rule can be tried before its repository exists;
    # a missing repository is said, not folded into the exit code.
    allowed, reason = verdict.allowed, verdict.reason
    if as_json:
        click.echo(
            json.dumps(
                {
                    "user": user_name,
                    "repo": name,
                    "requested": requested,
                    "exists": located is not None,
                    "action": action,
                    "allowed": allowed,
                    "reason": reason,
                    "level": verdict.level,
                    "rules": list(verdict.rules),
                    "access_via": list(verdict.access_via),
                    "requirements": [
                        {
                            "source": r.source,
                            "level": r.level,
                            "mode": r.mode,
                            "met": r.met,
                            "grace_until": r.grace_until.isoformat() if r.grace_until else None,
                        }
                        for r in verdict.requirements
                    ],
                    "message": list(verdict.message),
                    "warnings": list(verdict.warnings),
                },
                indent=2,
            )
        )
    else:
        click.echo(f"{user_name} {action} {name}: {'ALLOW' if allowed else 'REFUSE'} ({reason})")
        if located is None:
            click.echo(
                f"  note: no repository '{requested}' exists under "
                f"{ctx.policy.server.repositories}: git access is refused as not found until "
                "it is created"
            )
        elif name != requested:
            click.echo(f"  '{requested}' is an alias (symlink) of '{name}', judged as '{name}'")
        click.echo(f"  matching rules: {', '.join(verdict.rules) or 'none'}")
        click.echo(f"  access via: {', '.join(verdict.access_via) or 'nothing'}")
        for r in verdict.requirements:
            extra = f", grace until {r.grace_until}" if r.grace_until else ""
            click.echo(
                f"  requires {r.level} by {r.source} [{r.mode}{extra}]: "
                f"{'met' if r.met else 'NOT met'}"
            )
        click.echo(f"  level that applies: {verdict.level}")
        for line in (*verdict.message, *verdict.warnings):
            click.echo(f"  > {line}")
    sys.exit(0 if allowed else 1)


@cli.command()
@click.option("--host", help="Address to listen on (default: server.listen_host).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="Port to listen on (default: server.listen_port; 0 picks a free one).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Authenticated connections served at once.",
)
@click.option(
    "--max-startups",
    default="128:30:512",
    show_default=True,
    metavar="START:RATE:FULL",
    help="Connections not authenticated yet: from START on, new ones are dropped with "
    "RATE percent chance, rising to all at FULL (sshd's MaxStartups).",
)
@click.option(
    "--auth-timeout",
    type=click.FloatRange(min=0.1),
    default=20.0,
    show_default=True,
    help="Seconds a client gets to connect and authenticate (sshd's LoginGraceTime).",
)
@pass_ctx
def serve(
    ctx: Context,
    host: str | None,
    port: int | None,
    max_connections: int,
    max_startups: str,
    auth_timeout: float,
) -> None:
    """Run the embedded SSH server until SIGTERM/SIGINT."""
    from gatekeeper import server

    try:
        startups = server.Startups.parse(max_startups)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-startups") from exc
    limits = server.Limits(
        max_connections=max_connections, max_startups=startups, auth_timeout=auth_timeout
    )
    ctx.switch_later = True
    sys.exit(
        server.serve(
            ctx.policy,
            ctx.config,
            host,
            port,
            limits,
            echo=lambda line: click.echo(line),
            after_bind=ctx.become_state_owner,
        )
    )


from gatekeeper.hooks import cli_group as hooks_group  # noqa: E402 - registers `hooks`

cli.add_command(hooks_group())


from gatekeeper.cli_audit import register as register_audit  # noqa: E402 - it imports us

register_audit(cli)  # `audit`, `log`


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="gatekeeper", standalone_mode=False)
    except GatekeeperError as exc:
        click.echo(render(exc, label="error: "), err=True, nl=False)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except OSError as exc:
        # The last resort for a file problem no command foresaw: still one line, no traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        error = GatekeeperError(
            f"{exc.strerror or exc}{where}",
            hint="check that file's owner, mode and file system; run gatekeeper as the git user.",
        )
        click.echo(render(error, label="error: "), err=True, nl=False)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
