"""Store URLs: which database, and that a password never rides in one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gatekeeper.errors import InputError, PolicyError
from gatekeeper.policy import load_policy
from gatekeeper.store.url import parse_store_url, read_password_file


def test_no_url_is_the_sqlite_file_in_the_state_directory(tmp_path: Path) -> None:
    loc = parse_store_url("", str(tmp_path))
    assert (loc.kind, loc.path) == ("sqlite", str(tmp_path / "gatekeeper.db"))
    assert parse_store_url(None, str(tmp_path)) == loc


def test_a_path_or_sqlite_url_names_the_file_and_a_directory_its_database(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    assert parse_store_url(f"sqlite://{tmp_path}/x.db", "/s").path == f"{tmp_path}/x.db"
    assert parse_store_url(str(tmp_path / "dir"), "/s").path == f"{tmp_path}/dir/gatekeeper.db"
    assert parse_store_url("rel.db", "/s", base=str(tmp_path)).path == f"{tmp_path}/rel.db"


def test_a_postgres_url_keeps_its_parameters_but_not_the_password_file() -> None:
    loc = parse_store_url(
        "postgresql://gk@db:5433/gate?sslmode=require&password_file=/etc/gk/pw&connect_timeout=2",
        "/s",
    )
    assert loc.is_postgres
    assert loc.url == "postgresql://gk@db:5433/gate?sslmode=require&connect_timeout=2"
    assert loc.password_file == "/etc/gk/pw"
    assert loc.describe() == "postgresql://gk@db:5433/gate"
    assert parse_store_url("postgres://db/gate", "/s").url == "postgresql://db/gate"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://gk:hunter2@db/gate", "password in the URL"),
        ("postgresql://gk:@db/gate", "password in the URL"),
        ("postgresql://gk@db/gate?password=hunter2", "password parameter"),
        ("postgresql://gk@db/gate?sslmode=require&PASSWORD=x", "password parameter"),
        ("postgresql://gk@db/gate?password_file=", "needs a file name"),
        ("mysql://gk@db/gate", "unknown scheme"),
        ("sqlite://relative.db", "sqlite:///absolute/path"),
        ("sqlite:////double", "sqlite:///absolute/path"),
        ("sqlite:///x.db?mode=ro", "sqlite:///absolute/path"),
        ("postgresql://db/gate\nhost=evil", "control characters"),
    ],
)
def test_bad_store_urls_are_refused_with_a_hint(url: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        parse_store_url(url, "/s")
    assert info.value.hint
    assert "hunter2" not in info.value.message


def test_the_password_file_must_be_private_and_not_empty(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    pw.chmod(0o600)
    assert read_password_file(str(pw)) == "s3cret"
    pw.chmod(0o640)  # its group may read it (a least-privilege keys-command user)
    assert read_password_file(str(pw)) == "s3cret"
    for loose in (0o644, 0o660, 0o604):
        pw.chmod(loose)
        with pytest.raises(InputError, match="is open to others") as info:
            read_password_file(str(pw))
        assert info.value.hint == f"chmod 600 {pw} (or 640, to let its group read it)"
    pw.chmod(0o600)
    pw.write_text("\n")
    with pytest.raises(InputError, match="is empty"):
        read_password_file(str(pw))
    with pytest.raises(InputError, match="cannot read"):
        read_password_file(str(tmp_path / "missing"))


def _policy(tmp_path: Path, store_line: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"server:\n  state_dir: state\n{store_line}\nrepositories: []\n")
    return path


def test_the_policy_names_a_bad_store_url_with_its_line(tmp_path: Path) -> None:
    path = _policy(tmp_path, "  store: postgresql://gk:pw@db/gate")
    with pytest.raises(PolicyError) as info:
        load_policy(path, cache_dir=tmp_path / "cache")
    text = "\n".join(info.value.lines())
    assert "config.yaml:3" in text and "password in the URL" in text


def test_the_policy_resolves_a_relative_store_path_once(tmp_path: Path) -> None:
    policy = load_policy(_policy(tmp_path, "  store: data/gk.db"), cache_dir=tmp_path / "cache")
    assert policy.server.store == os.path.join(tmp_path, "data", "gk.db")
    empty = load_policy(_policy(tmp_path, "  store:"), cache_dir=tmp_path / "cache")
    assert empty.server.store == ""
    pg = load_policy(
        _policy(tmp_path, "  store: postgresql://gk@db/gate"), cache_dir=tmp_path / "cache"
    )
    assert pg.server.store == "postgresql://gk@db/gate"
