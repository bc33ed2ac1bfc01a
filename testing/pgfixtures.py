"""pytest fixtures for a real PostgreSQL server (a plugin module; see pgserver.py).

Load it from tests/conftest.py with ``pytest_plugins = ["testing.pgfixtures"]``, or on the
command line with ``python -m pytest -p testing.pgfixtures``.

``postgres_server``
    session scope: one ``PostgresServer`` per test process (so one per xdist worker), started
    the first time a test asks for it, stopped and removed at the end of the session.
``postgres_url``
    function scope: a fresh, empty database owned by the login role ``gatekeeper``, as
    ``postgresql://gatekeeper@127.0.0.1:PORT/NAME`` (no password in it). The fixture sets
    PGPASSFILE to the server's password file (and removes PGPASSWORD, PGHOST, ...) for the test,
    so libpq clients in the test process and in subprocesses started with ``os.environ``
    authenticate. ``postgres_server.url_with_passfile(name)`` and
    ``.url_with_password_file(name)`` name the file in the URL instead. The database is dropped
    at teardown (connections still open to it are ended); a server the test stopped or killed is
    started again first.

Without PostgreSQL the tests that use these fixtures are skipped, or fail when CI=true.
Every test that uses them gets the ``postgres`` marker (``-m "not postgres"`` leaves them out).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from testing.pgserver import PostgresServer, find_binaries, missing_reason

FIXTURES = ("postgres_server", "postgres_url")

_counter = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


def require_postgres() -> None:
    """Skip the test when PostgreSQL is missing; fail it when CI=true."""
    if find_binaries() is None:
        message = missing_reason()
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: not skipping)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    require_postgres()
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"gk_test_{worker}_{os.getpid()}_{next(_counter)}"[:63]
    postgres_server.ensure_running()
    url = postgres_server.create_database(name)
    for key in [k for k in os.environ if k.startswith("PG")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PGPASSFILE", str(postgres_server.passfile))
    yield url
    postgres_server.ensure_running()
    postgres_server.drop_database(name)
