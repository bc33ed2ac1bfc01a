"""The real-OpenSSH fixture itself, proved with git-shell and no gatekeeper code."""

from __future__ import annotations

import os
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

from testing.sshd import (
    SshClient,
    SshServer,
    current_user,
    generate_user_key,
    is_root,
    make_keys_command_wrapper,
    public_key_line,
    require_sshd,
    unsafe_path_reason,
)

pytestmark = pytest.mark.sshd

GIT_SHELL = 'git-shell -c \\"$SSH_ORIGINAL_COMMAND\\"'


@pytest.fixture(autouse=True)
def _need_sshd() -> None:
    require_sshd()


def run(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def make_bare_repo(path: Path) -> Path:
    run("git", "init", "-q", "--bare", "-b", "main", str(path))
    run("git", "-C", str(path), "config", "daemon.uploadarch", "true")
    return path


def ok(result: subprocess.CompletedProcess[str], server: SshServer) -> str:
    assert result.returncode == 0, (
        f"{result.args}\nexit {result.returncode}\nstderr:\n{result.stderr}\n"
        f"sshd log:\n{server.log_text()}"
    )
    return result.stdout


def commit(client: SshClient, work: Path, name: str, text: str) -> str:
    (work / name).write_text(text)
    for args in (["add", name], ["commit", "-q", "-m", f"add {name}"]):
        result = client.git(*args, cwd=work)
        assert result.returncode == 0, result.stderr
    return client.git("rev-parse", "HEAD", cwd=work).stdout.strip()


def test_git_over_real_sshd_with_forced_command(tmp_path: Path) -> None:
    bare = make_bare_repo(tmp_path / "remote.git")
    key, pub = generate_user_key(tmp_path / "keys", "alice")
    other_key, _ = generate_user_key(tmp_path / "keys", "mallory")
    record = tmp_path / "record.log"
    forced = (
        f'echo \\"$GIT_PROTOCOL|$SSH_ORIGINAL_COMMAND\\" >>{shlex.quote(str(record))}; '
        f"exec {GIT_SHELL}"
    )
    authorized_keys = tmp_path / "authorized_keys"
    authorized_keys.write_text(f'command="{forced}",restrict {public_key_line(pub)} alice\n')

    with SshServer(authorized_keys_file=authorized_keys) as server:
        client = SshClient(server, key)
        url = client.url(bare)
        work = tmp_path / "work"
        ok(client.git("clone", "-q", url, str(work)), server)
        first = commit(client, work, "README", "hello\n")
        ok(client.git("push", "-q", "origin", "main", cwd=work), server)
        assert run("git", "-C", str(bare), "rev-parse", "main").strip() == first

        other = tmp_path / "other"
        ok(client.git("clone", "-q", url, str(other)), server)
        second = commit(client, work, "NEWS", "news\n")
        ok(client.git("push", "-q", "origin", "main", cwd=work), server)
        ok(client.git("fetch", "-q", "origin", cwd=other), server)
        assert client.git("rev-parse", "origin/main", cwd=other).stdout.strip() == second

        record.write_text("")
        listing = ok(client.git("-c", "protocol.version=2", "ls-remote", url), server)
        assert f"{second}\trefs/heads/main" in listing
        assert record.read_text().splitlines() == [f"version=2|git-upload-pack '{bare}'"]

        tar = tmp_path / "archive.tar"
        ok(client.git("archive", f"--remote={url}", "-o", str(tar), "main"), server)
        with tarfile.open(tar) as archive:
            names = sorted(archive.getnames())
            member = archive.extractfile("NEWS")
            assert member is not None
            assert member.read() == b"news\n"
        assert names == ["NEWS", "README"]

        # The same URL in scp form (the port travels in GIT_SSH_COMMAND).
        listing = ok(client.git("ls-remote", client.scp_url(bare)), server)
        assert f"{second}\trefs/heads/main" in listing

        # The forced command is what runs: git-shell refuses anything but git.
        refused = client.run("id")
        assert refused.returncode != 0
        assert "unrecognized command" in refused.stderr

        # A key that is not in the file gets nowhere.
        stranger = SshClient(server, other_key).run("git-upload-pack " + shlex.quote(str(bare)))
        assert stranger.returncode == 255, stranger
        assert "Permission denied" in stranger.stderr

    assert f"Accepted publickey for {current_user()}" in server.log_text()
    assert not server.running


def test_git_over_real_sshd_with_authorized_keys_command(tmp_path: Path) -> None:
    bare = make_bare_repo(tmp_path / "remote.git")
    key, pub = generate_user_key(tmp_path / "keys", "alice")
    other_key, other_pub = generate_user_key(tmp_path / "keys", "mallory")
    asked = tmp_path / "asked.log"
    allowed = public_key_line(pub)
    kind, blob = allowed.split()
    line = f'command="{GIT_SHELL}",restrict {allowed}'
    wrapper = make_keys_command_wrapper(
        "#!/bin/sh\n"
        "# AuthorizedKeysCommand WRAPPER %u %t %k %f\n"
        f'printf \'%s %s\\n\' "$1" "$4" >>{shlex.quote(str(asked))}\n'
        f'if [ "$1" = {shlex.quote(current_user())} ] && [ "$2" = {kind} ] '
        f'&& [ "$3" = {blob} ]; then\n'
        f"  printf '%s\\n' {shlex.quote(line)}\n"
        "fi\n"
    )
    if is_root():
        assert unsafe_path_reason(wrapper) is None

    with SshServer(keys_command=[str(wrapper), "%u", "%t", "%k", "%f"]) as server:
        client = SshClient(server, key)
        listing = ok(client.git("ls-remote", client.url(bare)), server)
        assert listing == ""  # an empty repository, but the session worked

        stranger = SshClient(server, other_key).run("git-upload-pack " + shlex.quote(str(bare)))
        assert stranger.returncode == 255, stranger
        assert "Permission denied" in stranger.stderr

    fingerprints = {
        run("ssh-keygen", "-l", "-E", "sha256", "-f", str(p)).split()[1] for p in (pub, other_pub)
    }
    seen = {entry.split()[1] for entry in asked.read_text().splitlines()}
    assert seen == fingerprints, server.log_text()


@pytest.mark.skipif(not is_root(), reason="only root can run the command as another user")
def test_authorized_keys_command_as_dedicated_user(tmp_path: Path) -> None:
    key, pub = generate_user_key(tmp_path / "keys", "alice")
    line = f'command="echo keys-command-ok",restrict {public_key_line(pub)}'
    wrapper = make_keys_command_wrapper(
        f'[ "$(id -un)" = nobody ] && printf "%s\\n" {shlex.quote(line)}\n'
    )
    with SshServer(keys_command=[str(wrapper)], keys_command_user="nobody") as server:
        assert ok(SshClient(server, key).run(), server) == "keys-command-ok\n"


@pytest.mark.skipif(not is_root(), reason="as a normal user the command goes through /bin/sh")
def test_unsafe_keys_command_is_refused_before_sshd_starts(tmp_path: Path) -> None:
    script = tmp_path / "keys"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert unsafe_path_reason(script) is not None
    with pytest.raises(ValueError, match="make_keys_command_wrapper"):
        SshServer(keys_command=[str(script)])


def test_server_stops_and_keeps_its_log(tmp_path: Path) -> None:
    (tmp_path / "authorized_keys").write_text("")
    server = SshServer(authorized_keys_file=tmp_path / "authorized_keys")
    with server:
        pid = server.proc.pid if server.proc else 0
        assert server.running
    assert not server.running
    assert not server.tmpdir.exists()
    assert f"Server listening on 127.0.0.1 port {server.port}" in server.log_text()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
