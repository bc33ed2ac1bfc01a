"""The `gatekeeper` console script.

sshd runs `gatekeeper keys-command ...` for every key a client offers, so that one
subcommand goes straight to its light, standard-library-only implementation; every
other subcommand gets the click CLI (and its import cost).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config, rest = _split_config(args)
    if _is_keys_command(rest):
        from gatekeeper.authkeys import keys_command

        return keys_command([*config, *rest[1:]])
    from gatekeeper.cli.main import main as cli_main

    return cli_main(args)


def run_script() -> NoReturn:
    """The installed script's body: `main()`, then exit with its status. keys-command
    leaves without the interpreter's teardown (nothing is left to save, and sshd
    waits for it twice per connection in AuthorizedKeysCommand mode:
    docs/performance.md)."""
    code = main()
    if _is_keys_command(_split_config(sys.argv[1:])[1]):
        sys.stdout.flush()
        sys.stderr.flush()
        import os

        os._exit(code)
    sys.exit(code)


def _split_config(args: list[str]) -> tuple[list[str], list[str]]:
    """(`--config FILE` as two words, or nothing; the rest)."""
    if len(args) >= 2 and args[0] == "--config":
        return args[:2], args[2:]
    if args and args[0].startswith("--config="):
        return ["--config", args[0].split("=", 1)[1]], args[1:]
    return [], args


def _is_keys_command(rest: list[str]) -> bool:
    return bool(rest) and rest[0] == "keys-command" and not {"-h", "--help"} & set(rest)


if __name__ == "__main__":
    run_script()
