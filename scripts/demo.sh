#!/usr/bin/env bash
# The one command to try gatekeeper: install it into .venv, set up a demo in demo/
# (policy from config/example.yaml, a store, a user "demo" with a fresh SSH key, a
# repository "hello"), and start the embedded SSH server on 127.0.0.1:2222.
# Re-running reuses what exists. Environment: PYTHON (default python3), PORT (default 2222),
# DEMO_DIR (default demo/ in the checkout).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
PYTHON=${PYTHON:-python3}
PORT=${PORT:-2222}
demo=${DEMO_DIR:-${root}/demo}
# The key and known_hosts as the commands below spell them: relative to the checkout.
shown=${demo#"${root}/"}
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '==> %s\n' "$*"; }

if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv"
    "${PYTHON}" -m venv .venv
fi
# An editable install: a rerun (after a git pull too) runs the checkout's code as it is,
# so install only what is missing.
if [[ ! -x .venv/bin/gatekeeper ]] || ! .venv/bin/python -c 'import gatekeeper.cli.main' 2>/dev/null; then
    say "installing gatekeeper into .venv"
    .venv/bin/python -m pip install -q -e .
fi

gk() { .venv/bin/gatekeeper --config "${demo}/config.yaml" "$@"; }

mkdir -p "${demo}"
# Written on every run, so a rerun with another PORT serves (and its messages name) that port.
.venv/bin/python - "${root}/config/example.yaml" "${demo}/config.yaml" "${PORT}" <<'PY'
import sys
import yaml

source, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
policy = yaml.safe_load(open(source))
policy["server"].update(
    host="127.0.0.1", port=port, user="git", repositories="repositories",
    state_dir="state", listen_host="127.0.0.1", listen_port=port,
)
# The demo user joins a team that needs enrolled 2FA for the demo repository.
policy["teams"] = {"demo": {"members": ["demo"], "require_2fa": "enrolled"}}
policy["repositories"] = [{"match": "hello", "read": ["demo"], "write": ["demo"]}]
header = "# gatekeeper demo policy (made by scripts/demo.sh from config/example.yaml)\n"
text = header + yaml.safe_dump(policy, sort_keys=False)
try:
    with open(target) as fh:
        unchanged = fh.read() == text
except FileNotFoundError:
    unchanged = False
if not unchanged:
    print(f"==> writing {target} from config/example.yaml (port {port})")
    with open(target, "w") as fh:
        fh.write(text)
PY

if [[ ! -f "${demo}/state/gatekeeper.db" ]]; then
    gk init
fi
if [[ ! -f "${demo}/demo_key" ]]; then
    ssh-keygen -q -t ed25519 -N '' -C demo@gatekeeper-demo -f "${demo}/demo_key"
fi
if ! gk user list --json | grep -q '"user": "demo"'; then
    gk user add demo
    gk key add demo "${demo}/demo_key.pub"
fi
if [[ ! -d "${demo}/repositories/hello.git" ]]; then
    say "creating repository hello"
    seed=$(mktemp -d)
    git init -q -b main "${seed}"
    printf '# hello\n\nA repository behind gatekeeper.\n' >"${seed}/README.md"
    git -C "${seed}" add README.md
    git -C "${seed}" -c user.name=demo -c user.email=demo@example.invalid commit -qm "hello"
    git init -q --bare -b main "${demo}/repositories/hello.git"
    git -C "${demo}/repositories/hello.git" config daemon.uploadarch true
    git -C "${seed}" push -q "${demo}/repositories/hello.git" main
    rm -rf "${seed}"
fi

ssh_opts="-i ${shown}/demo_key -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=${shown}/known_hosts"
cat <<EOF

Try, in another terminal, from ${root}:
  export GIT_SSH_COMMAND='ssh ${ssh_opts}'
  alias ssh="\$GIT_SSH_COMMAND"   # the commands gatekeeper prints then use the demo key
  git clone ssh://git@127.0.0.1:${PORT}/hello.git     # refused: demo has not enrolled
  ssh -p ${PORT} git@127.0.0.1 2fa enroll            # scan the QR code
  ssh -p ${PORT} git@127.0.0.1 2fa confirm CODE
  git clone ssh://git@127.0.0.1:${PORT}/hello.git     # allowed
  ssh -p ${PORT} git@127.0.0.1                       # who you are, what you can reach
Admin side: .venv/bin/gatekeeper --config ${shown}/config.yaml 2fa status

EOF
exec .venv/bin/gatekeeper --config "${demo}/config.yaml" serve --host 127.0.0.1 --port "${PORT}"
