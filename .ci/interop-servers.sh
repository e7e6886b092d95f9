#!/usr/bin/env bash
# Install the servers of the interop matrix (tests/interop/test_contract.py, docs/interop.md)
# into a private folder, without starting any service and without touching the installed
# Postfix. Idempotent, non-interactive; run as root, e.g. from .ci/run before pytest:
#
#     bash .ci/interop-servers.sh
#
#   - Haraka from npm                     -> $ROOT/haraka/node_modules/.bin/haraka
#   - exim4-daemon-light, opensmtpd       -> `apt-get download` + `dpkg -x` into $ROOT/root
#     (never `apt-get install`: each package would replace Postfix as the system's MTA)
#   - the system users those two binaries look up by compiled-in name (Debian-exim,
#     opensmtpd, opensmtpq), created as their own maintainer scripts would
#
# ROOT is $TRIOMAIL_INTEROP_DIR, default /opt/triomail-interop (the tests read the same
# variable). A server that cannot be installed is reported and its tests skip with the
# reason; the script still exits 0 so that one unavailable registry does not fail CI.
set -uo pipefail

export DEBIAN_FRONTEND=noninteractive
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
ROOT=${TRIOMAIL_INTEROP_DIR:-/opt/triomail-interop}
HARAKA_VERSION=${HARAKA_VERSION:-3.3.4}
DEBS=(exim4-daemon-light opensmtpd libidn12) # libidn12: exim4's one library bookworm lacks

step() { printf '\n==> %s\n' "$*"; }
warn() { printf 'interop-servers: %s\n' "$*" >&2; }

retry() {
    local n
    for n in 1 2 3; do
        "$@" && return 0
        warn "attempt $n failed: $*"
        sleep $((n * 5))
    done
    return 1
}

mkdir -p "$ROOT"

# -- Haraka ----------------------------------------------------------------------------------
haraka_installed() {
    [ -x "$ROOT/haraka/node_modules/.bin/haraka" ] &&
        grep -q "\"version\": \"$HARAKA_VERSION\"" "$ROOT/haraka/node_modules/Haraka/package.json" 2>/dev/null
}
if haraka_installed; then
    step "Haraka $HARAKA_VERSION already in $ROOT/haraka"
elif ! command -v npm >/dev/null; then
    warn "npm not found: Haraka not installed (its contract tests will skip)"
else
    step "npm install Haraka@$HARAKA_VERSION into $ROOT/haraka"
    mkdir -p "$ROOT/haraka"
    [ -f "$ROOT/haraka/package.json" ] ||
        printf '{"name": "triomail-interop-haraka", "private": true}\n' >"$ROOT/haraka/package.json"
    (cd "$ROOT/haraka" && retry npm install --no-save --loglevel=error "Haraka@$HARAKA_VERSION" </dev/null) ||
        warn "npm install Haraka failed (its contract tests will skip)"
fi

# -- Debian packages, unpacked privately ---------------------------------------------------------
if [ -e "$ROOT/root/.unpacked" ]; then
    step "exim4-daemon-light and opensmtpd already unpacked in $ROOT/root"
else
    step "apt-get download ${DEBS[*]} -> dpkg -x $ROOT/root"
    mkdir -p "$ROOT/debs" "$ROOT/root"
    chown _apt "$ROOT/debs" 2>/dev/null || true # apt downloads as _apt when it can
    ok=1
    (cd "$ROOT/debs" && retry apt-get download -q "${DEBS[@]}" </dev/null) || {
        retry apt-get update -q </dev/null && (cd "$ROOT/debs" && retry apt-get download -q "${DEBS[@]}" </dev/null)
    } || ok=0
    if [ "$ok" = 1 ]; then
        for deb in "$ROOT"/debs/*.deb; do
            dpkg -x "$deb" "$ROOT/root" || ok=0
        done
    fi
    if [ "$ok" = 1 ]; then
        touch "$ROOT/root/.unpacked"
    else
        warn "could not download or unpack ${DEBS[*]} (Exim and OpenSMTPD tests will skip)"
    fi
fi

# -- system users the binaries look up by name ---------------------------------------------------
add_user() { # name home
    getent passwd "$1" >/dev/null && return 0
    step "adduser --system $1"
    getent group "$1" >/dev/null || groupadd --system "$1"
    useradd --system --gid "$1" --home-dir "$2" --no-create-home --shell /usr/sbin/nologin "$1"
}
add_user Debian-exim /var/spool/exim4
add_user opensmtpd /var/lib/opensmtpd
add_user opensmtpq /var/lib/opensmtpd

step "interop servers in $ROOT"
ls "$ROOT/haraka/node_modules/.bin/haraka" "$ROOT/root/usr/sbin/exim4" "$ROOT/root/usr/sbin/smtpd" 2>&1 || true
exit 0
