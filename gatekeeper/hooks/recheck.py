"""What both hooks share: load the policy and the store, decide again with the
store's facts as of now, and refuse (audited) in the forced command's words."""

from __future__ import annotations

from gatekeeper import decision, logs
from gatekeeper.errors import Denied, Refused, StoreError, render
from gatekeeper.frontend import load, unknown_key, user_facts
from gatekeeper.lightstd import datetime, timezone
from gatekeeper.policy import Policy
from gatekeeper.record import record
from gatekeeper.store import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

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


def log(message: str) -> None:
    logs.log("gatekeeper-hook", message)


def load_or_deny(config: str | Path) -> tuple[Policy, Store]:
    """Policy and store, or a refusal worded as the forced command words it."""
    try:
        return load(str(config), log)
    except Refused as exc:
        raise Denied.of(SERVER_ERROR, exc, audit=False) from exc


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
