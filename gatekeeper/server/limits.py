"""What keeps one client from hurting the others: the limits `serve` is given, the
bound on a packet's length, and the throttle on the lines about refused connections."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import paramiko

log = logging.getLogger("gatekeeper.server")  # one logger for the whole server

MAX_PACKET_BYTES = 256 * 1024  # what OpenSSH accepts; paramiko reads any length it is told


@dataclass(frozen=True)
class Startups:
    """OpenSSH's `MaxStartups start:rate:full`, for connections not authenticated yet:
    below `start` every one is served; from `start` on a new one is dropped with a
    probability of `rate` percent, rising linearly to 100% at `full`.

    OpenSSH's 10:30:100 suits its login grace time and a process per connection. Here a
    connection waits at most `auth_timeout` (a sixth of OpenSSH's default) and costs two
    threads, so the defaults are larger: `start` is above a hundred silent clients plus
    those logging in beside them, so such a flood costs no one a connection; `full`
    bounds what a bigger one can hold, and holding it takes `full / auth_timeout` new
    connections a second, some thirty times what OpenSSH's defaults take."""

    start: int = 128
    rate: int = 30
    full: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.full or not 1 <= self.rate <= 100:
            raise ValueError(
                "max startups must be START:RATE:FULL with 1 <= START <= FULL and "
                "RATE a percentage from 1 to 100"
            )

    @classmethod
    def parse(cls, text: str) -> Startups:
        """`START:RATE:FULL`, or one number N (`N:100:N`, drop all from N on), as in
        sshd_config. Raises ValueError with what is wrong."""
        parts = text.split(":")
        if len(parts) not in (1, 3) or not all(p.isdigit() for p in parts):
            raise ValueError(f"expected START:RATE:FULL (like 128:30:512), not {text!r}")
        if len(parts) == 1:
            return cls(int(parts[0]), 100, int(parts[0]))
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))

    def drop_percent(self, waiting: int) -> int:
        """The chance, in percent, that a new connection is dropped while `waiting`
        connections are not authenticated yet."""
        if waiting < self.start:
            return 0
        if waiting >= self.full:
            return 100
        return self.rate + (100 - self.rate) * (waiting - self.start) // (self.full - self.start)

    def __str__(self) -> str:
        return f"{self.start}:{self.rate}:{self.full}"


@dataclass(frozen=True)
class Limits:
    """The knobs that keep one client from hurting the others."""

    max_connections: int = 64
    """Authenticated connections served at once; while they are all taken a new
    connection is closed at once, and one that authenticates is told so and closed.
    Connections still logging in count against `max_startups` instead."""
    max_startups: Startups = field(default_factory=Startups)
    """Random early drop of connections that have not authenticated yet."""
    max_unauthenticated_per_source: int | None = None
    """Connections one address may have before authenticating (None: half of
    `max_startups.start`), so one host alone cannot make the others be dropped."""
    auth_timeout: float = 20.0
    """Seconds from accept to a completed authentication, the banner and key exchange
    included (OpenSSH's LoginGraceTime); also from there to a session."""
    max_auth_tries: int = 6
    """Failed authentication attempts (offered keys included) before disconnecting."""
    session_start_timeout: float = 30.0
    """Seconds between opening a session channel and asking for a command."""
    stall_timeout: float = 600.0
    """Seconds a client may leave us unable to send (window closed) before we drop it."""
    grace: float = 10.0
    """On SIGTERM/SIGINT: seconds open sessions get to finish before they are closed."""

    @property
    def per_source(self) -> int:
        if self.max_unauthenticated_per_source is not None:
            return self.max_unauthenticated_per_source
        return max(1, self.max_startups.start // 2)


def bound_packets(transport: paramiko.Transport) -> None:
    """Refuse a packet longer than MAX_PACKET_BYTES before reading it, not after: a
    client could otherwise make us hold as much as it cares to send, unauthenticated."""
    packetizer = transport.packetizer
    read_all = packetizer.read_all

    def bounded(n: int, check_rekey: bool = False) -> bytes:
        if n > MAX_PACKET_BYTES:
            raise paramiko.SSHException(f"a packet of {n} bytes (at most {MAX_PACKET_BYTES})")
        return read_all(n, check_rekey)

    packetizer.read_all = bounded  # type: ignore[method-assign]


class Throttled:
    """Log lines about refused connections: of each kind the first at once, then at
    most one every `every` seconds with a count of those left out, so that a flood
    cannot fill the log."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def log(self, kind: str, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                self._left_out[kind] = self._left_out.get(kind, 0) + 1
                return
            self._last[kind] = now
            left_out = self._left_out.pop(kind, 0)
        if left_out:
            log.warning("%s (and %d more like it since the last such line)", line, left_out)
        else:
            log.warning("%s", line)
