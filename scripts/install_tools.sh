#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks run for real, when their command is
# missing: `install_tools.sh prometheus wrk java` (each name is a command; its package is the
# same name unless package_for says otherwise).
#   prometheus  a real Prometheus server for the scrape tests (tests/integration/test_prometheus.py)
#   wrk         the HTTP load generator `python -m benchmarks.load` drives
#   haproxy     a real load balancer in front of torchgate replicas (tests/kserve/test_scale_out.py);
#               Debian installs it in /usr/sbin
#   java        the JVM a real TorchServe runs on (tests/support/torchserve.py: the tests that
#               compare with TorchServe); package default-jre-headless
# A no-op for commands already on PATH. Runs apt-get as root, through sudo otherwise; apt-get
# update runs first because fresh images carry no package lists, and waits for a dpkg lock
# another process holds instead of failing.
#   install_tools.sh --packages CMD...   prints the package of each command, installs nothing
set -euo pipefail

# The Debian package that provides a command, where its name is not the command's.
package_for() {
    case "$1" in
        java) echo default-jre-headless ;;
        *) echo "$1" ;;
    esac
}

if [ "${1:-}" = "--packages" ]; then
    shift
    for tool in "$@"; do package_for "$tool"; done
    exit 0
fi

present() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/bin/$1" ] || [ -x "/usr/sbin/$1" ]
}

missing=()
packages=()
for tool in "$@"; do
    present "$tool" || { missing+=("$tool"); packages+=("$(package_for "$tool")"); }
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_tools.sh: ${missing[*]} missing and no apt-get here; install ${packages[*]} by hand" >&2
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
# The JRE's postinst links its man page there and fails where slim images left the folder out.
[[ " ${packages[*]} " == *" default-jre-headless "* ]] && $sudo mkdir -p /usr/share/man/man1
$sudo apt-get install -y -qq --no-install-recommends "${lock[@]}" "${packages[@]}" >/dev/null
for tool in "${missing[@]}"; do
    present "$tool" || { echo "install_tools.sh: $tool still missing after apt-get" >&2; exit 1; }
done
