#!/usr/bin/env bash
# scripts/guest/selftest.sh - checks, INSIDE the guest, that the kernel-test environment works.
#
# Owns nothing but a throw-away `ovpn` link (ovpnselftest), created and deleted again.
# Run it through the harness:   scripts/guest/run.sh -- scripts/guest/selftest.sh
# Prints the kernel version, loads ovpn, shows its generic-netlink family (python3 + pyroute2),
# the openvpn version, the Python library versions, and creates + deletes an ovpn link.
# Exits non-zero at the first check that fails.
set -euo pipefail

step() { echo "selftest: --- $*"; }
fail() { echo "selftest: FAILED: $*" >&2; exit 1; }

step "kernel"
uname -r

step "modprobe ovpn"
modprobe ovpn || fail "modprobe ovpn"
grep -E '^ovpn ' /proc/modules || fail "ovpn is not in /proc/modules after modprobe"

step "generic netlink family 'ovpn' (pyroute2)"
python3 - <<'EOF' || fail "no 'ovpn' generic netlink family"
from pyroute2.netlink.generic import GenericNetlinkSocket

sock = GenericNetlinkSocket()
try:
    sock.bind("ovpn", None)  # resolves the family name to its id, or raises NetlinkError(ENOENT)
    print(f"genl family 'ovpn': id {sock.prid}")
finally:
    sock.close()
EOF

step "openvpn"
openvpn_version=$(openvpn --version | head -n 1) || true
echo "$openvpn_version"
[[ "$openvpn_version" == "OpenVPN 2.7."* ]] || fail "expected OpenVPN 2.7.x"
[[ "$openvpn_version" == *"[DCO]"* ]] || fail "openvpn was built without DCO"

step "python libraries"
python3 -c '
import sys, OpenSSL, cryptography, pyroute2, pytest
print("python", sys.version.split()[0])
print("pyOpenSSL", OpenSSL.__version__, "| cryptography", cryptography.__version__,
      "| pyroute2", pyroute2.__version__, "| pytest", pytest.__version__)
' || fail "python libraries"

step "ip link add dev ovpnselftest type ovpn"
ip link add dev ovpnselftest type ovpn || fail "ip link add ... type ovpn"
ip -d link show dev ovpnselftest
ip link del dev ovpnselftest || fail "ip link del ovpnselftest"
! ip link show dev ovpnselftest >/dev/null 2>&1 || fail "ovpnselftest still exists after deletion"

echo "selftest: OK"
