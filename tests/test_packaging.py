"""What the wheel ships: every package of the tree, and the programs git and sshd run
(the top-level hooks/ folder) as package data that gatekeeper/programs.py finds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from gatekeeper import programs

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("pre-receive.tmpl", "fetch-gate.sh", "keys-command.sh")


def _project() -> dict[str, object]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser, as pip carries it
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    data: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data


def test_the_package_list_names_every_package_in_the_tree() -> None:
    setuptools = _project()["tool"]["setuptools"]  # type: ignore[index]
    in_tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "gatekeeper").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == in_tree | {"gatekeeper.programs"}
    assert setuptools["package-dir"] == {"gatekeeper.programs": "hooks"}


def test_the_programs_are_read_from_hooks_in_a_checkout() -> None:
    for name in PROGRAMS:
        assert Path(programs.path(name)) == ROOT / "hooks" / name
        assert programs.text(name) == (ROOT / "hooks" / name).read_text()


def test_the_wheel_ships_the_programs_where_an_installed_gatekeeper_finds_them(
    tmp_path: Path,
) -> None:
    # What scripts/install.sh builds from, built as it builds it (pip wheel), from a copy:
    # setuptools writes build/ beside the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("gatekeeper", "hooks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
    subprocess.run([*pip, "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("gatekeeper-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in PROGRAMS:
        assert f"gatekeeper/programs/{name}" in names
    assert "gatekeeper/programs.py" in names
    assert not any(n.startswith("gatekeeper/resources/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "from gatekeeper import programs; "
        "print(programs.path('fetch-gate.sh')); print(programs.path('pre-receive.tmpl'))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == [
        str(site / "gatekeeper" / "programs" / "fetch-gate.sh"),
        str(site / "gatekeeper" / "programs" / "pre-receive.tmpl"),
    ]


def test_the_test_command_refuses_a_python_too_old_in_one_line(tmp_path: Path) -> None:
    """An older interpreter is named and refused before a venv is made: pip, left to it,
    searched for minutes for dependency releases that would fit it."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    old = tmp_path / "python3.9"
    old.write_text(
        "#!/bin/sh\n"
        'case "$1" in -V) echo "Python 3.9.18" ;; *) '
        f'exec {sys.executable} -c "import sys; sys.exit(1)" ;; esac\n'
    )
    old.chmod(0o755)
    result = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "test.sh")],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON": str(old), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-2:] == [
        f"error: {old} is Python 3.9.18; gatekeeper needs Python 3.10 or newer"
        " (3.10 to 3.13 are tested).",
        "hint: PYTHON=python3.11 scripts/test.sh",
    ]
    assert not (tmp_path / ".venv").exists()
