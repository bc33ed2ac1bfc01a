"""One installation behind each of gatekeeper's three front-ends, for tests that must
hold on all of them: a real sshd with `authorized_keys`, a real sshd with
`AuthorizedKeysCommand`, and `gatekeeper serve`; git runs as the real client."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from testing import sshd
from testing.installation import GATEKEEPER, Installation
from testing.net import free_port
from testing.served import HOST, Served, client_env

KINDS = ("authorized-keys", "keys-command", "serve")


class Front:
    """One front-end (sshd with authorized_keys or keys-command, or serve) over one
    installation, running git as one of its users."""

    def __init__(
        self, inst: Installation, kind: str, tmp_path: Path, users: tuple[str, ...]
    ) -> None:
        self.inst = inst
        self.kind = kind
        self.tmp_path = tmp_path
        self.keys = {name: inst.add_user(name)[0] for name in users}
        self.server: sshd.SshServer | None = None
        self.served: Served | None = None

    def git_env(self, user: str) -> dict[str, str]:
        if self.server is not None:
            return self.server.client(self.keys[user]).git_env()
        assert self.served is not None
        return client_env(self.inst, self.keys[user], self.served.port)

    def url(self, repo: str) -> str:
        if self.server is not None:
            return f"ssh://{self.server.user}@{HOST}:{self.server.port}/{repo}.git"
        assert self.served is not None
        return f"ssh://git@{HOST}:{self.served.port}/{repo}.git"

    def git(
        self, user: str, *args: str, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=self.git_env(user),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )


def sshd_front(inst: Installation, kind: str, tmp_path: Path) -> sshd.SshServer:
    """A real sshd (not started yet) in front of `inst`, as install.sh sets it up for
    `kind`: "authorized-keys" (the file gatekeeper writes) or "keys-command"."""
    if kind == "authorized-keys":
        auth = inst.base / "authorized_keys"
        inst.gk("authorized-keys", "--write", str(auth))
        return sshd.SshServer(authorized_keys_file=auth, tmp_dir=tmp_path)
    if kind != "keys-command":
        raise ValueError(f"not an sshd front-end: {kind}")
    wrapper = sshd.make_keys_command_wrapper(
        f'#!/bin/sh\nexec {GATEKEEPER} --config {inst.config} keys-command "$@"\n'
    )
    return sshd.SshServer(keys_command=[str(wrapper), "%u", "%t", "%k"], tmp_dir=tmp_path)


def start_front(
    kind: str,
    tmp_path: Path,
    policy: str,
    users: tuple[str, ...],
    build: Callable[[Installation], None],
) -> Iterator[Front]:
    """`kind`'s front-end over a new installation with `users` (a key each) and what
    `build` puts in it, for as long as the generator is not closed."""
    if kind == "serve":
        port = free_port()
        inst = Installation(tmp_path / "gk", policy, host=HOST, port=port, user="git").init()
        f = Front(inst, kind, tmp_path, users)
        build(inst)
        f.served = Served(inst, port, "--auth-timeout", "5")
        try:
            yield f
        finally:
            f.served.stop()
        return
    inst = Installation(tmp_path / "gk", policy, user=sshd.current_user()).init()
    f = Front(inst, kind, tmp_path, users)
    build(inst)
    with sshd_front(inst, kind, tmp_path) as server:
        inst.write_policy(policy, host="127.0.0.1", port=server.port, user=server.user)
        f.server = server
        yield f
