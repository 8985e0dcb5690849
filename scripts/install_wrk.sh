#!/usr/bin/env bash
# Install wrk (the HTTP load generator `torchgate bench` drives) from Debian's registry.
# A no-op when wrk is already on PATH. Runs apt-get directly as root, through sudo otherwise.
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_wrk.sh: wrk is not on PATH and apt-get is missing; install wrk by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq -o DPkg::Lock::Timeout=300
$SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=300 wrk >/dev/null
command -v wrk >/dev/null
