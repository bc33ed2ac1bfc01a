"""Run the gatekeeper CLI as a throwaway non-root user, where file permissions matter.

The suite runs as root, and root writes anywhere: a test of "the account cannot write
there" needs a real unprivileged account. `throwaway_user()` makes a system user
(useradd, removed afterwards, like tests/test_install.py's git user) and a home for the
test under /tmp that it owns; `AsUser.gk()` runs `python -m gatekeeper.entry` as that
user (runuser) with this checkout and this environment's packages on `PYTHONPATH`.

The interpreter must be one the user can run: this one when it lives where others can
read it (a CI image's /usr/local), else a system interpreter of the same version (the
packages' compiled parts are built for it). Without root, useradd, runuser or such an
interpreter the tests skip, and fail instead when CI=true.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI") == "true"
USER_COMMENT = "gatekeeper permission test"
_counter = itertools.count()


def _unavailable(message: str) -> None:
    if CI:
        pytest.fail(message + " (CI=true: not skipping)")
    pytest.skip(message)


@dataclass(frozen=True)
class AsUser:
    name: str
    uid: int
    gid: int
    home: Path
    """A 0700 directory the user owns, for the installation under test."""
    python: str

    def run(
        self, argv: list[str], env: dict[str, str], *, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        path = os.pathsep.join([str(REPO_ROOT), sysconfig.get_paths()["purelib"]])
        return subprocess.run(
            ["runuser", "-u", self.name, "--", *argv],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            cwd=self.home,
            env={**env, "PYTHONPATH": path, "HOME": str(self.home), "USER": self.name},
            timeout=60,
            check=False,
        )

    def gk(
        self, *args: str, env: dict[str, str], input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`gatekeeper ARGS` as this user."""
        return self.run([self.python, "-m", "gatekeeper.entry", *args], env, input=input)

    def own(self, path: Path) -> None:
        """Give `path` and everything under it to the user."""
        for entry in [path, *path.rglob("*")]:
            os.lchown(entry, self.uid, self.gid)


def _interpreter(name: str) -> str | None:
    """An interpreter `name` can run, of this one's version."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (
        sys.executable,
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
    ):
        if not os.path.exists(candidate):
            continue
        probe = subprocess.run(
            [
                "runuser",
                "-u",
                name,
                "--",
                candidate,
                "-c",
                "import sys; print('%d.%d' % sys.version_info[:2])",
            ],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


@contextmanager
def throwaway_user() -> Iterator[AsUser]:
    if os.geteuid() != 0:
        _unavailable("needs root to make a throwaway user")
    missing = [tool for tool in ("useradd", "userdel", "runuser") if shutil.which(tool) is None]
    if missing:
        _unavailable("needs " + ", ".join(missing))
    name = f"gkp{os.getpid()}x{next(_counter)}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            USER_COMMENT,
            name,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    home = Path(tempfile.mkdtemp(prefix=f"{name}."))
    try:
        account = pwd.getpwnam(name)
        os.chown(home, account.pw_uid, account.pw_gid)
        python = _interpreter(name)
        if python is None:
            _unavailable(f"no Python {sys.version_info[0]}.{sys.version_info[1]} {name} can run")
        assert python is not None
        yield AsUser(name, account.pw_uid, account.pw_gid, home, python)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True, check=False)
