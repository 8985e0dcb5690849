#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks run for real, when their command is
# missing: `install_tools.sh prometheus wrk` (each name is both the command and the package).
#   prometheus  a real Prometheus server for the scrape tests (tests/integration/test_prometheus.py)
#   wrk         the HTTP load generator `python -m benchmarks.load` drives
#   haproxy     a real load balancer in front of torchgate replicas (tests/kserve/test_scale_out.py);
#               Debian installs it in /usr/sbin
# A no-op for commands already on PATH. Runs apt-get as root, through sudo otherwise; apt-get
# update runs first because fresh images carry no package lists, and waits for a dpkg lock
# another process holds instead of failing.
set -euo pipefail

missing=()
for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/bin/$tool" ] || [ -x "/usr/sbin/$tool" ] \
        || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_tools.sh: ${missing[*]} missing and no apt-get here; install them by hand" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_tools.sh: need root or sudo" >&2; exit 1; }
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
lock=(-o DPkg::Lock::Timeout=300)
$sudo apt-get update -qq "${lock[@]}"
# --no-install-recommends: the Prometheus server alone, not node-exporter and friends. The
# tests start their own server; the package's service start is skipped without an init system.
$sudo apt-get install -y -qq --no-install-recommends "${lock[@]}" "${missing[@]}" >/dev/null
for tool in "${missing[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/bin/$tool" ] || [ -x "/usr/sbin/$tool" ]
done
