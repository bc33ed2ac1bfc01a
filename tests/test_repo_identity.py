"""One identity for a repository: the one git opens, whatever the path looks like.

An outside attack cloned `none/link.git -> ../secret/x.git` with a key that may use
`none/*` only, and pushed into `secret/x` through it, on all three front-ends; the
audit log said `repo=none/link, allowed`. Here a user of `none/*` tries every shape of
that (a relative and an absolute link, a linked directory, a spelling with `.git`)
through a real sshd in both modes and through `gatekeeper serve`, with the real git
client, and an admin asks `check`, `info` and the audit report about the same names.
Symlinks that stay inside the root are aliases: they reach exactly the repository they
point to, under its name and its rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.fronts import KINDS, Front, start_front
from testing.installation import Installation, git, make_bare_repo

pytestmark = pytest.mark.sshd

POLICY = """\
teams:
  open:
    members: [carol]
  vault:
    members: [alice]
repositories:
  - match: none/*
    read: [open]
    write: [open]
  - match: secret/*
    read: [vault]
    write: [vault]
"""

# How a name that leads into secret/x can be spelled from inside none/.
SHAPES = ("none/link", "none/abs", "none/dir/x")


def build(inst: Installation) -> None:
    """secret/x with content; none/real; and every shape of a way in from none/."""
    make_bare_repo(inst.repos, "secret/x", {"SECRET.txt": "the secret\n"})
    make_bare_repo(inst.repos, "none/real", {"README": "open\n"})
    none = inst.repos / "none"
    os.symlink("../secret/x.git", none / "link.git")
    os.symlink(inst.repos / "secret" / "x.git", none / "abs.git")
    os.symlink("../secret", none / "dir")
    os.symlink("real.git", none / "alias.git")
    make_bare_repo(inst.repos, "none/r.git")  # on disk: none/r.git.git
    inst.gk("hooks", "install", "--all")


@pytest.fixture(params=KINDS)
def front(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Front]:
    yield from start_front(str(request.param), tmp_path, POLICY, ("alice", "carol"), build)


def heads(repo: Path) -> str:
    return git("for-each-ref", cwd=repo).stdout


def test_a_link_into_a_repository_one_may_not_read_is_not_found(front: Front) -> None:
    for shape in SHAPES:
        dest = front.tmp_path / f"clone-{shape.replace('/', '-')}"
        result = front.git("carol", "clone", front.url(shape), str(dest))
        assert result.returncode != 0, f"{front.kind}: {shape} was cloned"
        said = f"repository '{shape}.git' not found, or you do not have access to it"
        assert said in result.stderr
        assert "secret" not in result.stderr.replace(shape, ""), result.stderr
        assert not (dest / "SECRET.txt").exists()
    records = front.inst.audit(event="access", user="carol")
    assert [(r["repo"], r["reason"]) for r in records] == [("secret/x", "not-authorized")] * 3
    requested = [json.loads(r["detail"])["requested"] for r in records]
    assert requested == list(SHAPES)


def test_a_push_through_a_link_never_reaches_the_target(front: Front) -> None:
    target = front.inst.repos / "secret" / "x.git"
    before = heads(target)
    work = front.tmp_path / "work"
    assert front.git("carol", "clone", front.url("none/real"), str(work)).returncode == 0
    git("checkout", "-q", "-b", "intruder", cwd=work)
    (work / "x.txt").write_text("pushed through a link\n")
    git("add", "x.txt", cwd=work)
    git("commit", "-qm", "x", cwd=work)
    for shape in SHAPES:
        push = front.git("carol", "push", front.url(shape), "intruder", cwd=work)
        assert push.returncode != 0, f"{front.kind}: pushed through {shape}"
        assert f"repository '{shape}.git' not found" in push.stderr
    assert heads(target) == before


def test_an_alias_inside_the_rules_reaches_its_target_under_the_targets_name(
    front: Front,
) -> None:
    dest = front.tmp_path / "alias"
    result = front.git("carol", "clone", front.url("none/alias"), str(dest))
    assert result.returncode == 0, result.stderr
    assert (dest / "README").read_text() == "open\n"
    (dest / "b.txt").write_text("b\n")
    git("add", "b.txt", cwd=dest)
    git("commit", "-qm", "b", cwd=dest)
    push = front.git("carol", "push", "origin", "HEAD", cwd=dest)
    assert push.returncode == 0, push.stderr
    access = front.inst.audit(event="access", user="carol")
    assert {r["repo"] for r in access} == {"none/real"}
    assert all(json.loads(r["detail"]).get("requested") == "none/alias" for r in access)
    updates = front.inst.audit(event="ref-update", user="carol")
    assert [r["repo"] for r in updates] == ["none/real"]


def test_the_refusal_echoes_what_the_client_typed(front: Front) -> None:
    result = front.git("carol", "ls-remote", front.url("none/nope.git"))
    assert "repository 'none/nope.git.git' not found" in result.stderr
    # A repository may be called r.git (r.git.git on disk); asked for as r.git.git.
    ok = front.git("carol", "ls-remote", front.url("none/r.git"))
    assert ok.returncode == 0, ok.stderr
    assert front.inst.audit(event="access", user="carol")[-1]["repo"] == "none/r.git"


def test_check_info_and_the_report_name_the_repository_git_opens(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "gk", POLICY).init()
    _, carol = inst.add_user("carol")
    inst.add_user("alice")
    build(inst)
    for shape in SHAPES:
        result = inst.gk("check", "carol", shape, "read", "--json", check=False)
        assert result.returncode == 1, result.stdout
        verdict = json.loads(result.stdout)
        assert (verdict["repo"], verdict["requested"], verdict["allowed"]) == (
            "secret/x",
            shape,
            False,
        )
    text = inst.gk("check", "carol", "none/alias", "read").stdout
    assert "'none/alias' is an alias (symlink) of 'none/real'" in text
    missing = inst.gk("check", "carol", "none/nope", "read").stdout
    assert "no repository 'none/nope' exists" in missing
    info = inst.shell(carol, "info").stdout
    listed = [line.split()[0] for line in info.splitlines() if line.startswith("  none/")]
    assert listed == ["none/r.git", "none/real"]
    report = json.loads(inst.gk("audit", "--format", "json").stdout)
    covered = {rule["match"]: [r["repo"] for r in rule["repos"]] for rule in report["rules"]}
    assert covered == {"none/*": ["none/r.git", "none/real"], "secret/*": ["secret/x"]}
