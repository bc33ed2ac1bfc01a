"""Every event and reason code the audit log can hold, for the admin CLI to check a
filter against (a misspelt code would otherwise list nothing, which reads as "nothing
happened"). tests/test_daily_commands.py holds this list to the codes the source writes.
"""

from __future__ import annotations

EVENTS = (
    "access",
    "ref-update",
    "policy-change",
    "user-add",
    "user-remove",
    "key-add",
    "key-remove",
    "2fa-enroll-start",
    "2fa-enabled",
    "2fa-disabled",
    "2fa-reset",
    "2fa-verified",
    "2fa-failure",
    "2fa-lockout",
    "2fa-unlock",
    "2fa-recovery-codes",
    "2fa-recovery-code-used",
    "2fa-code-reused",
    "sk-counter",
    "hooks-install",
    "hooks-uninstall",
    "log-prune",
)

REASONS = (
    # decision.py
    "allowed",
    "public-read",
    "grace-period",
    "report-only",
    "not-authorized",
    "2fa-not-enrolled",
    "2fa-not-verified",
    "2fa-locked",
    "2fa-no-security-key",
    "2fa-no-user-verification",
    # the forced command
    "not-found",
    "unknown-key",
    "bad-command",
    # the hooks
    "hook-no-identity",
    "hook-bad-identity",
    "bad-ref",
    "bad-input",
    "legacy-hook",
    "local-push",
    "server-error",
)
