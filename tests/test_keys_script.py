"""The shell AuthorizedKeysCommand: a key lookup for about what `cat` costs.

sshd runs the AuthorizedKeysCommand twice per connection; `gatekeeper keys-script`
writes one that reads the key index with no interpreter start. It must print exactly
what `gatekeeper keys-command` prints for every kind of key, nothing for anything else
(however the fingerprint is forged), hand a key the index does not have to
`keys-command`, and work behind a real sshd.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gatekeeper import keyindex
from testing import sshd
from testing.installation import DEFAULT_POLICY, Installation
from testing.softkey import SoftKey


def _keys(gk: Installation) -> dict[str, str]:
    """user -> fingerprint, for a plain key, an RSA key and two security keys."""
    gk.add_user("alice")
    gk.add_user("bob", key_type="rsa")
    gk.gk("user", "add", "carol")
    gk.gk("key", "add", "carol", "-", input=SoftKey().public_line())
    gk.gk("user", "add", "dave")
    gk.gk("key", "add", "dave", "-", "--verify-required", input=SoftKey("ecdsa").public_line())
    return {r["user"]: r["key_fp"] for r in gk.audit(event="key-add")}


def script(gk: Installation, tmp_path: Path) -> Path:
    path = tmp_path / "keys-command.sh"
    gk.gk("keys-script", "--write", str(path))
    return path


def run(path: Path, *args: str) -> str:
    result = subprocess.run(
        ["/bin/sh", str(path), *args], capture_output=True, text=True, timeout=30, env={}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_script_prints_what_keys_command_prints(gk: Installation, tmp_path: Path) -> None:
    fingerprints = _keys(gk)
    path = script(gk, tmp_path)
    for user, fp in fingerprints.items():
        expected = gk.gk("keys-command", "git", fp).stdout
        assert expected, user
        assert run(path, "git", fp) == expected, user
    assert "--factor touch+pin" in run(path, "git", fingerprints["dave"])


@pytest.mark.parametrize(
    "fp",
    [
        "SHA256:" + "A" * 43,  # nobody's
        "SHA256:../../../../etc/passwd",
        "SHA256:" + "A" * 42,
        "SHA256:" + "A" * 44,
        "SHA256:" + "A" * 41 + "/.",
        "MD5:aa:bb",
        "",
        "SHA256:" + "A" * 42 + "\n",
    ],
)
def test_anything_else_gets_nothing(gk: Installation, tmp_path: Path, fp: str) -> None:
    _keys(gk)
    path = script(gk, tmp_path)
    if fp == "SHA256:" + "A" * 43:
        # Not in the index: the script hands it to keys-command, which finds nothing.
        assert run(path, "git", fp) == ""
        return
    assert run(path, "git", fp) == ""


def test_the_wrong_account_and_a_damaged_entry_get_nothing(
    gk: Installation, tmp_path: Path
) -> None:
    fingerprints = _keys(gk)
    path = script(gk, tmp_path)
    assert run(path, "root", fingerprints["alice"]) == ""
    assert run(path, "git") == ""
    name = keyindex.entry_name(fingerprints["alice"])
    assert name is not None
    entry = gk.state / "keyindex" / name
    entry.write_text('7 ssh-ed25519 AAAA",command="sh -\n')
    assert run(path, "git", fingerprints["alice"]) == ""
    entry.write_text("x7 ssh-ed25519 AAAA -\n")
    assert run(path, "git", fingerprints["alice"]) == ""


def test_a_key_missing_from_the_index_is_found_in_the_store(
    gk: Installation, tmp_path: Path
) -> None:
    fingerprints = _keys(gk)
    path = script(gk, tmp_path)
    name = keyindex.entry_name(fingerprints["bob"])
    assert name is not None
    (gk.state / "keyindex" / name).unlink()  # as if added on another front-end
    assert (
        run(path, "git", fingerprints["bob"])
        == gk.gk("keys-command", "git", fingerprints["bob"]).stdout
    )
    assert "--key " + fingerprints["bob"] in run(path, "git", fingerprints["bob"])


def test_unsafe_paths_are_never_written_into_the_script(tmp_path: Path) -> None:
    gk = Installation(tmp_path / "g k", "teams: {}\n").init()
    result = gk.gk("keys-script", check=False)
    assert result.returncode != 0 and "unsafe characters" in result.stderr


@pytest.mark.sshd
def test_behind_sshd(gk: Installation, tmp_path: Path) -> None:
    gk.write_policy(DEFAULT_POLICY, user=sshd.current_user())  # the account sshd logs in
    gk.repo("platform/api")
    alice, _ = gk.add_user("alice")
    gk.enroll("alice")
    wrapper = sshd.make_keys_command_wrapper(gk.gk("keys-script").stdout, "keys-script")
    with sshd.SshServer(keys_command=[str(wrapper), "%u", "%f"], tmp_dir=tmp_path) as server:
        client = server.client(alice)
        ok = client.git("ls-remote", client.url("platform/api"))
        assert ok.returncode == 0 and "refs/heads/main" in ok.stdout, ok.stderr
        fp = gk.audit(event="key-add", user="alice")[0]["key_fp"]
        gk.gk("key", "remove", fp)
        gone = client.git("ls-remote", client.url("platform/api"))
        assert gone.returncode != 0 and "Permission denied" in gone.stderr
