"""The fetch gate: upload-pack under the forced command, which answers the pack-time
re-check itself (gatekeeper/hooks/fetchgate.py, hooks/fetch-gate.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gatekeeper import frontend, shell
from gatekeeper.hooks import fetchgate
from testing.installation import ROOT, Installation, git, make_bare_repo

# -- the protocol, with a stand-in for upload-pack and pack-objects --------------------------

DRIVER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from gatekeeper.hooks import fetchgate
    scenario, refusal, packer = sys.argv[1], sys.argv[2:3], {packer!r}
    pipes = fetchgate.open_pipes()
    hook = fetchgate.hook_command(packer, pipes, lambda s: "'" + s + "'")
    asked = []
    def recheck():
        asked.append(1)
        return [line for line in refusal if line]
    code = fetchgate.supervise(
        "/bin/sh", ["sh", {upload_pack!r}, scenario, hook], {{"PATH": "/usr/bin:/bin"}},
        pipes, recheck, lambda message: sys.stderr.write("LOG " + message + "\\n"),
    )
    stdin = os.readlink("/proc/self/fd/0")
    sys.stderr.write(f"RESULT {{code}} asked={{len(asked)}} stdin={{stdin}}\\n")
    """
)

# What upload-pack does with the hook, reduced: run it as `HOOK git pack-objects ARGS`
# (through the shell, as git does), in the scenario's way.
UPLOAD_PACK = """\
scenario=$1 hook=$2
req=$(echo "$hook" | cut -d' ' -f4) ans=$(echo "$hook" | cut -d' ' -f5)
case $scenario in
    stale) printf 'pack 1\\n' >&"$req" ;;   # an earlier asker that died unanswered
    garbage) printf 'hello there\\n' >&"$req" ;;
    exit3) exit 3 ;;
    killed) kill -TERM $$ ;;
    notpack) eval "$hook git rev-list --all"; exit $? ;;
esac
eval "$hook git pack-objects --stdout --thin"
"""

PACKER = '#!/bin/sh\necho "PACKED $*" >&2\n'


@pytest.fixture
def stand_ins(tmp_path: Path) -> tuple[Path, Path]:
    upload_pack = tmp_path / "upload-pack.sh"
    upload_pack.write_text(UPLOAD_PACK)
    packer = tmp_path / "packer"
    packer.write_text(PACKER)
    packer.chmod(0o755)
    driver = tmp_path / "driver.py"
    driver.write_text(
        DRIVER.format(root=str(ROOT), packer=str(packer), upload_pack=str(upload_pack))
    )
    return driver, tmp_path


def gate(stand_ins: tuple[Path, Path], scenario: str, refusal: str = "") -> str:
    driver, cwd = stand_ins
    result = subprocess.run(
        [sys.executable, str(driver), scenario, refusal],
        capture_output=True,
        text=True,
        timeout=20,  # a gate that hangs fails here
        cwd=cwd,
        stdin=subprocess.PIPE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_an_allowed_read_packs_with_git_s_arguments(stand_ins: tuple[Path, Path]) -> None:
    err = gate(stand_ins, "ok")
    assert "PACKED pack-objects --stdout --thin" in err
    assert "RESULT 0 asked=1 stdin=/dev/null" in err  # the channel is git's alone


def test_a_refused_read_says_why_and_packs_nothing(stand_ins: tuple[Path, Path]) -> None:
    err = gate(stand_ins, "ok", "gatekeeper: read 'x' refused: it requires a verified session")
    assert "gatekeeper: read 'x' refused: it requires a verified session\n" in err
    assert "PACKED" not in err
    assert "RESULT 1 asked=1" in err  # upload-pack's stand-in exits with the hook's 1


def test_an_earlier_askers_answer_is_not_taken(stand_ins: tuple[Path, Path]) -> None:
    err = gate(stand_ins, "stale", "gatekeeper: refused")
    # The stale asker 1 was answered too, but the hook waited for its own answer.
    assert "RESULT 1 asked=2" in err and "PACKED" not in err
    assert err.count("gatekeeper: refused") == 1


def test_a_malformed_request_refuses_every_pack_without_hanging(
    stand_ins: tuple[Path, Path],
) -> None:
    err = gate(stand_ins, "garbage")
    assert "LOG fetch gate: unexpected request b'hello there\\n'; refusing every pack" in err
    assert "gatekeeper: access refused: internal error (logged on the server)." in err
    assert "PACKED" not in err and "RESULT 1 asked=0" in err


def test_the_hook_runs_only_pack_objects(stand_ins: tuple[Path, Path]) -> None:
    err = gate(stand_ins, "notpack")
    assert "gatekeeper: access refused: internal error" in err
    assert "PACKED" not in err and "RESULT 1 asked=0" in err


@pytest.mark.parametrize(("scenario", "code"), [("exit3", 3), ("killed", 143)])
def test_git_s_exit_status_is_the_forced_command_s(
    stand_ins: tuple[Path, Path], scenario: str, code: int
) -> None:
    assert f"RESULT {code} asked=0" in gate(stand_ins, scenario)


@pytest.mark.parametrize(
    "args",
    [
        ["/usr/bin/git", "12", "4"],  # a descriptor dash cannot name
        ["/usr/bin/git", "3", "x"],
        ["git", "3", "4"],  # git by PATH, not by absolute path
    ],
)
def test_the_script_refuses_what_the_gate_never_passes(args: list[str]) -> None:
    result = subprocess.run(
        ["/bin/sh", fetchgate.SCRIPT, *args, "git", "pack-objects"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == "gatekeeper: access refused: internal error (logged on the server).\n"


def test_pipes_above_descriptor_9_are_not_used() -> None:
    """(The forced command opens them with only 0-2 open: they get 3-6.)"""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(10)]
    try:
        assert fetchgate.open_pipes() is None
    finally:
        for fd in held:
            os.close(fd)


# -- real git: a clone through the gate -------------------------------------------------------

REAL_DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from gatekeeper import frontend, shell
    from gatekeeper.hooks import fetchgate
    repo, flag = sys.argv[-1], {flag!r}
    pipes = fetchgate.open_pipes()
    hook = fetchgate.hook_command(frontend.git_binary(), pipes, shell.quote)
    argv = ["git", "-c", "uploadpack.packObjectsHook=" + hook, "upload-pack", "--", repo]
    def recheck():
        return open(flag).read().splitlines()
    sys.exit(fetchgate.supervise(frontend.git_binary(), argv, {{"PATH": "/usr/bin:/bin"}}, pipes,
                                 recheck, lambda message: None))
    """
)


def test_a_real_clone_through_the_gate(tmp_path: Path) -> None:
    bare = make_bare_repo(tmp_path / "srv", "proj", {"a.txt": "one\n", "b.txt": "two\n"})
    flag = tmp_path / "refusal"
    driver = tmp_path / "upload-pack.py"
    driver.write_text(REAL_DRIVER.format(root=str(ROOT), flag=str(flag)))
    upload_pack = f"{sys.executable} {driver}"

    flag.write_text("gatekeeper: read 'proj' refused: not today.\ngatekeeper: To fix: wait.\n")
    refused = git(
        "clone", "--no-local", "-u", upload_pack, f"file://{bare}", str(tmp_path / "no"),
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "remote: gatekeeper: read 'proj' refused: not today." in refused.stderr
    assert "remote: gatekeeper: To fix: wait." in refused.stderr

    flag.write_text("")
    cloned = git("clone", "--no-local", "-u", upload_pack, f"file://{bare}", str(tmp_path / "ok"))
    assert cloned.returncode == 0
    assert (tmp_path / "ok" / "b.txt").read_text() == "two\n"


# -- the forced command uses the gate for reads ----------------------------------------------


class Spawned(Exception):
    pass


def run_shell(gk: Installation, key_id: int, command: str, monkeypatch: Any) -> dict[str, Any]:
    """The forced command in-process, stopped where it would run git."""
    seen: dict[str, Any] = {}

    def supervise(git: str, argv: list[str], env: dict[str, str], pipes: Any, recheck: Any,
                  log: Any) -> int:  # fmt: skip
        seen.update(how="gate", argv=argv, env=env, recheck=recheck, pipes=pipes)
        raise Spawned

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        seen.update(how="exec", argv=argv, env=env)
        raise Spawned

    monkeypatch.setattr(fetchgate, "supervise", supervise)
    monkeypatch.setattr(shell.os, "execve", execve)
    env = {**gk.env, "SSH_CONNECTION": "127.0.0.1 5 127.0.0.1 22", "SSH_ORIGINAL_COMMAND": command}
    with pytest.raises(Spawned):
        shell.run(["--config", str(gk.config), str(key_id)], env, sys.stdin, sys.stdout, sys.stderr)
    return seen


def test_a_read_runs_upload_pack_under_the_gate(gk: Installation, monkeypatch: Any) -> None:
    gk.init()
    key_id = gk.enrolled_reader()
    # pytest holds descriptors above 9 open; sshd's child holds only 0-2.
    monkeypatch.setattr(fetchgate, "open_pipes", fetchgate.Pipes)
    seen = run_shell(gk, key_id, "git-upload-pack 'platform/api.git'", monkeypatch)
    assert seen["how"] == "gate"
    pipes = seen["pipes"]
    hook = f"/bin/sh {fetchgate.SCRIPT} {frontend.git_binary()} {pipes.request_write} "
    path = str(gk.repos / "platform/api.git")
    assert seen["argv"] == [
        "git",
        *shell.pinned_config(path),
        "-c",
        f"uploadpack.packObjectsHook={hook}{pipes.answer_read}",
        "upload-pack",
        "--strict",
        "--",
        path,
    ]
    pipes.close()

    assert seen["recheck"]() == []  # still allowed: pack
    gk.write_policy(
        "teams: {platform: {members: [bob]}}\n"
        "repositories: [{match: platform/*, read: [platform], require_2fa: verified}]\n"
    )
    refusal = seen["recheck"]()
    assert refusal[0].startswith(
        "gatekeeper: read 'platform/api' refused: it requires a verified two-step session"
    ), refusal
    record = gk.audit(event="access", user="bob")[-1]
    assert (record["reason"], record["repo"], record["action"]) == (
        "2fa-not-verified",
        "platform/api",
        "read",
    )
    assert json.loads(record["detail"]) == {"hook": "pack-objects", "allowed": False}


def test_without_usable_pipes_the_python_hook_checks_the_read(
    gk: Installation, monkeypatch: Any
) -> None:
    gk.init()
    key_id = gk.enrolled_reader()
    monkeypatch.setattr(fetchgate, "open_pipes", lambda: None)
    seen = run_shell(gk, key_id, "git-upload-pack 'platform/api.git'", monkeypatch)
    assert seen["how"] == "exec"
    hook = seen["argv"][seen["argv"].index("upload-pack") - 1]
    assert hook.startswith("uploadpack.packObjectsHook=")
    assert hook.endswith(f"-I -m gatekeeper.hooks pack-objects --config {gk.config}")


def test_a_write_without_usable_pipes_is_exec_d_for_the_python_hook(
    gk: Installation, monkeypatch: Any
) -> None:
    gk.init()
    key_id = gk.enrolled_reader()
    monkeypatch.setattr(fetchgate, "open_pipes", lambda: None)
    seen = run_shell(gk, key_id, "git-receive-pack 'platform/api.git'", monkeypatch)
    assert seen["how"] == "exec"
    path = str(gk.repos / "platform/api.git")
    assert seen["argv"] == ["git", *shell.pinned_config(path), "receive-pack", "--", path]
    assert "GATEKEEPER_PUSH_GATE" not in seen["env"] and seen["env"]["GATEKEEPER_TOKEN"]


def test_a_write_runs_receive_pack_under_the_push_gate(gk: Installation, monkeypatch: Any) -> None:
    from gatekeeper.hooks import pushgate

    gk.init()
    key_id = gk.enrolled_reader()
    monkeypatch.setattr(fetchgate, "open_pipes", fetchgate.Pipes)
    seen: dict[str, Any] = {}

    def supervise(git: str, argv: list[str], env: dict[str, str], pipes: Any, check: Any,
                  log: Any) -> int:  # fmt: skip
        seen.update(argv=argv, env=env, check=check, pipes=pipes)
        raise Spawned

    monkeypatch.setattr(pushgate, "supervise", supervise)
    env = {**gk.env, "SSH_CONNECTION": "127.0.0.1 5 127.0.0.1 22"}
    env["SSH_ORIGINAL_COMMAND"] = "git-receive-pack 'platform/api.git'"
    with pytest.raises(Spawned):
        shell.run(["--config", str(gk.config), str(key_id)], env, sys.stdin, sys.stdout, sys.stderr)
    pipes = seen["pipes"]
    assert seen["env"]["GATEKEEPER_PUSH_GATE"] == f"{pipes.request_write}:{pipes.answer_read}"
    pipes.close()
    update = b"0" * 40 + b" " + b"1" * 40 + b" refs/heads/main\n"
    check = seen["check"](update)
    assert check.begin() == []  # bob may push
    assert check.finish(0) == []
    check.close()
    assert [r["reason"] for r in gk.audit(event="ref-update")] == ["allowed"]


def test_the_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is missing (scripts/test.sh installs it); CI=true")
        pytest.skip("shellcheck is not installed (scripts/test.sh installs it as root)")
    result = subprocess.run(
        [shellcheck, "--severity=style", fetchgate.SCRIPT],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gate_fails_closed_on_a_broken_policy_or_store(
    gk: Installation, monkeypatch: Any
) -> None:
    gk.init()
    key_id = gk.enrolled_reader()
    monkeypatch.setattr(fetchgate, "open_pipes", fetchgate.Pipes)
    seen = run_shell(gk, key_id, "git-upload-pack 'platform/api.git'", monkeypatch)
    seen["pipes"].close()
    good_policy = gk.config.read_text()
    gk.config.write_text(good_policy + "repositories: [\n")
    assert seen["recheck"]() == [
        "gatekeeper: access refused: the server's policy file is invalid or unreadable.",
        "gatekeeper: hint: an administrator must run `gatekeeper policy check`.",
    ]
    gk.config.write_text(good_policy)
    (gk.state / "gatekeeper.db").write_bytes(b"this is not a database" * 100)
    assert seen["recheck"]() == [
        "gatekeeper: access refused: the server cannot read its 2FA state right now.",
        "gatekeeper: hint: try again in a moment; if it persists, tell an administrator.",
    ]
