"""The per-connection path checks its inputs with character sets instead of compiled
regular expressions (each compile cost every connection), and imports neither
OpenSSL's hashlib nor dataclasses. Each check must accept exactly what the regular
expression it replaced accepted: the old patterns are kept here as the reference."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper import authkeys, shell, sshcmd, sshkeys
from testing.reference import glob_regex

ROOT = Path(__file__).resolve().parent.parent

# The characters the patterns are about, the ones around them, and anything at all.
NEAR = list("aAzZ09_.+-=:@/ \t\n\r\x00\x1f\x7f;|&$`<>(){}\\!*?[]#'\"é٣ｱ")
TEXT = st.text(alphabet=st.sampled_from(NEAR), max_size=80) | st.text(max_size=80)

CASES: list[tuple[str, str, Callable[[str], bool]]] = [
    ("key id", r"[0-9]{1,12}\Z", shell.valid_key_id),
    (
        "GIT_PROTOCOL",
        r"[A-Za-z0-9._=-]{1,32}(:[A-Za-z0-9._=-]{1,32}){0,7}\Z",
        shell.valid_git_protocol,
    ),
    ("repository component", r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z", sshcmd._is_component),
    ("user command word", r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z", sshcmd._is_user_word),
    ("key base64", r"[A-Za-z0-9+/]+={0,2}\Z", sshkeys._is_base64),
    ("key type name", r"[A-Za-z0-9][A-Za-z0-9.@-]{0,63}\Z", sshkeys._is_type_name),
    ("authorized_keys path", r"[A-Za-z0-9_./+-]+\Z", authkeys._safe_path),
    ("authorized_keys key type", r"[a-z0-9@.-]{3,64}\Z", authkeys._key_type_ok),
    ("authorized_keys blob", r"[A-Za-z0-9+/]+={0,2}\Z", authkeys._blob_ok),
]


@pytest.mark.parametrize(("name", "pattern", "check"), CASES, ids=[c[0] for c in CASES])
@settings(max_examples=400, deadline=None)
@given(text=TEXT)
def test_each_check_accepts_what_its_pattern_accepted(
    name: str, pattern: str, check: Callable[[str], bool], text: str
) -> None:
    assert check(text) is (re.match(pattern, text) is not None), (name, text)


@pytest.mark.parametrize(("name", "pattern", "check"), CASES, ids=[c[0] for c in CASES])
def test_each_check_on_edges(name: str, pattern: str, check: Callable[[str], bool]) -> None:
    edges = ["", "0", "1" * 12, "1" * 13, "a" * 32, "a" * 64, "a" * 65, "abc", "ab"]
    edges += ["a:b", ":", "a:" * 7 + "a", "a:" * 8 + "a", "-a", "_a", ".a", "a\n", "AAAA=="]
    edges += ["AAAA===", "=", "a/b", "ssh-ed25519", "Ssh", "x@y.z", "a b", "٣"]
    for text in edges:
        assert check(text) is (re.match(pattern, text) is not None), (name, text)


@settings(max_examples=400, deadline=None)
@given(text=TEXT)
def test_control_and_shell_syntax_sets_find_what_the_patterns_found(text: str) -> None:
    control = re.search(r"[\x00-\x1f\x7f]", text) is not None
    syntax = re.search(r"[;|&$`<>(){}\\!*?\[\]#]", text) is not None
    assert (not sshcmd._CONTROL.isdisjoint(text)) is control
    assert (not sshcmd._SHELL_SYNTAX.isdisjoint(text)) is syntax


def imported_by(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    return set(out.split())


def test_the_forced_command_imports_no_hashlib_or_dataclasses() -> None:
    modules = imported_by("import gatekeeper.shell")
    assert not {"hashlib", "_hashlib", "dataclasses", "inspect", "yaml", "json.tool"} & modules


def test_the_keys_command_imports_no_hashlib_base64_or_dataclasses() -> None:
    modules = imported_by("import gatekeeper.authkeys, gatekeeper.sshkeys")
    assert not {"hashlib", "_hashlib", "base64", "struct", "dataclasses", "inspect"} & modules


def test_policy_sshkeys_and_sshcmd_compile_nothing_at_import() -> None:
    # `re` may come with other modules (json, pathlib); these three do not need it.
    modules = imported_by(
        "import datetime, json, pathlib, re, shlex\n"  # their own use of re comes first
        "before = dict(re._cache)\n"
        "import gatekeeper.policy, gatekeeper.sshkeys, gatekeeper.sshcmd, gatekeeper.authkeys\n"
        "assert re._cache == before, [p for p in re._cache if p not in before]\n"
    )
    assert "gatekeeper.policy" in modules


# -- the shell-word splitter that replaced shlex.split -------------------------------------

SHELLISH = list("ab -_/.~'\"\\ \t\r\n\x00;$`é")
SHELL_TEXT = st.text(alphabet=st.sampled_from(SHELLISH), max_size=60) | st.text(max_size=60)


def shlex_outcome(split: Callable[[str], list[str]], text: str) -> list[str] | str:
    try:
        return split(text)
    except ValueError as exc:
        return f"ValueError: {exc}"


@settings(max_examples=3000, deadline=None)
@given(text=SHELL_TEXT)
def test_split_words_splits_as_shlex_does(text: str) -> None:
    """The same words for every input, and the same refusal (shlex's message) for
    every input shlex refuses; not only for the subset parse_command accepts."""
    import shlex

    assert shlex_outcome(sshcmd.split_words, text) == shlex_outcome(shlex.split, text), text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "''",
        "'' ''",
        '""',
        "a''b",
        "git-upload-pack 'a/b.git'",
        'git-upload-pack "a/b.git"',
        "git upload-pack '/x'",
        r"a\ b",
        "a\\",
        "'a",
        '"a',
        '"a\\',
        r'"a\"b"',
        r'"a\\b"',
        r'"a\b"',
        r"'a\b'",
        "'a\"b'",
        '"a\'b"',
        "a#b #c",
        "\ta\r\nb\n",
        "a\x0bb",
        "a\u00a0b",
    ],
)
def test_split_words_on_edges(text: str) -> None:
    import shlex

    assert shlex_outcome(sshcmd.split_words, text) == shlex_outcome(shlex.split, text)


def test_parse_command_refuses_unbalanced_quotes_with_shlexs_message() -> None:
    with pytest.raises(sshcmd.InputError) as info:
        sshcmd.parse_command("git-upload-pack 'a")
    assert info.value.message == "command refused: No closing quotation (unbalanced quotes?)."
    with pytest.raises(sshcmd.InputError) as info:
        sshcmd.parse_command("git-upload-pack a\\")
    assert info.value.message == "command refused: No escaped character (unbalanced quotes?)."


# -- the canonical JSON of audit records, without the json module ---------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.sampled_from(NEAR), max_size=20)
    | st.text(max_size=20)
    | st.characters(min_codepoint=0x10000)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=2000, deadline=None)
@given(value=JSON_VALUES)
def test_canonical_json_is_json_dumps_byte_for_byte(value: object) -> None:
    import json

    from gatekeeper.auditlog.chain import canonical_json

    assert canonical_json(value) == json.dumps(value, sort_keys=True)
    compact = json.dumps(value, sort_keys=True, separators=(",", ":"))
    assert canonical_json(value, compact=True) == compact


DEEP: list[object] = ["x"]
for _ in range(60):
    DEEP = [DEEP]


@pytest.mark.parametrize(
    "value",
    [
        {1: "a", 2: "b"},  # non-string keys: json converts them, canonical_json defers
        {"x": {3.5: None, True: 1}},
        {"a": {"b": [1.5, -0.0, float("nan"), float("inf"), float("-inf")]}},
        [True, False, None, 10**30, "\x7f\x00\u2028\ud800\U0001f600"],
        {"deep": DEEP},  # deeper than canonical_json goes: json itself encodes it
    ],
)
def test_canonical_json_on_edges(value: object) -> None:
    import json

    from gatekeeper.auditlog.chain import canonical_json

    assert canonical_json(value) == json.dumps(value, sort_keys=True)
    compact = json.dumps(value, sort_keys=True, separators=(",", ":"))
    assert canonical_json(value, compact=True) == compact


def test_unsupported_values_fail_as_json_fails() -> None:
    import json

    from gatekeeper.auditlog.chain import canonical_json

    for value in ({"a": object()}, {"a": b"x"}, {1: 1, "a": 2}):
        with pytest.raises(TypeError) as expected:
            json.dumps(value, sort_keys=True)
        with pytest.raises(TypeError) as got:
            canonical_json(value)
        assert str(got.value) == str(expected.value)


def test_audit_record_hashes_are_unchanged() -> None:
    """A record hashed by the code before canonical_json (json.dumps), pinned: logs
    written by earlier versions must still verify."""
    from gatekeeper.auditlog.chain import GENESIS, record_hash

    rec = {
        "seq": 1,
        "at": "2024-01-02T03:04:05.000006Z",
        "event": "access",
        "actor": None,
        "user": "alice",
        "key_fp": "SHA256:abc",
        "repo": "platform/api",
        "action": "read",
        "reason": "verified",
        "client": "192.0.2.1",
        "detail": '{"allowed": true, "level": "enforce", "verb": "git-upload-pack"}',
    }
    import json
    from hashlib import sha256

    body = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    expected = sha256(f"{GENESIS}\n{body}".encode()).hexdigest()
    assert record_hash(GENESIS, rec) == expected  # json is imported here: its encoder
    # and in a process without json (the forced command's): canonical_json
    probe = (
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from gatekeeper.auditlog.chain import GENESIS, record_hash\n"
        f"print(record_hash(GENESIS, {rec!r}))\n"
        "assert 'json' not in sys.modules\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == expected


# -- paths as strings (pathstr) and shell quoting without pathlib and shlex ------------------

PATHISH = st.text(alphabet=st.sampled_from(list("/./a.b/..//x é")), max_size=30) | st.text(
    max_size=20
)


@settings(max_examples=2000, deadline=None)
@given(text=PATHISH)
def test_pathstr_spells_paths_as_pathlib_does(text: str) -> None:
    import os
    from pathlib import Path, PurePosixPath

    from gatekeeper import pathstr

    assert pathstr.norm(text) == str(PurePosixPath(text))
    assert pathstr.norm(Path(text)) == str(Path(text))
    assert pathstr.absolute(text) == str(Path(text).absolute())
    name = text.replace("/", "")
    if name not in ("", ".", ".."):
        assert pathstr.join(pathstr.norm(text), name) == str(Path(text) / name)
    if "\x00" not in text:
        assert pathstr.resolve(text) == str(Path(text).resolve()), os.getcwd()


def test_pathstr_resolve_follows_symlinks_as_pathlib_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gatekeeper import pathstr

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "config.yaml").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    monkeypatch.chdir(tmp_path)
    for text in ("link/config.yaml", "link/../link//config.yaml", "./missing/x", "", "/"):
        assert pathstr.resolve(text) == str(Path(text).resolve())
        assert pathstr.absolute(text) == str(Path(text).absolute())
    try:
        expected: object = str(Path("loop").resolve())
    except RuntimeError as exc:
        expected = ("RuntimeError", str(exc))
    try:
        got: object = pathstr.resolve("loop")
    except RuntimeError as exc:
        got = ("RuntimeError", str(exc))
    assert got == expected
    with pytest.raises(TypeError):
        pathstr.norm(b"/x")  # type: ignore[arg-type]


@settings(max_examples=1000, deadline=None)
@given(text=TEXT)
def test_shell_quote_is_shlex_quote(text: str) -> None:
    import shlex

    assert shell.quote(text) == shlex.quote(text)


# -- what the forced command imports, for real ----------------------------------------------


def probe_modules(
    imports: str, call: str, env: dict[str, str], cwd: Path | None = None
) -> tuple[str, set[str]]:
    """Run `imports` then `rc = call` in a fresh interpreter with gatekeeper from this
    checkout and without site-packages (-S: the editable install's path finder imports
    pathlib itself); return rc and every module loaded by then."""
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"{imports}\n"
        f"rc = {call}\n"
        "print(rc, ' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=cwd,
    ).stdout
    rc, _, names = out.partition(" ")
    return rc, set(names.split())


def dry_run_modules(gk: object, key_id: int, command: str) -> set[str]:
    """The modules loaded once gatekeeper-shell's main() returns, run the way the
    installed script runs it (`bin/gatekeeper-shell`)."""
    from testing.installation import Installation

    assert isinstance(gk, Installation)
    env = {k: v for k, v in gk.env.items() if not k.startswith("SSH_")}
    env.update(
        SSH_CONNECTION="127.0.0.1 50000 127.0.0.1 22",
        SSH_ORIGINAL_COMMAND=command,
        GATEKEEPER_DRY_RUN="1",
    )
    call = f"main(['--config', {str(gk.config)!r}, '{key_id}'])"
    rc, names = probe_modules("from gatekeeper.shell import main", call, env)
    return {f"rc={rc}", *names}


HOT_PATH_FREE_OF = {
    *("re", "pathlib", "json", "shlex", "enum", "hashlib", "dataclasses", "yaml"),
    # The Python wrappers around C cores, and what they pull in (gatekeeper/lightstd.py).
    *("sqlite3", "datetime", "functools", "collections", "contextlib"),
}


def test_the_dry_run_imports_no_re_pathlib_json_or_shlex(gk: object) -> None:
    from testing.installation import Installation

    assert isinstance(gk, Installation)
    gk.init()
    key_id = gk.enrolled_reader()
    # The first connection after a policy change compiles it (yaml, re): warm the cache.
    assert gk.shell(key_id, "git-upload-pack 'platform/api.git'", stdin="0000").returncode == 0
    for command, rc in [
        ("git-upload-pack 'platform/api.git'", "rc=0"),  # allowed: token, hook command
        ("git-receive-pack 'platform/api.git'", "rc=0"),
        ("git-upload-pack 'platform/nothing.git'", "rc=1"),  # refused, audited
    ]:
        modules = dry_run_modules(gk, key_id, command)
        assert rc in modules, (command, sorted(modules))
        assert not HOT_PATH_FREE_OF & modules, (command, sorted(HOT_PATH_FREE_OF & modules))
    unknown = dry_run_modules(gk, 999, "git-upload-pack 'platform/api.git'")
    assert "rc=1" in unknown and not HOT_PATH_FREE_OF & unknown


# -- repository globs without re --------------------------------------------------------------

GLOB_PATTERN = st.text(alphabet=st.sampled_from(list("ab*/.+-")), min_size=1, max_size=14)
GLOB_NAME = st.text(alphabet=st.sampled_from(list("ab/.+-\n*")), max_size=16)


@settings(max_examples=3000, deadline=None)
@given(pattern=GLOB_PATTERN, name=GLOB_NAME)
def test_glob_match_matches_what_glob_regex_matches(pattern: str, name: str) -> None:
    from gatekeeper.policy import glob_match, glob_tokens

    expected = glob_regex(pattern).match(name) is not None
    assert glob_match(glob_tokens(pattern), name) is expected, (pattern, name)


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("**", ""),
        ("**", "a\nb"),
        ("a/**", "a/"),
        ("a/**", "a"),
        ("**/b", "b"),
        ("**/b", "/b"),
        ("a/**/b", "a//b"),
        ("a/**/**/b", "a/x/b"),
        ("*/*", "a/"),
        ("a*b*c", "abbc"),
        ("a**b", "axxb"),
        ("***", "abc"),
        ("platform/*", "platform/api"),
        ("platform/*", "platform/api/x"),
    ],
)
def test_glob_match_on_edges(pattern: str, name: str) -> None:
    from gatekeeper.policy import glob_match, glob_tokens

    expected = glob_regex(pattern).match(name) is not None
    assert glob_match(glob_tokens(pattern), name) is expected


# -- the gatekeeper-shell launcher ---------------------------------------------------------

LAUNCHER = ROOT / "gatekeeper" / "launcher" / "gatekeeper-shell"
CLI_LAUNCHER = ROOT / "gatekeeper" / "launcher" / "gatekeeper"


def test_the_launcher_is_installed_as_a_script_and_not_as_an_entry_point() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser, as pip carries it
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "scripts" not in project["project"]  # no console-script wrappers at all
    assert project["tool"]["setuptools"]["script-files"] == [
        str(CLI_LAUNCHER.relative_to(ROOT)),
        str(LAUNCHER.relative_to(ROOT)),
    ]
    cli_code = [line for line in CLI_LAUNCHER.read_text().splitlines() if line[:1] not in "#"]
    assert [line for line in cli_code if line] == [
        "from gatekeeper.entry import run_script",  # keys-command skips the teardown
        'if __name__ == "__main__":',
        "    run_script()",
    ]
    assert CLI_LAUNCHER.stat().st_mode & 0o111
    text = LAUNCHER.read_text()
    assert text.startswith("#!python\n")  # pip writes the virtualenv's interpreter here
    assert LAUNCHER.stat().st_mode & 0o111
    code = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert code == [
        "import gc",
        "import sys",
        "gc.disable()",  # no collection passes in a one-command process
        "from gatekeeper.shell import main  # noqa: E402",
        'if __name__ == "__main__":',
        "    sys.exit(main())",
    ]


def run_launcher(
    launcher: Path, args: list[str], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run an installed script's source with a fresh interpreter, as sshd would run
    the script; return the result and every module it imported (`-X importtime`)."""
    result = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", str(launcher), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return result, imported


def test_the_launcher_runs_a_dry_run_without_importing_re(gk: object) -> None:
    """The launcher as sshd runs it, from a fresh interpreter: `-X importtime` lists
    every module it imports (-S: the editable install's path finder imports pathlib)."""
    from testing.installation import Installation

    assert isinstance(gk, Installation)
    gk.init()
    key_id = gk.enrolled_reader()
    assert gk.shell(key_id, "git-upload-pack 'platform/api.git'", stdin="0000").returncode == 0
    env = {k: v for k, v in gk.env.items() if not k.startswith(("SSH_", "PYTHON"))}
    env.update(
        PYTHONPATH=str(ROOT),
        SSH_CONNECTION="127.0.0.1 50000 127.0.0.1 22",
        SSH_ORIGINAL_COMMAND="git-upload-pack 'platform/api.git'",
        GATEKEEPER_DRY_RUN="1",
    )
    result, imported = run_launcher(LAUNCHER, ["--config", str(gk.config), str(key_id)], env)
    assert result.returncode == 0, result.stderr
    assert "gatekeeper.shell" in imported
    assert not HOT_PATH_FREE_OF & imported, sorted(HOT_PATH_FREE_OF & imported)
    # Audited as the same request through the installed script was.
    before, after = gk.audit(event="access")[-2:]
    assert after["reason"] == before["reason"] == "allowed" and after["seq"] == before["seq"] + 1


def test_keys_command_through_its_launcher_imports_no_re_or_pathlib(gk: object) -> None:
    """sshd runs `gatekeeper keys-command` for every key a client offers (twice per
    connection): through the plain launcher it imports none of the heavy modules."""
    from testing.installation import Installation

    assert isinstance(gk, Installation)
    gk.init()
    private, key_id = gk.add_user("bob")
    key_type, blob = Path(f"{private}.pub").read_text().split()[:2]
    env = {k: v for k, v in gk.env.items() if not k.startswith(("SSH_", "PYTHON"))}
    env["PYTHONPATH"] = str(ROOT)
    args = ["--config", str(gk.config), "keys-command", "git", key_type, blob]
    gk.gk(*args[2:])  # once, so the compiled policy is cached as for every later key
    result, imported = run_launcher(CLI_LAUNCHER, args, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('command="') and f' {key_id}",restrict ' in result.stdout
    assert "gatekeeper.authkeys" in imported and "click" not in imported
    assert not HOT_PATH_FREE_OF & imported, sorted(HOT_PATH_FREE_OF & imported)


def test_the_fetch_hook_path_imports_no_re_or_pathlib(gk: object) -> None:
    """The pack-objects hook is a fresh interpreter on every clone: load the policy and
    the store, look the token up, refuse and audit, without the heavy modules."""
    from gatekeeper.hooks import recheck
    from testing.installation import Installation

    assert isinstance(gk, Installation)
    gk.init()
    repo = gk.repo("docs")
    env = {**gk.env, "GIT_DIR": str(repo), "GATEKEEPER_USER": "bob", "GATEKEEPER_TOKEN": "0" * 64}
    call = f"pack_objects({str(gk.config)!r}, ['git', 'pack-objects'], os.environ, io.StringIO())"
    rc, names = probe_modules(
        "import io, os\nfrom gatekeeper.hooks.fetch import pack_objects", call, env, cwd=repo
    )
    assert rc == "1"  # refused: an unknown token
    assert {"gatekeeper.store", "gatekeeper.policy"} <= names
    assert not HOT_PATH_FREE_OF & names, sorted(HOT_PATH_FREE_OF & names)
    records = gk.audit(event="access")
    assert records and records[-1]["reason"] == recheck.BAD_IDENTITY


def test_a_policy_compile_turns_collection_back_on(tmp_path: Path) -> None:
    """The launcher runs the forced command with the cyclic collector off; compiling a
    changed policy (the one step that builds a large object graph) turns it on."""
    import gc

    from gatekeeper.policy import load_policy

    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "config" / "example.yaml").read_text())
    was = gc.isenabled()
    gc.disable()
    try:
        load_policy(str(policy), cache_dir=str(tmp_path / "cache"))
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
