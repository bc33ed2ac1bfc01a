"""The compiled policy: what `load_policy` caches and the forced command reads, so a
connection builds only the rules that can match its repository and the teams of its
user, at any policy size. marshal data with an index (the format is described below);
a damaged or foreign file is a ValueError, never a different policy.
"""

from __future__ import annotations

from gatekeeper.lightstd import date
from gatekeeper.policy.model import (
    LEVELS,
    MODES,
    Policy,
    RepoRule,
    ServerSettings,
    Team,
    TwoFactorSettings,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Bump whenever the compiled layout or what validation accepts changes: older caches
# are then ignored.
COMPILED_FORMAT = 4


def _typed(value: Any, kind: Any) -> Any:
    # bool is an int in Python: never accept one for the other.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"unexpected value {value!r}")
    return value


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unexpected value {value!r}")
    return str(value)


def _iso(d: date | None) -> str | None:
    return d.isoformat() if d else None


def _date(s: Any) -> date | None:
    return None if s is None else date.fromisoformat(_typed(s, str))


# -- the compiled cache's format -----------------------------------------------------
#
# MAGIC, the CRC-32 of the rest, then one marshal'd tuple of plain values: the header
# fields, the index and two tables (rules and teams), each table one bytes blob of
# marshal'd records plus a bytes string of 4-byte offsets, so a record is decoded only
# when it is needed. The index maps keys to tuples of record numbers (file order):
#   "=NAME"  the rules whose match is exactly NAME (no glob),
#   "/FIRST" the glob rules whose first path component is FIRST (no '*' in it),
#   "@USER"  the teams that list USER;
# glob rules whose first component has a '*' are listed in the header ("wild"), and
# every lookup checks them. The index is a hash table on disk: keys are spread over
# buckets by CRC-32, each bucket a marshal'd dict, so a lookup decodes one small bucket
# whatever the policy's size. Only rules that can match are built, and only their
# globs compiled (`re` keeps 512; a policy can have thousands).

COMPILED_MAGIC = b"GKpolicy"
_KEYS_PER_BUCKET = 4
_RULE_FIELDS_N = 8
_TEAM_FIELDS_N = 6


def _rule_key(match: str) -> str | None:
    if "*" not in match:
        return "=" + match
    first = match.split("/", 1)[0]
    if "*" in first or "/" not in match:
        return None
    return "/" + first


def _table(records: list[bytes]) -> tuple[bytes, bytes]:
    offsets = [0]
    for rec in records:
        offsets.append(offsets[-1] + len(rec))
    return b"".join(records), b"".join(o.to_bytes(4, "little") for o in offsets)


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def dump_compiled(policy: Policy) -> bytes:
    """The compiled cache's bytes for `policy` (see above); `load_compiled` reads them."""
    import marshal
    from binascii import crc32

    teams = list(policy.teams.values())
    index: dict[str, list[int]] = {}
    wild: list[int] = []
    for i, rule in enumerate(policy.rules):
        key = _rule_key(rule.match)
        if key is None:
            wild.append(i)
        else:
            index.setdefault(key, []).append(i)
    for i, team in enumerate(teams):
        for member in dict.fromkeys(team.members):
            index.setdefault("@" + member, []).append(i)
    nbuckets = max(1, len(index) // _KEYS_PER_BUCKET)
    buckets: list[dict[str, tuple[int, ...]]] = [{} for _ in range(nbuckets)]
    for key, numbers in index.items():
        buckets[crc32(_key_bytes(key)) % nbuckets][key] = tuple(numbers)
    rule_blob, rule_offsets = _table(
        [
            marshal.dumps(
                (
                    r.match,
                    tuple(r.read),
                    tuple(r.write),
                    r.public,
                    r.require_2fa,
                    _iso(r.grace_until),
                    r.mode,
                    r.line,
                )
            )
            for r in policy.rules
        ]
    )
    team_blob, team_offsets = _table(
        [
            marshal.dumps(
                (t.name, tuple(t.members), t.require_2fa, _iso(t.grace_until), t.mode, t.line)
            )
            for t in teams
        ]
    )
    bucket_blob, bucket_offsets = _table([marshal.dumps(b) for b in buckets])
    s, tf = policy.server, policy.two_factor
    body = marshal.dumps(
        (
            COMPILED_FORMAT,
            policy.source,
            policy.sha256,
            (
                s.host,
                s.port,
                s.user,
                str(s.repositories),
                str(s.state_dir),
                s.listen_host,
                s.listen_port,
                s.store,
            ),
            (
                tf.issuer,
                tf.session_hours,
                tf.max_failures,
                tf.failure_window_minutes,
                tf.lockout_minutes,
                tf.self_enroll,
                tf.keyboard_interactive,
            ),
            policy.allow_local_push,
            tuple(wild),
            nbuckets,
            bucket_offsets,
            bucket_blob,
            rule_offsets,
            rule_blob,
            team_offsets,
            team_blob,
        )
    )
    return COMPILED_MAGIC + crc32(body).to_bytes(4, "little") + body


def compiled_source(data: bytes) -> str | None:
    """The policy file a cache file was compiled from: `load_policy`'s marshal'd cache
    (any COMPILED_FORMAT: the source follows the format number) or the JSON cache of
    earlier releases. None for anything else. For tidying a cache directory, never
    for loading a policy."""
    import marshal
    from binascii import crc32

    start = len(COMPILED_MAGIC) + 4
    if data[: len(COMPILED_MAGIC)] == COMPILED_MAGIC:
        body = memoryview(data)[start:]
        if crc32(body) != int.from_bytes(data[len(COMPILED_MAGIC) : start], "little"):
            return None
        try:
            top = marshal.loads(body)  # noqa: S302 - CRC-checked, only a string is taken
        except (EOFError, TypeError, ValueError):
            return None
        if type(top) is tuple and len(top) > 1 and type(top[1]) is str:
            return top[1]
        return None
    import json

    try:
        value = json.loads(data)
    except ValueError:
        return None
    source = value.get("source") if type(value) is dict else None
    return source if type(source) is str else None


def load_compiled(data: bytes) -> Policy:
    """The policy `dump_compiled` wrote. Raises ValueError for anything else: the
    CRC-32 catches a damaged or truncated file, and every value is type-checked as it
    is used, so a corrupt cache can never become a different policy."""
    import marshal
    from binascii import crc32

    start = len(COMPILED_MAGIC) + 4
    if data[: len(COMPILED_MAGIC)] != COMPILED_MAGIC:
        raise ValueError("not a compiled policy")
    body = memoryview(data)[start:]
    if crc32(body) != int.from_bytes(data[len(COMPILED_MAGIC) : start], "little"):
        raise ValueError("the compiled policy is damaged (CRC mismatch)")
    try:
        # Only a file this account wrote and alone can write (`_read_cache`), CRC-checked;
        # nothing loaded is ever run, every value is type-checked.
        top = marshal.loads(body)  # noqa: S302
    except (EOFError, TypeError, ValueError) as exc:
        raise ValueError(f"not a compiled policy: {exc}") from None
    if type(top) is not tuple or len(top) != 14 or top[0] != COMPILED_FORMAT:
        raise ValueError("unknown compiled policy format")
    (_, source, digest, s, tf, local_push, wild, nbuckets) = top[:8]
    _tuple(s, 8)
    _tuple(tf, 7)
    server = ServerSettings(
        host=_typed(s[0], str),
        port=_typed(s[1], int),
        user=_typed(s[2], str),
        repositories=_typed(s[3], str),
        state_dir=_typed(s[4], str),
        listen_host=_typed(s[5], str),
        listen_port=_typed(s[6], int),
        store=_typed(s[7], str),
    )
    two_factor = TwoFactorSettings(
        issuer=_typed(tf[0], str),
        session_hours=_typed(tf[1], (int, float)),
        max_failures=_typed(tf[2], int),
        failure_window_minutes=_typed(tf[3], int),
        lockout_minutes=_typed(tf[4], int),
        self_enroll=_typed(tf[5], bool),
        keyboard_interactive=_typed(tf[6], bool),
    )
    tables = _Compiled(
        _numbers(wild, None),
        _typed(nbuckets, int),
        *(_typed(part, bytes) for part in top[8:]),
    )
    policy: Policy = object.__new__(Policy)
    for name, value in (
        ("server", server),
        ("two_factor", two_factor),
        ("allow_local_push", _typed(local_push, bool)),
        ("source", _typed(source, str)),
        ("sha256", _typed(digest, str)),
        ("_compiled", tables),
    ):
        object.__setattr__(policy, name, value)
    return policy


def _tuple(value: Any, length: int) -> None:
    if type(value) is not tuple or len(value) != length:
        raise ValueError("unexpected value in the compiled policy")


def _numbers(value: Any, limit: int | None) -> tuple[int, ...]:
    if type(value) is not tuple or not all(
        type(n) is int and 0 <= n and (limit is None or n < limit) for n in value
    ):
        raise ValueError("unexpected record numbers in the compiled policy")
    numbers: tuple[int, ...] = value
    return numbers


class _Compiled:
    """The tables of a compiled policy: records decoded (and checked) on demand."""

    def __init__(
        self,
        wild: tuple[int, ...],
        nbuckets: int,
        bucket_offsets: bytes,
        bucket_blob: bytes,
        rule_offsets: bytes,
        rule_blob: bytes,
        team_offsets: bytes,
        team_blob: bytes,
    ) -> None:
        self.nbuckets = nbuckets
        self.buckets = (bucket_offsets, bucket_blob)
        self.rules = (rule_offsets, rule_blob)
        self.teams = (team_offsets, team_blob)
        self.nrules = self._count(rule_offsets, rule_blob)
        self.nteams = self._count(team_offsets, team_blob)
        if nbuckets < 1 or self._count(bucket_offsets, bucket_blob) != nbuckets:
            raise ValueError("the compiled policy's index is damaged")
        self.wild = _numbers(wild, self.nrules)

    @staticmethod
    def _count(offsets: bytes, blob: bytes) -> int:
        if not offsets or len(offsets) % 4 or int.from_bytes(offsets[-4:], "little") != len(blob):
            raise ValueError("the compiled policy's tables are damaged")
        return len(offsets) // 4 - 1

    @staticmethod
    def _record(table: tuple[bytes, bytes], i: int) -> Any:
        import marshal

        offsets, blob = table
        start = int.from_bytes(offsets[4 * i : 4 * i + 4], "little")
        end = int.from_bytes(offsets[4 * i + 4 : 4 * i + 8], "little")
        try:
            return marshal.loads(blob[start:end])  # noqa: S302 - see load_compiled
        except (EOFError, TypeError, ValueError) as exc:
            raise ValueError(f"a damaged record in the compiled policy: {exc}") from None

    def lookup(self, key: str) -> tuple[int, ...]:
        from binascii import crc32

        bucket = self._record(self.buckets, crc32(_key_bytes(key)) % self.nbuckets)
        if type(bucket) is not dict:
            raise ValueError("the compiled policy's index is damaged")
        return _numbers(bucket.get(key, ()), None)

    def rule(self, i: int) -> RepoRule:
        r = self._record(self.rules, i)
        _tuple(r, _RULE_FIELDS_N)
        return RepoRule(
            match=_typed(r[0], str),
            read=_names_tuple(r[1]),
            write=_names_tuple(r[2]),
            public=_typed(r[3], bool),
            require_2fa=None if r[4] is None else _choice(r[4], LEVELS),
            grace_until=_date(r[5]),
            mode=None if r[6] is None else _choice(r[6], MODES),
            line=_typed(r[7], int),
        )

    def team(self, i: int) -> Team:
        t = self._record(self.teams, i)
        _tuple(t, _TEAM_FIELDS_N)
        return Team(
            name=_typed(t[0], str),
            members=_names_tuple(t[1]),
            require_2fa=_choice(t[2], LEVELS),
            grace_until=_date(t[3]),
            mode=_choice(t[4], MODES),
            line=_typed(t[5], int),
        )

    def matching_rules(self, repo: str) -> tuple[RepoRule, ...]:
        numbers = {*self.lookup("=" + repo), *self.wild}
        if "/" in repo:
            numbers.update(self.lookup("/" + repo.split("/", 1)[0]))
        rules = (self.rule(i) for i in sorted(_numbers(tuple(numbers), self.nrules)))
        return tuple(rule for rule in rules if rule.matches(repo))

    def teams_of(self, user: str) -> tuple[Team, ...]:
        numbers = _numbers(self.lookup("@" + user), self.nteams)
        return tuple(t for t in (self.team(i) for i in numbers) if user in t.members)

    def all_rules(self) -> tuple[RepoRule, ...]:
        return tuple(self.rule(i) for i in range(self.nrules))

    def all_teams(self) -> dict[str, Team]:
        teams = (self.team(i) for i in range(self.nteams))
        return {team.name: team for team in teams}


def _names_tuple(value: Any) -> tuple[str, ...]:
    if type(value) is not tuple or not all(type(v) is str for v in value):
        raise ValueError("unexpected names in the compiled policy")
    return value
