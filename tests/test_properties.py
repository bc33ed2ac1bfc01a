"""Property-based tests: for any input, the parsers either accept it in a safe form or
refuse it with an `InputError` (the policy checker with a list of problems); never
anything else. Hypothesis generates both arbitrary text and input shaped like the real
thing, so it reaches the deep branches as well as the first checks."""

from __future__ import annotations

import base64
import os
import re
import shlex
import struct
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gatekeeper import sshcmd, sshkeys
from gatekeeper.errors import InputError
from gatekeeper.policy import Policy
from gatekeeper.policy.check import check_policy_text
from gatekeeper.policy.compiled import dump_compiled, load_compiled

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z")

# -- a repositories root with the traps a real one can have ----------------------------


def _bare(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "HEAD").write_text("ref: refs/heads/main\n")


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<base>/root-link` -> `<base>/real-root`, holding repositories and symlinks:
    one to a repository outside the root, one to a directory outside it, one to the
    root's parent, one to a repository inside, a loop, and a directory without HEAD."""
    base = tmp_path_factory.mktemp("properties")
    outside = base / "outside"
    _bare(outside / "evil.git")
    _bare(outside / "sub" / "x.git")
    real = base / "real-root"
    _bare(real / "a.git")
    _bare(real / "platform" / "api.git")
    _bare(real / "x+y.git")
    (real / "notrepo.git").mkdir()
    (real / "link.git").symlink_to(outside / "evil.git")
    (real / "platform" / "leak.git").symlink_to(Path("..") / ".." / "outside" / "evil.git")
    (real / "escape").symlink_to(outside)
    (real / "up").symlink_to("..")
    (real / "alias.git").symlink_to("a.git")
    (real / "loop.git").symlink_to("loop.git")
    (base / "root-link").symlink_to(real)
    return base / "root-link"


def assert_safe_name(name: str) -> None:
    assert name, "an empty name was accepted"
    assert len(name) <= sshcmd.MAX_REPO_NAME_LENGTH
    assert ".." not in name
    assert not CONTROL.search(name)
    assert not name.startswith(("/", "-", ".", "~"))
    for component in name.split("/"):
        assert COMPONENT.match(component), (name, component)
        assert not component.startswith(("-", "."))


def assert_inside(root: Path, resolved: Path | None) -> None:
    if resolved is None:
        return
    real_root = os.path.realpath(root)
    assert str(resolved) == os.path.realpath(resolved), "not a real path"
    assert str(resolved).startswith(real_root + os.sep), (resolved, real_root)
    assert resolved.is_dir() and (resolved / "HEAD").is_file()
    assert not str(resolved).startswith(str(Path(real_root).parent / "outside"))


# -- strategies for SSH commands ---------------------------------------------------------

PARTS = st.sampled_from(
    [
        "a",
        "platform",
        "api",
        "leak",
        "link",
        "alias",
        "escape",
        "sub",
        "x",
        "x+y",
        "evil",
        "up",
        "real-root",
        "loop",
        "notrepo",
        "..",
        ".",
        "",
        "-x",
        "--upload-pack=sh",
        ".git",
        "a.git",
        "~",
        "~root",
        "$HOME",
        "`id`",
        "a b",
        "é",
        "\u202e",
        "\n",
        "\x00",
    ]
)
NAMES = st.builds(
    lambda prefix, parts, suffix: prefix + "/".join(parts) + suffix,
    st.sampled_from(["", "/", "~/", "//", "./", "-", "../"]),
    st.lists(PARTS | st.text(max_size=6), min_size=1, max_size=5),
    st.sampled_from(["", ".git", "/", ".git/", "/.", ".git.git"]),
)
VERBS = st.sampled_from(
    [
        "git-upload-pack",
        "git-receive-pack",
        "git-upload-archive",
        "git upload-pack",
        "git receive-pack",
        "git-upload-pack.exe",
        "git",
        "2fa",
        "2fa verify",
        "info",
        "help",
        "sh -c",
        "scp",
        "rsync",
        "",
    ]
)


@st.composite
def commands(draw: st.DrawFn) -> str:
    verb = draw(VERBS)
    args = draw(st.lists(NAMES | st.text(max_size=10), max_size=3))
    quoting = draw(st.sampled_from(["shlex", "single", "double", "bare", "mixed"]))
    words = []
    for arg in args:
        if quoting == "shlex":
            words.append(shlex.quote(arg))
        elif quoting == "single":
            words.append(f"'{arg}'")
        elif quoting == "double":
            words.append(f'"{arg}"')
        elif quoting == "bare":
            words.append(arg)
        else:
            words.append(draw(st.sampled_from([f"'{arg}'", arg, f'"{arg}"', f"\\{arg}"])))
    separator = draw(st.sampled_from([" ", "  ", "\t", " ; ", " | ", " && ", "\n"]))
    return verb + (separator if args else "") + separator.join(words)


def check_parse(text: str | None, root: Path) -> None:
    try:
        request = sshcmd.parse_command(text)
    except InputError as exc:
        assert exc.message and len(exc.message.splitlines()) == 1
        return
    if isinstance(request, sshcmd.UserCommand):
        assert request.verb in (*sshcmd.USER_VERBS, "info")
        for word in request.words[1:]:
            assert not CONTROL.search(word) and not word.startswith("-")
        return
    assert isinstance(request, sshcmd.GitRequest)
    assert request.verb in sshcmd.GIT_VERBS
    assert request.action in ("read", "write")
    assert_safe_name(request.repo)
    assert_inside(root, sshcmd.resolve_repo_path(root, request.repo))


@FAST
@given(text=st.text(max_size=sshcmd.MAX_COMMAND_LENGTH + 20))
@example(text="")
@example(text="git-upload-pack '" + "a" * 1100 + "'")
def test_parse_command_on_any_text_accepts_safely_or_refuses(text: str, repo_root: Path) -> None:
    check_parse(text, repo_root)


@THOROUGH
@given(text=commands())
@example(text="git-upload-pack 'platform/api'")
@example(text="git-upload-pack 'link.git'")
@example(text="git-upload-pack 'platform/leak'")
@example(text="git-receive-pack 'escape/sub/x.git'")
@example(text="git-upload-pack 'up/real-root/a.git'")
@example(text="git-upload-archive '--remote=x'")
@example(text="git-upload-pack 'loop'")
def test_parse_command_on_command_shaped_text(text: str, repo_root: Path) -> None:
    check_parse(text, repo_root)


@THOROUGH
@given(name=NAMES)
def test_normalised_names_are_plain_and_resolve_inside_the_root(name: str, repo_root: Path) -> None:
    try:
        normal = sshcmd.normalize_repo_name(name)
    except InputError:
        return
    assert_safe_name(normal)
    resolved = sshcmd.resolve_repo_path(repo_root, normal)
    assert_inside(repo_root, resolved)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a", "a.git"),
        ("alias", "a.git"),
        ("platform/api", "platform/api.git"),
        ("x+y", "x+y.git"),
        ("up/real-root/a", "a.git"),  # leaves and re-enters: the real path is inside
        ("link", None),  # a symlink to a repository outside the root
        ("platform/leak", None),  # the same, relative
        ("escape/sub/x", None),  # through a symlinked directory outside
        ("escape/evil", None),
        ("notrepo", None),  # no HEAD: not a repository
        ("loop", None),
        ("missing", None),
    ],
)
def test_the_traps_in_the_root(repo_root: Path, name: str, expected: str | None) -> None:
    resolved = sshcmd.resolve_repo_path(repo_root, name)
    if expected is None:
        assert resolved is None
    else:
        assert resolved == Path(os.path.realpath(repo_root)) / expected


# -- the policy checker on arbitrary documents ---------------------------------------------

POLICY_KEYS = [
    "server",
    "two_factor",
    "hooks",
    "teams",
    "repositories",
    "host",
    "port",
    "user",
    "state_dir",
    "listen_host",
    "listen_port",
    "issuer",
    "session_hours",
    "max_failures",
    "failure_window_minutes",
    "lockout_minutes",
    "self_enroll",
    "keyboard_interactive",
    "allow_local_push",
    "members",
    "require_2fa",
    "grace_until",
    "mode",
    "match",
    "read",
    "write",
    "public",
    "<<",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.dates(min_value=date(1, 1, 1))
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "none",
            "enrolled",
            "verified",
            "report",
            "enforce",
            "platform/*",
            "web/**",
            "**",
            "[",
            "2027-01-31",
            "2027-02-30",
            "~",
            "~nosuchuser/x",
            "yes",
            "0x1F",
            "1_000",
            "1" * 5000,
            "-1",
            "",
            "a\x00b",
            "/",
            "../../etc",
        ]
    )
)
KEYS = st.sampled_from(POLICY_KEYS) | st.text(max_size=8)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)
TEAM_NAMES = st.sampled_from(["platform", "ops", "a", "Bad Name", "-x", ""]) | st.text(max_size=6)
TEAMS = st.dictionaries(
    TEAM_NAMES,
    st.fixed_dictionaries(
        {},
        optional={
            "members": st.lists(TEAM_NAMES, max_size=4) | DOCUMENTS,
            "require_2fa": st.sampled_from(["none", "enrolled", "verified"]) | SCALARS,
            "grace_until": st.dates() | SCALARS,
            "mode": st.sampled_from(["report", "enforce"]) | SCALARS,
        },
    )
    | DOCUMENTS,
    max_size=3,
)
RULES = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "match": st.sampled_from(["platform/*", "docs", "**", "a/[b", ""]) | SCALARS,
            "read": st.lists(TEAM_NAMES, max_size=3) | SCALARS,
            "write": st.lists(TEAM_NAMES, max_size=3) | SCALARS,
            "public": st.booleans() | SCALARS,
            "require_2fa": st.sampled_from(["none", "enrolled", "verified"]) | SCALARS,
            "grace_until": st.dates() | SCALARS,
            "mode": st.sampled_from(["report", "enforce"]) | SCALARS,
        },
    )
    | DOCUMENTS,
    max_size=4,
)
POLICIES = st.fixed_dictionaries(
    {},
    optional={
        "server": st.dictionaries(st.sampled_from(POLICY_KEYS[5:11]), SCALARS) | DOCUMENTS,
        "two_factor": st.dictionaries(st.sampled_from(POLICY_KEYS[11:18]), SCALARS) | DOCUMENTS,
        "hooks": st.dictionaries(st.just("allow_local_push"), SCALARS) | DOCUMENTS,
        "teams": TEAMS,
        "repositories": RULES,
    },
)
YAML_ALPHABET = "ab01:-[]{}&*!|>'\"#%@` \n\t.~<=?,\\"


def dump(doc: Any, unicode: bool) -> str:
    return yaml.safe_dump(doc, allow_unicode=unicode, default_flow_style=None, width=10_000)


def check_policy(text: str, tmp_dir: Path) -> None:
    source = str(tmp_dir / "config.yaml")
    policy, problems = check_policy_text(text, source)  # must not raise
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        assert problem.severity in ("error", "warning")
        line = problem.format(source)
        assert problem.message and len(line.splitlines()) == 1, line
    if policy is None:
        assert errors, "no policy and no error"
    else:
        assert isinstance(policy, Policy)
        assert not errors
        # The compiled cache must hold every policy the checker accepts.
        assert load_compiled(dump_compiled(policy)) == policy


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy")


@FAST
@given(doc=DOCUMENTS, unicode=st.booleans())
def test_policy_checker_on_arbitrary_documents(doc: Any, unicode: bool, policy_dir: Path) -> None:
    check_policy(dump(doc, unicode), policy_dir)


@FAST
@given(doc=POLICIES, unicode=st.booleans())
def test_policy_checker_on_policy_shaped_documents(
    doc: Any, unicode: bool, policy_dir: Path
) -> None:
    check_policy(dump(doc, unicode), policy_dir)


@FAST
@given(text=st.text(max_size=300) | st.text(alphabet=YAML_ALPHABET, max_size=120))
@example(text="two_factor:\n  max_failures: 1" + "0" * 5000 + "\n")
@example(text="[" * 5000)
@example(text="teams: &a\n  x: *a\n")
@example(text="\ufeffteams: {}\n")
@example(text="!!python/object/apply:os.system ['true']\n")
def test_policy_checker_on_raw_text(text: str, policy_dir: Path) -> None:
    check_policy(text, policy_dir)


# -- public keys ---------------------------------------------------------------------------


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def mpint(value: int) -> bytes:
    if value == 0:
        return ssh_string(b"")
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
    return ssh_string(raw)


KEY_TYPES = st.sampled_from([*sshkeys.SUPPORTED_TYPES, "ssh-dss", "rsa-sha2-256"]) | st.text(
    max_size=12
)


@st.composite
def blobs(draw: st.DrawFn) -> tuple[str, bytes]:
    """A key type and a wire blob that is right, nearly right, or garbage for it."""
    key_type = draw(KEY_TYPES)
    inner = draw(st.sampled_from([key_type, *sshkeys.SUPPORTED_TYPES]) | st.text(max_size=8))
    blob = ssh_string(inner.encode("utf-8", "surrogatepass"))
    if inner == "ssh-rsa":
        e = draw(st.sampled_from([65537, 3, 2, 1, 0, -3]) | st.integers(0, 2**20))
        bits = draw(st.sampled_from([1024, 2047, 2048, 4096, 16385]))
        n = draw(st.integers(0, 2**bits)) | 1
        blob += mpint(e) + mpint(n)
    elif "ecdsa" in inner:
        curve = draw(st.sampled_from(["nistp256", "nistp384", "nistp521", "nistp999"]))
        size = {"nistp256": 32, "nistp384": 48, "nistp521": 66}.get(curve, 10)
        point = b"\x04" + draw(st.binary(min_size=2 * size, max_size=2 * size))
        blob += ssh_string(curve.encode()) + ssh_string(point)
    else:
        blob += ssh_string(draw(st.binary(max_size=40)))
    if draw(st.booleans()):
        blob += draw(st.binary(max_size=20))
    cut = draw(st.integers(0, len(blob)))
    if draw(st.integers(0, 4)) == 0:
        blob = blob[:cut]
    return key_type, blob


def check_key(parse: Any, *args: Any) -> None:
    try:
        key = parse(*args)
    except InputError as exc:
        assert exc.message and len(exc.message.splitlines()) == 1
        return
    assert key.key_type in sshkeys.SUPPORTED_TYPES
    assert key.fingerprint.startswith("SHA256:")
    assert key.comment.isprintable() and len(key.comment) <= sshkeys.MAX_COMMENT_LENGTH
    again = sshkeys.parse_public_key(key.openssh_line())
    assert again.fingerprint == key.fingerprint and again.bits == key.bits


@FAST
@given(text=st.text(max_size=400))
def test_parse_public_key_on_any_text(text: str) -> None:
    check_key(sshkeys.parse_public_key, text)


@THOROUGH
@given(
    key=blobs(),
    comment=st.text(max_size=30),
    prefix=st.sampled_from(["", " ", 'command="x" ', "restrict ", "\n"]),
    b64_junk=st.sampled_from(["", "=", "==", "!", " AAAA"]),
)
def test_parse_public_key_on_key_shaped_lines(
    key: tuple[str, bytes], comment: str, prefix: str, b64_junk: str
) -> None:
    key_type, blob = key
    b64 = base64.b64encode(blob).decode("ascii") + b64_junk
    check_key(sshkeys.parse_public_key, f"{prefix}{key_type} {b64} {comment}")


@THOROUGH
@given(key=blobs(), raw=st.text(max_size=60), use_raw=st.booleans())
def test_parse_key_blob_b64_on_anything(key: tuple[str, bytes], raw: str, use_raw: bool) -> None:
    key_type, blob = key
    b64 = raw if use_raw else base64.b64encode(blob).decode("ascii")
    check_key(sshkeys.parse_key_blob_b64, key_type, b64)


@FAST
@given(data=st.binary(max_size=300))
def test_parse_key_blob_b64_on_random_bytes(data: bytes) -> None:
    check_key(sshkeys.parse_key_blob_b64, "ssh-ed25519", base64.b64encode(data).decode())
    check_key(sshkeys.parse_key_blob_b64, "ssh-rsa", base64.b64encode(data).decode())
    check_key(sshkeys.parse_public_key, data.decode("latin-1"))
