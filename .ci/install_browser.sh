#!/usr/bin/env bash
# Headless Chromium for tests/cluster/test_mlflow_ui.py: Debian's package, installed only when missing.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
/usr/bin/chromium --version
