"""scripts/demo.sh as a newcomer runs it: every command it prints, pasted as printed.

A sysadmin found that the demo's refusals told them to run `ssh -p PORT git@127.0.0.1
2fa enroll`, which offered their own key instead of the demo's, and that a rerun with
another PORT kept the old one. Here the demo runs in a throwaway directory on a free
port, the printed lines are pasted into an interactive-like bash one by one (the
`export` and the `alias` included), the fix command the refusal prints is pasted too,
and a rerun on another port serves and names that port.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatekeeper import totp
from testing.net import free_port

pytestmark = pytest.mark.sshd

ROOT = Path(__file__).resolve().parent.parent


class Demo:
    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        env = {**os.environ, "DEMO_DIR": str(directory), "PORT": str(port)}
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "demo.sh")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.output: list[str] = []
        while not any("clone with:" in line for line in self.output):
            try:
                self.output.append(self.lines.get(timeout=180))
            except queue.Empty:
                raise AssertionError("\n".join(self.output)) from None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def printed(self) -> list[str]:
        """The lines under "Try, in another terminal", without their comments."""
        start = next(i for i, line in enumerate(self.output) if line.startswith("Try,"))
        block = []
        for line in self.output[start + 1 :]:
            if not line.startswith("  "):
                break
            block.append(re.sub(r"\s+# .*$", "", line.strip()))
        return block

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def paste(setup: list[str], line: str) -> subprocess.CompletedProcess[str]:
    """`line` in a bash that has run `setup` as a person's terminal would (aliases on)."""
    script = "shopt -s expand_aliases\n" + "\n".join([*setup, line]) + "\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "SSH_"))}
    return subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def demo_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "demo"
    yield directory


def test_every_printed_command_works_as_pasted(demo_dir: Path, tmp_path: Path) -> None:
    demo = Demo(demo_dir, free_port())
    try:
        lines = demo.printed()
        setup = [line for line in lines if line.startswith(("export ", "alias "))]
        assert len(setup) == 2, lines
        clone = next(line for line in lines if line.startswith("git clone"))
        clone = clone + f" {tmp_path / 'first'}"
        refused = paste(setup, clone)
        assert refused.returncode != 0
        fix = re.search(r"enroll with: (ssh .*2fa enroll)", refused.stderr)
        assert fix, refused.stderr
        assert f"-p {demo.port} " in fix.group(1)
        enrolled = paste(setup, fix.group(1))
        assert enrolled.returncode == 0, enrolled.stderr
        secret = re.search(r"secret: ([A-Z2-7]+)", enrolled.stdout)
        assert secret, enrolled.stdout
        confirm = next(line for line in lines if "2fa confirm CODE" in line)
        code = totp.current_code(secret.group(1), time.time())
        confirmed = paste(setup, confirm.replace("CODE", code))
        assert confirmed.returncode == 0, confirmed.stderr
        allowed = paste(setup, clone.replace("first", "second"))
        assert allowed.returncode == 0, allowed.stderr
        assert (tmp_path / "second" / "README.md").exists()
        info = paste(setup, next(line for line in lines if line.endswith("git@127.0.0.1")))
        assert "hello" in info.stdout
    finally:
        demo.stop()
    other = free_port()
    again = Demo(demo_dir, other)
    try:
        assert any(f"listening on 127.0.0.1:{other}" in line for line in again.output)
        assert all(f":{demo.port}/" not in line for line in again.printed())
        refused = paste(
            [line for line in again.printed() if line.startswith(("export ", "alias "))],
            f"ssh -p {other} git@127.0.0.1 help",
        )
        assert f"ssh -p {other} git@127.0.0.1" in refused.stdout, refused.stderr
    finally:
        again.stop()
