#!/usr/bin/env bash
# Install gatekeeper on a git box behind OpenSSH, idempotently.
#
#   scripts/install.sh [--mode authorized-keys|keys-command] [--user git] [--prefix DIR]
#                      [--config FILE] [--repos DIR] [--state-dir DIR] [--host NAME]
#                      [--issuer NAME] [--ssh-port N] [--extra-sshd-option 'Keyword value']...
#                      [--store URL [--password-file FILE]] [--server-key FILE]
#                      [--root DIR] [--dry-run] [--uninstall [--purge]]
#
# What it does (each step only when something is missing or out of date):
#   - creates the git system user (login shell /bin/sh, no password, not locked);
#   - a virtualenv in the prefix with gatekeeper installed (non-editable) from this checkout,
#     with its postgres extra (psycopg) when the store is PostgreSQL;
#   - with --password-file, the store's password file (the git user's, 0600);
#   - the policy file from config/example.yaml (server.user, repositories, state_dir, host,
#     port, --store and two_factor.issuer filled in) if there is none: an existing one is
#     never touched;
#   - the state directory (owned by the git user, 0700), with --server-key the first
#     front-end's server key in it, and `gatekeeper init` as the git user;
#   - the git hooks in every repository under the root, if this gatekeeper has `hooks`;
#   - in authorized-keys mode, the git user's ~/.ssh/authorized_keys with gatekeeper's block;
#   - an sshd_config.d drop-in (Match User <git>) for the chosen mode, validated with
#     `sshd -t` and rolled back if sshd rejects it, then sshd is reloaded (it is never
#     started: when it is not running, install.sh says how to start it on this box);
#   - PREFIX/install.conf: the mode, and in authorized-keys mode the file sshd reads. A later
#     run without --mode keeps that mode; the gatekeeper CLI reads it to rewrite the file
#     after every key change.
# Everything it created is listed in a manifest (PREFIX/install-manifest); --uninstall removes
# exactly that (the state directory and a policy edited since only with --purge). Running it
# again changes nothing and says so.
#
# A second front-end on a shared PostgreSQL store: --store with the same URL as the first,
# --password-file with the database password, --server-key with a copy of the first
# front-end's STATE_DIR/server.key (it encrypts the TOTP secrets), and --mode keys-command on
# every front-end (it finds a key added on another one in the database). The database itself
# is never dropped, not even by --uninstall --purge.
#
# --root DIR is a staging root: every path above lives under DIR, no system user is created
# (the user must exist), sshd is not reloaded, and DIR/etc/ssh/sshd_config is written (if
# missing) as a complete configuration for an sshd on 127.0.0.1:--ssh-port (default 2222).
set -euo pipefail
umask 022

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
PROG=install.sh
DROPIN_NAME=10-gatekeeper.conf
MAX_STARTUPS=100:30:200
# Where authorized-keys mode gets slower than keys-command mode: sshd parses the file up to the
# key, twice per connection (docs/install.md, "Which mode"; bench/bench.py --only authkeys measures it).
AK_SLOW_KEYS=10000
AK_SLOW_NOTE="on a 2-core test machine the newest of 10,000 keys added about 0.1 s to every git command, of 100,000 about 1 s"
MANIFEST_NAME=install-manifest
# shellcheck disable=SC2016 # the backquotes are literal: the marker line gatekeeper writes
AK_BEGIN='# BEGIN gatekeeper: managed by `gatekeeper authorized-keys`; edits here are lost'
AK_END='# END gatekeeper'

# -- options ----------------------------------------------------------------------------------

MODE=   # as asked; else as install.conf recorded; else authorized-keys
GIT_USER=git
PREFIX=/opt/gatekeeper
CONFIG=/etc/gatekeeper/config.yaml
REPOS=/srv/git
STATE=/var/lib/gatekeeper
HOST=
HOST_GIVEN=0
ISSUER=
ISSUER_GIVEN=0
SSH_PORT=
ROOT=
PYTHON=
SOURCE=$(dirname "${SCRIPT_DIR}")
SSHD=
DRY_RUN=0
UNINSTALL=0
PURGE=0
EXTRA_OPTIONS=()
STORE=
PASSWORD_FILE=
SERVER_KEY=
DEFAULT_PASSWORD_FILE=/etc/gatekeeper/db.password

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    cat <<'EOF'
Options:
  --mode MODE              authorized-keys or keys-command (AuthorizedKeysCommand); default: the
                           mode the last run recorded in PREFIX/install.conf, else
                           authorized-keys. A different mode switches the installation over
  --user NAME              the git account (default git)
  --prefix DIR             the virtualenv (default /opt/gatekeeper)
  --config FILE            the policy file (default /etc/gatekeeper/config.yaml)
  --repos DIR              repositories root for a new policy file (default /srv/git)
  --state-dir DIR          state directory for a new policy file (default /var/lib/gatekeeper)
  --host NAME              host name users connect to, for a new policy file (default: hostname -f;
                           a warning when users could not reach it by that name)
  --issuer NAME            the name authenticator apps show, for a new policy file (default: the
                           host name)
  --ssh-port N             port users connect to, for a new policy file (default 22; 2222 with
                           --root, where the staged sshd listens on 127.0.0.1:N)
  --extra-sshd-option LINE an extra line for the Match block, e.g. 'MaxSessions 4' (repeatable)
  --store URL              server.store for a new policy file, e.g.
                           postgresql://gatekeeper@db/gk (never a password in it; default:
                           the SQLite file in the state directory)
  --password-file FILE     with a PostgreSQL --store: install FILE (the database password) as
                           the URL's password_file=, or /etc/gatekeeper/db.password (added to
                           the URL), the git user's, 0600; a different one there is replaced
  --server-key FILE        put this server key (another front-end's STATE_DIR/server.key) in
                           the state directory before `gatekeeper init`; never replaces a
                           different one
  --python PATH            interpreter for the virtualenv (default /usr/bin/python3)
  --source DIR             the gatekeeper checkout to install (default: this script's checkout)
  --sshd PATH              the sshd binary used to validate (default /usr/sbin/sshd)
  --root DIR               staging root: everything lives under DIR
  --dry-run                print every change without making it
  --uninstall              remove what the install created (keeps the state directory and an
                           edited policy file)
  --purge                  with --uninstall: also the state directory, the policy file and the
                           git user if the install created them
EOF
}

die() {
    printf '%s: error: %s\n' "${PROG}" "$*" >&2
    exit 1
}

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    opt=$1
    case ${opt} in
    --*=*)
        set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
        continue
        ;;
    esac
    case ${opt} in
    --mode) need_value "$@"; MODE=$2; shift ;;
    --user) need_value "$@"; GIT_USER=$2; shift ;;
    --prefix) need_value "$@"; PREFIX=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --repos) need_value "$@"; REPOS=$2; shift ;;
    --state-dir) need_value "$@"; STATE=$2; shift ;;
    --host) need_value "$@"; HOST=$2; HOST_GIVEN=1; shift ;;
    --issuer) need_value "$@"; ISSUER=$2; ISSUER_GIVEN=1; shift ;;
    --ssh-port) need_value "$@"; SSH_PORT=$2; shift ;;
    --root) need_value "$@"; ROOT=$2; shift ;;
    --python) need_value "$@"; PYTHON=$2; shift ;;
    --source) need_value "$@"; SOURCE=$2; shift ;;
    --sshd) need_value "$@"; SSHD=$2; shift ;;
    --extra-sshd-option) need_value "$@"; EXTRA_OPTIONS+=("$2"); shift ;;
    --store) need_value "$@"; STORE=$2; shift ;;
    --password-file) need_value "$@"; PASSWORD_FILE=$2; shift ;;
    --server-key) need_value "$@"; SERVER_KEY=$2; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: ${opt} (see --help)" ;;
    esac
    shift
done

# -- checking the options ---------------------------------------------------------------------

# Paths end up in authorized_keys command="..." lines and in sshd_config: letters, digits and
# ./_+- only (gatekeeper refuses anything else there too), absolute, no "." or ".." components.
check_path() {
    local name=$1 value=$2
    [[ ${value} =~ ^/[A-Za-z0-9_./+-]*$ ]] ||
        die "${name} ${value@Q}: use an absolute path of letters, digits and ./_+- only"
    [[ /${value}/ != */../* && /${value}/ != */./* ]] ||
        die "${name} ${value@Q}: no '.' or '..' components, please"
}

case ${MODE} in
"" | authorized-keys | keys-command) ;;
*) die "--mode must be authorized-keys or keys-command, not ${MODE@Q}" ;;
esac
[[ ${GIT_USER} =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
    die "--user ${GIT_USER@Q}: a system user name (lower-case letters, digits, _ and -)"
for pair in "--prefix:${PREFIX}" "--config:${CONFIG}" "--repos:${REPOS}" "--state-dir:${STATE}"; do
    check_path "${pair%%:*}" "${pair#*:}"
done
[[ ${PREFIX} != / && ${CONFIG} != */ ]] || die "--prefix and --config need real paths"
if [[ -n ${ROOT} ]]; then
    [[ -d ${ROOT} ]] || die "--root ${ROOT@Q} is not a directory (create it first)"
    ROOT=$(cd "${ROOT}" && pwd -P)
    [[ ${ROOT} == / ]] && ROOT=
    [[ -z ${ROOT} ]] || check_path --root "${ROOT}"
fi
if [[ -n ${SSH_PORT} ]]; then
    if ! [[ ${SSH_PORT} =~ ^[0-9]{1,5}$ ]] || ((SSH_PORT < 1 || SSH_PORT > 65535)); then
        die "--ssh-port ${SSH_PORT@Q} is not a port number"
    fi
else
    SSH_PORT=22
    [[ -z ${ROOT} ]] || SSH_PORT=2222
fi
if [[ -z ${HOST} ]]; then
    HOST=$(hostname -f 2>/dev/null || hostname 2>/dev/null || echo localhost)
    [[ -z ${ROOT} ]] || HOST=127.0.0.1
fi
[[ ${HOST} =~ ^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$ ]] || die "--host ${HOST@Q}: a host name or address"
# The issuer goes into the policy (YAML, single-quoted) and the otpauth:// URI, where ':'
# separates it from the account name.
ISSUER_CHARS='^[A-Za-z0-9][A-Za-z0-9 ._&()+-]{0,63}$'
[[ -z ${ISSUER} || ${ISSUER} =~ ${ISSUER_CHARS} ]] ||
    die "--issuer ${ISSUER@Q}: up to 64 letters, digits, spaces and ._&()+-"
[[ -n ${ISSUER} ]] || ISSUER=${HOST}
for line in "${EXTRA_OPTIONS[@]}"; do
    [[ ${line} =~ ^[A-Za-z][A-Za-z0-9]*[[:blank:]]+[^[:cntrl:]]+$ ]] ||
        die "--extra-sshd-option ${line@Q}: one 'Keyword value' line"
    case ${line%%[[:blank:]]*} in
    [Ff][Oo][Rr][Cc][Ee][Cc][Oo][Mm][Mm][Aa][Nn][Dd])
        die "ForceCommand would override gatekeeper's per-key command= (see README)" ;;
    [Mm][Aa][Tt][Cc][Hh] | [Ii][Nn][Cc][Ll][Uu][Dd][Ee])
        die "--extra-sshd-option ${line@Q}: Match and Include are not options for a Match block" ;;
    esac
done
((PURGE == 0 || UNINSTALL == 1)) || die "--purge goes with --uninstall"
# The URL goes into the policy file (YAML) and sed: URL characters only. Not echoed here (it
# might hold a password); gatekeeper's own parser checks the rest below.
STORE_CHARS='^[][A-Za-z0-9._~:/?@=&%+,;-]+$'
[[ -z ${STORE} || ${STORE} =~ ${STORE_CHARS} ]] ||
    die "--store: use only letters, digits and ._~:/?@=&%+,;[]- in the URL (percent-encode the rest)"
if [[ -n ${PASSWORD_FILE} ]]; then
    [[ -n ${STORE} ]] || die "--password-file goes with --store"
    [[ -f ${PASSWORD_FILE} && -r ${PASSWORD_FILE} ]] ||
        die "--password-file ${PASSWORD_FILE@Q}: no such file (a file holding only the database password)"
    first_line=
    IFS= read -r first_line <"${PASSWORD_FILE}" || true
    [[ -n ${first_line%$'\r'} ]] || die "--password-file ${PASSWORD_FILE@Q}: its first line is empty (it holds the password)"
    unset first_line
fi
if [[ -n ${SERVER_KEY} ]]; then
    [[ -f ${SERVER_KEY} && -r ${SERVER_KEY} ]] ||
        die "--server-key ${SERVER_KEY@Q}: no such file (copy STATE_DIR/server.key from the first front-end)"
    [[ $(stat -c '%s' "${SERVER_KEY}") == 32 ]] ||
        die "--server-key ${SERVER_KEY@Q}: not a server key (gatekeeper init writes 32 bytes)"
fi
[[ ${EUID} -eq 0 ]] || die "run it as root (e.g. sudo ${BASH_SOURCE[0]} ...); try --root DIR --dry-run first"

if [[ -z ${SSHD} ]]; then
    for candidate in /usr/sbin/sshd /usr/local/sbin/sshd "$(command -v sshd || true)"; do
        if [[ -n ${candidate} && -x ${candidate} ]]; then
            SSHD=${candidate}
            break
        fi
    done
fi
[[ -n ${SSHD} && -x ${SSHD} ]] || die "sshd not found (install openssh-server, or pass --sshd PATH)"
# Where everything is (under the staging root, if any).
P_PREFIX=${ROOT}${PREFIX}
P_CONFIG=${ROOT}${CONFIG}
P_REPOS=${ROOT}${REPOS}
P_STATE=${ROOT}${STATE}
SSH_DIR=${ROOT}/etc/ssh
MAIN_CFG=${SSH_DIR}/sshd_config
DROPIN_DIR=${SSH_DIR}/sshd_config.d
DROPIN=${DROPIN_DIR}/${DROPIN_NAME}
MANIFEST=${P_PREFIX}/${MANIFEST_NAME}
INSTALL_CONF=${P_PREFIX}/install.conf
GK=${P_PREFIX}/bin/gatekeeper
SAFE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# -- output and bookkeeping -------------------------------------------------------------------

CHANGES=0
WARNINGS=()
declare -A PLANNED=()   # dry run: directories that would have been created
PENDING_MANIFEST=()     # entries recorded before the prefix (home of the manifest) exists

say() { printf '%s\n' "$*"; }
dry() { ((DRY_RUN == 1)); }
ok() { printf '  ok       %s\n' "$*"; }
change() {
    CHANGES=$((CHANGES + 1))
    if dry; then
        printf '  would    %s\n' "$*"
    else
        printf '  change   %s\n' "$*"
    fi
}
warn() {
    WARNINGS+=("$*")
    printf '  WARNING  %s\n' "$*" >&2
}

# The lines gatekeeper writes need `restrict` (OpenSSH 7.2); security keys need 8.2, and
# keys that must prove their PIN need `verify-required` (8.4), without which sshd would
# refuse those lines (fail closed: such a key cannot log in).
SSHD_VERSION=$({ "${SSHD}" -V 2>&1 || true; } | sed -n 's/.*OpenSSH_\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n 1)
if [[ -n ${SSHD_VERSION} ]]; then
    read -r sshd_major sshd_minor <<<"${SSHD_VERSION}"
    if ((sshd_major * 100 + sshd_minor < 702)); then
        die "OpenSSH ${sshd_major}.${sshd_minor} is too old: gatekeeper's key lines need 7.2 (restrict)"
    elif ((sshd_major * 100 + sshd_minor < 804)); then
        warn "OpenSSH ${sshd_major}.${sshd_minor}: security keys need 8.4 (verify-required); keys added with --verify-required cannot log in here, and the security-key levels cannot be met behind this sshd"
    fi
else
    warn "cannot tell ${SSHD}'s OpenSSH version; security keys need 8.4 or later"
fi

manifest_add() {
    dry && return 0
    local entry="$*"
    if [[ ! -d ${P_PREFIX} ]]; then
        PENDING_MANIFEST+=("${entry}")
        return 0
    fi
    if [[ ! -f ${MANIFEST} ]]; then
        printf '# gatekeeper install.sh manifest: what the install created (KIND PATH [DATA])\n' >"${MANIFEST}"
        chmod 0644 "${MANIFEST}"
    fi
    local pending
    for pending in "${PENDING_MANIFEST[@]}" "${entry}"; do
        grep -qxF -- "${pending}" "${MANIFEST}" || printf '%s\n' "${pending}" >>"${MANIFEST}"
    done
    PENDING_MANIFEST=()
}

manifest_del() {   # KIND PATH: drop that entry
    dry && return 0
    local tmp=${MANIFEST}.new
    awk -v k="$1" -v p="$2" '!($1 == k && $2 == p)' "${MANIFEST}" >"${tmp}"
    chmod 0644 "${tmp}"
    mv -f "${tmp}" "${MANIFEST}"
}

manifest_has() {
    [[ -f ${MANIFEST} ]] && grep -qxF -- "$*" "${MANIFEST}"
}

# The DATA of the first manifest entry "KIND PATH DATA", or nothing.
manifest_data() {
    [[ -f ${MANIFEST} ]] || return 0
    awk -v k="$1" -v p="$2" '$1 == k && $2 == p { print $3; exit }' "${MANIFEST}"
}

manifest_set() {   # KIND PATH DATA: replace that entry's DATA
    dry && return 0
    local tmp=${MANIFEST}.new
    awk -v k="$1" -v p="$2" '!($1 == k && $2 == p)' "${MANIFEST}" >"${tmp}"
    printf '%s %s %s\n' "$1" "$2" "$3" >>"${tmp}"
    chmod 0644 "${tmp}"
    mv -f "${tmp}" "${MANIFEST}"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

mode_of() { stat -c '%a' "$1"; }
owner_of() { stat -c '%U:%G' "$1"; }

# Create a directory (and its missing parents, root:root 0755), recorded in the manifest.
ensure_dir() {
    local path=$1 owner=$2 mode=$3
    if [[ -d ${path} || -n ${PLANNED[${path}]:-} ]]; then
        return 0
    fi
    [[ ! -e ${path} ]] || die "${path} exists and is not a directory"
    ensure_dir "$(dirname "${path}")" root:root 755
    change "create directory ${path} (${owner} ${mode})"
    if dry; then
        PLANNED[${path}]=1
        return 0
    fi
    mkdir -m "${mode}" "${path}"
    chown "${owner}" "${path}"
    manifest_add dir "${path}"
}

# Write CONTENT (from stdin) to PATH atomically, with owner and mode.
write_file() {
    local path=$1 owner=$2 mode=$3 tmp
    tmp=$(dirname "${path}")/.$(basename "${path}").gatekeeper-new.$$
    cat >"${tmp}"
    chown "${owner}" "${tmp}"
    chmod "${mode}" "${tmp}"
    mv -f "${tmp}" "${path}"
}

# Run a command as the git user, with a clean environment (no HOME: nothing written there).
as_git() {
    (cd / && runuser -u "${GIT_USER}" -- env -i PATH="${SAFE_PATH}" LC_ALL=C.UTF-8 "$@")
}

# Run the installed gatekeeper CLI as root without touching the store (policy reads only).
gk_root() {
    env -i PATH="${SAFE_PATH}" LC_ALL=C.UTF-8 "${GK}" "$@"
}

has_hooks_command() {
    [[ -x ${GK} ]] && gk_root hooks --help >/dev/null 2>&1
}

# sshd runs the command and checks that it and every directory above it are root-owned and
# not writable by group or others (OpenSSH's safe_path()).
unsafe_command_reason() {
    local path dir
    path=$(readlink -m -- "$1")   # the real path, even if it does not exist yet
    if [[ -e ${path} ]]; then
        [[ $(stat -c '%u' "${path}") == 0 && $((8#$(mode_of "${path}") & 8#022)) == 0 ]] ||
            { echo "bad ownership or modes for ${path}"; return 0; }
    fi
    dir=$(dirname "${path}")
    while :; do
        if [[ -e ${dir} ]]; then
            if [[ $(stat -c '%u' "${dir}") != 0 || $((8#$(mode_of "${dir}") & 8#022)) != 0 ]]; then
                echo "directory ${dir} is not root-owned or is writable by group or others"
                return 0
            fi
        fi
        [[ ${dir} == / || ${dir} == . ]] && break
        dir=$(dirname "${dir}")
    done
}

# Why users could not reach HOST by that name, or nothing. A dotted name that does not resolve
# here is not judged: a git box often cannot resolve the name its users reach it by.
unreachable_host_reason() {
    local host=$1 addrs
    if [[ ${host} =~ ^[0-9.]+$ ]]; then
        addrs=${host}
    else
        addrs=$(timeout 5 getent ahosts "${host}" 2>/dev/null | awk '{ print $1 }' | LC_ALL=C sort -u) || true
    fi
    if [[ ${host} == localhost || ${host} == localhost.* ]]; then
        echo "localhost is every machine's own name for itself"
    elif [[ -n ${addrs} ]] && ! grep -qvE '^(127\.|::1$)' <<<"${addrs}"; then
        echo "to other machines ${host} is not this one: it resolves only to a loopback address ($(paste -sd' ' <<<"${addrs}"))"
    elif [[ ${host} != *.* ]]; then
        echo "${host} has no domain, and other machines rarely resolve a bare host name"
    fi
}

# -- the git user -----------------------------------------------------------------------------

user_home() {
    local home
    home=$(getent passwd "${GIT_USER}" | cut -d: -f6)
    if [[ -n ${ROOT} && ${home} != "${ROOT}"/* ]]; then
        home=${ROOT}${home}
    fi
    printf '%s\n' "${home}"
}

# -- uninstall --------------------------------------------------------------------------------

remove_path() {   # PATH DESCRIPTION
    change "remove $2 $1"
    dry || rm -rf -- "$1"
}

# -- sshd: its privilege separation directory, its pid, reloading it ----------------------------

systemd_runs() {   # systemctl alone is no proof: containers and chroots have it, unbooted
    [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1
}

# sshd -t checks nothing until sshd's privilege separation directory exists. On a box without
# systemd it is made by sshd's init script, so it is missing on a fresh /run until sshd was
# first started there. sshd names it; it is sshd's (root, 0755), not listed in the manifest.
ensure_privsep_dir() {
    local out dir
    out=$("${SSHD}" -t -f "${MAIN_CFG}" 2>&1) && return 0
    # (sshd ends its fatal message with \r\n)
    dir=$(tr -d '\r' <<<"${out}" | sed -n 's/^Missing privilege separation directory: \(\/[^[:space:]]*\)$/\1/p' | head -n1)
    [[ -n ${dir} && ! -e ${dir} && -z ${PLANNED[${dir}]:-} ]] || return 0
    change "create sshd's privilege separation directory ${dir} (root 0755), which sshd -t needs"
    if dry; then
        PLANNED[${dir}]=1
    else
        mkdir -m 0755 "${dir}"
    fi
}

# The command that starts sshd on this box, for the admin to run.
sshd_start_command() {
    if systemd_runs; then
        if systemctl cat ssh.service >/dev/null 2>&1; then
            echo "systemctl start ssh"
        else
            echo "systemctl start sshd"
        fi
    elif command -v service >/dev/null 2>&1 && [[ -x /etc/init.d/ssh ]]; then
        echo "service ssh start"
    elif command -v service >/dev/null 2>&1 && [[ -x /etc/init.d/sshd ]]; then
        echo "service sshd start"
    else
        echo "${SSHD}$([[ ${MAIN_CFG} == /etc/ssh/sshd_config ]] || echo " -f ${MAIN_CFG}")"
    fi
}

# Is PID an sshd that reads this box's sshd_config? Not one in another mount namespace (a
# container reads another /etc/ssh), not a test or staging sshd started with another -f.
is_our_sshd() {
    local pid=$1 comm cmdline cfg=/etc/ssh/sshd_config
    [[ ${pid} =~ ^[1-9][0-9]*$ && -r /proc/${pid}/comm ]] || return 1
    read -r comm <"/proc/${pid}/comm" 2>/dev/null || return 1
    [[ ${comm} == sshd ]] || return 1
    [[ $(readlink "/proc/${pid}/ns/mnt" 2>/dev/null) == "$(readlink /proc/$$/ns/mnt)" ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null) || return 1
    if [[ ${cmdline} =~ [[:space:]]-f[[:space:]]*([^[:space:]]+) ]]; then
        cfg=${BASH_REMATCH[1]}
    fi
    [[ $(readlink -m -- "${cfg}") == "$(readlink -m -- "${MAIN_CFG}")" ]]
}

# sshd listeners reading this box's configuration: sshd processes whose parent is not sshd
# (per-connection sshd processes are the listener's children).
our_sshd_listeners() {
    local dir pid ppid comm rest
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        read -r comm <"${dir}/comm" 2>/dev/null || continue
        [[ ${comm} == sshd ]] || continue
        read -r _ _ _ ppid rest <"${dir}/stat" 2>/dev/null || continue
        read -r comm <"/proc/${ppid}/comm" 2>/dev/null || comm=
        [[ ${comm} != sshd ]] || continue
        is_our_sshd "${pid}" && printf '%s\n' "${pid}"
    done
    return 0
}

# The pid of the running sshd: from the pid file its configuration names. sshd removes that
# file on SIGHUP and writes it again once it listens, so a listener without a pid file gets
# a moment to write it, and is taken as it is if it is the only one. Nothing when sshd does
# not run.
sshd_pid() {
    local file pid i
    local -a listeners=()
    file=$("${SSHD}" -T -f "${MAIN_CFG}" 2>/dev/null | awk '$1 == "pidfile" { print $2; exit }')
    file=${file:-/run/sshd.pid}
    for ((i = 0; i < 30; i++)); do
        pid=
        [[ -r ${file} ]] && { read -r pid <"${file}" 2>/dev/null || true; }
        if is_our_sshd "${pid}"; then
            printf '%s\n' "${pid}"
            return 0
        fi
        ((i > 0)) || mapfile -t listeners < <(our_sshd_listeners)
        ((${#listeners[@]} > 0)) || return 1
        sleep 0.1
    done
    if ((${#listeners[@]} == 1)) && is_our_sshd "${listeners[0]}"; then
        printf '%s\n' "${listeners[0]}"
        return 0
    fi
    return 1
}

reload_sshd() {   # [uninstall]
    if [[ -n ${ROOT} ]]; then
        say "  note     staging root: sshd not reloaded (start it with: ${SSHD} -D -e -f ${MAIN_CFG})"
        return 0
    fi
    dry && { say "  would    reload sshd"; return 0; }
    local unit pid i
    if systemd_runs; then
        for unit in ssh sshd; do
            if systemctl reload "${unit}" 2>/dev/null; then
                say "  change   reloaded sshd (systemctl reload ${unit})"
                return 0
            fi
        done
    fi
    if ! pid=$(sshd_pid); then
        # Never started from here: a stopped sshd may be stopped on purpose, or supervised by
        # something (a container's entrypoint, runit) that a daemon started by a script would
        # escape. The configuration is checked; starting it is the admin's call.
        if [[ ${1:-} == uninstall ]]; then
            say "  note     sshd is not running: nothing to reload"
        else
            warn "sshd is not running, so the ${GIT_USER} account cannot be reached yet: start it with: $(sshd_start_command)"
        fi
        return 0
    fi
    if ! kill -HUP "${pid}" 2>/dev/null; then
        warn "could not send SIGHUP to sshd (pid ${pid}): reload it yourself to apply the configuration"
        return 0
    fi
    # sshd re-executes itself on SIGHUP (same pid); back when its pid file is.
    for ((i = 0; i < 50; i++)); do
        sleep 0.1
        if [[ $(sshd_pid) == "${pid}" ]]; then
            say "  change   reloaded sshd (SIGHUP to ${pid})"
            return 0
        fi
    done
    warn "sent SIGHUP to sshd (pid ${pid}), and it has not come back: check it, and start it with: $(sshd_start_command)"
}

remove_ak_block() {   # FILE CREATED(yes|no)
    local file=$1 created=$2 rest
    [[ -f ${file} ]] || return 0
    if ! grep -qxF -- "${AK_BEGIN}" "${file}"; then
        return 0
    fi
    rest=$(awk -v b="${AK_BEGIN}" -v e="${AK_END}" '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }' "${file}")
    if [[ ${created} == yes && -z ${rest//[[:space:]]/} ]]; then
        remove_path "${file}" "authorized_keys"
    else
        change "remove gatekeeper's block from ${file} (other lines kept)"
        dry || printf '%s\n' "${rest}" | write_file "${file}" "$(owner_of "${file}")" "$(mode_of "${file}")"
    fi
}

# The compiled policies in the git account's cache DIR made from the policy CONFIG (each file
# names the policy it was compiled from); another installation's stay. Read as the git account
# by the installed gatekeeper: the files are that account's, and only gatekeeper knows their
# format. Fails when this gatekeeper cannot tell (then nothing is removed).
policy_caches_of() {   # DIR CONFIG
    [[ -x ${P_PREFIX}/bin/python ]] || return 1
    as_git "${P_PREFIX}/bin/python" -I -c \
        'import sys; from gatekeeper.installation import policy_caches; print(*policy_caches(*sys.argv[1:]), sep="\n")' \
        "$1" "$2" 2>/dev/null
}

policy_cache_all_ours() {   # DIR CONFIG: does DIR hold only CONFIG's compiled policies?
    local ours all
    ours=$(policy_caches_of "$1" "$2") || return 1
    all=$(find "$1" -mindepth 1 -maxdepth 1 | LC_ALL=C sort)
    [[ $(LC_ALL=C sort <<<"${ours}") == "${all}" ]]
}

remove_policy_cache() {   # DIR CONFIG; fails when DIR stays
    local dir=$1 config=$2 file ours
    [[ -d ${dir} ]] || return 0
    if [[ -n $(ls -A "${dir}") ]]; then
        if ! ours=$(policy_caches_of "${dir}" "${config}"); then
            ok "kept ${dir}: this gatekeeper cannot tell which compiled policies in it are ${config}'s"
            return 1
        fi
        while IFS= read -r file; do
            if [[ -n ${file} ]]; then
                remove_path "${file}" "compiled policy"
            fi
        done <<<"${ours}"
        dry && return 0
        if [[ -n $(ls -A "${dir}") ]]; then
            ok "kept ${dir}: it holds compiled policies of another policy file"
            return 1
        fi
    fi
    dry && return 0
    rmdir "${dir}"
    # gatekeeper made ~/.cache for it; that goes too if the install made the home.
    if manifest_has dir "$(dirname "$(dirname "${dir}")")" && [[ -z $(ls -A "$(dirname "${dir}")") ]]; then
        rmdir "$(dirname "${dir}")"
    fi
}

# userdel refuses (exit 8) while the user has processes: the sshd session of a connection that
# ended a moment ago, or one still in progress; and, like useradd, while another account change
# holds one of /etc's lock files. Prints userdel's reason when it gives up.
delete_user() {   # NAME
    local out status attempt
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        status=0
        out=$(userdel "$1" 2>&1) || status=$?
        [[ (${status} == 8 || ${out} == *"try again later"*) && ${attempt} -lt 10 ]] || break
        sleep 0.5
    done
    ((status == 0)) || { printf '%s\n' "${out:-userdel exit ${status}}"; return 1; }
}

# Would DIR be empty once the uninstall has removed what it removes? Exact when not a dry
# run (only the manifest may be left in it); in a dry run, judged from the manifest.
would_be_empty() {
    local dir=$1 child kind path data removable
    while IFS= read -r child; do
        [[ ${child} == "${MANIFEST}" ]] && continue
        dry || return 1
        removable=0
        while read -r kind path data; do
            if [[ ${kind} == venv && ${dir} == "${path}" ]]; then
                removable=1
            elif [[ ${kind} == cache && ${child} == "$(dirname "${path}")" ]]; then
                # ~/.cache, if it holds only gatekeeper's cache and the install made the home
                [[ $(ls -A "${child}") == gatekeeper ]] && manifest_has dir "${dir}" &&
                    policy_cache_all_ours "${path}" "${data:-${P_CONFIG}}" && removable=1
            elif [[ ${path} == "${child}" ]]; then
                case ${kind} in
                dropin | conf) removable=1 ;;
                cache) policy_cache_all_ours "${path}" "${data:-${P_CONFIG}}" && removable=1 ;;
                file) [[ $(sha256_of "${child}") == "${data}" || ${PURGE} == 1 ]] && removable=1 ;;
                state) ((PURGE == 0)) || removable=1 ;;
                authkeys) [[ ${data} == yes ]] && removable=1 ;;
                dir) would_be_empty "${child}" && removable=1 ;;
                esac
            fi
        done < <(grep -v '^#' "${MANIFEST}")
        ((removable == 1)) || return 1
    done < <(find "${dir}" -mindepth 1 -maxdepth 1)
    return 0
}

uninstall() {
    say "gatekeeper uninstall$(dry && echo ' (dry run)')${ROOT:+ in staging root ${ROOT}}"
    if [[ ! -f ${MANIFEST} ]]; then
        say "nothing to uninstall: no manifest ${MANIFEST} (not installed by install.sh with this --prefix)"
        return 0
    fi
    local -a entries=()
    mapfile -t entries < <(grep -v '^#' "${MANIFEST}")
    local kind path data entry out i
    # 1. sshd stops sending the git user to gatekeeper first.
    for entry in "${entries[@]}"; do
        read -r kind path data <<<"${entry}"
        [[ ${kind} == dropin && -f ${path} ]] || continue
        remove_path "${path}" "sshd drop-in"
        if dry; then
            reload_sshd uninstall
            continue
        fi
        ensure_privsep_dir
        if out=$("${SSHD}" -t -f "${MAIN_CFG}" 2>&1); then
            reload_sshd uninstall
        else
            warn "sshd -t fails without the drop-in too (not put back, sshd not reloaded): ${out}"
        fi
    done
    # 2. What points into the virtualenv (authorized_keys lines, hooks), and the policy cache.
    local -a kept_cache=()
    for entry in "${entries[@]}"; do
        read -r kind path data <<<"${entry}"
        case ${kind} in
        authkeys) remove_ak_block "${path}" "${data}" ;;
        hooks)
            if has_hooks_command && gk_root hooks uninstall --help >/dev/null 2>&1; then
                change "run gatekeeper hooks uninstall --all as ${GIT_USER} (repositories under ${path})"
                if ! dry && ! as_git "${GK}" --config "${P_CONFIG}" hooks uninstall --all; then
                    warn "gatekeeper hooks uninstall --all failed: check the hooks under ${path}"
                fi
            else
                warn "git hooks under ${path} not removed: this gatekeeper has no 'hooks uninstall'"
            fi
            ;;
        cache) remove_policy_cache "${path}" "${data:-${P_CONFIG}}" || kept_cache+=("${entry}") ;;
        esac
    done
    # 3. In reverse order of creation: files, the virtualenv, the state directory and the
    #    user (--purge), directories once empty. The prefix and the directories above it
    #    come last: the prefix holds the manifest, kept if anything else is kept.
    local kept=0
    local -a remaining=("${kept_cache[@]}") prefix_dirs=()
    ((${#kept_cache[@]} == 0)) || kept=1
    for ((i = ${#entries[@]} - 1; i >= 0; i--)); do
        read -r kind path data <<<"${entries[i]}"
        case ${kind} in
        file)
            [[ -e ${path} ]] || continue
            if [[ $(sha256_of "${path}") == "${data}" ]] || ((PURGE == 1)); then
                remove_path "${path}" "file"
            else
                ok "kept ${path}: changed since the install (--purge removes it)"
                kept=1
                remaining=("${entries[i]}" "${remaining[@]}")
            fi
            ;;
        conf)
            [[ -e ${path} ]] || continue
            remove_path "${path}" "installation record"
            ;;
        venv)
            [[ -d ${path} ]] || continue
            change "remove the virtualenv in ${path}"
            dry || find "${path}" -mindepth 1 -maxdepth 1 ! -name "${MANIFEST_NAME}" -exec rm -rf -- {} +
            ;;
        state)
            [[ -e ${path} ]] || continue
            if ((PURGE == 1)); then
                remove_path "${path}" "state directory (users, keys, enrollments, audit log)"
            else
                ok "kept the state directory ${path} (--purge removes it)"
                kept=1
                remaining=("${entries[i]}" "${remaining[@]}")
            fi
            ;;
        user)
            getent passwd "${path}" >/dev/null || continue
            if ((PURGE == 1)); then
                change "delete user ${path}"
                if ! dry && ! out=$(delete_user "${path}"); then
                    warn "user ${path} not deleted: ${out} (run --uninstall --purge again once it is idle)"
                    kept=1
                    remaining=("${entries[i]}" "${remaining[@]}")
                fi
            else
                ok "kept user ${path} (--purge deletes it)"
                kept=1
                remaining=("${entries[i]}" "${remaining[@]}")
            fi
            ;;
        dir)
            [[ -d ${path} ]] || continue
            if [[ ${path} == "${P_PREFIX}" || ${P_PREFIX} == "${path}"/* ]]; then
                prefix_dirs+=("${path}")
            elif would_be_empty "${path}"; then
                change "remove directory ${path}"
                dry || rmdir "${path}"
            else
                ok "kept directory ${path}: not empty"
                kept=1
                remaining=("${entries[i]}" "${remaining[@]}")
            fi
            ;;
        esac
    done
    if ((kept == 1)); then
        ok "kept ${MANIFEST}: it lists what was kept, for a later --uninstall --purge"
        if ! dry; then
            {
                head -n1 "${MANIFEST}"
                for ((i = ${#prefix_dirs[@]} - 1; i >= 0; i--)); do
                    printf 'dir %s\n' "${prefix_dirs[i]}"
                done
                printf '%s\n' "${remaining[@]}"
            } >"${MANIFEST}.new"
            mv -f "${MANIFEST}.new" "${MANIFEST}"
        fi
    else
        dry || rm -f "${MANIFEST}"
        for path in "${prefix_dirs[@]}"; do
            if would_be_empty "${path}"; then
                change "remove directory ${path}"
                dry || rmdir "${path}"
            else
                ok "kept directory ${path}: not empty"
            fi
        done
    fi
    finish "uninstall"
}

finish() {
    local what=$1
    if ((CHANGES == 0)); then
        say "nothing to change: ${what} is already done as asked"
    elif dry; then
        say "dry run: ${CHANGES} change(s) would be made; nothing was changed"
    else
        say "${what}: ${CHANGES} change(s) made"
    fi
    if ((${#WARNINGS[@]} > 0)); then
        say "${#WARNINGS[@]} warning(s):"
        printf '  - %s\n' "${WARNINGS[@]}"
    fi
}

if ((UNINSTALL == 1)); then
    uninstall
    exit 0
fi

# -- install ----------------------------------------------------------------------------------

# The mode: as asked; else as the last run recorded it in install.conf; else, for an install
# from before install.conf, as its drop-in says; else authorized-keys.
recorded() {   # KEY: its value in install.conf
    [[ -f ${INSTALL_CONF} ]] || return 0
    sed -n "s/^$1=//p" "${INSTALL_CONF}" | head -n1
}
RECORDED_MODE=$(recorded mode)
case ${RECORDED_MODE} in
authorized-keys | keys-command) ;;
*)
    RECORDED_MODE=
    if [[ -f ${DROPIN} ]] && manifest_has dropin "${DROPIN}"; then
        if grep -q '^[[:space:]]*AuthorizedKeysCommand[[:space:]]' "${DROPIN}"; then
            RECORDED_MODE="keys-command"
        else
            RECORDED_MODE="authorized-keys"
        fi
    fi
    ;;
esac
MODE_NOTE=
if [[ -z ${MODE} ]]; then
    MODE=${RECORDED_MODE:-authorized-keys}
    [[ -z ${RECORDED_MODE} ]] || MODE_NOTE=" (kept from the last run; --mode switches)"
fi

say "gatekeeper install$(dry && echo ' (dry run)'): mode ${MODE}${MODE_NOTE}, user ${GIT_USER}${ROOT:+, staging root ${ROOT}}"

# Preflight: everything needed, before changing anything.
if [[ -z ${PYTHON} ]]; then
    PYTHON=/usr/bin/python3
    [[ -x ${PYTHON} ]] || PYTHON=$(command -v python3 || true)
fi
[[ -n ${PYTHON} && -x ${PYTHON} ]] || die "python3 not found (install python3 and python3-venv, or pass --python)"
"${PYTHON}" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
    die "${PYTHON} cannot make a virtualenv with pip, or is older than 3.10 (install python3-venv)"
[[ -f ${SOURCE}/pyproject.toml && -d ${SOURCE}/gatekeeper && -f ${SOURCE}/config/example.yaml ]] ||
    die "--source ${SOURCE@Q} is not a gatekeeper checkout"
# --store: gatekeeper's own parser (standard library only) from the checkout, so a password
# in the URL, an unknown scheme... are refused before anything changes.
STORE_KIND=          # sqlite or postgresql, with --store
STORE_NEW=           # what a new policy file's server.store says
PW_DEST=             # where --password-file goes
if [[ -n ${STORE} ]]; then
    parsed=$(PYTHONPATH='' "${PYTHON}" -I -B - "${SOURCE}" "${STORE}" 2>&1 <<'PY'
import sys

sys.path.insert(0, sys.argv[1])
from gatekeeper.errors import GatekeeperError
from gatekeeper.store.url import parse_store_url

try:
    location = parse_store_url(sys.argv[2], "/nonexistent")
except GatekeeperError as exc:
    sys.exit(exc.message + (f" ({exc.hint})" if exc.hint else ""))
print(location.kind, location.password_file or "-")
PY
    ) || die "--store: ${parsed:-gatekeeper.store.url cannot read it}"
    read -r STORE_KIND url_password_file <<<"${parsed}"
    STORE_NEW=${STORE}
    if [[ ${STORE_KIND} != postgresql ]]; then
        [[ -z ${PASSWORD_FILE} ]] || die "--password-file goes with a PostgreSQL --store"
    elif [[ -n ${PASSWORD_FILE} ]]; then
        if [[ ${url_password_file} == - ]]; then
            PW_DEST=${ROOT}${DEFAULT_PASSWORD_FILE}
            STORE_NEW+=$([[ ${STORE} == *\?* ]] && echo '&' || echo '?')password_file=${PW_DEST}
        else
            PW_DEST=${url_password_file}
            [[ -z ${ROOT} || ${PW_DEST} == "${ROOT}"/* ]] ||
                die "--store names password_file=${PW_DEST}, outside the staging root ${ROOT}"
        fi
        check_path "the password file" "${PW_DEST}"
        [[ ! -e ${PW_DEST} || -f ${PW_DEST} ]] || die "${PW_DEST} exists and is not a file"
    fi
fi
# A second front-end gets the first one's server key; a different key is never replaced.
if [[ -n ${SERVER_KEY} && -f ${P_STATE}/server.key ]] && ! cmp -s -- "${SERVER_KEY}" "${P_STATE}/server.key"; then
    die "${P_STATE}/server.key is already there and differs from --server-key ${SERVER_KEY}: not replaced (the TOTP secrets encrypted with it would be lost; move it away yourself if you mean it)"
fi
command -v runuser >/dev/null 2>&1 || die "runuser not found (util-linux)"
if [[ -z ${ROOT} ]]; then
    [[ -f ${MAIN_CFG} ]] || die "${MAIN_CFG} not found: install openssh-server first"
fi
check_keys_command_path() {
    local reason
    [[ ${MODE} == keys-command ]] || return 0
    reason=$(unsafe_command_reason "${GK}")
    [[ -z ${reason} ]] ||
        die "sshd would refuse AuthorizedKeysCommand ${GK}: ${reason} (the command and every directory above it must be root-owned and not group/world-writable)"
}
check_keys_command_path
if [[ -e ${P_PREFIX} && ! -f ${MANIFEST} ]] && [[ -n $(ls -A "${P_PREFIX}" 2>/dev/null) ]]; then
    die "${P_PREFIX} exists and was not made by install.sh (no ${MANIFEST_NAME}): choose another --prefix"
fi

# 1. The git user.
CREATE_USER=0
if getent passwd "${GIT_USER}" >/dev/null; then
    ok "user ${GIT_USER} exists"
elif [[ -n ${ROOT} ]]; then
    die "user ${GIT_USER} does not exist; with --root no system user is created: create it (useradd) or pass --user of an existing one"
else
    CREATE_USER=1
    change "create system user ${GIT_USER} (home /home/${GIT_USER}, shell /bin/sh, no password)"
    if ! dry; then
        # Password "*": no password login, but not "locked" ("!"), which sshd without PAM
        # refuses even for keys. The shell runs the forced command, so it must be a real one.
        # useradd gives up ("try again later") while another account change holds one of
        # /etc's lock files.
        for attempt in 1 2 3 4 5 6; do
            status=0
            out=$(useradd --system --user-group --home-dir "/home/${GIT_USER}" --no-create-home \
                --shell /bin/sh --password '*' --comment 'gatekeeper git account' "${GIT_USER}" 2>&1) ||
                status=$?
            [[ ${status} != 0 && ${out} == *"try again later"* && ${attempt} -lt 6 ]] || break
            sleep 1
        done
        ((status == 0)) || die "useradd could not create user ${GIT_USER}: ${out:-exit ${status}}"
        [[ -z ${out} ]] || printf '%s\n' "${out}" >&2
        manifest_add user "${GIT_USER}"
    fi
fi
if ((CREATE_USER == 1)) && dry; then
    GIT_GROUP=${GIT_USER}
    GIT_HOME=/home/${GIT_USER}
else
    GIT_GROUP=$(id -gn "${GIT_USER}")
    GIT_HOME=$(user_home)
    shell=$(getent passwd "${GIT_USER}" | cut -d: -f7)
    case ${shell} in
    */nologin | */false | "")
        warn "user ${GIT_USER}'s login shell is ${shell:-empty}: sshd runs the forced command through it, so every connection fails (usermod -s /bin/sh ${GIT_USER})" ;;
    esac
    if [[ $(getent shadow "${GIT_USER}" | cut -d: -f2) == '!'* ]]; then
        warn "user ${GIT_USER}'s password is locked ('!'): sshd with UsePAM no refuses locked accounts even with keys (usermod -p '*' ${GIT_USER})"
    fi
fi
check_path "home of ${GIT_USER}" "${GIT_HOME}"
OWNER=${GIT_USER}:${GIT_GROUP}
ensure_dir "${GIT_HOME}" "${OWNER}" 750
AK_FILE=${GIT_HOME}/.ssh/authorized_keys

# 2. The virtualenv with gatekeeper in the prefix.
SOURCE_FILES=(pyproject.toml README.md gatekeeper hooks)
for extra in setup.py setup.cfg MANIFEST.in LICENSE LICENSE.txt; do
    if [[ -e ${SOURCE}/${extra} ]]; then
        SOURCE_FILES+=("${extra}")
    fi
done
source_digest() {
    (cd "${SOURCE}" && find "${SOURCE_FILES[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
        LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}
DIGEST=$(source_digest)
VENV_UPDATED=0
EXTRAS=   # pyproject.toml's postgres extra (psycopg) for a PostgreSQL store
[[ ${STORE_KIND} != postgresql ]] || EXTRAS='[postgres]'
installed=$(manifest_data venv "${P_PREFIX}")
if [[ -x ${P_PREFIX}/bin/python && ${installed} == "${DIGEST}" && -x ${GK} ]]; then
    ok "virtualenv ${P_PREFIX} has gatekeeper from ${SOURCE} (unchanged)"
else
    ensure_dir "${P_PREFIX}" root:root 755
    if [[ -x ${P_PREFIX}/bin/python ]]; then
        change "reinstall gatekeeper${EXTRAS} in ${P_PREFIX} from ${SOURCE} (the source changed)"
    else
        change "create virtualenv ${P_PREFIX} (${PYTHON}) and install gatekeeper${EXTRAS} from ${SOURCE}"
    fi
    if ! dry; then
        VENV_UPDATED=1
        work=$(mktemp -d)
        trap 'rm -rf "${work}"' EXIT
        # Build from a copy: setuptools would write build/ and *.egg-info into the checkout.
        mkdir "${work}/src"
        tar -C "${SOURCE}" --exclude=__pycache__ --exclude='*.pyc' -cf - "${SOURCE_FILES[@]}" |
            tar -C "${work}/src" -xf -
        reinstall=()
        if [[ ! -x ${P_PREFIX}/bin/python ]]; then
            "${PYTHON}" -m venv "${P_PREFIX}"
        else
            reinstall=(--force-reinstall --no-deps)
        fi
        pip=("${P_PREFIX}/bin/python" -m pip --disable-pip-version-check --no-input)
        if ! { "${pip[@]}" wheel --no-deps -w "${work}/wheel" "${work}/src" &&
            wheel=$(find "${work}/wheel" -name 'gatekeeper-*.whl' | head -n1) &&
            { [[ ${#reinstall[@]} -eq 0 ]] || "${pip[@]}" install "${reinstall[@]}" "${wheel}"; } &&
            "${pip[@]}" install "${wheel}${EXTRAS}"; } >"${work}/pip.log" 2>&1; then
            cat "${work}/pip.log" >&2
            die "pip could not install gatekeeper into ${P_PREFIX} (its output is above)"
        fi
        chmod -R go-w "${P_PREFIX}"
        if [[ -z ${installed} ]]; then
            manifest_add venv "${P_PREFIX}" "${DIGEST}"
        else
            manifest_set venv "${P_PREFIX}" "${DIGEST}"
        fi
        rm -rf "${work}"
        trap - EXIT
    fi
fi
if [[ -x ${P_PREFIX}/bin/python ]] && ! as_git "${P_PREFIX}/bin/python" -c 'import gatekeeper' 2>/dev/null; then
    die "user ${GIT_USER} cannot run ${P_PREFIX}/bin/python ($(readlink -f "${P_PREFIX}/bin/python") is not reachable for it?): pass --python /usr/bin/python3 and --uninstall first"
fi

# 2b. --password-file: the PostgreSQL store's password, readable by the git user alone. Before
#     the policy file (its check reads the store) and `gatekeeper init`.
if [[ -n ${PASSWORD_FILE} ]]; then
    if [[ -f ${PW_DEST} ]] && cmp -s -- "${PASSWORD_FILE}" "${PW_DEST}"; then
        if [[ $(owner_of "${PW_DEST}") != "${OWNER}" || $(mode_of "${PW_DEST}") != 600 ]]; then
            change "set store password file ${PW_DEST} to ${OWNER} 0600 (was $(owner_of "${PW_DEST}") $(mode_of "${PW_DEST}"))"
            dry || { chown "${OWNER}" "${PW_DEST}" && chmod 0600 "${PW_DEST}"; }
        else
            ok "store password file ${PW_DEST} (${OWNER} 0600)"
        fi
    else
        ensure_dir "$(dirname "${PW_DEST}")" root:root 755
        if [[ -f ${PW_DEST} ]]; then
            change "replace store password file ${PW_DEST} with ${PASSWORD_FILE} (${OWNER} 0600; it differed)"
        else
            change "install store password file ${PW_DEST} from ${PASSWORD_FILE} (${OWNER} 0600)"
        fi
        if ! dry; then
            existed=no
            [[ -f ${PW_DEST} ]] && existed=yes
            # umask 077: not even the temporary file is readable by others for a moment.
            (umask 077 && write_file "${PW_DEST}" "${OWNER}" 600 <"${PASSWORD_FILE}")
            if [[ ${existed} == no ]]; then
                manifest_add file "${PW_DEST}" "$(sha256_of "${PW_DEST}")"
            elif [[ -n $(manifest_data file "${PW_DEST}") ]]; then
                manifest_set file "${PW_DEST}" "$(sha256_of "${PW_DEST}")"
            fi
        fi
    fi
fi

# 3. The policy file: from the example if there is none; never touched once it exists.
CONFIG_CREATED=0
if [[ -f ${P_CONFIG} ]]; then
    ok "policy file ${P_CONFIG} exists (left as it is)"
else
    ensure_dir "$(dirname "${P_CONFIG}")" root:root 755
    change "create policy file ${P_CONFIG} from config/example.yaml (user ${GIT_USER}, repositories ${P_REPOS}, state_dir ${P_STATE}, host ${HOST}, port ${SSH_PORT}, issuer '${ISSUER}'${STORE_NEW:+, store ${STORE_NEW}})"
    # The policy's host is what refusals tell users to run (ssh git@HOST 2fa enroll). A staging
    # root's default, 127.0.0.1, is meant for this machine.
    if ((HOST_GIVEN == 1)) || [[ -z ${ROOT} ]]; then
        reason=$(unreachable_host_reason "${HOST}")
        [[ -z ${reason} ]] ||
            warn "host ${HOST}: users will be told to run \"ssh ${GIT_USER}@${HOST} 2fa enroll\", but ${reason}; pass --host with the name users clone from (e.g. --host git.example.com), or edit server.host in ${P_CONFIG}"
    fi
    if ! dry; then
        CONFIG_CREATED=1
        store_expr=
        if [[ -n ${STORE_NEW} ]]; then
            # Single-quoted in YAML; for sed, & and | are escaped (no ' or \ gets this far).
            # shellcheck disable=SC2001 # ${var//} treats & differently across bash versions
            store_expr="s|^\(  store:\)[[:space:]]*\$|\1 '$(sed 's/[&|]/\\&/g' <<<"${STORE_NEW}")'|"
        fi
        # shellcheck disable=SC2001 # as above
        issuer_sed=$(sed 's/[&|]/\\&/g' <<<"${ISSUER}")
        # Only the server and two_factor sections' values; the comments after them stay.
        sed -e "/^server:/,/^[^[:space:]#]/{
s|^\(  host:[[:space:]]*\)[^[:space:]#]*|\1${HOST}|
s|^\(  port:[[:space:]]*\)[^[:space:]#]*|\1${SSH_PORT}|
s|^\(  user:[[:space:]]*\)[^[:space:]#]*|\1${GIT_USER}|
s|^\(  repositories:[[:space:]]*\)[^[:space:]#]*|\1${P_REPOS}|
s|^\(  state_dir:[[:space:]]*\)[^[:space:]#]*|\1${P_STATE}|
${store_expr}
}
/^two_factor:/,/^[^[:space:]#]/{
s|^\(  issuer:[[:space:]]*\)[^#]*[^#[:space:]]|\1'${issuer_sed}'|
}" "${SOURCE}/config/example.yaml" | {
            printf '# Written by gatekeeper scripts/install.sh from config/example.yaml; yours to edit:\n'
            printf '# install.sh never overwrites it. Check it with: %s --config %s policy check\n' "${GK}" "${P_CONFIG}"
            cat
        } | write_file "${P_CONFIG}" "root:${GIT_GROUP}" 640
        manifest_add file "${P_CONFIG}" "$(sha256_of "${P_CONFIG}")"
        if ! out=$(as_git "${GK}" --config "${P_CONFIG}" policy check 2>&1); then
            die "the new policy file does not check: ${out}"
        fi
    fi
fi

# The settings that count are the policy file's (it may be an older, edited one).
POLICY_STORE_KIND=${STORE_KIND:-sqlite}
if [[ -x ${GK} && -f ${P_CONFIG} ]]; then
    # Line 1: user repositories state_dir; line 2: the store's kind, whether it is the one
    # --store names (same, differs, or - without --store), and what server.store says.
    # (-I: the installed gatekeeper, never a checkout in the current directory.)
    settings=$(env -i PATH="${SAFE_PATH}" LC_ALL=C.UTF-8 "${P_PREFIX}/bin/python" -I - "${P_CONFIG}" "${STORE_NEW}" <<'PY'
import os
import sys
from gatekeeper.errors import GatekeeperError
from gatekeeper.policy import load_policy
from gatekeeper.store.url import parse_store_url

try:
    policy = load_policy(sys.argv[1])
    server = policy.server
    location = parse_store_url(server.store, str(server.state_dir))
    same = "-"
    if sys.argv[2]:
        wanted = parse_store_url(sys.argv[2], str(server.state_dir), os.path.dirname(sys.argv[1]))
        same = "same" if wanted == location else "differs"
except GatekeeperError as exc:
    sys.exit(f"{exc.message}")
print(server.user, server.repositories, server.state_dir)
print(location.kind, same, server.store or "(empty: the SQLite file in state_dir)")
print(policy.two_factor.issuer)
PY
    ) || die "cannot read ${P_CONFIG}: ${settings:-see above}"
    wanted="${GIT_USER} ${P_REPOS} ${P_STATE}"
    store_line=$(sed -n 2p <<<"${settings}")
    cfg_issuer=$(sed -n 3p <<<"${settings}")
    settings=$(sed -n 1p <<<"${settings}")
    read -r cfg_user P_REPOS P_STATE <<<"${settings}"
    read -r POLICY_STORE_KIND store_same cfg_store <<<"${store_line}"
    if ((CONFIG_CREATED == 1)) && [[ ${settings} != "${wanted}" || ${store_same} == differs ]]; then
        die "the new ${P_CONFIG} says (user repositories state_dir) ${settings}, store ${cfg_store}, not ${wanted}, store ${STORE_NEW:-(empty)}: has config/example.yaml's server section changed?"
    fi
    if ((CONFIG_CREATED == 1)) && [[ ${cfg_issuer} != "${ISSUER}" ]]; then
        die "the new ${P_CONFIG} says two_factor.issuer: ${cfg_issuer}, not ${ISSUER}: has config/example.yaml's two_factor section changed?"
    fi
    if ((CONFIG_CREATED == 0 && ISSUER_GIVEN == 1)) && [[ ${cfg_issuer} != "${ISSUER}" ]]; then
        say "  note     ${P_CONFIG} has two_factor.issuer '${cfg_issuer}', not --issuer '${ISSUER}': the policy file is left as it is (edit it to change the issuer)"
    fi
    if [[ ${store_same} == differs ]]; then
        say "  note     ${P_CONFIG} has server.store ${cfg_store}, not --store ${STORE_NEW}: the policy file is left as it is (edit it to change the store)"
    fi
    [[ ${cfg_user} == "${GIT_USER}" ]] ||
        die "${P_CONFIG} says server.user: ${cfg_user}, but --user is ${GIT_USER}: make them agree"
    check_path "server.repositories in ${P_CONFIG}" "${P_REPOS}"
    check_path "server.state_dir in ${P_CONFIG}" "${P_STATE}"
fi

# Several front-ends on one store: in authorized-keys mode each host's file knows only the keys
# changed on that host; keys-command mode finds the others in the shared database.
if [[ ${POLICY_STORE_KIND} == postgresql && ${MODE} == authorized-keys ]]; then
    warn "authorized-keys mode on a shared PostgreSQL store: a key added on another front-end is refused here (\"Permission denied\") until a key change on this host, or gatekeeper authorized-keys --write ${AK_FILE}, rewrites this host's file; --mode keys-command finds such a key in the shared database at once (the key index falls back to it)"
fi

# 3b. A PostgreSQL store (--store, or an existing policy's) needs psycopg in the virtualenv:
#     installed with gatekeeper above, or here from the installed gatekeeper's postgres extra.
if [[ ${POLICY_STORE_KIND} == postgresql && -x ${P_PREFIX}/bin/python ]]; then
    if as_git "${P_PREFIX}/bin/python" -c 'import psycopg' >/dev/null 2>&1; then
        ok "psycopg in ${P_PREFIX} (the store is PostgreSQL)"
    else
        change "install gatekeeper's postgres extra (psycopg) into ${P_PREFIX} (the store is PostgreSQL)"
        if ! dry; then
            postgres_extra() {   # the requirements of the installed gatekeeper's postgres extra
                env -i PATH="${SAFE_PATH}" LC_ALL=C.UTF-8 "${P_PREFIX}/bin/python" -I - <<'PY'
from importlib.metadata import requires

for line in requires("gatekeeper") or ():
    spec, _, marker = line.partition(";")
    if "".join(marker.split()).replace("'", '"') == 'extra=="postgres"':
        print(spec.strip())
PY
            }
            mapfile -t requirements < <(postgres_extra)
            ((${#requirements[@]} > 0)) || die "the installed gatekeeper has no postgres extra: install one from a newer checkout"
            if ! out=$("${P_PREFIX}/bin/python" -m pip --disable-pip-version-check --no-input install "${requirements[@]}" 2>&1); then
                printf '%s\n' "${out}" >&2
                die "pip could not install ${requirements[*]} into ${P_PREFIX} (its output is above)"
            fi
            chmod -R go-w "${P_PREFIX}"
        fi
    fi
fi

# 4. The state directory: the git user's alone. Then the store, as the git user.
if [[ -d ${P_STATE} ]]; then
    if [[ $(owner_of "${P_STATE}") != "${OWNER}" || $(mode_of "${P_STATE}") != 700 ]]; then
        change "set ${P_STATE} to ${OWNER} 0700 (was $(owner_of "${P_STATE}") $(mode_of "${P_STATE}"))"
        dry || { chown "${OWNER}" "${P_STATE}" && chmod 0700 "${P_STATE}"; }
    else
        ok "state directory ${P_STATE} (${OWNER} 0700)"
    fi
else
    ensure_dir "$(dirname "${P_STATE}")" root:root 755
    change "create state directory ${P_STATE} (${OWNER} 0700)"
    if ! dry; then
        mkdir -m 0700 "${P_STATE}"
        chown "${OWNER}" "${P_STATE}"
        manifest_add state "${P_STATE}"
    fi
fi
# --server-key: the first front-end's key, before `gatekeeper init` would make a new one.
SERVER_KEY_PATH=${P_STATE}/server.key
if [[ -n ${SERVER_KEY} ]]; then
    if [[ -f ${SERVER_KEY_PATH} ]]; then
        cmp -s -- "${SERVER_KEY}" "${SERVER_KEY_PATH}" ||
            die "${SERVER_KEY_PATH} is already there and differs from --server-key ${SERVER_KEY}: not replaced (the TOTP secrets encrypted with it would be lost; move it away yourself if you mean it)"
        ok "server key ${SERVER_KEY_PATH} is the one in ${SERVER_KEY}"
    else
        change "install server key ${SERVER_KEY_PATH} from ${SERVER_KEY} (${OWNER} 0600)"
        dry || (umask 077 && write_file "${SERVER_KEY_PATH}" "${OWNER}" 600 <"${SERVER_KEY}")
    fi
fi
# A PostgreSQL store is ready for this host when it is at this gatekeeper's schema and this
# host has its server key and its audit head (`gatekeeper init` on a second front-end writes
# the head). A read-only check, as the git user (its password file). Prints where, or why not.
store_ready() {
    as_git "${P_PREFIX}/bin/python" - "${P_CONFIG}" 2>&1 <<'PY'
import sys
from gatekeeper.errors import GatekeeperError
from gatekeeper.policy import load_policy
from gatekeeper.store import Store

try:
    server = load_policy(sys.argv[1]).server
    store = Store.open(server.state_dir, server.store)
    try:
        if not store.server_key_path.is_file():
            sys.exit(f"no server key {store.server_key_path} yet")
        if store.read_head() is None:
            sys.exit(f"this host has no audit head {store.head_path} yet")
        print(store.where)
    finally:
        store.close()
except GatekeeperError as exc:
    sys.exit(exc.message)
PY
}
where=
if [[ ${POLICY_STORE_KIND} == postgresql ]]; then
    if [[ -x ${P_PREFIX}/bin/python && -f ${P_CONFIG} ]] && where=$(store_ready); then
        ok "store ${where} is at this gatekeeper's schema; server key ${SERVER_KEY_PATH}"
    else
        change "run gatekeeper init as ${GIT_USER} (PostgreSQL store${where:+: ${where%%$'\n'*}})"
        dry || as_git "${GK}" --config "${P_CONFIG}" init | sed 's/^/           /'
    fi
elif [[ -f ${P_STATE}/gatekeeper.db ]]; then
    if ((VENV_UPDATED == 1)); then
        change "run gatekeeper migrate as ${GIT_USER} (new gatekeeper, existing store)"
        dry || as_git "${GK}" --config "${P_CONFIG}" migrate >/dev/null
    else
        ok "store ${P_STATE}/gatekeeper.db exists"
    fi
else
    change "run gatekeeper init as ${GIT_USER} (store, server key)"
    dry || as_git "${GK}" --config "${P_CONFIG}" init | sed 's/^/           /'
fi
# The forced command caches the compiled policy in the git account's ~/.cache/gatekeeper, which
# other installations' policies may share: the manifest names this installation's policy.
if [[ $(manifest_data cache "${GIT_HOME}/.cache/gatekeeper") != "${P_CONFIG}" ]]; then
    if [[ -n $(manifest_data cache "${GIT_HOME}/.cache/gatekeeper") ]] ||
        manifest_has cache "${GIT_HOME}/.cache/gatekeeper"; then
        manifest_set cache "${GIT_HOME}/.cache/gatekeeper" "${P_CONFIG}"
    else
        manifest_add cache "${GIT_HOME}/.cache/gatekeeper" "${P_CONFIG}"
    fi
fi

# 5. The repositories root and the hooks in every repository under it.
if [[ -d ${P_REPOS} ]]; then
    ok "repositories root ${P_REPOS} exists"
else
    ensure_dir "${P_REPOS}" "${OWNER}" 750
fi
hooks_digest() {
    [[ -d ${P_REPOS} ]] || { echo none; return 0; }
    find "${P_REPOS}" \( -name objects -o -name refs -o -name logs \) -prune -o \
        \( -path '*/hooks/*' -o -name config \) -type f -print0 |
        LC_ALL=C sort -z | xargs -0r sha256sum | sha256sum | cut -d' ' -f1
}
if [[ ! -x ${GK} ]] && dry; then
    change "run gatekeeper hooks install --all as ${GIT_USER} (repositories under ${P_REPOS}), if the new gatekeeper has a 'hooks' command"
elif has_hooks_command; then
    before=$(hooks_digest)
    if [[ $(manifest_data hooks "${P_REPOS}") == "${before}" && ${VENV_UPDATED} == 0 ]]; then
        ok "git hooks installed in the repositories under ${P_REPOS}"
    elif dry; then
        change "run gatekeeper hooks install --all as ${GIT_USER} (repositories under ${P_REPOS})"
    else
        as_git "${GK}" --config "${P_CONFIG}" hooks install --all | sed 's/^/           /' ||
            die "gatekeeper hooks install --all failed (see above)"
        after=$(hooks_digest)
        if [[ ${after} != "${before}" ]]; then
            change "installed the git hooks (gatekeeper hooks install --all) under ${P_REPOS}"
        else
            ok "git hooks under ${P_REPOS} were up to date"
        fi
        if [[ -z $(manifest_data hooks "${P_REPOS}") ]]; then
            manifest_add hooks "${P_REPOS}" "${after}"
        else
            manifest_set hooks "${P_REPOS}" "${after}"
        fi
    fi
else
    say "  skip     git hooks: this gatekeeper has no 'hooks' command (\`gatekeeper hooks --help\` fails);"
    say "           re-run install.sh with a gatekeeper that has it to install them"
fi

# 6. The mode. A switch says so once; its steps follow (the block, the drop-in, install.conf).
# keys-command mode runs the shell script `gatekeeper keys-script` writes (the key index, no
# interpreter: sshd runs it twice per connection), root's like the command sshd wants.
KEYS_SCRIPT=${P_PREFIX}/bin/gatekeeper-keys
KEYS_COMMAND="${KEYS_SCRIPT} %u %f"
if [[ -n ${RECORDED_MODE} && ${RECORDED_MODE} != "${MODE}" ]]; then
    if [[ ${MODE} == keys-command ]]; then
        change "switch from authorized-keys to keys-command mode: sshd will run keys-command for each key, and gatekeeper's block leaves the authorized_keys file"
    else
        change "switch from keys-command to authorized-keys mode: gatekeeper's block goes into ${AK_FILE}, and sshd will read it"
    fi
fi
# authorized-keys mode: the git user's authorized_keys with gatekeeper's block, written from the
# store on every run (so a key added while another mode was in force is in it too).
ak_key_count() {
    awk -v b="${AK_BEGIN}" -v e="${AK_END}" '$0 == e { inside = 0 } inside { n++ } $0 == b { inside = 1 } END { print n + 0 }' "${AK_FILE}"
}
if [[ ${MODE} == authorized-keys ]]; then
    ensure_dir "${GIT_HOME}/.ssh" "${OWNER}" 700
    if dry; then
        if [[ -f ${AK_FILE} ]] && grep -qxF -- "${AK_BEGIN}" "${AK_FILE}"; then
            ok "${AK_FILE} has gatekeeper's block ($(ak_key_count) keys; a real run rewrites it from the store)"
        else
            change "write gatekeeper's block into ${AK_FILE} (gatekeeper authorized-keys --write)"
        fi
    else
        existed=no
        [[ -f ${AK_FILE} ]] && existed=yes
        out=$(as_git "${GK}" --config "${P_CONFIG}" authorized-keys --write "${AK_FILE}")
        if [[ ${out} == updated:* ]]; then
            change "wrote gatekeeper's block into ${AK_FILE} ($(ak_key_count) keys)"
        else
            ok "${AK_FILE} has gatekeeper's block, up to date ($(ak_key_count) keys)"
        fi
        manifest_has authkeys "${AK_FILE}" yes || manifest_has authkeys "${AK_FILE}" no ||
            manifest_add authkeys "${AK_FILE}" "$([[ ${existed} == yes ]] && echo no || echo yes)"
        keys=$(ak_key_count)
        if ((keys >= AK_SLOW_KEYS)); then
            warn "${AK_FILE} holds ${keys} keys: sshd reads and parses the file up to the key, twice per connection (${AK_SLOW_NOTE}); --mode keys-command looks each key up by its fingerprint in the same time at any number of keys"
        fi
    fi
else
    check_keys_command_path
    if dry; then
        [[ -f ${KEYS_SCRIPT} ]] || change "write ${KEYS_SCRIPT} (gatekeeper keys-script: the AuthorizedKeysCommand)"
    else
        script=$(as_git "${GK}" --config "${P_CONFIG}" keys-script)
        if [[ -f ${KEYS_SCRIPT} && $(cat "${KEYS_SCRIPT}") == "${script}" ]]; then
            ok "${KEYS_SCRIPT}, the AuthorizedKeysCommand, is up to date"
        else
            printf '%s\n' "${script}" | write_file "${KEYS_SCRIPT}" root:root 755
            change "wrote ${KEYS_SCRIPT}, the AuthorizedKeysCommand (the key index, no interpreter)"
        fi
    fi
fi

# 7. A staging root gets its own complete sshd configuration, on a loopback port.
if [[ -n ${ROOT} ]]; then
    HOST_KEY=${SSH_DIR}/ssh_host_ed25519_key
    ensure_dir "${DROPIN_DIR}" root:root 755
    ensure_dir "${ROOT}/run" root:root 755
    if [[ -f ${HOST_KEY} ]]; then
        ok "host key ${HOST_KEY}"
    else
        change "generate host key ${HOST_KEY}"
        if ! dry; then
            ssh-keygen -q -t ed25519 -N '' -C "gatekeeper-staging" -f "${HOST_KEY}"
            manifest_add file "${HOST_KEY}" "$(sha256_of "${HOST_KEY}")"
            manifest_add file "${HOST_KEY}.pub" "$(sha256_of "${HOST_KEY}.pub")"
        fi
    fi
    if [[ -f ${MAIN_CFG} ]]; then
        ok "${MAIN_CFG} exists (left as it is)"
    else
        change "write ${MAIN_CFG} (a complete sshd for this staging root on 127.0.0.1:${SSH_PORT})"
        if ! dry; then
            staged_config() {
                cat <<EOF
# sshd for a gatekeeper staging root, written by scripts/install.sh --root.
# Start it with:  ${SSHD} -D -e -f ${MAIN_CFG}
Include ${DROPIN_DIR}/*.conf
ListenAddress 127.0.0.1:${SSH_PORT}
HostKey ${HOST_KEY}
PidFile ${ROOT}/run/sshd.pid
AllowUsers ${GIT_USER}
PermitRootLogin no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UseDNS no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
EOF
                # Newer sshd (9.8+) penalises addresses that fail to log in: not on loopback.
                [[ ${1:-} == penalties ]] && echo "PerSourcePenalties no"
                return 0
            }
            # The option only if this sshd takes it (and takes the rest: a broken sshd
            # gets the plain configuration, and the validation below reports it).
            staged_config penalties | write_file "${MAIN_CFG}" root:root 644
            if ! "${SSHD}" -t -f "${MAIN_CFG}" >/dev/null 2>&1; then
                staged_config | write_file "${MAIN_CFG}" root:root 644
            fi
            manifest_add file "${MAIN_CFG}" "$(sha256_of "${MAIN_CFG}")"
        fi
    fi
fi

# 8. The sshd drop-in: written, validated, rolled back if sshd rejects it, then sshd reloaded.
dropin_text() {
    cat <<EOF
# gatekeeper: written by scripts/install.sh (--mode ${MODE}); removed by install.sh --uninstall.
# Never add ForceCommand for ${GIT_USER}: it overrides gatekeeper's per-key command=.
#
# For every login, not only ${GIT_USER}'s: a CI farm's 50 clones at once are 50 connections
# still logging in together, and with sshd's default (10:30:100) it drops 30% of those beyond
# 10, rising to all at 100 ("Connection reset by peer"). The first value sshd reads wins: a
# MaxStartups of your own in a drop-in that sorts before this one stays in force.
MaxStartups ${MAX_STARTUPS}

Match User ${GIT_USER}
EOF
    if [[ ${MODE} == authorized-keys ]]; then
        printf '    AuthorizedKeysFile %s\n' "${AK_FILE}"
    else
        printf '    AuthorizedKeysFile none\n'
        printf '    AuthorizedKeysCommand %s\n' "${KEYS_COMMAND}"
        printf '    AuthorizedKeysCommandUser %s\n' "${GIT_USER}"
    fi
    cat <<EOF
    AcceptEnv GIT_PROTOCOL
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    PermitTTY no
    DisableForwarding yes
EOF
    local line
    for line in "${EXTRA_OPTIONS[@]}"; do
        printf '    %s\n' "${line}"
    done
}

# sshd -t, then: does the configuration sshd reads for this user say what the drop-in says?
validate_sshd() {
    local out effective want
    out=$("${SSHD}" -t -f "${MAIN_CFG}" 2>&1) || { printf '%s\n' "${out}"; return 1; }
    effective=$("${SSHD}" -T -f "${MAIN_CFG}" -C "user=${GIT_USER},host=localhost,addr=127.0.0.1" 2>&1) ||
        { printf '%s\n' "${effective}"; return 1; }
    if [[ ${MODE} == authorized-keys ]]; then
        want=("authorizedkeysfile ${AK_FILE}")
    else
        want=("authorizedkeyscommand ${KEYS_COMMAND}" "authorizedkeyscommanduser ${GIT_USER}")
    fi
    want+=("acceptenv GIT_PROTOCOL" "passwordauthentication no")
    local line
    for line in "${want[@]}"; do
        if ! grep -qxF -- "${line}" <<<"${effective}"; then
            printf 'sshd -T for user %s does not show "%s": is "Include %s/*.conf" in %s, or does an earlier Match block override it?\n' \
                "${GIT_USER}" "${line}" "${DROPIN_DIR}" "${MAIN_CFG}"
            return 1
        fi
    done
    if grep -qi '^forcecommand ' <<<"${effective}" && ! grep -qxi 'forcecommand none' <<<"${effective}"; then
        printf 'sshd applies ForceCommand to user %s (%s): it overrides gatekeeper'"'"'s command=; remove it\n' \
            "${GIT_USER}" "$(grep -i '^forcecommand ' <<<"${effective}")"
        return 1
    fi
}

WANT_DROPIN=$(dropin_text)
ensure_privsep_dir
if [[ -f ${DROPIN} && $(cat "${DROPIN}") == "${WANT_DROPIN}" ]]; then
    ok "sshd drop-in ${DROPIN} (${MODE})"
elif dry; then
    ensure_dir "${DROPIN_DIR}" root:root 755
    change "$([[ -f ${DROPIN} ]] && echo update || echo write) sshd drop-in ${DROPIN} (${MODE}), validate with ${SSHD} -t -f ${MAIN_CFG}:"
    printf '%s\n' "${WANT_DROPIN}" | sed 's/^/             | /'
    [[ -n ${ROOT} ]] || say "  would    reload sshd"
else
    ensure_dir "${DROPIN_DIR}" root:root 755
    backup=
    if [[ -f ${DROPIN} ]]; then
        backup=${DROPIN_DIR}/.${DROPIN_NAME}.gatekeeper-old.$$
        mv -f "${DROPIN}" "${backup}"   # keeps the old file's bytes and times for a rollback
    fi
    printf '%s\n' "${WANT_DROPIN}" | write_file "${DROPIN}" root:root 644
    if ! problem=$(validate_sshd); then
        if [[ -n ${backup} ]]; then
            mv -f "${backup}" "${DROPIN}"
            what="restored the previous ${DROPIN}"
        else
            rm -f "${DROPIN}"
            what="removed ${DROPIN}"
        fi
        printf '%s\n' "${problem}" | sed 's/^/  sshd: /' >&2
        die "sshd rejected the new drop-in; rolled back ($what); sshd was not reloaded"
    fi
    [[ -z ${backup} ]] || rm -f "${backup}"
    change "$([[ -n ${backup} ]] && echo updated || echo wrote) sshd drop-in ${DROPIN} (${MODE}); ${SSHD} -t accepts it"
    manifest_add dropin "${DROPIN}"
    reload_sshd
fi
if ! dry; then
    max_startups=$("${SSHD}" -T -f "${MAIN_CFG}" 2>/dev/null | awk '$1 == "maxstartups" { print $2; exit }')
    [[ ${max_startups} == "${MAX_STARTUPS}" ]] ||
        say "  note     sshd uses MaxStartups ${max_startups:-?}, set before the drop-in's ${MAX_STARTUPS} (fine if it lets 50 connections log in at once)"
fi

# 9. keys-command mode reads no authorized_keys file: gatekeeper's block in one (before a switch,
#    or left by an older install.sh) goes, now that sshd no longer reads it.
if [[ ${MODE} == keys-command && -f ${MANIFEST} ]]; then
    while read -r kind path data; do
        [[ ${kind} == authkeys ]] || continue
        remove_ak_block "${path}" "${data}"
        manifest_del authkeys "${path}"
    done < <(grep '^authkeys ' "${MANIFEST}" || true)
fi

# 10. What the next run and the gatekeeper CLI read: the mode, and the file sshd reads.
conf_text() {
    cat <<EOF
# gatekeeper install.sh: how sshd gets this installation's keys. A run of install.sh without
# --mode keeps this mode; in authorized-keys mode the gatekeeper CLI rewrites authorized_keys
# after every key change. Written by install.sh; edits here are lost.
mode=${MODE}
user=${GIT_USER}
config=${P_CONFIG}
EOF
    [[ ${MODE} != authorized-keys ]] || printf 'authorized_keys=%s\n' "${AK_FILE}"
}
WANT_CONF=$(conf_text)
if [[ -f ${INSTALL_CONF} && $(cat "${INSTALL_CONF}") == "${WANT_CONF}" ]]; then
    ok "${INSTALL_CONF} records mode ${MODE}"
else
    change "$([[ -f ${INSTALL_CONF} ]] && echo update || echo write) ${INSTALL_CONF}: mode ${MODE}$([[ ${MODE} != authorized-keys ]] || echo ", ${AK_FILE}")"
    if ! dry; then
        printf '%s\n' "${WANT_CONF}" | write_file "${INSTALL_CONF}" root:root 644
        manifest_add conf "${INSTALL_CONF}"
    fi
fi

finish "install"
if ((CHANGES > 0)) && ! dry; then
    cat <<EOF
Next, as the git user (never as root: the store must stay ${GIT_USER}'s; sudo -u ${GIT_USER} works too):
  runuser -u ${GIT_USER} -- ${GK} --config ${P_CONFIG} user add alice
  runuser -u ${GIT_USER} -- ${GK} --config ${P_CONFIG} key add alice - < alice.pub$([[ ${MODE} != authorized-keys ]] || echo "   # rewrites ${AK_FILE}")
a repository, NAME.git under ${P_REPOS}, with gatekeeper's hook:
  runuser -u ${GIT_USER} -- git init --bare -b main ${P_REPOS}/NAME.git
  runuser -u ${GIT_USER} -- ${GK} --config ${P_CONFIG} hooks install NAME
and the teams and repositories in ${P_CONFIG} (check it: ${GK} --config ${P_CONFIG} policy check).
EOF
    if [[ -n ${ROOT} ]]; then
        say "Start the staging sshd: ${SSHD} -D -e -f ${MAIN_CFG}   (127.0.0.1, see ListenAddress)"
    fi
fi
