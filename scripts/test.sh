#!/usr/bin/env bash
# The one command that installs what the tests need and runs the whole suite from a fresh
# checkout: ruff (lint and format), mypy, and pytest (including the end-to-end tests through a
# real OpenSSH sshd and the PostgreSQL store tests against a throwaway PostgreSQL server). Extra
# arguments go to pytest, e.g. `scripts/test.sh tests/test_store.py -x`.
# Environment: PYTHON (interpreter for a new .venv, default python3), PYTEST_WORKERS (default 2),
# CI=true makes the sshd and PostgreSQL tests fail instead of skip when sshd or PostgreSQL is
# missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
PYTEST_WORKERS=${PYTEST_WORKERS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '==> %s\n' "$*"; }
note() { printf 'note: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
# PostgreSQL's server programs: on PATH, or where Debian puts them (tests/pgserver.py looks there).
have_postgres_server() {
    have initdb || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

# --- system packages: OpenSSH, git, PostgreSQL, a Python that can make a venv ---------------
missing=()
if [[ ! -x /usr/sbin/sshd ]] && ! have sshd; then
    missing+=(openssh-server)
fi
if ! have ssh || ! have ssh-keygen; then
    missing+=(openssh-client)
fi
if ! have git; then
    missing+=(git)
fi
if ! have shellcheck; then
    missing+=(shellcheck) # tests/test_install.py lints scripts/install.sh
fi
if ! have_postgres_server; then
    # The tests run their own clusters (initdb in a temporary directory, a free port); the
    # package's default cluster, if it makes and starts one, is never used.
    missing+=(postgresql)
fi
if [[ ! -x "${VENV}/bin/python" ]]; then
    if ! have "${PYTHON}"; then
        missing+=(python3 python3-venv)
        PYTHON=python3
    elif ! "${PYTHON}" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        missing+=(python3-venv)
    fi
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ ${EUID} -eq 0 ]] && have apt-get; then
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        note "missing: ${missing[*]} (install them as root, e.g. with apt-get)."
        note "without sshd the end-to-end tests are skipped (they fail when CI=true);"
        note "without PostgreSQL the postgres tests are skipped (they fail when CI=true)."
    fi
fi

# --- the project in its virtual environment -----------------------------------------------------
if [[ ! -x "${VENV}/bin/python" ]]; then
    say "creating ${VENV}"
    "${PYTHON}" -m venv "${VENV}"
fi
say "installing the project and its test dependencies"
"${VENV}/bin/python" -m pip install -q -e '.[test]'

# --- the checks: run them all, then fail if any failed ------------------------------------------
failed=()
step() {
    local name=$1
    shift
    say "${name}"
    if "$@"; then
        return 0
    fi
    failed+=("${name}")
}

step "ruff check" "${VENV}/bin/ruff" check .
step "ruff format --check" "${VENV}/bin/ruff" format --check .
step "mypy" "${VENV}/bin/mypy"
step "pytest" "${VENV}/bin/python" -m pytest -q -n "${PYTEST_WORKERS}" "$@"

if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
say "all checks passed"
