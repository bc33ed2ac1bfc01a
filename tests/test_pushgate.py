"""The push gate: an SSH push is re-checked by the forced command, no second interpreter.

For a push over SSH the forced command stays receive-pack's parent and the installed
pre-receive (a shell script) asks it over two pipes (gatekeeper/hooks/pushgate.py). The
push-side tests in test_hooks.py run through it and hold it to everything the Python
hook guaranteed: a policy change or a key removed between connection and push is
caught, bad ref names refuse the whole push, the chained hook runs and can refuse, every
ref update is audited. These tests show the gate is what answers, and that a push
without it still meets the Python hook.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_e2e_sshd import Site, start_site
from test_hooks import clone

from testing.installation import git

pytestmark = pytest.mark.sshd


@pytest.fixture
def hsite(tmp_path: Path) -> Iterator[Site]:
    """The end-to-end site with gatekeeper's hooks in every repository, bob enrolled."""
    for site in start_site(tmp_path, "authorized-keys"):
        site.inst.gk("hooks", "install", "--all")
        site.inst.enroll("bob")
        yield site


def break_the_python_hook(site: Site, repo: str) -> None:
    """Point the installed pre-receive at an interpreter that does not exist: only the
    gate can then allow a push."""
    hook = site.inst.repos / f"{repo}.git" / "hooks" / "pre-receive"
    text = hook.read_text()
    lines = [
        "GATEKEEPER_PYTHON=/nonexistent/python" if line.startswith("GATEKEEPER_PYTHON=") else line
        for line in text.splitlines()
    ]
    hook.write_text("\n".join(lines) + "\n")


def commit(work: Path, name: str) -> None:
    (work / name).write_text(name + "\n")
    git("add", name, cwd=work)
    git("commit", "-qm", name, cwd=work)


def test_an_ssh_push_is_answered_by_the_forced_command(hsite: Site, tmp_path: Path) -> None:
    work = tmp_path / "work"
    bob = clone(hsite, "bob", "platform/api", work)
    break_the_python_hook(hsite, "platform/api")
    commit(work, "a.txt")
    push = bob.git("push", "origin", "main", cwd=work)
    assert push.returncode == 0, push.stderr
    updates = hsite.inst.audit(event="ref-update", user="bob")
    assert [json.loads(u["detail"])["ref"] for u in updates] == ["refs/heads/main"]
    assert updates[0]["repo"] == "platform/api" and updates[0]["reason"] == "allowed"


def test_the_chained_hook_runs_with_the_updates_and_can_refuse(
    hsite: Site,
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    bob = clone(hsite, "bob", "platform/api", work)
    hooks = hsite.inst.repos / "platform" / "api.git" / "hooks"
    seen = tmp_path / "seen"
    legacy = hooks / "pre-receive.legacy"
    legacy.write_text(
        f"#!/bin/sh\ncat > {seen}\nenv | grep -c GATEKEEPER_PUSH_GATE >> {seen}\n"
        'echo "site policy: no pushes today" >&2\nexit 3\n'
    )
    legacy.chmod(0o755)
    break_the_python_hook(hsite, "platform/api")
    commit(work, "b.txt")
    push = bob.git("push", "origin", "main", cwd=work)
    assert push.returncode != 0
    assert "site policy: no pushes today" in push.stderr
    assert "refused by the repository's own pre-receive hook (pre-receive.legacy, exit 3)" in (
        push.stderr
    )
    lines = seen.read_text().splitlines()
    assert lines[0].endswith(" refs/heads/main") and lines[-1] == "0"  # no gate for it
    reasons = [r["reason"] for r in hsite.inst.audit(event="access", user="bob")]
    assert reasons[-1] == "legacy-hook"
    assert hsite.inst.audit(event="ref-update", user="bob") == []


def test_a_local_push_with_a_forged_gate_still_meets_the_python_hook(
    hsite: Site,
    tmp_path: Path,
) -> None:
    """Without the forced command, GATEKEEPER_PUSH_GATE naming descriptors that are not
    open is refused, and without it the Python hook refuses a push that did not come
    through gatekeeper."""
    work = tmp_path / "work"
    clone(hsite, "bob", "platform/api", work)
    commit(work, "c.txt")
    bare = hsite.inst.repos / "platform" / "api.git"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    forged = subprocess.run(
        ["git", "push", str(bare), "main"],
        cwd=work,
        env={**env, "GATEKEEPER_PUSH_GATE": "7:8"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert forged.returncode != 0 and "internal error" in forged.stderr
    plain = subprocess.run(
        ["git", "push", str(bare), "main"], cwd=work, env=env, capture_output=True, text=True
    )
    assert plain.returncode != 0 and "did not come through gatekeeper" in plain.stderr
