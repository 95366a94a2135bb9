#!/usr/bin/env bash
# Installs what pyovpn's test suite needs on a fresh Debian 12, as root; safe to re-run.
#
# Debian packages: the stock openvpn (interop peer), iperf3, iproute2 (ip netns, ss),
# iputils-ping, nftables (packet counters by DSCP; packet loss for bench/lossy.py), procps
# (sysctl), python3-venv, tcpdump (debugging captures) and tmux (a terminal for the
# password-prompt test).
# Python: pyovpn editable with its [test] extra, into the first of
#   1. ./.venv, if it already exists;
#   2. the current python3, if its pip accepts the install;
#   3. a new ./.venv, if python3 is "externally managed" (PEP 668) or has no pip.
# .ci/run applies the same rule (".venv if present, else python3") to pick the interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(openvpn iperf3 iproute2 iputils-ping nftables procps python3-venv tcpdump tmux)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: must run as root (apt-get, and the netns tests need it anyway)" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup.sh: Debian packages already installed: ${PACKAGES[*]}"
else
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

install_into() {
    # $1: python interpreter; pip output is kept quiet unless it fails.
    "$1" -m pip install --quiet --disable-pip-version-check -e '.[test]'
    # The monitoring tools users run against OpenVPN, for tests/netns/test_monitoring_tools.py.
    # openvpn-monitor pins exact versions of its dependencies; it runs with these current ones
    # (flask and flask-wtf serve its page, tests/netns/test_openvpn_monitor_page.py).
    "$1" -m pip install --quiet --disable-pip-version-check openvpn-api openvpn-management-api jc semver geoip2 humanize \
        flask flask-wtf
    "$1" -m pip install --quiet --disable-pip-version-check --no-deps openvpn-monitor
    # openvpn-api pulls the old openvpn-status (same module name, cannot read 2.6 dates);
    # openvpn-status-reader is the maintained one
    "$1" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall openvpn-status-reader
}

if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
    install_into "$PY"
else
    PY=$(command -v python3)
    if ! out=$(install_into "$PY" 2>&1); then
        if grep -qE "externally-managed-environment|No module named pip" <<<"$out"; then
            echo "setup.sh: $PY refuses a system-wide pip install (externally managed or no pip); using .venv"
            python3 -m venv .venv
            PY=.venv/bin/python
            install_into "$PY"
        else
            echo "$out" >&2
            exit 1
        fi
    fi
fi
echo "setup.sh: pyovpn installed (editable, with [test]) for $PY ($("$PY" --version 2>&1))"
