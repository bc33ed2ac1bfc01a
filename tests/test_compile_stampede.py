"""A policy edited in place is compiled once, however many connections find it first.

The first connections after an edit of a large policy each compiled the YAML (seconds
of CPU and tens of MB apiece on 10,000 rules). Now one compiles under a lock in the
cache directory and the others wait for its result; `policy install` compiles before
the swap is even seen. Here 50 processes load a freshly edited 2,000-rule policy at
once, each counting the compiles it runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import sys
from gatekeeper import policy
from gatekeeper.policy import check
real = check.compile_policy_text
def counted(text, source):
    with open(sys.argv[2], "a") as fh:
        fh.write("compiled\\n")
    return real(text, source)
check.compile_policy_text = counted
loaded = policy.load_policy(sys.argv[1])
assert len(loaded.rules) >= 2000
"""


def big_policy(rules: int, marker: str) -> str:
    lines = ["teams:", "  dev:", "    members: [alice]", "repositories:"]
    for i in range(rules):
        lines += [f"  - match: group{i}/*", "    read: [dev]", f"    # {marker}"]
    return "\n".join(lines) + "\n"


def test_fifty_connections_after_an_edit_compile_it_once(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    cache = tmp_path / "cache"
    log = tmp_path / "compiles"
    config.write_text(big_policy(2000, "first"))
    env = {"HOME": str(tmp_path), "GATEKEEPER_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", PROBE, str(config), str(log)], env=env, check=True, timeout=120
    )
    assert log.read_text().count("compiled") == 1
    log.unlink()
    config.write_text(big_policy(2000, "edited"))  # edited in place
    procs = [
        subprocess.Popen([sys.executable, "-c", PROBE, str(config), str(log)], env=env)
        for _ in range(50)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * 50
    assert log.read_text().count("compiled") == 1
