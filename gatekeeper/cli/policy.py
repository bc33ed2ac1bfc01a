"""`gatekeeper policy check|install`, and `gatekeeper check`, which explains the
decision the policy makes for one user, repository and action."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from gatekeeper import decision
from gatekeeper.cli.common import Context, actor, pass_ctx
from gatekeeper.errors import GatekeeperError, InputError, NotFound, PolicyError
from gatekeeper.policy.check import check_policy_text
from gatekeeper.store import Store


@click.group()
def policy() -> None:
    """Check the policy file."""


@policy.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def policy_check(ctx: Context, file: Path | None) -> None:
    """Validate FILE (default: the configured policy); list every problem."""
    path = file or ctx.config
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"policy file {path} is not UTF-8 text (byte {exc.start})", hint="save it as UTF-8."
        ) from None
    known: set[str] | None = None
    loaded, _ = check_policy_text(text, str(path))
    if loaded is not None:
        try:
            with Store.open(loaded.server.state_dir, loaded.server.store) as store:
                known = store.user_names()
        except GatekeeperError:
            known = None
    result, problems = check_policy_text(text, str(path), known_users=known)
    for p in problems:
        click.echo(p.format(str(path)), err=p.severity == "error")
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    if errors:
        click.echo(f"{path}: {errors} error(s), {warnings} warning(s)", err=True)
        sys.exit(1)
    assert result is not None
    click.echo(
        f"{path}: ok ({len(result.teams)} teams, {len(result.rules)} repository rules, "
        f"{warnings} warning(s))"
    )


@policy.command("install")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def policy_install(ctx: Context, file: Path) -> None:
    """Check FILE and, only if it is valid, make it the live policy in one atomic
    swap, compiled for the forced command and recorded in the audit log with who did
    it. A policy with an error never goes live: every connection would be refused."""
    from gatekeeper import policyinstall

    result = policyinstall.install(ctx.config, file)
    for line in result.problems:
        click.echo(line, err=True)
    if result.policy is None:
        click.echo(f"{file}: not installed; {ctx.config} is unchanged", err=True)
        sys.exit(1)
    if not result.changed:
        click.echo(f"{ctx.config} already is {file}: nothing to install")
        return
    # The new policy names the state (its owner, as root, runs the rest).
    ctx.use_policy(result.policy)
    ctx.become_state_owner()
    compiled = policyinstall.compile_for_connections(ctx.config)
    with Store.open(result.policy.server.state_dir, result.policy.server.store) as store:
        previous = store.last_policy_hash()
        store.audit(
            "policy-change",
            actor=actor(),
            detail={
                "old": previous,
                "new": result.policy.sha256,
                "file": str(ctx.config),
                "how": f"policy install {file}",
            },
        )
    click.echo(
        f"installed {file} as {ctx.config} ({len(result.policy.teams)} teams, "
        f"{len(result.policy.rules)} repository rules){'; compiled' if compiled else ''}"
    )


@click.command()
@click.argument("user_name", metavar="USER")
@click.argument("repo")
@click.argument("action", type=click.Choice(["read", "write"]))
@click.option("--key", "fingerprint", help="Judge as this key (for verified sessions).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def check(
    ctx: Context, user_name: str, repo: str, action: str, fingerprint: str | None, as_json: bool
) -> None:
    """Explain whether USER may ACTION REPO: rules, level, reason. Exit 0 allow, 1 refuse,
    2 for an unknown user or key or an invalid repository name."""
    from gatekeeper.frontend import best_user_facts
    from gatekeeper.sshcmd import locate_repo, normalize_repo_name

    requested = normalize_repo_name(repo)
    # The forced command's identity of the repository: an alias is judged as the
    # repository it points to.
    located = locate_repo(ctx.policy.server.repositories, requested)
    name = located.name if located is not None else requested
    now = time.time()
    with ctx.store() as store:
        try:
            store.get_user(user_name)
        except NotFound as exc:
            # Exit 2, not 1: a script must tell "refused" from "asked about nobody".
            raise InputError(exc.message, hint=exc.hint) from exc
        keys = store.list_keys(user_name)
        if fingerprint:
            keys = [k for k in keys if k.fingerprint == fingerprint]
            if not keys:
                raise InputError(f"{user_name} has no key {fingerprint}.")
        ufacts = best_user_facts(store, user_name, keys, now)
    verdict = decision.decide(
        ctx.policy, ufacts, name, action, datetime.fromtimestamp(now, timezone.utc)
    )
    # The verdict is the policy's, so a rule can be tried before its repository exists;
    # a missing repository is said, not folded into the exit code.
    allowed, reason = verdict.allowed, verdict.reason
    if as_json:
        click.echo(
            json.dumps(
                {
                    "user": user_name,
                    "repo": name,
                    "requested": requested,
                    "exists": located is not None,
                    "action": action,
                    "allowed": allowed,
                    "reason": reason,
                    "level": verdict.level,
                    "rules": list(verdict.rules),
                    "access_via": list(verdict.access_via),
                    "requirements": [
                        {
                            "source": r.source,
                            "level": r.level,
                            "mode": r.mode,
                            "met": r.met,
                            "grace_until": r.grace_until.isoformat() if r.grace_until else None,
                        }
                        for r in verdict.requirements
                    ],
                    "message": list(verdict.message),
                    "warnings": list(verdict.warnings),
                },
                indent=2,
            )
        )
    else:
        click.echo(f"{user_name} {action} {name}: {'ALLOW' if allowed else 'REFUSE'} ({reason})")
        if located is None:
            click.echo(
                f"  note: no repository '{requested}' exists under "
                f"{ctx.policy.server.repositories}: git access is refused as not found until "
                "it is created"
            )
        elif name != requested:
            click.echo(f"  '{requested}' is an alias (symlink) of '{name}', judged as '{name}'")
        click.echo(f"  matching rules: {', '.join(verdict.rules) or 'none'}")
        click.echo(f"  access via: {', '.join(verdict.access_via) or 'nothing'}")
        for r in verdict.requirements:
            extra = f", grace until {r.grace_until}" if r.grace_until else ""
            click.echo(
                f"  requires {r.level} by {r.source} [{r.mode}{extra}]: "
                f"{'met' if r.met else 'NOT met'}"
            )
        click.echo(f"  level that applies: {verdict.level}")
        for line in (*verdict.message, *verdict.warnings):
            click.echo(f"  > {line}")
    sys.exit(0 if allowed else 1)
