"""The commands admins and developers type every day, as a sysadmin found them on a box.

An admin lifts a lockout without wiping the enrollment, asks `check` about a user who
does not exist, and mistypes a reason code; a developer coming from GitLab types
`2fa_verify`, mistypes a verb, and looks for `info` in `help`. No code ever lands in the
audit log, whatever was typed.
"""

from __future__ import annotations

import json
from pathlib import Path

from testing.installation import Installation


def test_an_admin_unlocks_a_user_without_wiping_the_enrollment(gk: Installation) -> None:
    gk.repo("platform/api")
    _, key = gk.add_user("bob")
    gk.enroll("bob")
    for _ in range(3):  # max_failures in the test policy
        gk.shell(key, "2fa verify 000000")
    locked = gk.shell(key, "2fa verify 000000")
    assert locked.returncode != 0 and "locked" in locked.stderr
    result = gk.gk("2fa", "unlock", "bob")
    assert "unlocked bob (was locked until" in result.stdout
    ok = gk.shell(key, f"2fa verify {gk.code('bob')}")
    assert ok.returncode == 0, ok.stderr
    record = gk.audit(event="2fa-unlock")[-1]
    assert record["user"] == "bob" and record["actor"]
    assert json.loads(record["detail"])["was_locked_until"]
    again = gk.gk("2fa", "unlock", "bob")
    assert "was not locked out" in again.stdout
    status = json.loads(gk.gk("2fa", "status", "bob", "--json").stdout)
    assert status[0]["state"] == "enrolled"


def test_check_tells_an_unknown_user_from_a_refusal(gk: Installation) -> None:
    gk.add_user("carol")
    refused = gk.gk("check", "carol", "platform/api", "write", check=False)
    assert refused.returncode == 1 and "REFUSE" in refused.stdout
    unknown = gk.gk("check", "nobody", "platform/api", "read", check=False)
    assert unknown.returncode == 2
    assert "no such user: 'nobody'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_a_misspelt_reason_is_named_not_an_empty_table(gk: Installation) -> None:
    gk.repo("platform/api")
    _, key = gk.add_user("carol")
    gk.shell(key, "git-receive-pack 'platform/api'")
    result = gk.gk("log", "--reason", "not-authorised", check=False)
    assert result.returncode == 2
    assert "there is no reason 'not-authorised'" in result.stderr
    assert "Did you mean 'not-authorized'?" in result.stderr
    assert "not-authorized" in result.stderr.split("hint:", 1)[1]
    assert gk.gk("log", "--event", "acess", check=False).returncode == 2
    listed = gk.gk("log", "--reason", "not-authorized", "--json")
    assert [r["reason"] for r in json.loads(listed.stdout)] == ["not-authorized"]


def test_help_lists_info_and_gitlab_spellings_work(gk: Installation) -> None:
    gk.repo("platform/api")
    _, key = gk.add_user("bob")
    gk.enroll("bob")
    _, alice = gk.add_user("alice")  # her own code: nobody waits for the next TOTP step
    gk.enroll("alice")
    assert "ssh git@git.example.com info " in gk.shell(key, "help").stdout
    verified = gk.shell(key, f"2fa_verify {gk.code('bob')}")
    assert verified.returncode == 0, verified.stderr
    assert "Verified" in verified.stdout
    codes = gk.shell(alice, f"2fa_recovery_codes {gk.code('alice')}")
    assert codes.returncode == 0 and "Recovery codes" in codes.stdout
    typo = gk.shell(key, "2fa verfy")
    assert "unknown 2fa command 'verfy'. Did you mean '2fa verify'?" in typo.stderr
    bare = gk.shell(key, "verify 123456")
    assert "Did you mean '2fa verify'?" in bare.stderr


def test_no_code_reaches_the_audit_log_whatever_was_typed(gk: Installation) -> None:
    gk.repo("platform/api")
    _, key = gk.add_user("bob")
    gk.enroll("bob")
    code = gk.code("bob")
    typed = [
        f"2fa verify {code} extra\x1b",  # refused for its control character
        f"2fa_verify {code};",
        f"verify {code}",
        f"2fa verify {code}",
        f"2fa disable {code[:3]} {code[3:]}",
    ]
    for command in typed:
        gk.shell(key, command)
    text = json.dumps(gk.audit())
    assert code not in text
    assert code[:3] + " " + code[3:] not in text


def test_every_code_the_source_writes_is_in_the_catalog() -> None:
    """`log --reason/--event` check filters against gatekeeper.codes: a code written
    somewhere but missing there would be refused as a typo."""
    import re
    from pathlib import Path

    from gatekeeper import codes

    package = Path(codes.__file__).parent
    source = "\n".join(p.read_text() for p in sorted(package.rglob("*.py")))
    calls = r'(?:_append_audit|\.audit|audit_many|audit_with_token)\(\s*"([a-z0-9-]+)"'
    events = set(re.findall(calls, source)) | set(re.findall(r'"event": "([a-z0-9-]+)"', source))
    assert events and events <= set(codes.EVENTS), events - set(codes.EVENTS)
    # Reason codes: given as reason="..." or as the constants of the decision and hooks.
    reasons = set(re.findall(r'reason="([a-z0-9-]+)"', source))
    for module in ("decision.py", "hooks/recheck.py"):
        text = (package / module).read_text()
        reasons |= set(re.findall(r'^[A-Z_]+ = "([a-z0-9]+(?:-[a-z0-9]+)*)"$', text, re.M))
    reasons -= {"pre-receive", "pre-receive.tmpl", "none", "read", "write"}
    assert reasons <= set(codes.REASONS), reasons - set(codes.REASONS)


def test_policy_install_refuses_a_typo_and_installs_a_valid_policy(
    gk: Installation, tmp_path: Path
) -> None:
    """One typo in a policy edited in place refused every user, and none of those
    refusals reached the audit log. `policy install` checks first."""
    gk.repo("platform/api")
    _, key = gk.add_user("bob")
    gk.enroll("bob")
    live = gk.config.read_text()
    broken = tmp_path / "new.yaml"
    broken.write_text(live.replace("  platform:\n", "  platform:\n\t"))
    refused = gk.gk("policy", "install", str(broken), check=False)
    assert refused.returncode == 1
    assert f"{broken}:" in refused.stderr and "not installed" in refused.stderr
    assert gk.config.read_text() == live
    assert gk.shell(key, "git-upload-pack 'platform/api'", stdin="0000").returncode == 0
    good = tmp_path / "good.yaml"
    good.write_text(live.replace("require_2fa: enrolled", "require_2fa: verified", 1))
    mode = gk.config.stat().st_mode
    installed = gk.gk("policy", "install", str(good))
    assert f"installed {good} as {gk.config}" in installed.stdout
    assert gk.config.read_text() == good.read_text() and gk.config.stat().st_mode == mode
    record = gk.audit(event="policy-change")[-1]
    detail = json.loads(record["detail"])
    assert record["actor"] and detail["how"] == f"policy install {good}"
    refused_now = gk.shell(key, "git-upload-pack 'platform/api'", stdin="0000")
    assert "verified two-step session" in refused_now.stderr
    again = gk.gk("policy", "install", str(good))
    assert "nothing to install" in again.stdout


def test_a_policy_edited_in_place_is_recorded_without_blaming_the_next_admin(
    gk: Installation,
) -> None:
    gk.add_user("alice")
    gk.config.write_text(gk.config.read_text() + "\n# edited by hand\n")
    gk.gk("user", "list")
    record = gk.audit(event="policy-change")[-1]
    detail = json.loads(record["detail"])
    assert record["actor"] is None
    assert detail["how"].startswith("edited in place; noticed by ")
    assert detail["modified"] and detail["file_owner"]
