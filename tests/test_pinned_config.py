"""A repository's own config cannot choose the programs git runs for it.

An outside attack set `core.hooksPath` in a served repository's `config` to a directory
of someone else's hooks: a push through gatekeeper ran that directory's pre-receive,
update, post-receive and reference-transaction, and not gatekeeper's pre-receive. The
forced command now pins every such setting on git's command line (protected
configuration); these tests push through each front-end with a repository config that
tries, and check that only gatekeeper's hooks ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gatekeeper import shell, sshcmd
from testing.fronts import KINDS, Front, start_front
from testing.installation import Installation, git, make_bare_repo

pytestmark = pytest.mark.sshd

POLICY = """\
teams:
  dev:
    members: [alice]
repositories:
  - match: "**"
    read: [dev]
    write: [dev]
"""

FOREIGN_HOOKS = (
    "pre-receive",
    "update",
    "post-receive",
    "post-update",
    "reference-transaction",
    "push-to-checkout",
    "proc-receive",
)


def foreign_hooks(directory: Path, marks: Path) -> None:
    """Hooks that would leave a mark and let everything through."""
    directory.mkdir(parents=True)
    marks.mkdir()
    for name in FOREIGN_HOOKS:
        hook = directory / name
        hook.write_text(f"#!/bin/sh\ncat >/dev/null\ntouch {marks}/{name}\nexit 0\n")
        hook.chmod(0o755)


def build(inst: Installation) -> None:
    make_bare_repo(inst.repos, "app")
    base = make_bare_repo(inst.repos, "base")
    inst.gk("hooks", "install", "--all")
    marks = inst.base / "marks"
    foreign_hooks(inst.base / "elsewhere", marks)
    app = inst.repos / "app.git"
    # Set after gatekeeper's hook is in place, as a later edit of the config would be.
    git("config", "core.hooksPath", str(inst.base / "elsewhere"), cwd=app)
    # An alternate makes receive-pack list its refs, by a command the config may name.
    (app / "objects" / "info").mkdir(exist_ok=True)
    (app / "objects" / "info" / "alternates").write_text(f"{base / 'objects'}\n")
    git("config", "core.alternateRefsCommand", f"touch {marks}/alternate-refs; true", cwd=app)
    # And through an include, which the repository's config can pull in.
    extra = inst.base / "included.conf"
    extra.write_text(f"[core]\n\thooksPath = {inst.base / 'elsewhere'}\n")
    git("config", "include.path", str(extra), cwd=app)


@pytest.fixture(params=KINDS)
def front(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Front]:
    yield from start_front(str(request.param), tmp_path, POLICY, ("alice",), build)


def test_a_push_runs_gatekeepers_hook_and_none_the_config_names(front: Front) -> None:
    work = front.tmp_path / "work"
    cloned = front.git("alice", "clone", front.url("app"), str(work))
    assert cloned.returncode == 0, cloned.stderr
    (work / "f.txt").write_text("f\n")
    git("add", "f.txt", cwd=work)
    git("commit", "-qm", "f", cwd=work)
    push = front.git("alice", "push", "origin", "HEAD", cwd=work)
    assert push.returncode == 0, push.stderr
    marks = front.inst.base / "marks"
    assert sorted(p.name for p in marks.iterdir()) == []
    # gatekeeper's pre-receive ran: it records each ref update.
    updates = front.inst.audit(event="ref-update", user="alice")
    assert [(r["repo"], r["detail"].count("refs/heads/main")) for r in updates] == [("app", 1)]


def test_the_forced_commands_git_argv_pins_the_program_settings(tmp_path: Path) -> None:
    """Every git the forced command starts carries the pinned settings before its
    subcommand, where git reads them as protected configuration."""
    for verb in ("git-upload-pack", "git-receive-pack", "git-upload-archive"):
        request = sshcmd.GitRequest(verb, "app")
        argv = shell.git_argv(request, "/srv/git/app.git", "HOOK")
        sub = argv.index(request.git_subcommand)
        settings = [argv[i + 1] for i in range(1, sub) if argv[i] == "-c"]
        names = {s.split("=", 1)[0] for s in settings}
        assert {"core.hooksPath", "core.alternateRefsCommand", "gpg.program"} <= names
        assert "core.hooksPath=/srv/git/app.git/hooks" in settings
