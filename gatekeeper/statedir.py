"""Whose the state directory is, and running the admin CLI as that account.

Light (standard library only): the store's error messages use `ownership_hint`.

The forced command runs as the account sshd logs git users in as (`git`), and reads
and writes every file in the state directory: the database and its WAL files, the
audit head file, the server key. Admins run the `gatekeeper` CLI as root, and a file
a root command creates or replaces there is root's: one `gatekeeper user add` left
`audit.head` root's, mode 0600, and from then on every git access of every user was
refused, and `log verify` reported tampering (issue 20).

So the CLI, run as root, runs each command as the state directory's owner (or, for
`init` before the directory exists, as the policy's `server.user`), switching before it
touches anything in the state and for the whole command, the way `runuser -u git`
would: supplementary groups, group, user, HOME. Files a root command of an earlier
version left there are given back to that owner first. Where the switch is impossible
the command is refused with the command line that works. A state directory that
belongs to root stays root's: nothing to switch to.

SQLite does the same for its own files: run as root, it gives the WAL and shared-memory
files it creates the database file's owner.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys

from gatekeeper.errors import StoreError
from gatekeeper.record import record


@record
class Account:
    name: str
    uid: int
    gid: int
    home: str


def _account(entry: pwd.struct_passwd) -> Account:
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def state_owner(state_dir: str, server_user: str) -> Account | None:
    """The account a root command must run as, or None to stay root: the state
    directory's owner; while the directory does not exist, the policy's `server.user`,
    if there is such an account and it could reach the directory (else the forced
    command, running as it, could not either: leave that to the admin)."""
    try:
        owner = os.stat(state_dir).st_uid
    except FileNotFoundError:
        try:
            account = _account(pwd.getpwnam(server_user))
        except KeyError:
            return None
        if account.uid == os.geteuid() or not _can_reach(state_dir, account):
            return None
        return account
    if owner == os.geteuid():
        return None
    try:
        return _account(pwd.getpwuid(owner))
    except KeyError:
        raise StoreError(
            f"the state directory {state_dir} belongs to uid {owner}, which has no account: "
            "gatekeeper cannot run as it.",
            hint=f"give it to the account the forced command runs as: chown -R git: {state_dir}",
        ) from None


def _can_reach(path: str, account: Account) -> bool:
    """Whether `account` may search every existing directory above `path`."""
    groups = set(os.getgrouplist(account.name, account.gid))
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            st = None
        if st is not None:
            if st.st_uid == account.uid:
                allowed = st.st_mode & stat.S_IXUSR
            elif st.st_gid in groups:
                allowed = st.st_mode & stat.S_IXGRP
            else:
                allowed = st.st_mode & stat.S_IXOTH
            if not allowed:
                return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def create_state_dir(state_dir: str, account: Account) -> None:
    """`init` as root: the state directory the forced command needs, the account's and
    0700, in directories root creates for it (0755, as install.sh makes them)."""
    missing = []
    parent = os.path.dirname(os.path.abspath(state_dir))
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)  # noqa: S103 - not umask 077: the git account must pass
        os.mkdir(state_dir, 0o700)
        os.chown(state_dir, account.uid, account.gid)
    except FileExistsError:
        pass  # made meanwhile: whoever made it, its owner decides
    except OSError as exc:
        raise StoreError(
            f"cannot create state directory {state_dir}: {exc.strerror}",
            hint=f"create it, owned by {account.name} and mode 0700, then run init again.",
        ) from exc


def give_back(state_dir: str, account: Account) -> list[str]:
    """As root, before switching: the files in the state directory that are not the
    owner's (a root command of an earlier version left them) become the owner's again,
    with the group a file the owner created there would have. Returns their names."""
    try:
        st_dir = os.stat(state_dir)
        names = os.listdir(state_dir)
    except OSError:
        return []
    gid = st_dir.st_gid if st_dir.st_mode & stat.S_ISGID else account.gid
    given = []
    for name in sorted(names):
        path = os.path.join(state_dir, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid == account.uid:
                continue
            os.chown(path, account.uid, gid, follow_symlinks=False)
        except OSError:
            continue
        given.append(name)
    return given


def become(account: Account, state_dir: str) -> None:
    """Run the rest of this process as `account`, as `runuser -u NAME` would; refuse
    with that command line when the switch is impossible (no CAP_SETUID, say)."""
    try:
        os.initgroups(account.name, account.gid)
        os.setgid(account.gid)
        os.setuid(account.uid)
    except OSError as exc:
        import shlex

        command = shlex.join(["runuser", "-u", account.name, "--", *sys.argv])
        raise StoreError(
            f"cannot run as {account.name}, the owner of the state directory {state_dir}: "
            f"{exc.strerror}; nothing was changed.",
            hint=f"run the command as {account.name}: {command}",
        ) from exc
    os.environ["HOME"] = account.home


def as_state_owner(state_dir: str, server_user: str, *, create: bool = False) -> str | None:
    """What the CLI does first when root runs it (see the module's docstring); returns
    the name of the account it now runs as, or None when it stays root."""
    if os.geteuid() != 0:
        return None
    account = state_owner(state_dir, server_user)
    if account is None:
        return None
    if create and not os.path.exists(state_dir):
        create_state_dir(state_dir, account)
    for name in give_back(state_dir, account):
        sys.stderr.write(
            f"gatekeeper: note: {os.path.join(state_dir, name)} belonged to another account; "
            f"it is {account.name}'s again\n"
        )
    become(account, state_dir)
    return account.name


def ownership_hint(path: str) -> str:
    """Whose the file is, whose it should be (the state directory's owner, whom the
    forced command runs as), and the command that gives it back."""

    def name(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)

    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        owner = name(os.stat(directory).st_uid)
    except OSError:
        return "the state directory and its files must belong to the account gatekeeper runs as."
    try:
        st = os.stat(path)
        now = f"it belongs to {name(st.st_uid)}, mode {st.st_mode & 0o7777:04o}; "
    except OSError:
        now = ""
    return (
        f"{now}the state directory belongs to {owner}: run gatekeeper as {owner} (as root, "
        f"gatekeeper switches to {owner} by itself), or give the file back with "
        f"`chown {owner}: {path}`. A permission problem, not tampering."
    )
