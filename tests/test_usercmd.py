"""The user commands (`ssh git@HOST 2fa ...`): each verb sshcmd parses has its function.
Their stories through the forced command are in test_shell.py and test_totp.py."""

from __future__ import annotations

from gatekeeper import sshcmd, usercmd


def test_every_2fa_verb_the_parser_knows_has_its_function_and_no_other() -> None:
    assert set(usercmd.TWOFA) == set(sshcmd.TWOFA_VERBS)


def test_the_help_lists_every_2fa_verb() -> None:
    for verb in sshcmd.TWOFA_VERBS:
        assert f"2fa {verb}" in usercmd.HELP
