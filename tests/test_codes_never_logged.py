"""No code and no recovery code is ever written to a log, on any front-end.

The embedded server once logged `'2fa confirm 616866'` and `'2fa verify 616866'`. Here
a developer runs every 2FA command that takes a code (right ones, a wrong one, a
recovery code, GitLab's spelling, one refused for trailing junk) through a real sshd in
both modes and through `gatekeeper serve`; then every log gatekeeper and the servers
keep (the audit log, the server log file, sshd's and serve's own output) is searched for
each code.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatekeeper import totp
from testing.fronts import KINDS, Front, start_front
from testing.installation import Installation

pytestmark = pytest.mark.sshd

POLICY = """\
teams:
  dev:
    members: [bob]
repositories:
  - match: app
    read: [dev]
"""


def build(inst: Installation) -> None:
    inst.repo("app")


@pytest.fixture(params=KINDS)
def front(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Front]:
    yield from start_front(str(request.param), tmp_path, POLICY, ("bob",), build)


def ssh(front: Front, command: str) -> subprocess.CompletedProcess[str]:
    """`ssh git@HOST COMMAND` with bob's key, as bob would type it."""
    env = front.git_env("bob")
    login = front.server.user if front.server is not None else "git"
    argv = [*shlex.split(env["GIT_SSH_COMMAND"]), f"{login}@127.0.0.1", command]
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def test_every_code_command_leaves_no_code_in_any_log(front: Front) -> None:
    enrolled = ssh(front, "2fa enroll")
    assert enrolled.returncode == 0, enrolled.stderr
    secret = re.search(r"secret: ([A-Z2-7]+)", enrolled.stdout)
    assert secret
    step = int(time.time() // 30)
    if time.time() % 30 > 25:  # keep the three steps inside the window throughout
        time.sleep(31 - time.time() % 30)
        step = int(time.time() // 30)
    first, second, third = (totp.current_code(secret.group(1), (step + i) * 30) for i in (-1, 0, 1))
    confirmed = ssh(front, f"2fa confirm {first}")
    assert confirmed.returncode == 0, confirmed.stderr
    recovery = re.findall(r"^  ([0-9a-z]{4,}(?:-[0-9a-z]+)*)$", confirmed.stdout, re.M)
    assert len(recovery) == 10, confirmed.stdout
    assert ssh(front, f"2fa_verify {second}").returncode == 0
    again = ssh(front, f"2fa recovery-codes {third}")
    assert again.returncode == 0, again.stderr
    fresh = re.findall(r"^  ([0-9a-z]{4,}(?:-[0-9a-z]+)*)$", again.stdout, re.M)
    used = ssh(front, f"2fa verify {fresh[0]}")
    assert used.returncode == 0, used.stderr
    wrong = "135791"
    assert ssh(front, f"2fa disable {wrong}").returncode != 0
    junk = ssh(front, f"2fa verify {third} junk;")
    assert junk.returncode != 0
    secrets = [first, second, third, wrong, *recovery, *fresh, secret.group(1)]

    logs = {"audit": json.dumps(front.inst.audit())}
    for path in front.inst.state.glob("gatekeeper.log*"):
        logs[path.name] = path.read_text(errors="replace")
    if front.server is not None:
        logs["sshd"] = front.server.log_text()
    if front.served is not None:
        logs["serve"] = front.served.log()
    # The server log file exists once something was worth logging (serve logs each
    # command it ran; behind sshd only faults are).
    for name, text in logs.items():
        for value in secrets:
            assert value not in text, f"{value!r} is in the {name} log"
