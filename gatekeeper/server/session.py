"""One session channel: what it asked for, and the forced command that answers it,
run as a process with an environment built from scratch and pumped both ways."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import paramiko

from gatekeeper.errors import InputError

CHUNK = 64 * 1024


@dataclass
class Session:
    """What one session channel asked for (filled in by the transport thread)."""

    channel: paramiko.Channel
    command: str | None = None
    git_protocol: str | None = None
    refusal: InputError | None = None
    """Set for a command that cannot be handed to the forced command whole: its
    refusal, in the forced command's words, is answered here."""
    started: threading.Event = field(default_factory=threading.Event)
    pty: bool = False
    """The client asked for a terminal (`ssh git@HOST` from one). None is allocated; the
    output gets the `\r\n` line ends a terminal in raw mode needs."""


def run_forced_command(
    sess: Session,
    argv: list[str],
    env: dict[str, str],
    transport: paramiko.Transport,
    stall_timeout: float,
    hard_stop: threading.Event,
) -> int:
    """Run `argv` (the forced command) for this session, pumped both ways, and return
    the exit status sent to the client. The command is killed when the client goes away
    or stalls past `stall_timeout`, and when `hard_stop` is set."""
    channel = sess.channel
    channel.settimeout(stall_timeout)
    child = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd="/",
        close_fds=True,
        start_new_session=True,
        bufsize=0,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    failed = threading.Event()

    def kill() -> None:
        failed.set()
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)

    send: Callable[[bytes], None] = channel.sendall
    send_stderr: Callable[[bytes], None] = channel.sendall_stderr
    if sess.pty:
        send, send_stderr = _crlf(send), _crlf(send_stderr)
    pumps = [
        _thread(_pump_out, child.stdout, send, kill),
        _thread(_pump_out, child.stderr, send_stderr, kill),
    ]
    feeder = _thread(_pump_in, channel, child.stdin, kill)
    while True:
        try:
            rc = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if channel.closed or not transport.is_active():
                kill()  # the client went away: stop git
            elif hard_stop.is_set():
                kill()
    for t in pumps:
        t.join(timeout=10)
        if t.is_alive():
            kill()  # something the child left behind still holds the pipe
            t.join(timeout=5)
    status = rc if rc >= 0 else 128 - rc
    if not channel.closed and not failed.is_set():
        channel.shutdown_write()  # EOF: stdout and stderr are both done
        channel.send_exit_status(status)
    channel.close()
    feeder.join(timeout=5)
    return status


def _thread(target: Callable[..., None], *args: Any) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def _crlf(send: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """`send` with the line ends a terminal in raw mode shows as lines."""

    def crlf(data: bytes) -> None:
        send(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    return crlf


def _pump_out(source: IO[bytes], send: Callable[[bytes], None], kill: Callable[[], None]) -> None:
    """Child stdout/stderr -> channel, one chunk at a time (send blocks on the window)."""
    fd = source.fileno()
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                return
            try:
                send(data)
            except (OSError, EOFError, paramiko.SSHException):
                kill()  # the client is gone or stalled past the timeout
                return
    finally:
        source.close()


def _pump_in(channel: paramiko.Channel, sink: IO[bytes], kill: Callable[[], None]) -> None:
    """Channel -> child stdin until the client's EOF; a closed channel kills the child."""
    try:
        while True:
            try:
                data = channel.recv(CHUNK)
            except TimeoutError:
                continue  # a quiet client (git may be thinking); the window bounds memory
            if not data:
                if channel.closed and not channel.eof_received:
                    kill()
                return
            try:
                sink.write(data)
            except (BrokenPipeError, ValueError, OSError):
                return  # the child stopped reading (it exited or refused)
    finally:
        with contextlib.suppress(OSError, BrokenPipeError):
            sink.close()
