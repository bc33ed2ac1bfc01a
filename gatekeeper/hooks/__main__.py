"""`python -I -m gatekeeper.hooks ...`: what the installed pre-receive script and
upload-pack's pack-objects hook run. Anything unexpected refuses: no traceback."""

from __future__ import annotations

import os
import sys

from gatekeeper.errors import internal_error
from gatekeeper.hooks.recheck import log

USAGE = (
    "usage: python -m gatekeeper.hooks pre-receive --config POLICY [--hook PATH]\n"
    "       python -m gatekeeper.hooks pack-objects --config POLICY git pack-objects ARGS...\n"
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) < 3 or args[1] != "--config":
            sys.stderr.write(USAGE)
            return 2
        name, config = args[0], args[2]
        rest = args[3:]
        if name == "pre-receive":
            # pathlib only here: the fetch hook runs on every clone and does without.
            from pathlib import Path

            hook = None
            if rest[:1] == ["--hook"] and len(rest) == 2:
                hook, rest = Path(rest[1]), []
            if rest:
                sys.stderr.write(USAGE)
                return 2
            data = sys.stdin.buffer.read()
            from gatekeeper.hooks.prereceive import pre_receive

            return pre_receive(Path(config), hook, os.environ, data, sys.stderr)
        if name == "pack-objects":
            from gatekeeper.hooks.fetch import pack_objects

            return pack_objects(config, rest, os.environ, sys.stderr)
        sys.stderr.write(USAGE)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - fail closed, never a traceback to the client
        sys.stderr.write(internal_error(exc, log))
        return 1


if __name__ == "__main__":
    sys.exit(main())
