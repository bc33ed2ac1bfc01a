"""Where one forced-command decision spends its time, phase by phase.

Run by bench.py with the benchmark virtualenv's interpreter, in a fresh process per
sample, with the same environment as gatekeeper-shell gets (GATEKEEPER_DRY_RUN=1):

    python phases.py --config CONFIG KEY_ID

Prints one JSON object: seconds spent importing gatekeeper.shell, in main(), and in
each wrapped step of main(). Standard library only (it runs in the benchmark venv).
"""

from __future__ import annotations

import sys
import time

T0 = time.perf_counter()
import gatekeeper.shell as shell  # noqa: E402 - timing the import is the point

T1 = time.perf_counter()

from gatekeeper import decision, frontend, sshcmd  # noqa: E402
from gatekeeper.store import Store  # noqa: E402

spent: dict[str, float] = {}


def _timed(label: str, fn):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

    return wrapper


frontend.load_policy = _timed("policy: read file, hash, load compiled cache", frontend.load_policy)
Store.open = staticmethod(_timed("store: open (connect, pragmas, schema check)", Store.open))  # type: ignore[method-assign]
Store.connection_facts = _timed("store: connection facts (one query)", Store.connection_facts)  # type: ignore[method-assign]
sshcmd.parse_command = _timed("parse SSH_ORIGINAL_COMMAND", sshcmd.parse_command)
decision.decide = _timed("decide()", decision.decide)
sshcmd.locate_repo = _timed("locate the repository (its real path)", sshcmd.locate_repo)
Store.audit_with_token = _timed(  # type: ignore[method-assign]
    "store: audit record + hook token (BEGIN IMMEDIATE ... COMMIT)", Store.audit_with_token
)
Store.close = _timed("store: close (the last connection checkpoints the WAL)", Store.close)  # type: ignore[method-assign]

T2 = time.perf_counter()
rc = shell.main(sys.argv[1:])
T3 = time.perf_counter()

import json  # noqa: E402 - after the measurement

json.dump(
    {"rc": rc, "import gatekeeper.shell": T1 - T0, "main()": T3 - T2, "steps": spent},
    sys.stdout,
)
