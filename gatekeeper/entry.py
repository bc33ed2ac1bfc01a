"""The `gatekeeper` console script.

sshd runs `gatekeeper keys-command ...` for every key a client offers, so that one
subcommand goes straight to its light, standard-library-only implementation; every
other subcommand gets the click CLI (and its import cost).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config: list[str] = []
    rest = args
    if len(rest) >= 2 and rest[0] == "--config":
        config, rest = rest[:2], rest[2:]
    elif rest and rest[0].startswith("--config="):
        config, rest = ["--config", rest[0].split("=", 1)[1]], rest[1:]
    if rest and rest[0] == "keys-command" and not {"-h", "--help"} & set(rest):
        from gatekeeper.authkeys import keys_command

        return keys_command([*config, *rest[1:]])
    from gatekeeper.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
