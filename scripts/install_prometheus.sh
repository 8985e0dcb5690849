#!/usr/bin/env bash
# Installs a real Prometheus server for tests/integration/test_prometheus.py (Debian's package).
# A no-op when prometheus is already on PATH or at /usr/bin/prometheus. Needs root (CI runs as
# root) or sudo; apt-get update runs first because fresh images carry no package lists.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_prometheus: no apt-get here; install Prometheus >= 2.x and put it on PATH" >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install_prometheus: need root or sudo to run apt-get install prometheus" >&2
        exit 1
    fi
    sudo="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
# --no-install-recommends: only the server, not node-exporter and friends. The package's own
# service is not needed (the test starts its own server); in a container without an init
# system its post-install start is skipped.
$sudo apt-get install -y -q --no-install-recommends prometheus
prometheus --version 2>&1 | head -n 1
