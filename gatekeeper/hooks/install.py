"""Installing the pre-receive hook: `gatekeeper hooks install|uninstall|status`, as
plain functions (the click commands are in the CLI). Like pre-commit, a hook is known
as ours by a marker line, re-installing is idempotent, and a hook that is not ours is
kept as `pre-receive.legacy` and chained."""

from __future__ import annotations

import os
from pathlib import Path

from gatekeeper import programs, sshcmd
from gatekeeper.errors import HookError
from gatekeeper.files import replace_file
from gatekeeper.hooks.prereceive import HOOK, LEGACY_SUFFIX
from gatekeeper.policy import Policy
from gatekeeper.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

TEMPLATE = "pre-receive.tmpl"
MARKER = "# gatekeeper-hook-id: 8c2f5e1a9d7b4e03a6f1c2d4b5e6f708"
"""The line by which our hooks are known (pre-commit's `is_our_script`)."""


@record
class RepoHook:
    """The state of one bare repository's pre-receive hook."""

    name: str
    path: Path
    state: str
    """ok | missing | stale (ours, for another interpreter, policy or version) |
    foreign (not ours) | hooks-path (core.hooksPath set: git ignores hooks/)."""
    legacy: bool = False
    """A chained pre-receive.legacy is present."""
    hooks_path: str | None = None


@record
class Outcome:
    name: str
    result: str
    error: str | None = None
    hint: str | None = None


def template_text() -> str:
    """The hook's template (hooks/pre-receive.tmpl). Its text is what `status` compares
    an installed hook with, not its path: an edit makes every installed hook stale
    until `hooks install --all` rewrites it, a move does not."""
    return programs.text(TEMPLATE)


def render_hook(python: str, config: Path) -> str:
    """The hook's text for this interpreter and policy file (both absolute)."""
    from shlex import quote

    return (
        template_text().replace("@PYTHON@", quote(python)).replace("@CONFIG@", quote(str(config)))
    )


def is_ours(text: bytes) -> bool:
    return MARKER.encode() in text


def find_repositories(root: Path) -> list[tuple[str, Path]]:
    """Every bare repository under `root` that a client can name, by canonical name
    (`sshcmd.list_repositories`: symlinks are aliases, not repositories)."""
    from pathlib import Path

    return [(repo.name, Path(repo.path)) for repo in sshcmd.list_repositories(root)]


def select_repositories(
    policy: Policy, names: Sequence[str], all_repos: bool
) -> list[tuple[str, Path]]:
    root = policy.server.repositories
    if all_repos:
        if names:
            raise HookError("give repository names or --all, not both.")
        return find_repositories(root)
    if not names:
        raise HookError(
            "name the repositories, or use --all.", hint="`gatekeeper hooks status` lists them."
        )
    out = []
    from pathlib import Path

    for arg in names:
        name = sshcmd.normalize_repo_name(arg)
        located = sshcmd.locate_repo(root, name)
        if located is None:
            raise HookError(
                f"no repository '{name}' under {root}.",
                hint="`gatekeeper hooks status` lists the repositories.",
            )
        out.append((located.name, Path(located.path)))
    return out


def configured_hooks_path(repo: Path) -> str | None:
    """core.hooksPath from the repository's own config file (and what it includes)."""
    import subprocess

    config = repo / "config"
    if not config.is_file():
        return None
    result = subprocess.run(
        ["git", "config", "--file", str(config), "--includes", "--get", "core.hooksPath"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_NOSYSTEM": "1"},
    )
    value = result.stdout.strip()
    return value if result.returncode == 0 and value else None


def hook_state(name: str, repo: Path, expected: str) -> RepoHook:
    hook = repo / "hooks" / HOOK
    legacy = os.path.lexists(hook.with_name(HOOK + LEGACY_SUFFIX))
    hooks_path = configured_hooks_path(repo)
    if hooks_path is not None:
        return RepoHook(name, repo, "hooks-path", legacy, hooks_path)
    if not os.path.lexists(hook):
        return RepoHook(name, repo, "missing", legacy)
    try:
        text = hook.read_bytes()
    except OSError:
        return RepoHook(name, repo, "foreign", legacy)
    if not is_ours(text):
        return RepoHook(name, repo, "foreign", legacy)
    return RepoHook(name, repo, "ok" if text == expected.encode() else "stale", legacy)


def status(policy: Policy, python: str, config: Path) -> list[RepoHook]:
    expected = render_hook(python, config)
    return [hook_state(n, p, expected) for n, p in find_repositories(policy.server.repositories)]


def _not_writable(name: str, path: Path, exc: OSError) -> HookError:
    return HookError(
        f"cannot write {path}: {exc.strerror or exc}.",
        hint="the hooks directory must be a directory the git user can write: run as "
        "the repositories' owner, or fix its owner and mode.",
    )


def _write_hook(name: str, hooks_dir: Path, text: str) -> None:
    """Write hooks/pre-receive atomically, mode 0755, owned like the hooks directory."""
    try:
        owner = None
        if os.geteuid() == 0:
            st = os.stat(hooks_dir)
            owner = (st.st_uid, st.st_gid)
        replace_file(
            hooks_dir / HOOK, text.encode("utf-8"), mode=0o755, exact_mode=True, owner=owner
        )
    except OSError as exc:
        raise _not_writable(name, hooks_dir, exc) from exc


def install_one(name: str, repo: Path, expected: str) -> str:
    """Install (or update) one repository's hook; returns what was done."""
    state = hook_state(name, repo, expected)
    if state.state == "hooks-path":
        raise HookError(
            f"core.hooksPath is set ({state.hooks_path}), so git would not run "
            f"hooks/{HOOK}; nothing installed.",
            hint=f"unset it (git config --file {repo / 'config'} --unset core.hooksPath) "
            "and install again.",
        )
    if state.state == "ok":
        return "unchanged"
    hooks_dir = repo / "hooks"
    if os.path.lexists(hooks_dir) and not hooks_dir.is_dir():
        raise HookError(
            f"{hooks_dir} is not a directory; nothing installed.",
            hint="move it away (git expects a directory of hooks there) and install again.",
        )
    try:
        hooks_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise _not_writable(name, hooks_dir, exc) from exc
    hook = hooks_dir / HOOK
    legacy = hooks_dir / (HOOK + LEGACY_SUFFIX)
    if state.state != "foreign":
        _write_hook(name, hooks_dir, expected)
        return "installed" if state.state == "missing" else "updated"
    if state.legacy:
        raise HookError(
            f"hooks/{HOOK} is not gatekeeper's and hooks/{HOOK}{LEGACY_SUFFIX} "
            "already exists; nothing changed.",
            hint="merge them into one hook (or move one away), then install again.",
        )
    try:
        os.rename(hook, legacy)  # the same bytes, mode and owner (a symlink stays one)
    except OSError as exc:
        raise _not_writable(name, hooks_dir, exc) from exc
    try:
        _write_hook(name, hooks_dir, expected)
    except HookError:
        os.rename(legacy, hook)
        raise
    return f"installed; the existing hook is kept as {HOOK}{LEGACY_SUFFIX} and still runs"


def uninstall_one(name: str, repo: Path) -> str:
    """Remove our hook and put back the one it replaced; leave anything else alone."""
    hook = repo / "hooks" / HOOK
    legacy = hook.with_name(HOOK + LEGACY_SUFFIX)
    if not os.path.lexists(hook):
        return "not installed"
    try:
        ours = not hook.is_symlink() and is_ours(hook.read_bytes())
    except OSError:
        ours = False
    if not ours:
        return f"not installed (hooks/{HOOK} is not gatekeeper's; left alone)"
    try:
        if os.path.lexists(legacy):
            os.replace(legacy, hook)
            return f"removed; restored the previous hook from {HOOK}{LEGACY_SUFFIX}"
        os.unlink(hook)
    except OSError as exc:
        raise _not_writable(name, hook.parent, exc) from exc
    return "removed"


def install(targets: Sequence[tuple[str, Path]], python: str, config: Path) -> list[Outcome]:
    """Install into each repository; one repository's problem does not stop the others."""
    expected = render_hook(python, config)
    outcomes = []
    for name, path in targets:
        try:
            outcomes.append(Outcome(name, install_one(name, path, expected)))
        except HookError as exc:
            outcomes.append(Outcome(name, "error", exc.message, exc.hint))
    return outcomes


def uninstall(targets: Sequence[tuple[str, Path]]) -> list[Outcome]:
    outcomes = []
    for name, path in targets:
        try:
            outcomes.append(Outcome(name, uninstall_one(name, path)))
        except HookError as exc:
            outcomes.append(Outcome(name, "error", exc.message, exc.hint))
    return outcomes
