"""The kernel-test environment itself: the ovpn driver, openvpn with DCO, and pyovpn from the checkout.

Runs inside the scripts/guest/run.sh guest (see conftest.py and README.md in this directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

from pyovpn.datachannel.choice import kernel_ovpn_status

CHECKOUT = Path(__file__).resolve().parents[2]
GENL_MIN_ID = 16  # GENL_ID_CTRL; dynamically registered families get ids above it


def run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def test_ovpn_generic_netlink_family_is_registered(ovpn_family_id: int) -> None:
    assert ovpn_family_id > GENL_MIN_ID
    assert Path("/sys/module/ovpn").is_dir(), "the ovpn module is not loaded"


def test_ip_link_add_type_ovpn_creates_and_deletes_a_link() -> None:
    name = f"ovpnk{os.getpid() % 100000}"
    res = run("ip", "link", "add", "dev", name, "type", "ovpn")
    assert res.returncode == 0, f"ip link add {name} type ovpn: {res.stderr.strip()}"
    try:
        res = run("ip", "-d", "-j", "link", "show", "dev", name)
        assert res.returncode == 0, res.stderr
        (link,) = json.loads(res.stdout)
        assert link["ifname"] == name
        assert link["linkinfo"]["info_kind"] == "ovpn"
        assert "POINTOPOINT" in link["flags"]
    finally:
        deleted = run("ip", "link", "del", "dev", name)
    assert deleted.returncode == 0, f"ip link del {name}: {deleted.stderr.strip()}"
    assert run("ip", "link", "show", "dev", name).returncode != 0, f"{name} still exists"


def test_openvpn_is_2_7_with_dco() -> None:
    res = run("openvpn", "--version")
    first = res.stdout.splitlines()[0] if res.stdout else ""
    assert first.startswith("OpenVPN 2.7."), f"openvpn --version: {first!r}"
    assert "[DCO]" in first, f"openvpn built without DCO: {first!r}"


def test_pyovpn_imports_from_the_checkout() -> None:
    # From / so that the import can only come through PYTHONPATH=<checkout>/src (set by the guest's init).
    res = run(
        sys.executable,
        "-c",
        "import pyovpn, pyovpn.cli, pyovpn.daemon, pyovpn.datachannel.userspace; print(pyovpn.__file__)",
        cwd="/",
    )
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve().is_relative_to(CHECKOUT / "src")

    res = run(sys.executable, "-m", "pyovpn", "--version", cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("pyovpn ")


def test_pyovpn_sees_the_kernel_driver() -> None:
    ok, why = kernel_ovpn_status()
    assert ok, why


def test_checkout_is_shared_at_the_host_path() -> None:
    if os.environ.get("PYOVPN_GUEST") != "1":
        return  # only meaningful inside the guest
    assert Path(os.environ["PYOVPN_CHECKOUT"]) == CHECKOUT
    assert Path.cwd() == CHECKOUT


def test_python_requirements_are_met() -> None:
    import cryptography
    import OpenSSL
    import pyroute2
    from OpenSSL import SSL

    assert sys.version_info >= (3, 11)
    assert Version(cryptography.__version__) >= Version("41")
    assert Version(OpenSSL.__version__) >= Version("23.2")
    assert hasattr(SSL.Connection, "export_keying_material")
    assert Version(pyroute2.__version__) >= Version("0.7.9")
