#!/usr/bin/env bash
# System packages for the DKIM interop tests (tests/dkim/test_dkim_opendkim.py):
#   opendkim        `opendkim -t` verifies a message file offline (TestPublicKeys)
#   opendkim-tools  opendkim-testmsg (probed; skipped while Debian's build is broken)
# Installed only when missing, non-interactively, as root (CI runs as root). Package
# maintainer scripts are kept from starting the opendkim service (policy-rc.d), as .ci/run
# does for postfix. The tests skip, with a reason, when a package is absent.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

missing=()
for pkg in opendkim opendkim-tools; do
    is_installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "dkim-deps: opendkim and opendkim-tools already installed"
    exit 0
fi

policy_rc_d=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy_rc_d=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# added by .ci/dkim-deps.sh for the duration of apt-get\nexit 101\n' >"$policy_rc_d"
    chmod 755 "$policy_rc_d"
    trap 'rm -f "$policy_rc_d"' EXIT
fi
for attempt in 1 2 3; do
    if apt-get update -q </dev/null &&
        apt-get install -y -q \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}" </dev/null; then
        exit 0
    fi
    echo "dkim-deps: attempt $attempt failed" >&2
    sleep $((attempt * 5))
done
exit 1
