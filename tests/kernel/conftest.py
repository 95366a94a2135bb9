"""Gate for the kernel tests (this directory only): they need the Linux ``ovpn`` driver.

The tests here run INSIDE the qemu guest that boots Debian's linux 7.3 with the ``ovpn`` module::

    scripts/guest/build.sh && scripts/guest/run.sh -- python3 -m pytest tests/kernel

On a machine without the driver (the usual host) every test here is skipped, with the reason
shown by ``pytest -ra``. Inside the guest (``PYOVPN_GUEST=1``, set by the guest's init) a missing
driver is an error instead, so a broken guest cannot pass by skipping everything.
"""

from __future__ import annotations

import functools
import os

import pytest

SKIP_REASON = (
    "kernel ovpn driver not available here; run via scripts/guest/run.sh -- python3 -m pytest tests/kernel"
)


def in_guest() -> bool:
    """True inside the scripts/guest/run.sh guest."""
    return os.environ.get("PYOVPN_GUEST") == "1"


@functools.cache
def find_ovpn_family() -> int | None:
    """The id of the ``ovpn`` generic-netlink family, or None if the kernel has no such family."""
    try:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.generic import GenericNetlinkSocket
    except ImportError:
        return None
    sock = GenericNetlinkSocket()
    try:
        sock.bind("ovpn", None)  # resolves the name; NetlinkError(ENOENT) when there is no such family
        return int(sock.prid)
    except NetlinkError:
        return None
    finally:
        sock.close()


def pytest_report_header(config: pytest.Config) -> str:
    family = find_ovpn_family()
    where = "in the pyovpn guest" if in_guest() else "not in the pyovpn guest"
    if family is None:
        return f"kernel tests: {os.uname().release}, no 'ovpn' genl family ({where})"
    return f"kernel tests: {os.uname().release}, 'ovpn' genl family id {family} ({where})"


@pytest.fixture(autouse=True)
def _kernel_ovpn_required() -> None:
    if find_ovpn_family() is None:
        if in_guest():
            pytest.fail("the guest has no 'ovpn' generic netlink family: did `modprobe ovpn` fail?")
        pytest.skip(SKIP_REASON)
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (CAP_NET_ADMIN)")


@pytest.fixture
def ovpn_family_id() -> int:
    """The id of the kernel's ``ovpn`` generic-netlink family."""
    family = find_ovpn_family()
    assert family is not None
    return family
