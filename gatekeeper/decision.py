"""The one access decision: pure, no I/O, shared by every entry point.

`decide()` takes the compiled policy, what the store knows about the user, the
repository, the action and the current time, and returns a `Decision` with a
stable reason code and the lines a person should read. The forced command, the
embedded server, the hooks and `gatekeeper check` all call it, so they can never
disagree.

Semantics (docs/design.md, "Two-step verification levels"):
- Access comes from repository rules: a rule that matches grants `read`/`write` to
  teams; `public: true` lets any known key read with no second factor.
- Every matching rule with `require_2fa`, and every team through which the user
  reaches the repository, is a *requirement* with its own level, `grace_until` and
  `mode`. The level that applies is the strictest. A requirement's grace or report
  mode softens only that requirement, so a repository rule can tighten a team's
  level and never loosen it.
- An unmet requirement refuses, unless it is in its grace period (allowed, warned,
  until the end of that day UTC) or in report mode (allowed, warned, logged as
  "would refuse").
"""

from __future__ import annotations

from gatekeeper.lightstd import date, datetime, timezone
from gatekeeper.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gatekeeper.policy import Policy

LEVEL_ORDER = {"none": 0, "enrolled": 1, "verified": 2, "security-key": 3, "security-key-pin": 4}
SECURITY_KEY_LEVELS = ("security-key", "security-key-pin")
ACTIONS = ("read", "write")

# Stable reason codes: they appear in the audit log and in scripts' JSON output.
ALLOWED = "allowed"
PUBLIC_READ = "public-read"
GRACE_PERIOD = "grace-period"
REPORT_ONLY = "report-only"
NOT_AUTHORIZED = "not-authorized"
NOT_ENROLLED = "2fa-not-enrolled"
NOT_VERIFIED = "2fa-not-verified"
LOCKED = "2fa-locked"
NO_SECURITY_KEY = "2fa-no-security-key"
NO_USER_VERIFICATION = "2fa-no-user-verification"


@record
class UserFacts:
    """What the store knows about a user (and the connecting key) at decision time."""

    name: str
    enrolled: bool = False
    pending: bool = False
    verified_until: datetime | None = None
    """End of the verified session for *this* key, if one was ever opened."""
    locked_until: datetime | None = None
    factor: str | None = None
    """What this connection's key proved by itself: `touch` or `touch+pin` for a
    security key (enforced by sshd or the embedded server), None otherwise."""

    def verified(self, now: datetime) -> bool:
        return self.enrolled and self.verified_until is not None and now < self.verified_until

    def locked(self, now: datetime) -> bool:
        return self.locked_until is not None and now < self.locked_until

    def meets(self, level: str, now: datetime) -> bool:
        """A touch on every connection is a fresh second factor of its own, so it meets
        `enrolled` and `verified` too; TOTP never meets a security-key level."""
        if level == "security-key-pin":
            return self.factor == "touch+pin"
        if level == "security-key":
            return self.factor is not None
        if level == "verified":
            return self.factor is not None or self.verified(now)
        if level == "enrolled":
            return self.factor is not None or self.enrolled
        return True

    def met_by(self, level: str, now: datetime) -> str | None:
        """Which factor meets `level` on this connection: `touch`, `touch+pin`,
        `totp-session`, `totp`, or None (nothing is needed, or it is not met)."""
        if level == "none" or not self.meets(level, now):
            return None
        if self.factor is not None:
            return self.factor
        return "totp-session" if level == "verified" else "totp"


@record
class Requirement:
    """One rule or team asking for a level of two-step verification."""

    source: str
    level: str
    grace_until: date | None
    mode: str
    met: bool

    def in_grace(self, today: date) -> bool:
        return self.grace_until is not None and today <= self.grace_until

    @property
    def soft(self) -> bool:
        return self.mode == "report"


@record
class Decision:
    allowed: bool
    reason: str
    user: str
    repo: str
    action: str
    level: str = "none"
    requirements: tuple[Requirement, ...] = ()
    rules: tuple[str, ...] = ()
    """Each matching repository rule, as `match (line N)`."""
    access_via: tuple[str, ...] = ()
    """The teams (or `public`) through which access was granted."""
    message: tuple[str, ...] = ()
    """For a refusal: what was refused, why, and the exact command that fixes it."""
    warnings: tuple[str, ...] = ()
    """For a soft allow (grace or report mode): shown to the user, then git runs."""

    @property
    def would_refuse(self) -> bool:
        return self.allowed and self.reason in (GRACE_PERIOD, REPORT_ONLY)


def ssh_command_prefix(policy: Policy) -> str:
    """`ssh git@HOST` or `ssh -p PORT git@HOST`, as the user should type it."""
    server = policy.server
    port = "" if server.port == 22 else f"-p {server.port} "
    return f"ssh {port}{server.user}@{server.host}"


def strictest(levels: list[str]) -> str:
    return max(levels, key=LEVEL_ORDER.__getitem__, default="none")


def decide(policy: Policy, facts: UserFacts, repo: str, action: str, now: datetime) -> Decision:
    """Decide whether `facts.name` may `action` ("read" or "write") repository `repo`."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    user = facts.name
    matched = policy.matching_rules(repo)
    rules = tuple(f"{rule.match} (line {rule.line})" for rule in matched)
    member_of = {team.name: team for team in policy.teams_of(user)}

    via: list[str] = []
    for rule in matched:
        granted = rule.write if action == "write" else (*rule.read, *rule.write)
        via.extend(t for t in granted if t in member_of and t not in via)
    public = action == "read" and any(rule.public for rule in matched)

    base = {"user": user, "repo": repo, "action": action, "rules": rules}
    if public:
        # Public repositories are readable by any known key with no second factor.
        return Decision(True, PUBLIC_READ, access_via=("public",), **base)  # type: ignore[arg-type]
    if not via:
        return Decision(
            False,
            NOT_AUTHORIZED,
            message=not_found_message(policy, repo),
            **base,  # type: ignore[arg-type]
        )

    requirements: list[Requirement] = []
    for rule in matched:
        if rule.require_2fa and rule.require_2fa != "none":
            requirements.append(
                Requirement(
                    source=f"repository rule '{rule.match}' (line {rule.line})",
                    level=rule.require_2fa,
                    grace_until=rule.grace_until,
                    mode=rule.mode or "enforce",
                    met=facts.meets(rule.require_2fa, now),
                )
            )
    for name in via:
        team = member_of[name]
        if team.require_2fa != "none":
            requirements.append(
                Requirement(
                    source=f"team '{team.name}' (line {team.line})",
                    level=team.require_2fa,
                    grace_until=team.grace_until,
                    mode=team.mode,
                    met=facts.meets(team.require_2fa, now),
                )
            )
    level = strictest([r.level for r in requirements])
    common = {**base, "level": level, "requirements": tuple(requirements), "access_via": tuple(via)}

    today = now.astimezone(timezone.utc).date()
    unmet = [r for r in requirements if not r.met]
    hard = [r for r in unmet if not r.soft and not r.in_grace(today)]
    if hard:
        worst = strictest([r.level for r in hard])
        reason, message = refusal(policy, facts, repo, action, worst, hard, now)
        return Decision(False, reason, message=message, **common)  # type: ignore[arg-type]
    if unmet:
        warnings = tuple(soft_warning(policy, facts, repo, r, now) for r in unmet)
        reason = (
            GRACE_PERIOD if any(r.in_grace(today) and not r.soft for r in unmet) else REPORT_ONLY
        )
        return Decision(True, reason, warnings=warnings, **common)  # type: ignore[arg-type]
    return Decision(True, ALLOWED, **common)  # type: ignore[arg-type]


def not_found_message(policy: Policy, repo: str) -> tuple[str, ...]:
    # Identical for a repository that does not exist and one the user may not
    # see, so the answer never reveals which repositories exist.
    return (
        f"repository '{repo}' not found, or you do not have access to it.",
        f"hint: check the name; `{ssh_command_prefix(policy)} info` lists what you can reach.",
    )


SECURITY_KEY_HOWTO = "ssh-keygen -t ed25519-sk -O verify-required"


def fix_command(policy: Policy, facts: UserFacts, level: str, now: datetime) -> str:
    """The one thing this user should do next to meet `level`."""
    ssh = ssh_command_prefix(policy)
    if level in SECURITY_KEY_LEVELS:
        pin = " --verify-required" if level == "security-key-pin" else ""
        return (
            f"make a security key with `{SECURITY_KEY_HOWTO}` (or -t ecdsa-sk), ask an "
            f"administrator to register its .pub file (gatekeeper key add {facts.name} "
            f"FILE.pub{pin}), and connect with it (ssh -i ~/.ssh/id_ed25519_sk)"
        )
    if not facts.enrolled:
        if facts.pending:
            return f"finish enrolling with the code your app shows: {ssh} 2fa confirm CODE"
        if policy.two_factor.self_enroll:
            return f"enroll with: {ssh} 2fa enroll"
        return f"ask an administrator to enroll you (gatekeeper 2fa enroll {facts.name})"
    if level == "verified":
        if facts.locked(now) and facts.locked_until is not None:
            until = facts.locked_until.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            return f"verification is locked after repeated wrong codes; try again after {until}"
        return f"verify with: {ssh} 2fa verify"
    return f"check your status with: {ssh} 2fa status"


NEEDS = {
    "enrolled": "two-step verification (TOTP) enrolled",
    "verified": "a verified two-step session for this key",
    "security-key": "a security key (FIDO2) with a touch on every connection",
    "security-key-pin": "a security key (FIDO2) with a touch and its PIN on every connection",
}


def refusal(
    policy: Policy,
    facts: UserFacts,
    repo: str,
    action: str,
    level: str,
    hard: list[Requirement],
    now: datetime,
) -> tuple[str, tuple[str, ...]]:
    verb = "push to" if action == "write" else "read"
    sources = ", ".join(r.source for r in hard if r.level == level)
    head = f"{verb} '{repo}' refused: it requires {NEEDS[level]} ({sources})."
    if level in SECURITY_KEY_LEVELS:
        if facts.factor is None:
            reason = NO_SECURITY_KEY
            state = "this connection was not made with a security key."
        else:
            reason = NO_USER_VERIFICATION
            state = "this security key is not registered to prove its PIN on every use."
    elif not facts.enrolled and facts.factor is None:
        reason = NOT_ENROLLED
        state = (
            "your enrollment is pending confirmation."
            if facts.pending
            else f"you ({facts.name}) have not enrolled in two-step verification."
        )
    elif facts.locked(now):
        reason = LOCKED
        state = "verification is locked for your account after repeated wrong codes."
    else:
        reason = NOT_VERIFIED
        if facts.verified_until is not None:
            expired = facts.verified_until.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            state = f"your verified session for this key expired at {expired}."
        else:
            state = "this key has no verified session."
    return reason, (head, state, "To fix: " + fix_command(policy, facts, level, now))


def soft_warning(
    policy: Policy, facts: UserFacts, repo: str, req: Requirement, now: datetime
) -> str:
    fix = fix_command(policy, facts, req.level, now)
    if req.soft:
        return (
            f"notice: '{repo}' would be refused (needs {req.level} two-step verification, "
            f"{req.source}; report mode, so allowed for now). To fix: {fix}"
        )
    assert req.grace_until is not None
    return (
        f"warning: '{repo}' needs {req.level} two-step verification ({req.source}); "
        f"allowed until {req.grace_until.isoformat()} (grace period, {days_left(req, now)}), "
        f"refused after. To fix: {fix}"
    )


def days_left(req: Requirement, now: datetime) -> str:
    """`14 days left`, `last day`: what remains of a grace period, counting today."""
    assert req.grace_until is not None
    days = (req.grace_until - now.astimezone(timezone.utc).date()).days
    return "last day" if days <= 0 else f"{days} day{'s' if days != 1 else ''} left"


def deadline_note(policy: Policy, verdict: Decision, facts: UserFacts, now: datetime) -> str:
    """For a soft allow, what `info` says instead of "ok": until when (with the days
    left) or that it is only reported, and the one command that fixes it."""
    unmet = [r for r in verdict.requirements if not r.met]
    graced = [r for r in unmet if not r.soft and r.grace_until is not None]
    fix = fix_command(policy, facts, strictest([r.level for r in unmet]), now)
    if graced:
        first = min(graced, key=lambda r: r.grace_until or now.date())
        assert first.grace_until is not None
        until = f"ok until {first.grace_until.isoformat()} ({days_left(first, now)})"
        return f"{until}; then refused. {fix[0].upper()}{fix[1:]}"
    return f"ok (report mode: would be refused). {fix[0].upper()}{fix[1:]}"
