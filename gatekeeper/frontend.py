"""What every front-end needs, in one place: the forced command, the hooks, the
embedded server and `gatekeeper check` load the policy and the store, see a key's
user as the decision sees it, and refuse, all in the same words.

A front-end imports this, never another front-end: the forced command's module is
imported only by its launcher. It runs on every connection, so it imports only the
standard library and gatekeeper's light modules.
"""

from __future__ import annotations

import os

from gatekeeper import decision, logs, sshcmd
from gatekeeper.errors import GatekeeperError, PolicyError, Refused, StoreError
from gatekeeper.lightstd import datetime, timezone
from gatekeeper.policy import Policy, load_policy
from gatekeeper.store import ConnectionFacts, KeyRecord, Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
"""git's PATH under every front-end: never the client's, nor the server's own."""
BAD_COMMAND_KEPT = 200  # characters of a refused command in its audit record


def load(config: str, report: Callable[[str], None], *, light: bool = True) -> tuple[Policy, Store]:
    """Policy and store, or a refusal that names the server-side problem, not its details
    (those go to `report`, the front-end's log). Every front-end refuses in the same
    words. `light`: see `Store.open`."""
    try:
        policy = load_policy(config)
    except PolicyError as exc:
        report(f"policy error: {' | '.join(exc.lines())}")
        raise policy_refusal() from exc
    logs.use_state_dir(policy.server.state_dir_str)
    try:
        store = Store.open(policy.server.state_dir_str, policy.server.store, light=light)
    except StoreError as exc:
        report(f"store error: {' | '.join(exc.lines())}")
        raise exc.for_client() from exc
    return policy, store


def policy_refusal() -> Refused:
    return Refused(
        "access refused: the server's policy file is invalid or unreadable.",
        hint="an administrator must run `gatekeeper policy check`.",
    )


def store_refusal(exc: StoreError | None = None) -> Refused:
    """What a client learns of a store fault (`StoreError.for_client`)."""
    if exc is not None:
        return exc.for_client()
    return StoreError("").for_client()


def for_client(exc: GatekeeperError, report: Callable[[str], None]) -> GatekeeperError:
    """What a client may read of `exc`: a store error's words name the database and
    quote it, so they go to `report` (the server log) and the client gets
    `StoreError.for_client`."""
    if isinstance(exc, StoreError):
        report(f"store error: {' | '.join(exc.lines())}")
        return exc.for_client()
    return exc


def unknown_key() -> Refused:
    return Refused(
        "access refused: this key is not registered (it may have just been removed).",
        hint="ask an administrator to add your public key (`gatekeeper key add`).",
    )


def audit_bad_command(
    store: Store, key: KeyRecord, client: str, command: str | None, now: float
) -> None:
    """The record of a command `sshcmd.parse_command` refused (the embedded server
    writes it too, for the commands it cannot hand over whole)."""
    store.audit(
        "access",
        now=now,
        user=key.user,
        key_fp=key.fingerprint,
        reason="bad-command",
        client=client,
        detail={"command": sshcmd.redact((command or "")[:BAD_COMMAND_KEPT])},
    )


def proven_factor(key: KeyRecord, claimed: str | None) -> str | None:
    """What the front-end says it enforced for this connection (`claimed`), never more
    than the key as the store has it now allows: a security key's `touch`, with its
    PIN only when both say so."""
    if claimed is None or key.factor is None:
        return None
    return "touch+pin" if claimed == key.factor == "touch+pin" else "touch"


def facts_of(
    name: str,
    *,
    enrolled: bool,
    pending: bool,
    verified_until: float | None = None,
    locked_until: float | None = None,
    factor: str | None = None,
) -> decision.UserFacts:
    """The decision's view of a user from what the store records (times in epoch
    seconds): the one place every front-end, `check` and the report build it."""

    def when(ts: float | None) -> datetime | None:
        return datetime.fromtimestamp(ts, timezone.utc) if ts is not None else None

    return decision.UserFacts(
        name=name,
        enrolled=enrolled,
        pending=pending,
        verified_until=when(verified_until),
        locked_until=when(locked_until),
        factor=factor,
    )


def user_facts(facts: ConnectionFacts, factor: str | None = None) -> decision.UserFacts:
    """The decision's view of a key's user; `factor` is the front-end's claim for this
    connection (`proven_factor` caps it)."""
    return facts_of(
        facts.key.user,
        enrolled=facts.enrolled,
        pending=facts.pending,
        verified_until=facts.verified_until,
        locked_until=facts.locked_until,
        factor=proven_factor(facts.key, factor),
    )


def best_user_facts(
    store: Store, user_name: str, keys: list[KeyRecord], now: float
) -> decision.UserFacts:
    """A user's facts as their best-placed key gives them (a verified session on any
    of `keys` counts), or from the enrollment alone when none is left: what
    `gatekeeper check` judges when no connection names the key."""
    found = [f for f in (store.connection_facts(k.id, now) for k in keys) if f is not None]
    if found:
        return user_facts(max(found, key=lambda f: f.verified_until or 0))
    record = store.get_totp(store.get_user(user_name).id)
    return facts_of(
        user_name,
        enrolled=bool(record and record.confirmed),
        pending=bool(record and not record.confirmed),
    )


def git_binary() -> str:
    for directory in ("/usr/bin", "/usr/local/bin", "/bin"):
        candidate = os.path.join(directory, "git")
        if os.access(candidate, os.X_OK):
            return candidate
    raise Refused("access refused: git is not installed on the server.", hint="install git.")
