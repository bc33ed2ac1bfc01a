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
from gatekeeper.errors import GatekeeperError, InputError, PolicyError, Refused, StoreError
from gatekeeper.lightstd import datetime, timezone
from gatekeeper.policy import DEFAULT_CONFIG, Policy, load_policy
from gatekeeper.record import record
from gatekeeper.store import ConnectionFacts, HookToken, Store, token_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
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


SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
PREFIX = "gatekeeper: "
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


def client_address(ssh_connection: str) -> str:
    """The client address from SSH_CONNECTION, which may be `UNKNOWN 65535 UNKNOWN 65535`."""
    parts = ssh_connection.split()
    return parts[0] if parts and len(parts[0]) <= 64 else "unknown"


def parse_invocation(argv: list[str], env: Mapping[str, str]) -> Connection:
    config: str | None = None
    args = list(argv)
    if len(args) >= 2 and args[0] == "--config":
        config, args = args[1], args[2:]
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
    )


def load(config: str, report: Callable[[str], None] | None = None) -> tuple[Policy, Store]:
    """Policy and store, or a refusal that names the server-side problem, not its details
    (those go to `report`, the forced command's log by default). The hooks refuse in the same
    words."""
    report = report or log
    try:
        policy = load_policy(config)
    except PolicyError as exc:
        report(f"policy error: {' | '.join(exc.lines())}")
        raise Refused(
            "access refused: the server's policy file is invalid or unreadable.",
            hint="an administrator must run `gatekeeper policy check`.",
        ) from exc
    logs.use_state_dir(policy.server.state_dir_str)
    try:
        store = Store.open(policy.server.state_dir_str, policy.server.store, light=True)
    except StoreError as exc:
        report(f"store error: {' | '.join(exc.lines())}")
        raise exc.for_client() from exc
    return policy, store


def user_facts(facts: ConnectionFacts) -> decision.UserFacts:
    def when(ts: int | None) -> datetime | None:
        return datetime.fromtimestamp(ts, timezone.utc) if ts is not None else None

    return decision.UserFacts(
        name=facts.key.user,
        enrolled=facts.enrolled,
        pending=facts.pending,
        verified_until=when(facts.verified_until),
        locked_until=when(facts.locked_until),
    )


def run(
    argv: list[str], env: Mapping[str, str], stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    conn = parse_invocation(argv, env)
    policy, store = load(conn.config)
    now = time.time()
    facts = store.connection_facts(conn.key_id, now)
    if facts is None:
        store.audit(
            "access",
            now=now,
            reason="unknown-key",
            client=conn.client,
            detail={"key_id": conn.key_id},
        )
        raise Refused(
            "access refused: this key is not registered (it may have just been removed).",
            hint="ask an administrator to add your public key (`gatekeeper key add`).",
        )
    try:
        request = sshcmd.parse_command(conn.original_command)
    except InputError:
        store.audit(
            "access",
            now=now,
            user=facts.key.user,
            key_fp=facts.key.fingerprint,
            reason="bad-command",
            client=conn.client,
            detail={"command": (conn.original_command or "")[:200]},
        )
        raise
    if isinstance(request, sshcmd.UserCommand):
        from gatekeeper import usercmd

        return usercmd.run(request, policy, store, facts, conn.client, env, stdin, stdout, stderr)
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
    verdict = decision.decide(policy, user_facts(facts), request.repo, request.action, when)
    reason, message = verdict.reason, verdict.message
    path = None
    if verdict.allowed:
        path = sshcmd.resolve_repo(policy.server.repositories_str, request.repo)
        if path is None:
            reason, message = "not-found", decision.not_found_message(policy, request.repo)
    allowed = path is not None
    fields = {
        "user": facts.key.user,
        "key_fp": facts.key.fingerprint,
        "repo": request.repo,
        "action": request.action,
        "reason": reason,
        "client": conn.client,
        "detail": {"verb": request.verb, "level": verdict.level, "allowed": allowed},
    }
    # No git without a record: if this write fails, StoreError refuses the connection.
    token = None
    if allowed:
        # The hooks' proof that this connection came through here (see hooks.py):
        # the same CSPRNG as `secrets`, without its imports on this path.
        token = os.urandom(32).hex()
        grant = HookToken(
            facts.key.user,
            facts.key.id,
            facts.key.fingerprint,
            request.repo,
            request.action,
            conn.client,
            int(now),
            int(now + HOOK_TOKEN_SECONDS),
        )
        store.audit_with_token("access", token_digest(token), grant, now=now, **fields)
    else:
        store.audit("access", now=now, **fields)
    if not allowed or path is None or token is None:
        for line in message:
            stderr.write(PREFIX + line + "\n")
        stderr.flush()
        return 1
    for line in verdict.warnings:
        stderr.write(PREFIX + line + "\n")
    stderr.flush()
    store.close()
    config = pathstr.resolve(conn.config)
    git = git_binary()
    pipes = hook = None
    if request.git_subcommand == "upload-pack":
        from gatekeeper import fetchgate

        # The fetch-side check: answered by us (fetchgate.py), else by the Python hook.
        pipes = fetchgate.open_pipes()
        hook = fetchgate.hook_command(git, pipes, quote) if pipes else pack_objects_hook(config)
    argv = git_argv(request, path, hook)
    git_env = {
        "PATH": SAFE_PATH,
        "HOME": env.get("HOME", "/"),
        "GATEKEEPER_USER": facts.key.user,
        "GATEKEEPER_KEY": facts.key.fingerprint,
        "GATEKEEPER_KEY_ID": str(facts.key.id),
        "GATEKEEPER_REPO": request.repo,
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
            from gatekeeper import hooks

            key = facts.key
            ident = hooks.Identity(request.repo, key.user, key.id, key.fingerprint, conn.client)
            return hooks.check_fetch(config, time.time(), ident)

        code = fetchgate.supervise(git, argv, git_env, pipes, recheck, log)
        # git is done and the SSH session ends when we do: skip the interpreter's
        # teardown (about 2.5 ms on every clone and ls-remote); nothing is left to save.
        sys.stderr.flush()
        os._exit(code)
    os.execve(git, argv, git_env)  # noqa: S606 - argv is built, never a shell
    return 1  # pragma: no cover - execve does not return


def git_argv(
    request: sshcmd.GitRequest, path: str | os.PathLike[str], pack_hook: str | None = None
) -> list[str]:
    """git's command line; `pack_hook` is the fetch-side check (hooks.py, fetchgate.py)
    that upload-pack runs instead of `git pack-objects`."""
    sub = request.git_subcommand
    if sub == "upload-archive":
        # upload-archive takes no options; the absolute path cannot look like one.
        return ["git", sub, str(path)]
    if sub == "upload-pack":
        if pack_hook is None:
            return ["git", sub, "--strict", "--", str(path)]
        # git honours this only from protected configuration, which the command line is.
        return [
            "git",
            "-c",
            f"uploadpack.packObjectsHook={pack_hook}",
            sub,
            "--strict",
            "--",
            str(path),
        ]
    return ["git", sub, "--", str(path)]


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


def git_binary() -> str:
    for directory in ("/usr/bin", "/usr/local/bin", "/bin"):
        candidate = os.path.join(directory, "git")
        if os.access(candidate, os.X_OK):
            return candidate
    raise Refused("access refused: git is not installed on the server.", hint="install git.")


def log(message: str) -> None:
    logs.log("gatekeeper-shell", message)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(
            sys.argv[1:] if argv is None else argv, os.environ, sys.stdin, sys.stdout, sys.stderr
        )
    except GatekeeperError as exc:
        if isinstance(exc, StoreError):
            # Its words name the database and quote it: for the server log, not the client.
            log(f"store error: {' | '.join(exc.lines())}")
            exc = exc.for_client()
        for line in exc.lines():
            sys.stderr.write(PREFIX + line + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - fail closed, never a traceback to the client
        log(f"internal error: {type(exc).__name__}: {exc}")
        sys.stderr.write(PREFIX + "access refused: internal error (logged on the server).\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
