"""gatekeeper-shell: the forced command, and the whole git-access path in one place.

    key id (argv) -> policy (compiled cache) -> store facts -> parse SSH_ORIGINAL_COMMAND
    -> decide() -> audit record -> exec git | refusal on stderr | a user command

This module runs on every SSH connection, so it imports only the standard library
and gatekeeper's light modules; the 2FA commands (pyotp, cryptography, segno) are
imported only when a user runs one. Anything unexpected refuses: no traceback, no
access.
"""

from __future__ import annotations

import os
import sys
import time

from gatekeeper import decision, logs, pathstr, sshcmd
from gatekeeper.errors import (
    GatekeeperError,
    InputError,
    Refused,
    internal_error,
    prefixed,
    render,
)
from gatekeeper.frontend import (
    SAFE_PATH,
    audit_bad_command,
    for_client,
    git_binary,
    load,
    unknown_key,
    user_facts,
)
from gatekeeper.lightstd import datetime, timezone
from gatekeeper.policy import DEFAULT_CONFIG, Policy
from gatekeeper.record import record
from gatekeeper.store import ConnectionFacts, HookToken, Store, token_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import TextIO

_DIGITS = frozenset("0123456789")
_PROTOCOL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._=-")


def valid_key_id(arg: str) -> bool:
    """`[0-9]{1,12}`, the whole string (checked without compiling a regular expression)."""
    return 1 <= len(arg) <= 12 and _DIGITS.issuperset(arg)


def valid_git_protocol(value: str) -> bool:
    """`[A-Za-z0-9._=-]{1,32}(:[A-Za-z0-9._=-]{1,32}){0,7}`, the whole string."""
    parts = value.split(":")
    return len(parts) <= 8 and all(
        1 <= len(part) <= 32 and _PROTOCOL_CHARS.issuperset(part) for part in parts
    )


HOOK_TOKEN_SECONDS = 6 * 3600  # how long the hooks accept a connection's token


@record
class Connection:
    """Who is connecting and from where, as sshd (or the embedded server) told us."""

    key_id: int
    original_command: str | None
    client: str
    git_protocol: str | None
    config: str
    """The policy file, spelled as pathlib spells it (`pathstr`; no pathlib import here)."""
    key_fp: str | None = None
    """The fingerprint the authorized_keys line names beside the key id (`--key`): the key
    sshd verified. The id counts only while the store still gives it this fingerprint."""
    port: int | None = None
    """The port the embedded server listens on, which messages name instead of
    `server.port` (from its command line; never from the client's environment)."""
    factor: str | None = None
    """What the front-end enforced for this key on this connection (`--factor`): a
    security key's `touch` or `touch+pin`, as sshd's line options or the embedded
    server's own check of the signature's flags."""


def client_address(ssh_connection: str) -> str:
    """The client address from SSH_CONNECTION, which may be `UNKNOWN 65535 UNKNOWN 65535`."""
    parts = ssh_connection.split()
    return parts[0] if parts and len(parts[0]) <= 64 else "unknown"


def valid_port(arg: str) -> bool:
    return 1 <= len(arg) <= 5 and _DIGITS.issuperset(arg) and 1 <= int(arg) <= 65535


def parse_invocation(argv: list[str], env: Mapping[str, str]) -> Connection:
    config: str | None = None
    key_fp: str | None = None
    port: int | None = None
    args = list(argv)
    if len(args) >= 2 and args[0] == "--config":
        config, args = args[1], args[2:]
    if len(args) >= 2 and args[0] == "--port" and valid_port(args[1]):
        port, args = int(args[1]), args[2:]
    if len(args) >= 2 and args[0] == "--key" and args[1].startswith("SHA256:"):
        key_fp, args = args[1], args[2:]
    factor: str | None = None
    if len(args) >= 2 and args[0] == "--factor" and args[1] in ("touch", "touch+pin"):
        factor, args = args[1], args[2:]
    if len(args) != 1 or not valid_key_id(args[0]):
        raise InputError(
            "gatekeeper-shell must be run by sshd with one key id argument.",
            hint="see `gatekeeper authorized-keys` for the lines that call it.",
        )
    if "SSH_CONNECTION" not in env:
        raise Refused("only SSH is supported: SSH_CONNECTION is not set.")
    protocol = env.get("GIT_PROTOCOL")
    return Connection(
        key_id=int(args[0]),
        original_command=env.get("SSH_ORIGINAL_COMMAND"),
        client=client_address(env["SSH_CONNECTION"]),
        git_protocol=protocol if protocol and valid_git_protocol(protocol) else None,
        config=pathstr.norm(config or env.get("GATEKEEPER_CONFIG") or DEFAULT_CONFIG),
        key_fp=key_fp,
        port=port,
        factor=factor,
    )


def run(
    argv: list[str], env: Mapping[str, str], stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    conn = parse_invocation(argv, env)
    policy, store = load(conn.config, log)
    if conn.port is not None:
        policy = policy.served_on(conn.port)
    now = time.time()
    facts = store.connection_facts(conn.key_id, now)
    if facts is None or (conn.key_fp is not None and facts.key.fingerprint != conn.key_fp):
        # Also an id whose key was removed and whose number a new key took since the
        # line was written: never the new key's rights.
        store.audit(
            "access",
            now=now,
            reason="unknown-key",
            client=conn.client,
            key_fp=conn.key_fp,
            detail={"key_id": conn.key_id},
        )
        raise unknown_key()
    try:
        request = sshcmd.parse_command(conn.original_command)
    except InputError:
        audit_bad_command(store, facts.key, conn.client, conn.original_command, now)
        raise
    if isinstance(request, sshcmd.UserCommand):
        from gatekeeper import usercmd

        return usercmd.run(
            request, policy, store, facts, conn.client, env, stdin, stdout, stderr, conn.factor
        )
    return git_access(request, conn, policy, store, facts, now, stderr, env)


def git_access(
    request: sshcmd.GitRequest,
    conn: Connection,
    policy: Policy,
    store: Store,
    facts: ConnectionFacts,
    now: float,
    stderr: TextIO,
    env: Mapping[str, str],
) -> int:
    when = datetime.fromtimestamp(now, timezone.utc)
    ufacts = user_facts(facts, conn.factor)
    # Decide on the repository git will open, whatever the client's spelling and the
    # symlinks on the way (an alias gets its target's rules, never its own name's).
    located = sshcmd.locate_repo(policy.server.repositories_str, request.repo)
    repo = located.name if located is not None else request.repo
    verdict = decision.decide(policy, ufacts, repo, request.action, when)
    reason, message = verdict.reason, verdict.message
    if verdict.reason == decision.NOT_AUTHORIZED or (verdict.allowed and located is None):
        # The same words for a repository that is missing and one the user may not
        # see, naming only what the client typed.
        message = decision.not_found_message(policy, request.shown)
        if verdict.allowed:
            reason = "not-found"
    allowed = verdict.allowed and located is not None
    detail: dict[str, object] = {"verb": request.verb, "level": verdict.level, "allowed": allowed}
    met_by = ufacts.met_by(verdict.level, when)
    if met_by is not None:
        detail["factor"] = met_by
    if repo != request.repo:
        detail["requested"] = request.repo
    fields = {
        "user": facts.key.user,
        "key_fp": facts.key.fingerprint,
        "repo": repo,
        "action": request.action,
        "reason": reason,
        "client": conn.client,
        "detail": detail,
    }
    # No git without a record: if this write fails, StoreError refuses the connection.
    token = None
    if allowed:
        # The hooks' proof that this connection came through here (gatekeeper/hooks/):
        # the same CSPRNG as `secrets`, without its imports on this path.
        token = os.urandom(32).hex()
        grant = HookToken(
            facts.key.user,
            facts.key.id,
            facts.key.fingerprint,
            repo,
            request.action,
            conn.client,
            int(now),
            int(now + HOOK_TOKEN_SECONDS),
            ufacts.factor,
        )
        store.audit_with_token("access", token_digest(token), grant, now=now, **fields)
    else:
        store.audit("access", now=now, **fields)
    if located is None or token is None:
        stderr.write(prefixed(message))
        stderr.flush()
        return 1
    stderr.write(prefixed(verdict.warnings))
    stderr.flush()
    store.close()
    config = pathstr.resolve(conn.config)
    git = git_binary()
    pipes = push_pipes = hook = None
    if request.git_subcommand == "upload-pack":
        from gatekeeper.hooks import fetchgate

        # The fetch-side check: answered by us (hooks/fetchgate.py), else by the Python hook.
        pipes = fetchgate.open_pipes()
        hook = fetchgate.hook_command(git, pipes, quote) if pipes else pack_objects_hook(config)
    elif request.git_subcommand == "receive-pack" and env.get("GATEKEEPER_DRY_RUN") != "1":
        from gatekeeper.hooks import fetchgate

        # The push-side check: answered by us (hooks/pushgate.py), else by the Python hook.
        push_pipes = fetchgate.open_pipes()
    path = located.path
    argv = git_argv(request, path, hook)
    git_env = {
        "PATH": SAFE_PATH,
        "HOME": env.get("HOME", "/"),
        "GATEKEEPER_USER": facts.key.user,
        "GATEKEEPER_KEY": facts.key.fingerprint,
        "GATEKEEPER_KEY_ID": str(facts.key.id),
        "GATEKEEPER_REPO": repo,
        "GATEKEEPER_ACTION": request.action,
        "GATEKEEPER_CONFIG": config,
        "GATEKEEPER_TOKEN": token,
    }
    if env.get("GATEKEEPER_CACHE_DIR"):
        # The admin's compiled-policy cache, so the hooks find it too.
        git_env["GATEKEEPER_CACHE_DIR"] = env["GATEKEEPER_CACHE_DIR"]
    if conn.git_protocol:
        git_env["GIT_PROTOCOL"] = conn.git_protocol
    if env.get("GATEKEEPER_DRY_RUN") == "1":
        # For the benchmark: everything up to the exec, but not the exec.
        if pipes is not None:
            pipes.close()
        return 0
    if pipes is not None:

        def recheck() -> list[str]:
            from gatekeeper.hooks.fetch import check_fetch
            from gatekeeper.hooks.recheck import Identity

            key = facts.key
            ident = Identity(repo, key.user, key.id, key.fingerprint, conn.client, ufacts.factor)
            return check_fetch(config, time.time(), ident, path)

        code = fetchgate.supervise(git, argv, git_env, pipes, recheck, log)
        # git is done and the SSH session ends when we do: skip the interpreter's
        # teardown, which every clone and ls-remote would wait for (docs/performance.md);
        # nothing is left to save.
        sys.stderr.flush()
        os._exit(code)
    if push_pipes is not None:
        from gatekeeper.hooks import pushgate
        from gatekeeper.hooks.prereceive import PushCheck
        from gatekeeper.hooks.recheck import Identity

        def push_check(data: bytes) -> PushCheck:
            key = facts.key
            ident = Identity(repo, key.user, key.id, key.fingerprint, conn.client, ufacts.factor)
            return PushCheck(config, time.time(), data, ident, path)

        git_env.update(pushgate.environment(push_pipes))
        code = pushgate.supervise(git, argv, git_env, push_pipes, push_check, log)
        sys.stderr.flush()
        os._exit(code)
    os.execve(git, argv, git_env)  # noqa: S606 - argv is built, never a shell
    return 1  # pragma: no cover - execve does not return


# Settings that make git run a program for a served repository, pinned on git's command
# line: protected configuration, which a repository's own config cannot override (nor an
# `include` it pulls in). docs/threat-model.md lists the settings examined and why the
# others are not pinned.
ALTERNATE_REFS = "true"
"""What lists an alternate's refs: nothing. Every push runs this command (receive-pack
makes the repository itself an alternate of its quarantine), so it is a program without
a shell; the refs it would add only spare objects, never decide anything."""


def pinned_config(path: str | os.PathLike[str]) -> list[str]:
    """`-c` options that keep git's choice of programs to gatekeeper for repository `path`:
    its own `hooks/` (where gatekeeper's pre-receive is), no alternate-refs listing,
    and the standard signature programs for push certificates."""
    hooks = os.path.join(os.fspath(path), "hooks")
    return [
        "-c",
        f"core.hooksPath={hooks}",
        "-c",
        f"core.alternateRefsCommand={ALTERNATE_REFS}",
        "-c",
        "gpg.program=gpg",
        "-c",
        "gpg.openpgp.program=gpg",
        "-c",
        "gpg.x509.program=gpgsm",
        "-c",
        "gpg.ssh.program=ssh-keygen",
    ]


def git_argv(
    request: sshcmd.GitRequest, path: str | os.PathLike[str], pack_hook: str | None = None
) -> list[str]:
    """git's command line; `pack_hook` is the fetch-side check (hooks/fetch.py, hooks/fetchgate.py)
    that upload-pack runs instead of `git pack-objects`."""
    sub = request.git_subcommand
    pinned = pinned_config(path)
    if sub == "upload-archive":
        # upload-archive takes no options; the absolute path cannot look like one.
        return ["git", *pinned, sub, str(path)]
    if sub == "upload-pack":
        if pack_hook is not None:
            # git honours this only from protected configuration, which the command line is.
            pinned += ["-c", f"uploadpack.packObjectsHook={pack_hook}"]
        return ["git", *pinned, sub, "--strict", "--", str(path)]
    return ["git", *pinned, sub, "--", str(path)]


def pack_objects_hook(config: str | os.PathLike[str]) -> str:
    """The shell command upload-pack runs instead of `git pack-objects` (it appends the
    pack-objects command line): this interpreter, isolated (`-I`: no PYTHON* variables,
    no current directory on sys.path), re-checking the read before packing."""
    python = quote(sys.executable)
    return f"{python} -I -m gatekeeper.hooks pack-objects --config {quote(os.fspath(config))}"


# What shlex.quote leaves unquoted: `[\w@%+=:,./-]` with `\w` ASCII only.
_SHELL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")


def quote(text: str) -> str:
    """`shlex.quote(text)` without importing shlex (and re): unchanged when every
    character is safe, otherwise single-quoted, a `'` written as `'"'"'`."""
    if not text:
        return "''"
    if _SHELL_SAFE.issuperset(text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def log(message: str) -> None:
    logs.log("gatekeeper-shell", message)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(
            sys.argv[1:] if argv is None else argv, os.environ, sys.stdin, sys.stdout, sys.stderr
        )
    except GatekeeperError as exc:
        shown = for_client(exc, log)
        sys.stderr.write(render(shown))
        return shown.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - fail closed, never a traceback to the client
        sys.stderr.write(internal_error(exc, log))
        return 1


if __name__ == "__main__":
    sys.exit(main())
