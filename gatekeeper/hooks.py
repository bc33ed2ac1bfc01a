"""Git hooks: the repository itself re-checks every push and fetch (defence in depth).

Even if a repository is reached by a path that skipped the forced command, or the
policy changed between connection and push, the repository checks again with the
same `decision.decide()` and answers with the same wording, as `remote:` lines.

Identity. When the forced command allows a git request it records a random
per-connection token in the store, bound to (user, key, repository, action, expiry),
in the same transaction as the access record, and hands it to git as
`GATEKEEPER_TOKEN` beside `GATEKEEPER_USER` and `GATEKEEPER_KEY`. Only the token's
SHA-256 is stored. A hook believes `GATEKEEPER_USER` only when the token is in the
store, unexpired, and names that user, that key, this repository and this action;
then it reads the key's 2FA state again and decides afresh. A push with no identity
at all (a local `git push` into the bare repository) is refused unless the policy
says `hooks: {allow_local_push: true}`; a push that claims an identity it cannot
prove (a forged `GATEKEEPER_USER`, an unknown or expired token) is always refused.

Push side: `hooks/pre-receive`, a thin shell script written from
`resources/pre-receive.tmpl` with the installing interpreter's absolute path and the
policy file baked in (never found through PATH), and a marker line by which
`gatekeeper hooks` knows its own scripts. For a push over SSH it hands the ref
updates to the forced command, which is receive-pack's parent and runs `PushCheck`
itself (pushgate.py: no second interpreter); otherwise it runs `python -I -m
gatekeeper.hooks pre-receive`. Either way one `PushCheck` reads all ref updates,
makes one decision, checks every ref name
(git's `check-ref-format` rules, control characters first), runs a chained
`pre-receive.legacy` if there is one (after gatekeeper has allowed the push, so a
refused push never reaches it; its failure refuses the push), then writes one audit
record per ref update (ref, old, new) in a single `BEGIN IMMEDIATE` transaction: all
of them or none. If the store stays locked past its busy timeout the whole push is
refused, with nothing recorded and nothing changed.

Fetch side: git's `uploadpack.packObjectsHook`, chosen over a wrapper around
upload-pack. git honours that setting only from protected configuration (system,
global, or the command line), never from a repository's own config, so the forced
command passes it on upload-pack's command line (`git -c ...`): nothing to install,
and a repository cannot switch it off. upload-pack then runs the hook instead of
`git pack-objects ARGS`, and the hook re-checks the read (`check_fetch`) before it
execs `git pack-objects ARGS`. Over SSH the hook is a shell script that asks the
forced command, which stays alive as upload-pack's parent and answers with the same
`check_fetch` for the identity it already knows (fetchgate.py): no second interpreter
per clone. Where that cannot be set up (see fetchgate.py) the hook is
`python -I -m gatekeeper.hooks pack-objects ...`, which proves the identity from the
token as pre-receive does. A wrapper around upload-pack would have to re-implement or
proxy the pack protocol to run at the same moment.
Limits: the check runs when objects are packed, so the ref advertisement (names and
ids of refs; all of `git ls-remote`) is still answered on the connection-time
decision; `git upload-archive` has no such hook and relies on the forced command
alone; a refused fetch also shows git's own "git-pack-objects died" lines after ours.

Other limits: a token is a bearer secret in git's environment for its lifetime
(`shell.HOOK_TOKEN_SECONDS`), visible to other hooks that run in the same push; anyone
who can already write the repository's files as the git user is beyond any hook.
`core.hooksPath` set in a repository makes git ignore `hooks/`, so installing there
is refused; set in the git user's global or the system config it would silence the
hooks of every repository, which `hooks status` cannot see.

This module is imported by those two entry points on every push and fetch, so it
imports only the standard library and gatekeeper's light modules at the top; the
`gatekeeper hooks` commands (click) are built by `cli_group()` on demand.
"""

from __future__ import annotations

import os
import sys
import time

from gatekeeper import decision, logs, sshcmd
from gatekeeper.errors import (
    INTERNAL_ERROR,
    Denied,
    HookError,
    Refused,
    StoreError,
    prefixed,
    render,
)
from gatekeeper.frontend import load, unknown_key, user_facts
from gatekeeper.lightstd import datetime, timezone
from gatekeeper.policy import Policy
from gatekeeper.record import record
from gatekeeper.store import Store, token_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path
    from typing import Any, TextIO

    import click

    from gatekeeper.cli import Context

HOOK = "pre-receive"
LEGACY_SUFFIX = ".legacy"
TEMPLATE = "pre-receive.tmpl"
MARKER = "# gatekeeper-hook-id: 8c2f5e1a9d7b4e03a6f1c2d4b5e6f708"
"""The line by which our hooks are known (pre-commit's `is_our_script`)."""

MAX_REF_LENGTH = 1024
# Checked with sets, not regular expressions: `re` costs the Python fetch hook (a fresh
# interpreter where fetchgate.py is not used) more than the rest of its imports.
_HEX = frozenset("0123456789abcdef")
_HEX_BYTES = frozenset(b"0123456789abcdef")
_REF_BAD_BYTES = frozenset(range(0x21)) | frozenset(b"\x7f~^:?*[\\")


def _is_token(text: str) -> bool:
    return len(text) == 64 and _HEX.issuperset(text)


def _is_oid(data: bytes) -> bool:
    """A SHA-1 (40) or SHA-256 (64) object name in lowercase hex."""
    return len(data) in (40, 64) and _HEX_BYTES.issuperset(data)


def _first_bad_ref_byte(ref: bytes) -> int | None:
    """The index of the first byte git never allows in a ref name, or None."""
    return next((i for i, b in enumerate(ref) if b in _REF_BAD_BYTES), None)


# Reason codes of the hooks' own refusals, for the audit log.
NO_IDENTITY = "hook-no-identity"
BAD_IDENTITY = "hook-bad-identity"
UNKNOWN_KEY = "unknown-key"
BAD_REF = "bad-ref"
BAD_INPUT = "bad-input"
LEGACY_HOOK = "legacy-hook"
LOCAL_PUSH = "local-push"
NOT_FOUND = "not-found"
SERVER_ERROR = "server-error"


@record
class Identity:
    """Who is pushing or fetching, as proven by the connection's token."""

    repo: str
    user: str | None = None
    """None for an allowed local push (no gatekeeper identity at all)."""
    key_id: int = 0
    key_fp: str | None = None
    client: str | None = None
    factor: str | None = None
    """What the connection's security key proved, as the forced command found it."""


def remote_url(policy: Policy, repo: str) -> str:
    server = policy.server
    port = "" if server.port == 22 else f":{server.port}"
    return f"ssh://{server.user}@{server.host}{port}/{repo}.git"


def verb_of(action: str) -> str:
    return "push to" if action == "write" else "read"


def log(message: str) -> None:
    logs.log("gatekeeper-hook", message)


# -- the checks both hooks share ---------------------------------------------------


def load_or_deny(config: str | Path) -> tuple[Policy, Store]:
    """Policy and store, or a refusal worded as the forced command words it."""
    try:
        return load(str(config), log)
    except Refused as exc:
        raise Denied.of(SERVER_ERROR, exc, audit=False) from exc


def repo_name(root: str, git_dir: str) -> str | None:
    """The canonical name of the repository at the real path `git_dir` under the real
    `root`, or None (`sshcmd.canonical_name`)."""
    return sshcmd.canonical_name(root, git_dir)


def identify(
    policy: Policy,
    store: Store,
    env: Mapping[str, str],
    git_dir: str,
    action: str,
    now: float,
    audit: dict[str, Any],
) -> Identity:
    """Whose request this is, proven by the connection's token; refuse otherwise."""
    root = os.path.realpath(policy.server.repositories_str)
    derived = repo_name(root, git_dir)
    shown = derived or os.path.basename(git_dir)
    audit["repo"] = derived or git_dir
    verb = verb_of(action)
    token = env.get("GATEKEEPER_TOKEN", "")
    claimed = env.get("GATEKEEPER_USER")
    unproven = Denied(
        BAD_IDENTITY,
        f"{verb} '{shown}' refused: its gatekeeper identity could not be verified.",
        "To fix: connect again over SSH; if it persists, tell an administrator.",
    )
    if not token:
        if claimed or env.get("GATEKEEPER_KEY"):
            audit["user"] = claimed
            log(f"{verb} {shown}: GATEKEEPER_USER={claimed!r} without a token")
            raise unproven
        if action == "write" and policy.allow_local_push:
            return Identity(repo=derived or git_dir)
        fix = f"To fix: use the SSH remote {remote_url(policy, shown)}"
        if action == "write":
            fix += "; an administrator can allow local pushes with hooks.allow_local_push: true"
        raise Denied(
            NO_IDENTITY,
            f"{verb} '{shown}' refused: it did not come through gatekeeper "
            "(no gatekeeper identity).",
            fix + ".",
        )
    grant = store.hook_token(token_digest(token), now) if _is_token(token) else None
    audit["user"] = claimed
    if grant is None:
        log(f"{verb} {shown}: unknown or expired token (user {claimed!r})")
        raise unproven
    audit.update(user=grant.user, key_fp=grant.key_fp, client=grant.client)
    key_id = env.get("GATEKEEPER_KEY_ID")
    mismatch = [
        what
        for what, ok in (
            ("user", grant.user == claimed),
            ("key", grant.key_fp == env.get("GATEKEEPER_KEY")),
            ("key id", key_id is None or key_id == str(grant.key_id)),
            ("action", grant.action == action),
            # The repository git opened, by its one identity: whatever name the client
            # used, the token names the canonical one.
            ("repository", grant.repo == derived),
        )
        if not ok
    ]
    if mismatch:
        log(f"{verb} {shown}: token of {grant.user} does not match its {', '.join(mismatch)}")
        raise unproven
    audit["repo"] = grant.repo
    return Identity(grant.repo, grant.user, grant.key_id, grant.key_fp, grant.client, grant.factor)


def decide(
    policy: Policy, store: Store, ident: Identity, action: str, now: float
) -> decision.Decision:
    """The forced command's decision, made again with the store's facts as of now."""
    facts = store.connection_facts(ident.key_id, now)
    if facts is None or facts.key.fingerprint != ident.key_fp or facts.key.user != ident.user:
        raise Denied.of(UNKNOWN_KEY, unknown_key())
    when = datetime.fromtimestamp(now, timezone.utc)
    verdict = decision.decide(policy, user_facts(facts, ident.factor), ident.repo, action, when)
    if not verdict.allowed:
        raise Denied(verdict.reason, *verdict.message)
    return verdict


def refuse(denied: Denied, store: Store | None, audit: dict[str, Any], now: float) -> list[str]:
    """Audit a refusal (unless it says not to); return the lines the git client reads."""
    if store is not None and denied.audit:
        detail = {**audit.pop("detail", {}), "allowed": False}
        try:
            store.audit("access", now=now, reason=denied.reason, detail=detail, **audit)
        except StoreError as exc:
            log(f"could not audit a refusal ({denied.reason}): {exc.message}")
    return render(denied).splitlines()


# -- pre-receive -------------------------------------------------------------------


@record
class RefUpdate:
    old: str
    new: str
    ref: str


def ref_problem(ref: bytes) -> str | None:
    """Why git would not accept `ref` as a ref name (`git check-ref-format`, and
    receive-pack's `refs/<kind>/<name>`), or None."""
    bad = _first_bad_ref_byte(ref)
    if bad is not None:
        char = ref[bad : bad + 1]
        if char < b" " or char == b"\x7f":
            return "it contains a control character"
        return "it contains a space" if char == b" " else f"it contains {char.decode()!r}"
    if len(ref) > MAX_REF_LENGTH:
        return f"it is longer than {MAX_REF_LENGTH} bytes"
    try:
        ref.decode("utf-8")
    except UnicodeDecodeError:
        return "it is not UTF-8 text"
    parts = ref.split(b"/")
    if parts[0] != b"refs" or len(parts) < 3:
        return "it is not of the form refs/<kind>/<name>"
    if any(not part for part in parts):
        return "it has an empty component (a '//' or a trailing '/')"
    if b".." in ref or b"@{" in ref:
        return "it contains '..'" if b".." in ref else "it contains '@{'"
    if ref.endswith(b"."):
        return "it ends with '.'"
    for part in parts:
        if part.startswith(b"."):
            return "a component starts with '.'"
        if part.endswith(b".lock"):
            return "a component ends with '.lock'"
    return None


def shown_ref(ref: bytes) -> str:
    """A ref name as it can be printed safely: control characters escaped, cut short."""
    text = ref[:120].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text + ("..." if len(ref) > 120 else "")


def parse_updates(data: bytes, repo: str) -> list[RefUpdate]:
    """The ref updates git feeds pre-receive (`OLD NEW REF` lines); refuse if any is bad."""
    updates: list[RefUpdate] = []
    problems: list[str] = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        fields = line.split(b" ", 2)
        if len(fields) != 3 or not (_is_oid(fields[0]) and _is_oid(fields[1])):
            raise Denied(
                BAD_INPUT, f"push to '{repo}' refused: git sent a malformed ref update line."
            )
        old, new, ref = fields
        why = ref_problem(ref)
        if why is not None:
            problems.append(f"'{shown_ref(ref)}' is not a valid ref name: {why}.")
            continue
        updates.append(RefUpdate(old.decode(), new.decode(), ref.decode()))
    if problems:
        more = [f"... and {len(problems) - 5} more."] if len(problems) > 5 else []
        raise Denied(
            BAD_REF,
            f"push to '{repo}' refused: {len(problems)} invalid ref name(s); nothing was changed.",
            *problems[:5],
            *more,
            hint="ref names follow `git check-ref-format`: no control characters, spaces, "
            "'~^:?*[\\', '..' or '@{', no component starting with '.' or ending in '.lock'.",
        )
    return updates


def run_legacy(hook: Path | None, data: bytes, env: Mapping[str, str], repo: str) -> None:
    """Run the hook that `hooks install` kept as pre-receive.legacy, with the same input
    (git skips a hook that is not executable, so do we). Its failure refuses the push."""
    if hook is None:
        return
    legacy = hook.with_name(hook.name + LEGACY_SUFFIX)
    if not (legacy.is_file() and os.access(legacy, os.X_OK)):
        return
    import subprocess

    # It is the admin's own hook: it keeps GATEKEEPER_USER and the like, not the token.
    child_env = {k: v for k, v in env.items() if k != "GATEKEEPER_TOKEN"}
    try:
        rc = subprocess.run([str(legacy)], input=data, env=child_env, check=False).returncode
    except OSError as exc:
        log(f"cannot run {legacy}: {exc}")
        rc = 126
    if rc != 0:
        raise Denied(
            LEGACY_HOOK,
            f"push to '{repo}' refused by the repository's own pre-receive hook "
            f"({HOOK}{LEGACY_SUFFIX}, exit {rc}).",
        )


def pre_receive(
    config: Path,
    hook: Path | None,
    env: Mapping[str, str],
    data: bytes,
    stderr: TextIO,
    *,
    now: float | None = None,
) -> int:
    """Check a push: identity, decision, ref names, the chained hook; then audit every
    ref update in one transaction. Returns the hook's exit code."""
    now = time.time() if now is None else now
    git_dir = os.path.realpath(env.get("GIT_DIR") or ".")

    def proven(policy: Policy, store: Store, audit: dict[str, Any]) -> Identity:
        return identify(policy, store, env, git_dir, "write", now, audit)

    check = PushCheck(config, now, data, proven)
    refusal = check.begin()
    if not refusal:
        try:
            run_legacy(hook, data, env, check.repo)
            refusal = check.finish(0)
        except Denied as denied:
            refusal = check.refuse(denied)
    check.close()
    if refusal:
        stderr.write("".join(line + "\n" for line in refusal))
        stderr.flush()
        return 1
    return 0


class PushCheck:
    """The re-check of one push, in two steps around the repository's own chained
    pre-receive: `begin` (identity, decision, ref names) and `finish` (the chained
    hook's result, then one audit record per ref update, all in one transaction).
    Each returns [] to go on, or the refusal's lines for the git client (the refusal
    audited). The Python hook runs both; behind the forced command the push gate
    (pushgate.py) runs them in the forced command itself, for a shell script hook."""

    def __init__(
        self,
        config: str | Path,
        now: float,
        data: bytes,
        who: Identity | Callable[[Policy, Store, dict[str, Any]], Identity],
        path: str | None = None,
    ) -> None:
        self.config, self.now, self.data, self.who, self.path = config, now, data, who, path
        self.audit: dict[str, Any] = {"action": "write", "detail": {"hook": HOOK}}
        self.store: Store | None = None
        self.policy: Policy | None = None
        self.reason = ""
        self.updates: list[RefUpdate] = []
        self.repo = ""

    def begin(self) -> list[str]:
        try:
            policy, self.store = load_or_deny(self.config)
            self.policy = policy
            if isinstance(self.who, Identity):
                ident = self.who
                self.audit.update(
                    user=ident.user, key_fp=ident.key_fp, client=ident.client, repo=ident.repo
                )
                if self.path is not None and (
                    sshcmd.resolve_repo(policy.server.repositories_str, ident.repo) != self.path
                ):
                    raise Denied(NOT_FOUND, *decision.not_found_message(policy, ident.repo))
            else:
                ident = self.who(policy, self.store, self.audit)
            self.repo = ident.repo
            if ident.user is None:
                self.reason = LOCAL_PUSH
                self.audit["actor"] = local_account()
            else:
                self.reason = decide(policy, self.store, ident, "write", self.now).reason
            self.updates = parse_updates(self.data, ident.repo)
            self.audit["detail"]["refs"] = len(self.updates)
            return []
        except Denied as denied:
            return self.refuse(denied)
        except StoreError as exc:
            return self._unusable(exc)

    def finish(self, legacy_status: int) -> list[str]:
        """After the chained hook (its exit status; 0 when there is none)."""
        assert self.store is not None
        try:
            if legacy_status != 0:
                raise Denied(
                    LEGACY_HOOK,
                    f"push to '{self.repo}' refused by the repository's own pre-receive hook "
                    f"({HOOK}{LEGACY_SUFFIX}, exit {legacy_status}).",
                )
            records = [
                {
                    **self.audit,
                    "reason": self.reason,
                    "detail": {"hook": HOOK, "ref": u.ref, "old": u.old, "new": u.new},
                }
                for u in self.updates
            ]
            try:
                self.store.audit_many("ref-update", records, now=self.now)
            except StoreError as exc:
                log(f"push to {self.repo} refused, audit failed: {' | '.join(exc.lines())}")
                why = "the state database is busy" if exc.busy else "logged on the server"
                raise Denied(
                    SERVER_ERROR,
                    f"push to '{self.repo}' refused: the server could not record it in its "
                    f"audit log ({why})"
                    "; nothing was changed.",
                    hint="try again in a moment; if it persists, tell an administrator.",
                    audit=False,
                ) from exc
            return []
        except Denied as denied:
            return self.refuse(denied)

    def refuse(self, denied: Denied) -> list[str]:
        return refuse(denied, self.store, self.audit, self.now)

    def _unusable(self, exc: StoreError) -> list[str]:
        log(f"store error: {' | '.join(exc.lines())}")
        return self.refuse(Denied.of(SERVER_ERROR, exc.for_client(), audit=False))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def local_account() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


# -- the fetch side: uploadpack.packObjectsHook --------------------------------------


def pack_objects(
    config: str | Path,
    command: Sequence[str],
    env: Mapping[str, str],
    stderr: TextIO,
    *,
    now: float | None = None,
) -> int:
    """Re-check a read when upload-pack is about to pack objects, then exec
    `git pack-objects` with the arguments upload-pack gave. Returns only on refusal."""
    now = time.time() if now is None else now
    if list(command[:2]) != ["git", "pack-objects"]:
        log(f"pack-objects hook called with {list(command[:4])!r}")
        stderr.write(prefixed([INTERNAL_ERROR]))
        return 1
    git_dir = os.path.realpath(env.get("GIT_DIR") or ".")

    def proven(policy: Policy, store: Store, audit: dict[str, Any]) -> Identity:
        return identify(policy, store, env, git_dir, "read", now, audit)

    refusal = check_fetch(config, now, proven)
    if refusal:
        stderr.write("".join(line + "\n" for line in refusal))
        stderr.flush()
        return 1
    from gatekeeper.frontend import git_binary

    os.execv(git_binary(), ["git", "pack-objects", *command[2:]])  # noqa: S606
    return 1  # pragma: no cover - execv does not return


def check_fetch(
    config: str | Path,
    now: float,
    who: Identity | Callable[[Policy, Store, dict[str, Any]], Identity],
    path: str | None = None,
) -> list[str]:
    """The pack-time re-check of a read: [] to pack, otherwise the refusal's lines for
    the git client (the refusal audited). `who` is the identity the forced command
    itself vouches for (fetchgate.py) with `path`, the real path it gave git, or how to
    prove one from a token (the hook)."""
    audit: dict[str, Any] = {"action": "read", "detail": {"hook": "pack-objects"}}
    store: Store | None = None
    try:
        policy, store = load_or_deny(config)
        if isinstance(who, Identity):
            ident = who
            audit.update(user=who.user, key_fp=who.key_fp, client=who.client, repo=who.repo)
            if path is not None:
                # The repository may have been moved or renamed since the connection:
                # its name must still be the one decided on.
                if sshcmd.resolve_repo(policy.server.repositories_str, who.repo) != path:
                    raise Denied(
                        decision.NOT_AUTHORIZED,
                        *decision.not_found_message(policy, who.repo),
                    )
        else:
            ident = who(policy, store, audit)
        decide(policy, store, ident, "read", now)
        return []
    except Denied as denied:
        return refuse(denied, store, audit, now)
    except StoreError as exc:
        log(f"store error: {' | '.join(exc.lines())}")
        return render(exc.for_client()).splitlines()
    finally:
        if store is not None:
            store.close()


# -- entry point (`python -I -m gatekeeper.hooks ...`) ------------------------------

USAGE = (
    "usage: python -m gatekeeper.hooks pre-receive --config POLICY [--hook PATH]\n"
    "       python -m gatekeeper.hooks pack-objects --config POLICY git pack-objects ARGS...\n"
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) < 3 or args[1] != "--config":
            sys.stderr.write(USAGE)
            return 2
        name, config = args[0], args[2]
        rest = args[3:]
        if name == "pre-receive":
            # pathlib only here: the fetch hook runs on every clone and does without.
            from pathlib import Path

            hook = None
            if rest[:1] == ["--hook"] and len(rest) == 2:
                hook, rest = Path(rest[1]), []
            if rest:
                sys.stderr.write(USAGE)
                return 2
            data = sys.stdin.buffer.read()
            return pre_receive(Path(config), hook, os.environ, data, sys.stderr)
        if name == "pack-objects":
            return pack_objects(config, rest, os.environ, sys.stderr)
        sys.stderr.write(USAGE)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - fail closed, never a traceback to the client
        log(f"internal error: {type(exc).__name__}: {exc}")
        sys.stderr.write(prefixed([INTERNAL_ERROR]))
        return 1


# -- installing: `gatekeeper hooks install|status|uninstall` ------------------------


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
    from pathlib import Path

    return (Path(__file__).parent / "resources" / TEMPLATE).read_text(encoding="utf-8")


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
    tmp = hooks_dir / f".{HOOK}.gatekeeper-{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        try:
            os.write(fd, text.encode("utf-8"))
            os.fchmod(fd, 0o755)
            if os.geteuid() == 0:
                st = os.stat(hooks_dir)
                os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)
        os.replace(tmp, hooks_dir / HOOK)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
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


def cli_group() -> click.Group:
    """The `gatekeeper hooks` commands, registered by cli.py (click is imported here,
    not by the hooks themselves)."""
    import click

    from gatekeeper import cli

    def report(ctx: Context, event: str, outcomes: list[Outcome]) -> None:
        if not outcomes:
            click.echo(f"no repositories under {ctx.policy.server.repositories}")
        changed = {}
        for o in outcomes:
            if o.error is not None:
                click.echo(f"{o.name}: error: {o.error}", err=True)
                if o.hint:
                    click.echo(f"{o.name}: hint: {o.hint}", err=True)
            else:
                click.echo(f"{o.name}: {o.result}")
                if not o.result.startswith(("unchanged", "not installed")):
                    changed[o.name] = o.result
        if changed:
            with ctx.store() as store:
                store.audit(event, actor=cli.actor(), detail={"repositories": changed})
        if any(o.error is not None for o in outcomes):
            sys.exit(1)

    @click.group("hooks")
    def hooks_group() -> None:
        """Install the git hooks that re-check every push (README: Hooks)."""

    @hooks_group.command("install")
    @click.argument("repos", nargs=-1, metavar="[REPO]...")
    @click.option("--all", "all_repos", is_flag=True, help="Every repository under the root.")
    @click.pass_obj
    def install_cmd(ctx: Context, repos: tuple[str, ...], all_repos: bool) -> None:
        """Install the pre-receive hook into repositories (idempotent). An existing hook
        is kept as pre-receive.legacy and chained."""
        targets = select_repositories(ctx.policy, repos, all_repos)
        report(ctx, "hooks-install", install(targets, sys.executable, ctx.config))

    @hooks_group.command("uninstall")
    @click.argument("repos", nargs=-1, metavar="[REPO]...")
    @click.option("--all", "all_repos", is_flag=True, help="Every repository under the root.")
    @click.pass_obj
    def uninstall_cmd(ctx: Context, repos: tuple[str, ...], all_repos: bool) -> None:
        """Remove gatekeeper's hook and restore the hook it replaced."""
        report(ctx, "hooks-uninstall", uninstall(select_repositories(ctx.policy, repos, all_repos)))

    @hooks_group.command("status")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    def status_cmd(ctx: Context, as_json: bool) -> None:
        """List every repository's hook: ok, missing, stale, foreign or hooks-path.
        Exit 1 when any is not ok."""
        states = status(ctx.policy, sys.executable, ctx.config)
        rows = [
            {
                "repo": s.name,
                "state": s.state,
                "legacy": "yes" if s.legacy else "no",
                "path": str(s.path),
            }
            for s in states
        ]
        cli.emit(rows, ("repo", "state", "legacy"), as_json)
        if any(s.state != "ok" for s in states):
            sys.exit(1)

    return hooks_group


if __name__ == "__main__":
    sys.exit(main())
