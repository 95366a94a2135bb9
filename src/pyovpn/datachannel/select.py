"""Choosing a data-channel backend for ``--dco auto|kernel|userspace`` and saying why in one log line."""

from __future__ import annotations

import asyncio
import logging
import os

from pyovpn.datachannel.api import DataChannel
from pyovpn.errors import BackendError

log = logging.getLogger("pyovpn")


def kernel_ovpn_status() -> tuple[bool, str]:
    """Whether the kernel ``ovpn`` generic-netlink family is usable, and why not."""
    try:
        from pyroute2.netlink.generic import GenericNetlinkSocket
    except ImportError:  # pragma: no cover - pyroute2 is a dependency
        return False, "pyroute2 is not installed"
    sock = GenericNetlinkSocket()
    try:
        sock.bind("ovpn", None)
    except Exception:
        release = os.uname().release
        return False, (
            f"the kernel ({release}) has no 'ovpn' generic netlink family: it needs Linux >= 6.16 "
            "with the ovpn module (modprobe ovpn)"
        )
    finally:
        sock.close()
    return True, "the kernel 'ovpn' driver is available"


async def open_backend(choice: str) -> DataChannel:
    # pyroute2's synchronous sockets cannot be created inside a running event loop's thread
    if choice == "kernel":
        ok, why = await asyncio.to_thread(kernel_ovpn_status)
        if not ok:
            raise BackendError(f"--dco kernel: {why}; or use --dco userspace")
        raise BackendError(
            "--dco kernel: the kernel ovpn driver is present, but pyovpn's kernel backend is not "
            "implemented in this release; use --dco userspace (or auto)"
        )
    from pyovpn.datachannel.userspace import UserspaceDataChannel

    if choice == "userspace":
        log.info("DCO: using the userspace data channel (--dco userspace)")
    else:
        ok, why = await asyncio.to_thread(kernel_ovpn_status)
        reason = (
            why
            if not ok
            else "kernel driver found, but the kernel backend is not implemented in this release"
        )
        log.info("DCO: auto selected the userspace data channel: %s", reason)
    return UserspaceDataChannel()
