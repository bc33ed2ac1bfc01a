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

from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from gatekeeper import decision, sshcmd, twofactor
from gatekeeper.errors import InputError, Refused
from gatekeeper.policy import Policy
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
            stderr.write("gatekeeper: interactive shells are not available here.\n")
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
    ssh = decision.ssh_command_prefix(policy)
    user = facts.key.user
    if sub == "status":
        _no_args(sub, args)
        stdout.write(status_text(store, facts))
        return 0
    if sub == "enroll":
        _no_args(sub, args)
        if not policy.two_factor.self_enroll:
            raise Refused(
                "self-enrollment is turned off on this server.",
                hint=f"ask an administrator: gatekeeper 2fa enroll {user}",
            )
        if facts.enrolled:
            raise Refused(
                "you are already enrolled in two-step verification.",
                hint=f"to move to a new app: {ssh} 2fa disable CODE, then enroll again.",
            )
        enrollment = twofactor.enroll(store, policy, user, actor=user)
        stdout.write(
            "Scan this QR code with your authenticator app, or add the key by hand.\n\n"
            f"{enrollment.qr()}\n"
            f"{enrollment.uri}\n\n"
            f"secret: {enrollment.secret}\n\n"
            f"Then confirm with the 6-digit code the app shows:\n  {ssh} 2fa confirm CODE\n"
        )
        return 0
    if sub == "confirm":
        code = _one_code(sub, args, stdin, stderr)
        codes = twofactor.confirm(store, policy, user, code, actor=user, client=client)
        stdout.write("Two-step verification is now enabled for " + user + ".\n\n")
        stdout.write(recovery_text(codes))
        return 0
    if sub == "verify":
        code = _one_code(sub, args, stdin, stderr)
        until = twofactor.verify(store, policy, facts.key, code, client=client)
        stdout.write(
            f"Verified: this key may reach repositories that need a verified session "
            f"until {_fmt(until)}.\n"
        )
        return 0
    if sub == "disable":
        code = _one_code(sub, args, stdin, stderr)
        twofactor.disable(
            store, policy, user, code, actor=user, key_fp=facts.key.fingerprint, client=client
        )
        stdout.write(
            "Two-step verification is now disabled. Repositories that require it will "
            "refuse you until you enroll again.\n"
        )
        return 0
    if sub == "recovery-codes":
        code = _one_code(sub, args, stdin, stderr)
        record = store.get_user(user)
        twofactor.check_code(
            store,
            policy,
            record,
            code,
            key_fp=facts.key.fingerprint,
            client=client,
            allow_recovery=False,
        )
        stdout.write(recovery_text(twofactor.new_recovery_codes(store, user, actor=user)))
        return 0
    raise InputError(
        f"unknown 2fa command '{sub}'.{sshcmd.did_you_mean('2fa ' + sub)}",
        hint=f"`{ssh} help` lists the commands.",
    )


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
