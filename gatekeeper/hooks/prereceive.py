"""The push check: one decision for the whole push, every ref name checked, the
repository's own chained pre-receive run, then one audit record per ref update in one
transaction (see the package's docstring)."""

from __future__ import annotations

import os
import time

from gatekeeper import decision, sshcmd
from gatekeeper.errors import Denied, StoreError
from gatekeeper.hooks.identity import identify
from gatekeeper.hooks.recheck import (
    BAD_INPUT,
    BAD_REF,
    LEGACY_HOOK,
    LOCAL_PUSH,
    NOT_FOUND,
    SERVER_ERROR,
    Identity,
    decide,
    load_or_deny,
    log,
    refuse,
)
from gatekeeper.policy import Policy
from gatekeeper.record import record
from gatekeeper.store import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path
    from typing import Any, TextIO

HOOK = "pre-receive"
LEGACY_SUFFIX = ".legacy"
MAX_REF_LENGTH = 1024
# Checked with sets, not regular expressions: `re` costs the Python fetch hook (a fresh
# interpreter where fetchgate.py is not used) more than the rest of its imports.
_HEX_BYTES = frozenset(b"0123456789abcdef")
_REF_BAD_BYTES = frozenset(range(0x21)) | frozenset(b"\x7f~^:?*[\\")


def _is_oid(data: bytes) -> bool:
    """A SHA-1 (40) or SHA-256 (64) object name in lowercase hex."""
    return len(data) in (40, 64) and _HEX_BYTES.issuperset(data)


def _first_bad_ref_byte(ref: bytes) -> int | None:
    """The index of the first byte git never allows in a ref name, or None."""
    return next((i for i, b in enumerate(ref) if b in _REF_BAD_BYTES), None)


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
