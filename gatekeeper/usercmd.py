"""What a person can run over SSH: `help`, `info` (or nothing), and `2fa ...`.

ssh git@HOST                     who you are, your 2FA state, what you can reach
ssh git@HOST 2fa enroll          start enrollment: otpauth URI and a QR code
ssh git@HOST 2fa confirm CODE    finish it; prints recovery codes once
ssh git@HOST 2fa verify [CODE]   open a verified session for this key
ssh git@HOST 2fa status
ssh git@HOST 2fa disable CODE
ssh git@HOST 2fa recovery-codes CODE
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from gatekeeper import decision, sshcmd, twofactor
from gatekeeper.errors import InputError, Refused, prefixed
from gatekeeper.policy import Policy
from gatekeeper.record import record
from gatekeeper.sshcmd import UserCommand
from gatekeeper.store import ConnectionFacts, Store

HELP = """\
gatekeeper: git over SSH with two-step verification.
  {ssh}                        who you are, your 2FA state, what you can reach
  {ssh} info                   the same
  {ssh} 2fa enroll             start two-step enrollment (shows a QR code)
  {ssh} 2fa confirm CODE       finish enrollment with the code your app shows
  {ssh} 2fa verify [CODE]      open a verified session for this key ({hours}h)
  {ssh} 2fa status             your 2FA state
  {ssh} 2fa disable CODE       turn two-step verification off
  {ssh} 2fa recovery-codes CODE  new recovery codes (the old ones stop working)
  {ssh} help                   this text
Git itself works as usual: git clone {url}
"""


def _fmt(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def help_text(policy: Policy) -> str:
    ssh = decision.ssh_command_prefix(policy)
    server = policy.server
    port = "" if server.port == 22 else f":{server.port}"
    url = f"ssh://{server.user}@{server.host}{port}/REPOSITORY.git"
    return HELP.format(ssh=ssh, hours=f"{policy.two_factor.session_hours:g}", url=url)


@record
class Call:
    """One user command's connection: who, from where, and the streams to answer on."""

    policy: Policy
    store: Store
    facts: ConnectionFacts
    client: str
    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    @property
    def user(self) -> str:
        return self.facts.key.user

    @property
    def ssh(self) -> str:
        return decision.ssh_command_prefix(self.policy)


def run(
    cmd: UserCommand,
    policy: Policy,
    store: Store,
    facts: ConnectionFacts,
    client: str,
    env: Mapping[str, str],
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    factor: str | None = None,
) -> int:
    words = cmd.words
    if not words or words == ("info",):
        stdout.write(info_text(policy, store, facts, factor))
        if env.get("SSH_TTY"):
            stderr.write(prefixed(["interactive shells are not available here."]))
            return 1
        return 0
    if words[0] == "help":
        stdout.write(help_text(policy))
        return 0
    if words[0] != "2fa" or len(words) < 2:
        raise InputError(
            f"usage: 2fa {'|'.join(sshcmd.TWOFA_VERBS)}",
            hint=f"`{decision.ssh_command_prefix(policy)} help` lists the commands.",
        )
    sub, args = words[1], list(words[2:])
    verb = TWOFA.get(sub)
    if verb is None:
        raise InputError(
            f"unknown 2fa command '{sub}'.{sshcmd.did_you_mean('2fa ' + sub)}",
            hint=f"`{decision.ssh_command_prefix(policy)} help` lists the commands.",
        )
    verb(Call(policy, store, facts, client, stdin, stdout, stderr), sub, args)
    return 0


# -- `2fa VERB`: one function each, answering on `call.stdout` or raising -----------


def _status(call: Call, sub: str, args: list[str]) -> None:
    _no_args(sub, args)
    call.stdout.write(status_text(call.store, call.facts))


def _enroll(call: Call, sub: str, args: list[str]) -> None:
    _no_args(sub, args)
    if not call.policy.two_factor.self_enroll:
        raise Refused(
            "self-enrollment is turned off on this server.",
            hint=f"ask an administrator: gatekeeper 2fa enroll {call.user}",
        )
    if call.facts.enrolled:
        raise Refused(
            "you are already enrolled in two-step verification.",
            hint=f"to move to a new app: {call.ssh} 2fa disable CODE, then enroll again.",
        )
    enrollment = twofactor.enroll(call.store, call.policy, call.user, actor=call.user)
    call.stdout.write(
        "Scan this QR code with your authenticator app, or add the key by hand.\n\n"
        f"{enrollment.qr()}\n"
        f"{enrollment.uri}\n\n"
        f"secret: {enrollment.secret}\n\n"
        f"Then confirm with the 6-digit code the app shows:\n  {call.ssh} 2fa confirm CODE\n"
    )


def _confirm(call: Call, sub: str, args: list[str]) -> None:
    code = _one_code(sub, args, call.stdin, call.stderr)
    user = call.user
    codes = twofactor.confirm(call.store, call.policy, user, code, actor=user, client=call.client)
    call.stdout.write("Two-step verification is now enabled for " + user + ".\n\n")
    call.stdout.write(recovery_text(codes))


def _verify(call: Call, sub: str, args: list[str]) -> None:
    code = _one_code(sub, args, call.stdin, call.stderr)
    until = twofactor.verify(call.store, call.policy, call.facts.key, code, client=call.client)
    call.stdout.write(
        f"Verified: this key may reach repositories that need a verified session "
        f"until {_fmt(until)}.\n"
    )


def _disable(call: Call, sub: str, args: list[str]) -> None:
    code = _one_code(sub, args, call.stdin, call.stderr)
    twofactor.disable(
        call.store,
        call.policy,
        call.user,
        code,
        actor=call.user,
        key_fp=call.facts.key.fingerprint,
        client=call.client,
    )
    call.stdout.write(
        "Two-step verification is now disabled. Repositories that require it will "
        "refuse you until you enroll again.\n"
    )


def _recovery_codes(call: Call, sub: str, args: list[str]) -> None:
    code = _one_code(sub, args, call.stdin, call.stderr)
    user = call.store.get_user(call.user)
    twofactor.check_code(
        call.store,
        call.policy,
        user,
        code,
        key_fp=call.facts.key.fingerprint,
        client=call.client,
        allow_recovery=False,
    )
    codes = twofactor.new_recovery_codes(call.store, call.user, actor=call.user)
    call.stdout.write(recovery_text(codes))


TWOFA: dict[str, Callable[[Call, str, list[str]], None]] = {
    "enroll": _enroll,
    "confirm": _confirm,
    "verify": _verify,
    "status": _status,
    "disable": _disable,
    "recovery-codes": _recovery_codes,
}
"""`ssh git@HOST 2fa VERB ARGS`: each verb's function (sshcmd.TWOFA_VERBS names them)."""


def _no_args(sub: str, args: list[str]) -> None:
    if args:
        raise InputError(f"2fa {sub} takes no arguments.")


def _one_code(sub: str, args: list[str], stdin: TextIO, stderr: TextIO) -> str:
    if len(args) > 1:
        raise InputError(f"2fa {sub} takes one code.")
    if args:
        return args[0]
    stderr.write("Enter the code from your authenticator app: ")
    stderr.flush()
    line = stdin.readline(64)
    if not line.strip():
        raise InputError("no code given.", hint=f"pass it on the command line: 2fa {sub} CODE")
    return line.strip()


def recovery_text(codes: list[str]) -> str:
    lines = "\n".join(f"  {c}" for c in codes)
    return (
        "Recovery codes (each works once, in place of a code, if you lose your phone).\n"
        "They are shown only now: store them somewhere safe.\n\n" + lines + "\n"
    )


def status_text(store: Store, facts: ConnectionFacts) -> str:
    import time

    now = time.time()
    state = "enrolled" if facts.enrolled else ("pending confirmation" if facts.pending else "none")
    user = store.get_user(facts.key.user)
    lines = [
        f"user: {facts.key.user}",
        f"key: {facts.key.fingerprint} ({facts.key.key_type})",
        f"two-step verification: {state}",
    ]
    if facts.enrolled:
        until = facts.verified_until
        session = (
            f"verified until {_fmt(until)}"
            if until and until > now
            else "not verified"
            if until is None
            else f"expired at {_fmt(until)}"
        )
        lines.append(f"this key: {session}")
        lines.append(f"last verified (any key): {_fmt(store.last_verified(user.id))}")
        left = len(store.unused_recovery_codes(user.id))
        lines.append(f"recovery codes left: {left}")
    if facts.locked_until:
        lines.append(f"verification locked until {_fmt(facts.locked_until)}")
    return "\n".join(lines) + "\n"


def list_repositories(root: Path) -> Iterator[str]:
    """Canonical names of the repositories under `root` (`sshcmd.list_repositories`):
    an alias is not listed apart from the repository it points to."""
    for repo in sshcmd.list_repositories(root):
        yield repo.name


def info_text(
    policy: Policy, store: Store, facts: ConnectionFacts, factor: str | None = None
) -> str:
    from gatekeeper.frontend import user_facts

    now = datetime.now(timezone.utc)
    ufacts = user_facts(facts, factor)
    out = [status_text(store, facts)]
    if ufacts.factor is not None:
        pin = " and its PIN" if ufacts.factor == "touch+pin" else ""
        out.append(f"this connection: a security key, with a touch{pin}\n")
    rows = []
    for repo in list_repositories(policy.server.repositories):
        read = decision.decide(policy, ufacts, repo, "read", now)
        if read.reason == decision.NOT_AUTHORIZED:
            continue
        write = decision.decide(policy, ufacts, repo, "write", now)
        can_write = write.reason != decision.NOT_AUTHORIZED
        verdict = write if can_write else read
        level = verdict.level
        if verdict.would_refuse:
            note = decision.deadline_note(policy, verdict, ufacts, now)
        elif verdict.allowed:
            note = "ok"
        else:
            note = f"needs {level}: " + decision.fix_command(policy, ufacts, level, now)
        rows.append((repo, "read/write" if can_write else "read", level, note))
    if rows:
        width = max(len(r[0]) for r in rows)
        out.append("\nrepositories you can reach:\n")
        for repo, access, level, note in rows:
            out.append(f"  {repo:<{width}}  {access:<10}  2fa: {level:<8}  {note}\n")
    else:
        out.append("\nno repositories are open to you yet.\n")
    out.append(f"\n`{decision.ssh_command_prefix(policy)} help` lists the commands.\n")
    return "".join(out)
