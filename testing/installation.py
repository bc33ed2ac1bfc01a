"""A real gatekeeper installation in a temporary directory, for tests: a policy file,
an initialised store, bare repositories with commits, users and keys, and git run as
a real client (`Installation`, `git`, `make_bare_repo`). tests/conftest.py makes
fixtures of it (`gk`, `pg_gk`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GATEKEEPER = str(BIN / "gatekeeper")
GATEKEEPER_SHELL = str(BIN / "gatekeeper-shell")


def git(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    base = {
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(cwd or ROOT),
    }
    full = {**os.environ, **base, **(env or {})}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=full, capture_output=True, text=True, check=check, timeout=120
    )


def make_bare_repo(root: Path, name: str, files: dict[str, str] | None = None) -> Path:
    """A bare repository `<root>/<name>.git` with one commit on `main`."""
    bare = root / f"{name}.git"
    bare.parent.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("config", "daemon.uploadarch", "true", cwd=bare)
    work = root.parent / f".seed-{name.replace('/', '-')}"
    git("init", "-q", "-b", "main", str(work))
    for path, text in (files or {"README.md": f"# {name}\n"}).items():
        (work / path).write_text(text)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "initial", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    return bare


DEFAULT_POLICY = """\
teams:
  platform:
    members: [alice, bob]
    require_2fa: enrolled
  contractors:
    members: [carol]
repositories:
  - match: platform/*
    read: [contractors]
    write: [platform]
  - match: platform/secrets
    require_2fa: verified
  - match: docs
    public: true
    write: [platform]
"""


class Installation:
    """One gatekeeper: policy file, state directory, repositories root."""

    def __init__(
        self,
        base: Path,
        policy: str = DEFAULT_POLICY,
        host: str = "git.example.com",
        port: int = 22,
        user: str = "git",
        store_url: str = "",
    ) -> None:
        self.base = base
        self.store_url = store_url  # "" is SQLite in the state directory
        self.config = base / "config.yaml"
        self.repos = base / "repositories"
        self.state = base / "state"
        self.keys = base / "keys"
        self.repos.mkdir(parents=True, exist_ok=True)
        self.keys.mkdir(exist_ok=True)
        self._last_step: dict[str, int] = {}
        self.env = {
            **os.environ,
            "GATEKEEPER_CONFIG": str(self.config),
            "GATEKEEPER_CACHE_DIR": str(base / "cache"),
        }
        self.write_policy(policy, host=host, port=port, user=user)

    def write_policy(
        self,
        body: str,
        *,
        host: str = "git.example.com",
        port: int = 22,
        user: str = "git",
        two_factor: str = "",
    ) -> None:
        server = textwrap.dedent(f"""\
            server:
              host: {host}
              port: {port}
              user: {user}
              repositories: {self.repos}
              state_dir: {self.state}
            """)
        if self.store_url:
            server += f"  store: {self.store_url}\n"
        tf = two_factor or "two_factor:\n  max_failures: 3\n"
        self.config.write_text(server + tf + body)

    def gk(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [GATEKEEPER, *args],
            input=input,
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"gatekeeper {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def init(self) -> Installation:
        self.gk("init")
        return self

    def add_user(self, name: str, key_type: str = "ed25519") -> tuple[Path, int]:
        """Add a user with a fresh key; return (private key path, key id)."""
        self.gk("user", "add", name)
        private = self.keys / name
        if not private.exists():
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    key_type,
                    "-N",
                    "",
                    "-C",
                    f"{name}@test",
                    "-f",
                    str(private),
                ],
                check=True,
            )
        self.gk("key", "add", name, str(private) + ".pub")
        return private, self.key_id(name)

    def key_id(self, name: str) -> int:
        import json

        rows = json.loads(self.gk("key", "list", name, "--json").stdout)
        return int(rows[-1]["id"])

    def repo(self, name: str, files: dict[str, str] | None = None) -> Path:
        return make_bare_repo(self.repos, name, files)

    def shell(
        self,
        key_id: int,
        command: str | None,
        *,
        stdin: str = "",
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run gatekeeper-shell as sshd would for `key_id` with SSH_ORIGINAL_COMMAND."""
        env = {k: v for k, v in self.env.items() if not k.startswith("SSH_")}
        env["SSH_CONNECTION"] = "127.0.0.1 50000 127.0.0.1 22"
        if command is not None:
            env["SSH_ORIGINAL_COMMAND"] = command
        env.update(extra_env or {})
        return subprocess.run(
            [GATEKEEPER_SHELL, "--config", str(self.config), str(key_id)],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    def secret(self, user: str) -> str:
        """Read a user's TOTP secret back from the store (tests play the phone)."""
        from gatekeeper import totp
        from gatekeeper.store import Store

        with Store.open(self.state, self.store_url) as store:
            record = store.get_user(user)
            row = store.get_totp(record.id)
            assert row is not None
            return totp.decrypt_secret(
                totp.load_server_key(store.server_key_path), record.id, row.secret
            )

    def code(self, user: str, offset_steps: int | None = None) -> str:
        """A code for `user`, as their phone would show it.

        With no offset: a code the server has not seen yet, from the current step or
        later (waiting if needed), so each call can be used once. The step it picks
        stays inside the server's +-1 window for at least 30 seconds, so a loaded
        machine cannot turn it stale. With an offset: the raw code that many steps away.
        """
        from gatekeeper import totp

        secret = self.secret(user)
        if offset_steps is not None:
            return totp.current_code(secret, time.time() + 30 * offset_steps)
        now_step = int(time.time() // 30)
        step = max(self._last_step.get(user, now_step - 1) + 1, now_step)
        if step > now_step + 1:
            time.sleep((step - 1) * 30 - time.time() + 0.05)
        self._last_step[user] = step
        return totp.current_code(secret, step * 30)

    def enroll(self, user: str) -> None:
        """Enroll and confirm `user` with the admin CLI, as an admin would."""
        self.gk("2fa", "enroll", user, "--no-qr")
        self._last_step.pop(user, None)
        self.gk("2fa", "confirm", user, self.code(user))

    def enrolled_reader(self) -> int:
        """The repository platform/api and bob (team platform in DEFAULT_POLICY), enrolled,
        so his fetch is allowed: his key id. The most common start of a git-path test."""
        self.repo("platform/api")
        _, key_id = self.add_user("bob")
        self.enroll("bob")
        return key_id

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        from gatekeeper.store import Store

        with Store.open(self.state, self.store_url) as store:
            return store.audit_records(**filters)


def password_file_url(server: Any, url: str) -> str:
    """`url` with its password from `password_file=`: sshd hands forced commands a clean
    environment, so PGPASSFILE would not reach them."""
    return str(server.url_with_password_file(url.rsplit("/", 1)[1]))


def avoid_step_boundary(margin: float = 3.0) -> None:
    """Wait out the end of a TOTP step, so codes computed now stay in the window."""
    left = 30 - time.time() % 30
    if left < margin:
        time.sleep(left + 0.1)


def next_code_step() -> None:
    """Sleep into the next 30 s TOTP step (so a fresh code is not a replay)."""
    time.sleep(30 - time.time() % 30 + 0.1)
