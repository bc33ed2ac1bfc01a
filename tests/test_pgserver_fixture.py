"""The throwaway PostgreSQL fixture itself, proved with psycopg and no gatekeeper code."""

from __future__ import annotations

import os
import stat
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from testing.pgserver import PostgresServer

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        message = "needs psycopg (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: not skipping)")
        pytest.skip(message)
    return psycopg


def dbname(url: str) -> str:
    return urllib.parse.urlsplit(url).path.lstrip("/")


def test_select_1_through_the_url_and_the_passfile(
    psycopg: Any,
    postgres_server: PostgresServer,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PGPASSFILE, set by the fixture
    with psycopg.connect(postgres_url, connect_timeout=10) as conn:
        row = conn.execute("SELECT 1, current_user, current_database()").fetchone()
    assert row == (1, "gatekeeper", dbname(postgres_url))
    # the passfile named in the URL, with no PG* variables at all
    monkeypatch.delenv("PGPASSFILE")
    url = postgres_server.url_with_passfile(dbname(postgres_url))
    with psycopg.connect(url, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.host == "127.0.0.1"
        assert conn.info.port == postgres_server.port


def test_the_url_carries_no_password(postgres_server: PostgresServer, postgres_url: str) -> None:
    parts = urllib.parse.urlsplit(postgres_url)
    assert parts.scheme == "postgresql"
    assert parts.username == "gatekeeper"
    assert parts.password is None
    assert parts.hostname == "127.0.0.1"
    assert parts.port == postgres_server.port
    assert not parts.query
    for url in (
        postgres_url,
        postgres_server.url_with_passfile(dbname(postgres_url)),
        postgres_server.url_with_password_file(dbname(postgres_url)),
    ):
        assert postgres_server.password not in url
    # the password lives in files only the test process can read
    for path in (postgres_server.passfile, postgres_server.password_file):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
    line = f"127.0.0.1:{postgres_server.port}:*:gatekeeper:{postgres_server.password}"
    assert line in postgres_server.passfile.read_text().splitlines()
    assert postgres_server.password_file.read_text() == postgres_server.password + "\n"


def test_a_wrong_or_missing_password_is_refused(
    psycopg: Any, postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            postgres_url, password="not-" + postgres_server.password, connect_timeout=10
        )
    empty = tmp_path / "empty-pgpass"
    empty.write_text("")
    empty.chmod(0o600)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(postgres_url, passfile=str(empty), connect_timeout=10)
    # TCP is never trust, not even for the superuser
    superuser = f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(superuser, password="x", connect_timeout=10)
    # and the gatekeeper role is an ordinary one
    is_super = postgres_server.psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'gatekeeper'")
    assert is_super.strip() == "f"


def test_kill_is_an_outage_and_start_brings_it_back(
    psycopg: Any, postgres_server: PostgresServer, postgres_url: str
) -> None:
    with psycopg.connect(postgres_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (42)")
    conn = psycopg.connect(postgres_url, autocommit=True, connect_timeout=10)
    try:
        postgres_server.kill()
        assert not postgres_server.running
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match=r"(?i)connection refused"):
            psycopg.connect(postgres_url, connect_timeout=5)
    finally:
        conn.close()
        postgres_server.start()
    with psycopg.connect(postgres_url, connect_timeout=10) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]


def test_two_databases_are_independent(
    psycopg: Any, postgres_server: PostgresServer, postgres_url: str
) -> None:
    other = postgres_server.create_database(dbname(postgres_url) + "_b")
    try:
        assert other != postgres_url
        with (
            psycopg.connect(postgres_url, autocommit=True) as a,
            psycopg.connect(other, autocommit=True) as b,
        ):
            a.execute("CREATE TABLE only_in_a (x int)")
            b.execute("CREATE TABLE only_in_b (y text)")
            tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            assert a.execute(tables).fetchall() == [("only_in_a",)]
            assert b.execute(tables).fetchall() == [("only_in_b",)]
            owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s"
            for conn, url in ((a, postgres_url), (b, other)):
                assert conn.execute(owner, (dbname(url),)).fetchone() == ("gatekeeper",)
    finally:
        postgres_server.drop_database(dbname(other))
    listed = postgres_server.psql("SELECT datname FROM pg_database").split()
    assert dbname(other) not in listed
    assert dbname(postgres_url) in listed


def test_each_test_gets_a_fresh_empty_database(psycopg: Any, postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        count = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
            "'information_schema')"
        ).fetchone()
    assert count == (0,)


def test_sixty_concurrent_connections(psycopg: Any, postgres_url: str) -> None:
    def one(i: int) -> int:
        with psycopg.connect(postgres_url, connect_timeout=30) as conn:
            row = conn.execute("SELECT %s::int, pg_sleep(0.2)", (i,)).fetchone()
            assert row is not None
            return int(row[0])

    with ThreadPoolExecutor(max_workers=60) as pool:
        assert sorted(pool.map(one, range(60))) == list(range(60))


def test_close_stops_the_server_and_removes_its_directory(postgres_server: PostgresServer) -> None:
    # A private cluster: closing the session one would break the other tests.
    server = PostgresServer()
    base, port = server.base, server.port
    assert server.psql("SELECT 1").strip() == "1"
    assert (server.sockdir / f".s.PGSQL.{port}").exists()
    server.close()
    server.close()
    assert not base.exists()
    assert not server.running
    with pytest.raises(RuntimeError, match="closed"):
        server.start()
