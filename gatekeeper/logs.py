"""The server-side log: syslog's auth facility.

Refusals tell the client only what it needs; the details (a policy problem, a store
error, an internal fault) go here for admins. sshd discards an AuthorizedKeysCommand's
stderr, so that is also the only place it can report anything.
"""

from __future__ import annotations


def log(ident: str, message: str) -> None:
    try:
        import syslog

        syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_AUTH)
        syslog.syslog(syslog.LOG_WARNING, message)
    except Exception:  # noqa: BLE001, S110 - logging must never turn a refusal into a traceback
        pass
