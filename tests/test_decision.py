"""The decision, as a pure function: who may read or write what, at which 2FA level."""

from __future__ import annotations

import textwrap
from datetime import datetime, timedelta, timezone

import pytest

from gatekeeper import decision
from gatekeeper.decision import UserFacts, decide
from gatekeeper.policy import Policy
from gatekeeper.policy.check import compile_policy_text

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)

POLICY = """
server:
  host: git.example.com
  port: 2222
teams:
  platform:
    members: [alice, bob]
    require_2fa: enrolled
  security:
    members: [alice]
    require_2fa: verified
  contractors:
    members: [carol]
  interns:
    members: [dave]
    require_2fa: enrolled
    grace_until: 2026-12-31
  pilot:
    members: [erin]
    require_2fa: verified
    mode: report
repositories:
  - match: platform/*
    read: [contractors, interns, pilot]
    write: [platform]
  - match: platform/vault
    write: [security]
    require_2fa: verified
  - match: docs
    public: true
    write: [platform]
  - match: legacy/**
    read: [contractors]
    require_2fa: enrolled
    grace_until: 2026-06-30
  - match: trial/*
    read: [contractors]
    require_2fa: verified
    mode: report
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return compile_policy_text(textwrap.dedent(POLICY), "policy.yaml")


def none(name: str) -> UserFacts:
    return UserFacts(name)


def enrolled(name: str) -> UserFacts:
    return UserFacts(name, enrolled=True)


def verified(name: str, hours: float = 1) -> UserFacts:
    return UserFacts(name, enrolled=True, verified_until=NOW + timedelta(hours=hours))


def test_a_member_who_meets_the_level_is_allowed(policy: Policy) -> None:
    d = decide(policy, enrolled("bob"), "platform/api", "write", NOW)
    assert (d.allowed, d.reason, d.level) == (True, decision.ALLOWED, "enrolled")
    assert d.access_via == ("platform",)


def test_an_unenrolled_member_is_told_how_to_enroll(policy: Policy) -> None:
    d = decide(policy, none("bob"), "platform/api", "write", NOW)
    assert (d.allowed, d.reason) == (False, decision.NOT_ENROLLED)
    text = "\n".join(d.message)
    assert "platform/api" in text and "team 'platform'" in text
    assert "ssh -p 2222 git@git.example.com 2fa enroll" in text


def test_a_pending_enrollment_is_told_to_confirm(policy: Policy) -> None:
    d = decide(policy, UserFacts("bob", pending=True), "platform/api", "read", NOW)
    assert d.reason == decision.NOT_ENROLLED
    assert "2fa confirm CODE" in "\n".join(d.message)


def test_strictest_level_of_all_matching_rules_applies(policy: Policy) -> None:
    d = decide(policy, enrolled("alice"), "platform/vault", "write", NOW)
    assert (d.allowed, d.reason, d.level) == (False, decision.NOT_VERIFIED, "verified")
    assert "2fa verify" in "\n".join(d.message)
    assert decide(policy, verified("alice"), "platform/vault", "write", NOW).allowed


def test_a_repository_rule_tightens_a_team_level_for_readers_too(policy: Policy) -> None:
    d = decide(policy, none("carol"), "platform/vault", "read", NOW)
    assert (d.allowed, d.level) == (False, "verified")


def test_team_level_applies_only_through_teams_that_grant_access(policy: Policy) -> None:
    # alice is in security (verified) but reaches platform/api through platform (enrolled).
    d = decide(policy, enrolled("alice"), "platform/api", "write", NOW)
    assert (d.allowed, d.level) == (True, "enrolled")


def test_an_expired_session_says_when_it_expired(policy: Policy) -> None:
    facts = UserFacts("alice", enrolled=True, verified_until=NOW - timedelta(minutes=5))
    d = decide(policy, facts, "platform/vault", "write", NOW)
    assert d.reason == decision.NOT_VERIFIED
    assert "expired at 2026-11-28 11:55 UTC" in "\n".join(d.message)


def test_a_locked_user_is_told_when_to_retry(policy: Policy) -> None:
    facts = UserFacts("alice", enrolled=True, locked_until=NOW + timedelta(minutes=10))
    d = decide(policy, facts, "platform/vault", "write", NOW)
    assert d.reason == decision.LOCKED
    assert "2026-11-28 12:10 UTC" in "\n".join(d.message)


def test_no_matching_rule_and_no_team_look_the_same(policy: Policy) -> None:
    missing = decide(policy, verified("alice"), "nothing/here", "read", NOW)
    forbidden = decide(policy, verified("carol"), "platform/api", "write", NOW)
    stranger = decide(policy, verified("zed"), "platform/api", "read", NOW)
    assert missing.reason == forbidden.reason == stranger.reason == decision.NOT_AUTHORIZED
    assert missing.message[1:] == forbidden.message[1:] == stranger.message[1:]
    assert "not found, or you do not have access" in missing.message[0]


def test_read_access_does_not_grant_write(policy: Policy) -> None:
    assert decide(policy, enrolled("carol"), "platform/api", "read", NOW).allowed
    assert not decide(policy, enrolled("carol"), "platform/api", "write", NOW).allowed


def test_public_repositories_are_readable_by_any_known_key(policy: Policy) -> None:
    for who in ("zed", "carol", "alice"):
        d = decide(policy, none(who), "docs", "read", NOW)
        assert (d.allowed, d.reason) == (True, decision.PUBLIC_READ)


def test_writing_a_public_repository_needs_the_level(policy: Policy) -> None:
    assert not decide(policy, none("bob"), "docs", "write", NOW).allowed
    assert decide(policy, enrolled("bob"), "docs", "write", NOW).allowed
    assert not decide(policy, verified("zed"), "docs", "write", NOW).allowed


def test_team_grace_period_allows_with_a_dated_warning(policy: Policy) -> None:
    d = decide(policy, none("dave"), "platform/api", "read", NOW)
    assert (d.allowed, d.reason) == (True, decision.GRACE_PERIOD)
    assert d.would_refuse
    assert "2026-12-31" in d.warnings[0] and "2fa enroll" in d.warnings[0]


def test_grace_ends_after_its_date(policy: Policy) -> None:
    last_day = datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc)
    after = datetime(2027, 1, 1, 0, 0, tzinfo=timezone.utc)
    assert decide(policy, none("dave"), "platform/api", "read", last_day).allowed
    d = decide(policy, none("dave"), "platform/api", "read", after)
    assert (d.allowed, d.reason) == (False, decision.NOT_ENROLLED)


def test_repository_grace_that_has_passed_refuses(policy: Policy) -> None:
    d = decide(policy, none("carol"), "legacy/a/b", "read", NOW)
    assert (d.allowed, d.reason) == (False, decision.NOT_ENROLLED)
    earlier = datetime(2026, 6, 1, tzinfo=timezone.utc)
    assert decide(policy, none("carol"), "legacy/a/b", "read", earlier).reason == "grace-period"


def test_report_mode_allows_and_says_it_would_refuse(policy: Policy) -> None:
    d = decide(policy, none("carol"), "trial/x", "read", NOW)
    assert (d.allowed, d.reason) == (True, decision.REPORT_ONLY)
    assert "would be refused" in d.warnings[0]


def test_team_report_mode_softens_only_that_team(policy: Policy) -> None:
    assert decide(policy, none("erin"), "platform/api", "read", NOW).reason == "report-only"
    # platform/vault's own rule is enforced, whatever erin's team says.
    assert not decide(policy, none("erin"), "platform/vault", "read", NOW).allowed


def test_a_repository_rule_cannot_loosen_a_team(policy: Policy) -> None:
    # trial/* is in report mode, but bob's team level is enforced wherever bob writes.
    text = POLICY + "  - match: trial/open\n    write: [platform]\n    mode: report\n"
    p = compile_policy_text(textwrap.dedent(text), "p.yaml")
    d = decide(p, none("bob"), "trial/open", "write", NOW)
    assert (d.allowed, d.reason) == (False, decision.NOT_ENROLLED)


def test_naive_now_is_taken_as_utc(policy: Policy) -> None:
    naive = NOW.replace(tzinfo=None)
    assert decide(policy, verified("alice"), "platform/vault", "write", naive).allowed


def test_an_unknown_action_is_a_programming_error(policy: Policy) -> None:
    with pytest.raises(ValueError):
        decide(policy, none("bob"), "docs", "delete", NOW)
