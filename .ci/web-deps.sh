#!/bin/sh
# Browser for the web view's tests (tests/web): Debian's chromium and chromium-driver.
# Installs only what is missing, without questions; the Python side comes from the
# `web` extra (starlette, hypercorn, selenium, dkimpy). Called from .ci/run.
set -eu
if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
