"""A PostgreSQL store behind several front-ends: set-up, moving a store, failing
closed when the database is away, and two hosts sharing one state."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_shell import assert_clean_refusal

from gatekeeper.errors import StoreError
from gatekeeper.store import SCHEMA_VERSION, Store
from gatekeeper.store.postgres import PostgresDatabase
from gatekeeper.store.schema import MIGRATIONS
from testing.installation import GATEKEEPER_SHELL, Installation, password_file_url

pytestmark = pytest.mark.postgres

FETCH = "git-upload-pack 'platform/api'"


@pytest.fixture
def pg_site(pg_gk: Installation) -> tuple[Installation, int]:
    pg_gk.repo("platform/api")
    pg_gk.repo("platform/secrets")
    _, key_id = pg_gk.add_user("bob")
    pg_gk.enroll("bob")
    return pg_gk, key_id


def second_front_end(first: Installation, base: Path) -> Installation:
    """Another host: its own policy file and state directory, the same database and
    server key (which every front-end of one store must share)."""
    other = Installation(base, store_url=first.store_url)
    other.repos.rmdir()
    other.repos.symlink_to(first.repos)
    other.state.mkdir(mode=0o700)
    shutil.copy2(first.state / "server.key", other.state / "server.key")
    return other.init()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- set-up ---------------------------------------------------------------------------


def test_init_creates_the_schema_and_access_works(pg_site: tuple[Installation, int]) -> None:
    gk, key = pg_site
    assert not (gk.state / "gatekeeper.db").exists()
    result = gk.shell(key, FETCH, stdin="0000")
    assert result.returncode == 0, result.stderr
    assert "refs/heads/main" in result.stdout
    again = gk.gk("init")
    assert "store is up to date: postgresql://" in again.stdout
    assert "password" not in again.stdout
    assert [r["reason"] for r in gk.audit(event="access")] == ["allowed"]
    assert gk.gk("log", "verify").returncode == 0


def test_migrate_upgrades_an_older_postgres_schema(
    tmp_path: Path, postgres_server: object, postgres_url: str
) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        pg_ddl = PostgresDatabase.ddl(MIGRATIONS[1])
        for statement in filter(str.strip, pg_ddl.split(";")):
            conn.execute(statement)
        conn.execute("CREATE TABLE gatekeeper_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO gatekeeper_schema VALUES (1)")
    inst = Installation(tmp_path / "gk", store_url=password_file_url(postgres_server, postgres_url))
    refused = inst.gk("user", "list", check=False)
    assert refused.returncode != 0 and "gatekeeper migrate" in refused.stderr
    result = inst.gk("migrate")
    assert f"migrated from schema 1 to {SCHEMA_VERSION}" in result.stdout
    assert f"at schema {SCHEMA_VERSION}" in inst.gk("migrate").stdout
    inst.gk("init")
    inst.add_user("alice")


def test_an_empty_database_is_not_a_store(tmp_path: Path, postgres_url: str) -> None:
    with pytest.raises(StoreError, match="not set up") as info:
        Store.open(tmp_path, postgres_url)
    assert info.value.hint == "run `gatekeeper init`."


# -- failing closed -------------------------------------------------------------------


def test_a_closed_port_is_refused_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the state database") as info:
        Store.open(tmp_path, f"postgresql://gk@127.0.0.1:{closed_port()}/gate")
    assert time.monotonic() - started < 3
    assert "PostgreSQL is running" in (info.value.hint or "")


def test_a_server_that_never_answers_times_out(tmp_path: Path, blackhole: int) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach"):
        Store.open(tmp_path, f"postgresql://gk@127.0.0.1:{blackhole}/gate?connect_timeout=2")
    assert time.monotonic() - started < 8


def test_the_forced_command_never_hangs_a_git_client_on_a_silent_database(
    pg_site: tuple[Installation, int], blackhole: int
) -> None:
    gk, key = pg_site
    gk.store_url = f"postgresql://gk@127.0.0.1:{blackhole}/gate?connect_timeout=2"
    gk.write_policy(gk.config.read_text().split("two_factor:", 1)[1].split("\n", 2)[2])
    started = time.monotonic()
    result = gk.shell(key, FETCH)
    assert time.monotonic() - started < 10
    assert_clean_refusal(result, "cannot read its 2FA state")
    assert result.stdout == ""


def test_a_database_outage_refuses_then_recovers(
    pg_site: tuple[Installation, int], postgres_server: object
) -> None:
    gk, key = pg_site
    postgres_server.kill()  # type: ignore[attr-defined]
    try:
        started = time.monotonic()
        down = gk.shell(key, FETCH)
        assert time.monotonic() - started < 10
        assert_clean_refusal(down, "cannot read its 2FA state")
        admin = gk.gk("user", "list", check=False)
        assert admin.returncode != 0 and "Traceback" not in admin.stderr
        assert "cannot reach the state database postgresql://" in admin.stderr
    finally:
        postgres_server.start()  # type: ignore[attr-defined]
    up = gk.shell(key, FETCH, stdin="0000")
    assert up.returncode == 0, up.stderr


def test_a_wrong_password_and_a_missing_database_say_which(
    tmp_path: Path, postgres_server: object, postgres_url: str
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    with pytest.raises(StoreError, match="cannot log in") as info:
        Store.open(tmp_path, f"{postgres_url}?password_file={wrong}")
    assert "password_file" in (info.value.hint or "")
    assert "not-the-password" not in info.value.message
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(StoreError, match="does not exist") as info:
        Store.open(tmp_path, missing)
    assert "createdb" in (info.value.hint or "")


def test_a_password_in_the_store_url_is_refused(pg_site: tuple[Installation, int]) -> None:
    gk, key = pg_site
    gk.store_url = "postgresql://gatekeeper:hunter2@127.0.0.1:1/gate"
    gk.write_policy(gk.config.read_text().split("two_factor:", 1)[1].split("\n", 2)[2])
    result = gk.gk("policy", "check", check=False)
    assert result.returncode != 0 and "password in the URL" in result.stdout + result.stderr
    assert_clean_refusal(gk.shell(key, FETCH), "policy file is invalid")


def test_without_the_driver_it_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from gatekeeper.store import Store\n"
        "from gatekeeper.errors import StoreError\n"
        "try:\n"
        "    Store.open(sys.argv[1], 'postgresql://gk@127.0.0.1:1/gate')\n"
        "except StoreError as exc:\n"
        "    print(exc.message, '|', exc.hint)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert "psycopg driver is not installed" in out and "gatekeeper[postgres]" in out


# -- two front-ends, one state --------------------------------------------------------


def test_two_front_ends_share_enrollment_sessions_lockout_and_one_chain(
    pg_gk: Installation, tmp_path: Path
) -> None:
    pg_gk.write_policy(
        "teams:\n  platform:\n    members: [bob]\n    require_2fa: verified\n"
        "repositories:\n  - match: platform/*\n    write: [platform]\n"
    )
    pg_gk.repo("platform/api")
    _, key = pg_gk.add_user("bob")
    other = second_front_end(pg_gk, tmp_path / "other")
    other.write_policy(pg_gk.config.read_text().split("two_factor:", 1)[1].split("\n", 2)[2])
    pg_gk.enroll("bob")  # on host one
    assert_clean_refusal(other.shell(key, FETCH), "2fa verify")
    verified = pg_gk.shell(key, f"2fa verify {pg_gk.code('bob')}")
    assert verified.returncode == 0, verified.stderr
    allowed = other.shell(key, FETCH, stdin="0000")  # the session is seen on host two
    assert allowed.returncode == 0, allowed.stderr
    for inst in (pg_gk, other, pg_gk):  # max_failures is 3: host one's third locks
        inst.shell(key, "2fa verify 000000")
    locked = other.shell(key, f"2fa verify {other.code('bob')}")
    assert_clean_refusal(locked, "locked")
    status = json.loads(other.gk("2fa", "status", "--json").stdout)
    assert status[0]["locked_until"] is not None
    for inst in (pg_gk, other):
        check = inst.gk("log", "verify", check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    seqs = [r["seq"] for r in pg_gk.audit()]
    assert seqs == list(range(1, len(seqs) + 1))


# -- store copy -----------------------------------------------------------------------


def test_store_copy_moves_sqlite_to_postgres_and_back(
    tmp_path: Path, postgres_server: object, postgres_url: str
) -> None:
    site = Installation(tmp_path / "gk").init()
    site.repo("platform/api")
    _, key = site.add_user("bob")
    site.enroll("bob")
    site.add_user("alice")
    assert site.shell(key, FETCH, stdin="0000").returncode == 0
    before = site.audit()
    url = password_file_url(postgres_server, postgres_url)

    out = site.gk("store", "copy", str(site.state), url).stdout
    assert f"audit chain verified: records up to {len(before)}" in out
    assert "2 users" in out and "password" not in out.replace("password_file", "")

    # The copy serves: point the policy at it; the same user, key id and 2FA hold.
    site.store_url = url
    site.write_policy(site.config.read_text().split("two_factor:", 1)[1].split("\n", 2)[2])
    after = site.shell(key, FETCH, stdin="0000")
    assert after.returncode == 0, after.stderr
    copied = site.audit()
    assert [r["hash"] for r in copied[: len(before)]] == [r["hash"] for r in before]
    assert site.gk("log", "verify").returncode == 0
    site.add_user("carol")  # new ids start above the copied ones

    back = tmp_path / "back.db"
    again = site.gk("store", "copy", url, f"sqlite://{back}").stdout
    assert "3 users" in again
    with Store.open(tmp_path / "gk" / "state", str(back)) as store:
        assert [u.name for u in store.list_users()] == ["alice", "bob", "carol"]
        assert store.verify_audit() == []


def test_store_copy_refuses_a_destination_with_data_unless_replace(
    tmp_path: Path, postgres_server: object, postgres_url: str
) -> None:
    site = Installation(tmp_path / "gk").init()
    site.add_user("alice")
    url = password_file_url(postgres_server, postgres_url)
    site.gk("store", "copy", str(site.state), url)
    site.add_user("bob")
    refused = site.gk("store", "copy", str(site.state), url, check=False)
    assert refused.returncode != 0 and "is not empty" in refused.stderr
    assert "--replace" in refused.stderr and "Traceback" not in refused.stderr
    with Store.open(tmp_path, url) as store:
        assert [u.name for u in store.list_users()] == ["alice"]  # untouched
    out = site.gk("store", "copy", "--replace", str(site.state), url).stdout
    assert "replaced" in out
    with Store.open(tmp_path, url) as store:
        assert [u.name for u in store.list_users()] == ["alice", "bob"]


def test_store_copy_refuses_a_source_whose_log_does_not_verify(
    tmp_path: Path, postgres_server: object, postgres_url: str
) -> None:
    site = Installation(tmp_path / "gk").init()
    site.add_user("alice")
    with Store.open(site.state) as store:
        store.conn.execute("UPDATE audit SET user = 'mallory' WHERE seq = 1")
    url = password_file_url(postgres_server, postgres_url)
    refused = site.gk("store", "copy", str(site.state), url, check=False)
    assert refused.returncode != 0 and "does not verify" in refused.stderr
    with Store.open(tmp_path, url) as store:
        assert store.is_empty()


def test_store_copy_to_an_unreachable_database_changes_nothing(tmp_path: Path) -> None:
    site = Installation(tmp_path / "gk").init()
    site.add_user("alice")
    url = f"postgresql://gk@127.0.0.1:{closed_port()}/gate"
    refused = site.gk("store", "copy", str(site.state), url, check=False)
    assert refused.returncode != 0 and "cannot reach" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert [u["user"] for u in json.loads(site.gk("user", "list", "--json").stdout)] == ["alice"]


# -- the per-connection driver (libpq through ctypes) -------------------------------------


def test_libpq_round_trips_every_type_the_store_uses(postgres_url: str) -> None:
    from gatekeeper.store import libpq

    conn = libpq.Connection({"dbname": postgres_url, "client_encoding": "UTF8"})
    try:
        blob = bytes(range(256)) + b"\x00\\x"
        row = conn.execute(
            "SELECT $1::bytea AS b, $2::bigint AS big, $3::text AS t, $4::text AS n,"
            " $5::boolean AS yes, $6::int AS small, 1.5::float8 AS f",
            (blob, 2**40, "zoë 'quoted' \\ $1 ?", None, True, -7),
        ).fetchone()
        assert row == {
            "b": blob,
            "big": 2**40,
            "t": "zoë 'quoted' \\ $1 ?",
            "n": None,
            "yes": True,
            "small": -7,
            "f": 1.5,
        }
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        assert conn.execute("INSERT INTO t VALUES (1), (2)").rowcount == 2
        with pytest.raises(libpq.PgError) as info:
            conn.execute("INSERT INTO t VALUES ($1)", (1,))
        assert info.value.sqlstate == "23505" and "duplicate key" in str(info.value)
        assert conn.transaction_status() == libpq.TRANS_IDLE
    finally:
        conn.close()
    assert conn.closed
    with pytest.raises(libpq.PgError, match="closed"):
        conn.execute("SELECT 1")


def test_the_git_access_path_does_not_import_psycopg(pg_site: tuple[Installation, int]) -> None:
    gk, key = pg_site
    code = (
        "import sys\n"
        "from gatekeeper.store import Store\n"
        "store = Store.open(sys.argv[1], sys.argv[2], light=True)\n"
        "facts = store.connection_facts(int(sys.argv[3]), 0)\n"
        "print(type(store.db).__name__, facts.enrolled, 'psycopg' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(gk.state), gk.store_url, str(key)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["LibpqDatabase", "True", "False"]
    trace = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            GATEKEEPER_SHELL,
            "--config",
            str(gk.config),
            str(key),
        ],
        capture_output=True,
        text=True,
        env={
            **gk.env,
            "SSH_CONNECTION": "127.0.0.1 1 127.0.0.1 22",
            "SSH_ORIGINAL_COMMAND": FETCH,
            "GATEKEEPER_DRY_RUN": "1",
        },
    )
    assert trace.returncode == 0, trace.stderr[-2000:]
    assert "psycopg" not in trace.stderr and "gatekeeper.store.libpq" in trace.stderr


def test_store_copy_refuses_a_password_on_the_command_line(tmp_path: Path) -> None:
    site = Installation(tmp_path / "gk").init()
    result = site.gk(
        "store", "copy", str(site.state), "postgresql://gk:hunter2@127.0.0.1/gate", check=False
    )
    assert result.returncode != 0 and "password in the URL" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
    assert "password_file" in result.stderr


def test_libpq_falls_back_to_the_copy_in_psycopgs_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ctypes

    from gatekeeper.store import libpq

    real_cdll = ctypes.CDLL
    tried: list[str] = []

    def only_paths(name: str) -> object:
        tried.append(name)
        if "/" not in name:
            raise OSError(f"{name}: not found")
        return real_cdll(name)

    (tmp_path / "psycopg_binary.libs").mkdir()
    (tmp_path / "psycopg_binary.libs" / "libpq-evil.so.5").write_text("not a library")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    monkeypatch.setattr(libpq, "_lib", None)
    monkeypatch.setattr(ctypes, "CDLL", only_paths)
    lib = libpq.load()
    assert "psycopg_binary.libs" in tried[-1] and lib.PQstatus is not None
    assert not any("evil" in name for name in tried)  # never from the working directory
    monkeypatch.setattr(libpq, "_lib", None)
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(libpq.PgError, match="not installed"):
        libpq.load()


def test_a_front_end_joining_with_the_same_policy_verifies_the_log_at_once(
    tmp_path: Path, postgres_server: object, postgres_url: str
) -> None:
    """Identical policy files on every front-end (relative paths): the second host's
    init records no policy change, yet its `log verify` has a head to hold the log to."""
    url = password_file_url(postgres_server, postgres_url)
    text = f"server:\n  state_dir: state\n  repositories: repos\n  store: {url}\nrepositories: []\n"
    hosts = []
    for name in ("one", "two"):
        inst = Installation(tmp_path / name, store_url=url)
        inst.config.write_text(text)
        hosts.append(inst)
    one, two = hosts
    one.init()
    one.gk("user", "add", "alice")
    two.state.mkdir(mode=0o700)
    shutil.copy2(one.state / "server.key", two.state / "server.key")
    joined = two.gk("init").stdout
    assert "this host's audit head starts at record 2" in joined
    assert "store is up to date" in joined
    assert [r["event"] for r in two.audit()] == ["policy-change", "user-add"]
    assert two.gk("log", "verify", check=False).returncode == 0
    assert "audit head" not in two.gk("init").stdout  # once
    # Host one's witness still holds while host two appends.
    two.gk("user", "add", "bob")
    assert one.gk("log", "verify", check=False).returncode == 0
    # Cutting host two's record off the end is seen on host two.
    with Store.open(two.state, url) as store:
        store.db.execute("DELETE FROM audit WHERE seq = 3")
    cut = two.gk("log", "verify", check=False)
    assert cut.returncode != 0 and "cut off" in cut.stdout + cut.stderr


def test_an_unusable_password_file_refuses_like_an_unreachable_database(
    pg_site: tuple[Installation, int], tmp_path: Path
) -> None:
    gk, key = pg_site
    loose = tmp_path / "loose.password"
    loose.write_text("whatever\n")
    loose.chmod(0o644)
    gk.store_url = gk.store_url.split("?", 1)[0] + f"?password_file={loose}"
    gk.write_policy(gk.config.read_text().split("two_factor:", 1)[1].split("\n", 2)[2])
    result = gk.shell(key, FETCH)
    assert_clean_refusal(result, "cannot read its 2FA state")
    assert "loose.password" not in result.stderr  # the server's detail stays in its log
    admin = gk.gk("user", "list", check=False)
    assert admin.returncode != 0 and "is open to others" in admin.stderr
    assert f"chmod 600 {loose}" in admin.stderr
