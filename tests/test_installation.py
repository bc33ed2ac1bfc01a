"""A key change reaches sshd: the CLI follows what install.sh recorded (install.conf).

An admin on a box installed in authorized_keys mode ran `gatekeeper key add alice
alice.pub`, saw the fingerprint, and alice was still refused: the file sshd reads was
rewritten only with `--authorized-keys FILE`. Now the CLI reads install.sh's record in
its own virtualenv (`sys.prefix/install.conf`) and rewrites that file after every key
change; without a record it says what to run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gatekeeper import authkeys, installation
from gatekeeper.cli.main import cli
from gatekeeper.errors import GatekeeperError
from testing.installation import Installation


def record(prefix: Path, **values: str) -> None:
    prefix.mkdir(parents=True, exist_ok=True)
    lines = [f"{key}={value}" for key, value in values.items()]
    (prefix / installation.CONF_NAME).write_text("# written by install.sh\n" + "\n".join(lines))


def run_cli(gk: Installation, *args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--config", str(gk.config), *args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def block_lines(path: Path) -> list[str]:
    text = path.read_text()
    assert authkeys.BEGIN in text and authkeys.END in text, text
    inside = text.split(authkeys.BEGIN + "\n", 1)[1].split(authkeys.END, 1)[0]
    return inside.splitlines()


@pytest.fixture
def prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's virtualenv, as install.sh made it: sys.prefix for the CLI."""
    venv = tmp_path / "opt-gatekeeper"
    venv.mkdir()
    monkeypatch.setattr(sys, "prefix", str(venv))
    return venv


def new_key(gk: Installation, name: str) -> str:
    import subprocess

    private = gk.keys / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(private)],
        check=True,
    )
    return Path(f"{private}.pub").read_text()


def test_in_authorized_keys_mode_every_key_change_rewrites_the_file_sshd_reads(
    gk: Installation, prefix: Path
) -> None:
    gk.init()
    sshd_reads = gk.base / "home" / ".ssh" / "authorized_keys"
    sshd_reads.parent.mkdir(parents=True)
    sshd_reads.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther admin@box\n")
    record(prefix, mode="authorized-keys", config=str(gk.config), authorized_keys=str(sshd_reads))
    gk.gk("user", "add", "alice")
    gk.gk("user", "add", "bob")

    code, out, err = run_cli(gk, "key", "add", "alice", "-", input=new_key(gk, "alice"))
    assert code == 0 and out.startswith("SHA256:"), err
    assert err == ""
    (line,) = block_lines(sshd_reads)
    assert line.startswith('command="') and f"--key {out.strip()} " in line
    assert sshd_reads.read_text().startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther")

    code, bob_fp, _ = run_cli(gk, "key", "add", "bob", "-", input=new_key(gk, "bob"))
    assert code == 0 and len(block_lines(sshd_reads)) == 2
    code, _, err = run_cli(gk, "key", "remove", out.strip())
    assert code == 0, err
    assert [bob_fp.strip() in line for line in block_lines(sshd_reads)] == [True]
    code, _, err = run_cli(gk, "user", "remove", "bob")
    assert code == 0, err
    assert block_lines(sshd_reads) == []
    assert "admin@box" in sshd_reads.read_text()


def test_another_policy_leaves_the_installations_file_alone_and_says_so(
    gk: Installation, prefix: Path, tmp_path: Path
) -> None:
    gk.init()
    sshd_reads = tmp_path / "authorized_keys"
    sshd_reads.write_text("")
    record(
        prefix,
        mode="authorized-keys",
        config=str(tmp_path / "etc" / "config.yaml"),
        authorized_keys=str(sshd_reads),
    )
    gk.gk("user", "add", "alice")
    code, _, err = run_cli(gk, "key", "add", "alice", "-", input=new_key(gk, "alice"))
    assert code == 0
    assert sshd_reads.read_text() == ""
    assert f"{sshd_reads} was not rewritten" in err and "serves" in err
    assert len(err.strip().splitlines()) == 1


def test_keys_command_mode_needs_nothing_and_says_nothing(gk: Installation, prefix: Path) -> None:
    gk.init()
    record(prefix, mode="keys-command", config=str(gk.config))
    gk.gk("user", "add", "alice")
    code, out, err = run_cli(gk, "key", "add", "alice", "-", input=new_key(gk, "alice"))
    assert code == 0 and out.startswith("SHA256:")
    assert err == ""


def test_without_a_record_the_cli_says_in_one_line_what_to_run(
    gk: Installation, prefix: Path
) -> None:
    gk.init()
    gk.gk("user", "add", "alice")
    code, out, err = run_cli(gk, "key", "add", "alice", "-", input=new_key(gk, "alice"))
    assert code == 0 and out.startswith("SHA256:")
    (line,) = err.strip().splitlines()
    assert "sshd may not see this change yet" in line
    assert "gatekeeper authorized-keys --write FILE" in line
    # With --authorized-keys the admin said which file: nothing to add.
    target = gk.base / "authorized_keys"
    code, _, err = run_cli(gk, "key", "remove", out.strip(), "--authorized-keys", str(target))
    assert code == 0 and err == ""
    assert block_lines(target) == []


def test_a_file_the_cli_cannot_write_is_an_error_that_says_what_to_run(
    gk: Installation, prefix: Path, tmp_path: Path
) -> None:
    gk.init()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    target = blocker / "authorized_keys"
    record(prefix, mode="authorized-keys", config=str(gk.config), authorized_keys=str(target))
    gk.gk("user", "add", "alice")
    result = CliRunner().invoke(
        cli, ["--config", str(gk.config), "key", "add", "alice", "-"], input=new_key(gk, "alice")
    )
    # The key is registered (its fingerprint is printed); sshd does not see it yet.
    assert result.stdout.startswith("SHA256:")
    assert isinstance(result.exception, GatekeeperError), result.exception
    message, hint = result.exception.message, result.exception.hint or ""
    assert message.startswith("added SHA256:") and f"{target}: not a directory" in message
    assert hint.endswith(f"then run `gatekeeper authorized-keys --write {target}`.")


@pytest.mark.parametrize(
    "text",
    ["", "mode=\n", "mode=forced\nauthorized_keys=/x\n", "no equals sign\n"],
)
def test_an_unusable_record_counts_as_none(tmp_path: Path, text: str) -> None:
    (tmp_path / installation.CONF_NAME).write_text(text)
    assert installation.read_installed(str(tmp_path)) is None


def test_the_record_is_read_as_install_sh_writes_it(tmp_path: Path) -> None:
    (tmp_path / installation.CONF_NAME).write_text(
        "# gatekeeper install.sh: how sshd gets this installation's keys\n"
        "mode=authorized-keys\n"
        "config=/etc/gatekeeper/config.yaml\n"
        "authorized_keys=/home/git/.ssh/authorized_keys\n"
        "user=git\n"
    )
    assert installation.read_installed(str(tmp_path)) == installation.Installed(
        mode="authorized-keys",
        config="/etc/gatekeeper/config.yaml",
        authorized_keys="/home/git/.ssh/authorized_keys",
    )
    follow = installation.after_key_change(
        Path("/etc/gatekeeper/config.yaml"), prefix=str(tmp_path)
    )
    assert follow == installation.KeyChangeFollowUp(
        rewrite=(Path("/home/git/.ssh/authorized_keys"),)
    )


def test_root_rewriting_the_file_leaves_it_the_git_accounts(
    gk: Installation, prefix: Path, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown); the CI runs as root")
    gk.init()
    home = tmp_path / "home-git" / ".ssh"
    home.mkdir(parents=True)
    os.chown(home, 4242, 4243)
    target = home / "authorized_keys"
    record(prefix, mode="authorized-keys", config=str(gk.config), authorized_keys=str(target))
    gk.gk("user", "add", "alice")
    code, _, err = run_cli(gk, "key", "add", "alice", "-", input=new_key(gk, "alice"))
    assert code == 0, err
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4242, 4243, 0o600)
    os.chown(target, 4244, 4245)
    code, _, err = run_cli(gk, "user", "remove", "alice")
    assert code == 0, err
    assert (target.stat().st_uid, target.stat().st_gid) == (4244, 4245)


def test_the_compiled_policies_of_one_policy_file_are_told_apart(
    gk: Installation, tmp_path: Path
) -> None:
    """What `install.sh --uninstall` removes from a cache directory other installations share."""
    import json

    from gatekeeper.policy import load_policy

    cache = tmp_path / "cache"
    other = tmp_path / "other" / "config.yaml"
    other.parent.mkdir()
    other.write_text(gk.config.read_text() + "# another installation\n")
    load_policy(gk.config, cache_dir=cache)
    gk.config.write_text(gk.config.read_text() + "# edited\n")
    load_policy(gk.config, cache_dir=cache)
    load_policy(other, cache_dir=cache)
    # An earlier release's JSON cache, a damaged file and a stranger.
    (cache / "policy-0123.json").write_text(json.dumps({"source": str(gk.config)}))
    (cache / "policy-4567.v4").write_bytes(b"GKpolicy\0\0\0\0garbage")
    (cache / "notes.txt").write_text(str(gk.config))
    ours = installation.policy_caches(str(cache), str(gk.config))
    assert len(ours) == 3 and str(cache / "policy-0123.json") in ours
    (theirs,) = installation.policy_caches(str(cache), str(other))
    assert theirs not in ours
    assert installation.policy_caches(str(tmp_path / "missing"), str(gk.config)) == []
