"""What every admin command gets: the `Context` (the policy, the store, run as the
state's owner when started as root), who ran it, the table and JSON printers, and
telling sshd about a key change (`tell_sshd`)."""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from gatekeeper import authkeys, installation
from gatekeeper.errors import GatekeeperError, PolicyError
from gatekeeper.policy import Policy, load_policy
from gatekeeper.store import Store


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


# For commands that change which keys may log in: sshd reads an authorized_keys file
# that only a rewrite brings up to date.
authorized_keys_option = click.option(
    "--authorized-keys",
    "authorized_keys",
    type=click.Path(path_type=Path, readable=False),
    help="Also rewrite this authorized_keys file (install.sh's own is rewritten anyway).",
)


def tell_sshd(ctx: Context, store: Store, explicit: Path | None, done: str) -> None:
    """After a key change (`done`, already in the store): rewrite the authorized_keys
    file(s) sshd reads, as install.sh recorded them (gatekeeper/installation.py), or
    say what to run."""
    follow_up = installation.after_key_change(ctx.config, explicit)
    for path in follow_up.rewrite:
        refresh_authorized_keys(ctx, store, path, done=done)
    if follow_up.note:
        click.echo(follow_up.note, err=True)
