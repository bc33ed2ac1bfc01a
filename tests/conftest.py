"""The fixtures every test can ask for: `gk`, a real gatekeeper installation in a
temporary directory (testing/installation.py), `pg_gk`, the same on a throwaway
PostgreSQL store, and the PostgreSQL fixtures of testing/pgfixtures.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testing.installation import Installation, password_file_url

pytest_plugins = ["testing.pgfixtures"]  # postgres_server, postgres_url: a real PostgreSQL


@pytest.fixture
def gk(tmp_path: Path) -> Iterator[Installation]:
    yield Installation(tmp_path / "gk").init()


@pytest.fixture
def pg_gk(tmp_path: Path, postgres_server: Any, postgres_url: str) -> Iterator[Installation]:
    """An installation whose store is a fresh PostgreSQL database."""
    url = password_file_url(postgres_server, postgres_url)
    yield Installation(tmp_path / "gk", store_url=url).init()
