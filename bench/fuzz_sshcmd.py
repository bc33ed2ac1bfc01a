"""Coverage-guided fuzzing of the SSH command parser and repository resolution (atheris).

Every input is given to `sshcmd.parse_command` as `SSH_ORIGINAL_COMMAND`. It must either
raise `InputError` or return a request; a git request's repository name must be plain
(no `..`, no component starting with `-` or `.`, no control characters) and
`resolve_repo_path` must return None or a real path inside the real repositories root,
which holds symlinks that lead outside it. Anything else is a crash that atheris
reports with the input that caused it.

Not part of the test suite or CI (the hypothesis tests in tests/test_properties.py
are); atheris is not a test dependency. To run it:

    .venv/bin/pip install atheris
    .venv/bin/python bench/fuzz_sshcmd.py                      # 60 s, fresh seed corpus
    .venv/bin/python bench/fuzz_sshcmd.py -max_total_time=600 corpus/

Any libFuzzer option can be passed (`-max_total_time`, `-jobs`, `-dict`...); without
`-max_total_time` or `-runs` it stops after 60 s. A crash is written to
`crash-<sha1>`; replay it with `.venv/bin/python bench/fuzz_sshcmd.py crash-<sha1>`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import atheris  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the machine
    sys.stderr.write("fuzz_sshcmd: atheris is not installed (.venv/bin/pip install atheris)\n")
    sys.exit(2)

with atheris.instrument_imports():
    from gatekeeper import sshcmd
    from gatekeeper.errors import InputError

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z")
SEEDS = [
    "git-upload-pack 'platform/api.git'",
    "git-receive-pack '/platform/api.git'",
    "git upload-pack '~/a.git'",
    "git-upload-archive 'a'",
    "git-upload-pack 'link.git'",
    "git-upload-pack 'escape/sub/x.git'",
    "git-upload-pack 'up/real-root/a.git'",
    "git-upload-pack '--upload-pack=touch /tmp/x'",
    "git-upload-pack 'a/../../etc'",
    'git-upload-pack "a" extra',
    "2fa verify 123456",
    "info",
    "sh -c 'id'",
]


def _bare(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "HEAD").write_text("ref: refs/heads/main\n")


def build_root(base: Path) -> Path:
    """A repositories root reached through a symlink, with traps inside (as in
    tests/test_properties.py): symlinks to a repository and a directory outside, to the
    parent, a loop, and a directory without HEAD."""
    outside = base / "outside"
    _bare(outside / "evil.git")
    _bare(outside / "sub" / "x.git")
    real = base / "real-root"
    _bare(real / "a.git")
    _bare(real / "platform" / "api.git")
    (real / "notrepo.git").mkdir()
    (real / "link.git").symlink_to(outside / "evil.git")
    (real / "platform" / "leak.git").symlink_to(Path("..") / ".." / "outside" / "evil.git")
    (real / "escape").symlink_to(outside)
    (real / "up").symlink_to("..")
    (real / "alias.git").symlink_to("a.git")
    (real / "loop.git").symlink_to("loop.git")
    (base / "root-link").symlink_to(real)
    return base / "root-link"


# libFuzzer ends the process with exit(), past Python's atexit: the fuzzing runs in a
# child process and this one removes the scratch directory afterwards.
_BASE_ENV = "GATEKEEPER_FUZZ_BASE"
BASE = Path(os.environ.get(_BASE_ENV) or tempfile.mkdtemp(prefix="fuzz-sshcmd-"))
if _BASE_ENV in os.environ:
    ROOT = build_root(BASE)
    REAL_ROOT = os.path.realpath(ROOT)
    OUTSIDE = str(BASE / "outside")


def check(text: str) -> None:
    try:
        request = sshcmd.parse_command(text)
    except InputError as exc:
        if not exc.message or len(exc.message.splitlines()) != 1:
            raise AssertionError(f"refusal is not one line: {exc.message!r}") from None
        return
    if isinstance(request, sshcmd.UserCommand):
        if request.verb not in (*sshcmd.USER_VERBS, "info"):
            raise AssertionError(f"user command with verb {request.verb!r}")
        return
    if request.verb not in sshcmd.GIT_VERBS:
        raise AssertionError(f"git request with verb {request.verb!r}")
    name = request.repo
    if (
        not name
        or len(name) > sshcmd.MAX_REPO_NAME_LENGTH
        or ".." in name
        or CONTROL.search(name)
        or not all(COMPONENT.match(part) for part in name.split("/"))
    ):
        raise AssertionError(f"unsafe repository name accepted: {name!r} from {text!r}")
    resolved = sshcmd.resolve_repo_path(ROOT, name)
    if resolved is None:
        return
    real = str(resolved)
    if real != os.path.realpath(real) or not real.startswith(REAL_ROOT + os.sep):
        raise AssertionError(f"{text!r} resolved outside the root: {real}")
    if real.startswith(OUTSIDE) or not (resolved / "HEAD").is_file():
        raise AssertionError(f"{text!r} resolved to {real}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    check(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))


def main() -> None:
    if _BASE_ENV not in os.environ:
        env = {**os.environ, _BASE_ENV: str(BASE)}
        try:
            child = subprocess.run([sys.executable, *sys.argv], env=env, check=False)
        finally:
            shutil.rmtree(BASE, ignore_errors=True)
        sys.exit(child.returncode)
    argv = list(sys.argv)
    if not any(a.startswith(("-max_total_time=", "-runs=")) for a in argv[1:]):
        argv.append("-max_total_time=60")
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = BASE / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(SEEDS):
            # FuzzedDataProvider reads a format byte first: 0 means ASCII/latin-1 text.
            (corpus / f"seed-{i}").write_bytes(b"\0" + seed.encode())
        argv.append(str(corpus))
    for seed in SEEDS:
        check(seed)  # the target itself must hold on the seeds
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
