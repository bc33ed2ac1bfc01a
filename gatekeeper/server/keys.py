"""The keys `serve` last read, for when the policy or the store cannot be read."""

from __future__ import annotations

import threading

from gatekeeper.record import evolve
from gatekeeper.store import KeyRecord

KEYS_REFRESH_SECONDS = 60.0


class RememberedKeys:
    """The keys the store last listed, and the git account the policy last named.

    When the policy or the store cannot be loaded, the owner of a key should learn that
    the server is at fault and what to tell an administrator, not read "Permission
    denied" as if the key were wrong. So a key remembered here may then log in (its
    signature checked as always), only to be answered with the forced command's
    refusal; nothing runs. Refreshed every KEYS_REFRESH_SECONDS and by every lookup; a
    key removed while the store cannot be read stays until it can, for that refusal
    only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._user: str | None = None
        self._keys: dict[str, KeyRecord] = {}

    def replace(self, user: str, records: list[KeyRecord]) -> None:
        keys = {r.fingerprint: _slim(r) for r in records}
        with self._lock:
            self._user, self._keys = user, keys

    def note(self, user: str, fingerprint: str, record: KeyRecord | None) -> None:
        """What one lookup found (None: no such key any more)."""
        with self._lock:
            self._user = user
            if record is None:
                self._keys.pop(fingerprint, None)
            else:
                self._keys[fingerprint] = _slim(record)

    def find(self, user: str, fingerprint: str) -> KeyRecord | None:
        with self._lock:
            return self._keys.get(fingerprint) if user == self._user else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


def _slim(record: KeyRecord) -> KeyRecord:
    # The fingerprint stands for the key: a large site need not keep every blob.
    return evolve(record, blob="", comment="")
