"""`gatekeeper serve` for tests: one embedded server for one installation (`Served`),
on a free loopback port, and the environment that makes git's ssh client use it."""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from testing.installation import GATEKEEPER, Installation

HOST = "127.0.0.1"


class Served:
    """A `gatekeeper serve` process for one installation."""

    def __init__(
        self,
        inst: Installation,
        port: int,
        *args: str,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.inst = inst
        self.port = port
        self.log_path = inst.base / f"serve-{port}.log"
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [GATEKEEPER, "--config", str(inst.config), "serve", "--port", str(port), *args],
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            env=inst.env,
            text=True,
            preexec_fn=preexec_fn,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.banner = [self.line(), self.line(), self.line()]
            assert "listening on" in self.banner[0], self.banner
            assert "host key SHA256:" in self.banner[1], self.banner
            assert f"@{HOST}:{port}/REPOSITORY.git" in self.banner[2], self.banner
        except BaseException:
            self.stop()  # no test holds it yet: do not leave it running
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 20) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"server said nothing; log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in (log := self.log()):
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the server log:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return int(self.proc.returncode)


def ssh_argv(key: Path, port: int, *extra: str, batch: bool = True) -> list[str]:
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        f"BatchMode={'yes' if batch else 'no'}",
        "-p",
        str(port),
        *extra,
    ]


def client_env(inst: Installation, key: Path, port: int, *extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSH_", "GIT_"))}
    env["GIT_SSH_COMMAND"] = shlex.join(ssh_argv(key, port, "-o", "SendEnv=GIT_PROTOCOL", *extra))
    env.update(
        {
            "GIT_AUTHOR_NAME": "T",
            "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "T",
            "GIT_COMMITTER_EMAIL": "t@example.com",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(inst.base),
        }
    )
    return env
