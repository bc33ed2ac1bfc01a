#!/usr/bin/env bash
# The one command that installs what the tests need and runs the whole suite from a fresh
# checkout: ruff (lint and format), mypy, the import contracts of pyproject.toml
# (lint-imports: the layers of docs/design.md, no cycles), and pytest (including the end-to-end tests through a
# real OpenSSH sshd and the PostgreSQL store tests against a throwaway PostgreSQL server). Extra
# arguments go to pytest, e.g. `scripts/test.sh tests/test_store.py -x`.
# Then the interpreter-sensitive tests (the hot path, the standard-library stand-ins, the shell,
# the store, TOTP, the policy, command parsing) run again on every other supported Python found
# (3.10 to 3.13: on PATH as python3.X, or under pyenv), each in its own .venv-3.X.
# Environment: PYTHON (interpreter for a new .venv, default python3), PYTEST_WORKERS (default 2),
# OTHER_PYTHONS=0 skips the other interpreters. CI=true makes the sshd and PostgreSQL tests fail
# instead of skip when sshd or PostgreSQL is missing, and a supported Python that is not found
# a failure.
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
if ! have chromium && ! have chromium-browser; then
    missing+=(chromium) # tests/test_rollout.py renders the audit page in a real browser
fi
if ! have_postgres_server; then
    # The tests run their own clusters (initdb in a temporary directory, a free port); the
    # package's default cluster, if it makes and starts one, is never used.
    missing+=(postgresql)
fi
# An older Python is refused here, in one line: pip would spend minutes looking for
# releases of the test dependencies that fit it before it gave up.
if [[ ! -x "${VENV}/bin/python" ]] && have "${PYTHON}" &&
    ! "${PYTHON}" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' >/dev/null 2>&1; then
    printf 'error: %s is %s; gatekeeper needs Python 3.10 or newer (3.10 to 3.13 are tested).\n' \
        "${PYTHON}" "$("${PYTHON}" -V 2>&1)" >&2
    printf 'hint: PYTHON=python3.11 scripts/test.sh\n' >&2
    exit 2
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
        note "without PostgreSQL the postgres tests are skipped (they fail when CI=true);"
        note "without Chromium the HTML page's test is skipped (it fails when CI=true)."
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

# --- every other supported Python -------------------------------------------------------------
SUPPORTED_PYTHONS=(3.10 3.11 3.12 3.13)
SENSITIVE_TESTS=(
    tests/test_hotpath.py tests/test_lightstd.py tests/test_shell.py tests/test_store.py
    tests/test_totp.py tests/test_policy.py tests/test_compiled.py tests/test_sshcmd.py
    tests/test_decision.py
)
find_python() {
    local version=$1 candidate root
    # A pyenv shim is on PATH for every version pyenv has, but runs only the selected ones.
    if candidate=$(command -v "python${version}" 2>/dev/null) &&
        "${candidate}" -c 'import sys' >/dev/null 2>&1; then
        printf '%s\n' "${candidate}"
        return 0
    fi
    root=$(pyenv root 2>/dev/null || printf '%s' "${PYENV_ROOT:-${HOME}/.pyenv}")
    for candidate in "${root}"/versions/"${version}".*/bin/"python${version}"; do
        if [[ -x "${candidate}" ]]; then
            printf '%s\n' "${candidate}"
            return 0
        fi
    done
    return 1
}
default_version=$("${VENV}/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
other_venvs=()
if [[ "${OTHER_PYTHONS:-1}" != 0 ]]; then
    for version in "${SUPPORTED_PYTHONS[@]}"; do
        [[ "${version}" == "${default_version}" ]] && continue
        if ! interpreter=$(find_python "${version}"); then
            if [[ "${CI:-}" == true ]]; then
                failed+=("Python ${version} not found")
            else
                note "Python ${version} not found: its tests are skipped (they fail when CI=true)."
            fi
            continue
        fi
        other="${VENV}-${version}"
        if [[ ! -x "${other}/bin/python" ]]; then
            say "creating ${other} (${interpreter})"
            "${interpreter}" -m venv "${other}"
        fi
        other_venvs+=("${other}")
    done
    # Installed side by side: pip spends its time waiting on the network, not the CPU.
    pids=()
    for other in "${other_venvs[@]}"; do
        "${other}/bin/python" -m pip install -q -e '.[test]' >"${other}/install.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            cat "${other_venvs[$i]}/install.log" >&2
            failed+=("install into ${other_venvs[$i]}")
        fi
    done
fi

step "ruff check" "${VENV}/bin/ruff" check .
step "ruff format --check" "${VENV}/bin/ruff" format --check .
step "mypy" "${VENV}/bin/mypy"
step "import contracts (lint-imports)" "${VENV}/bin/lint-imports"
step "pytest" "${VENV}/bin/python" -m pytest -q -n "${PYTEST_WORKERS}" "$@"
if [[ $# -eq 0 ]]; then
    for other in "${other_venvs[@]}"; do
        step "pytest on $("${other}/bin/python" -V)" \
            "${other}/bin/python" -m pytest -q -n "${PYTEST_WORKERS}" "${SENSITIVE_TESTS[@]}"
    done
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
say "all checks passed"
