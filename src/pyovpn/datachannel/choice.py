"""Choosing a data-channel backend for ``--dco auto|kernel|userspace`` and saying why in one log line."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess

from pyovpn.datachannel.api import DataChannel
from pyovpn.errors import BackendError

log = logging.getLogger("pyovpn")
DEFAULT_ENGINE = "multiprocess"

_WHAT_TO_DO = "it needs Linux >= 6.16 with the ovpn module (modprobe ovpn) and CAP_NET_ADMIN"


def _family_present() -> tuple[bool, str]:
    """Resolve the generic-netlink family ``ovpn``; then check that commands are allowed."""
    from pyroute2 import NetlinkError

    from pyovpn.datachannel.kernel.genl import OvpnNetlink

    try:
        sock = OvpnNetlink()
    except OSError as e:
        return False, f"cannot open a generic netlink socket: {e.strerror or e}"
    try:
        try:
            sock.bind()
        except Exception:
            release = os.uname().release
            return False, f"the kernel ({release}) has no 'ovpn' generic netlink family"
        # every ovpn command needs CAP_NET_ADMIN; a peer dump of ifindex 0 is refused with
        # EPERM without it and with ENODEV/EINVAL with it, and changes nothing
        try:
            sock.peers(0)
        except NetlinkError as e:
            if e.code in (errno.EPERM, errno.EACCES):
                return False, (
                    "the kernel 'ovpn' driver is present, but this process lacks CAP_NET_ADMIN "
                    "(netlink said EPERM): run as root or grant the capability"
                )
        except Exception as e:  # pragma: no cover - unexpected, but not a reason to refuse
            log.debug("ovpn permission probe failed: %r", e)
    finally:
        sock.close()
    return True, "generic netlink family 'ovpn' found"


def kernel_ovpn_status() -> tuple[bool, str]:
    """Whether the kernel ``ovpn`` driver is usable, and why not.

    Loads the module (``modprobe ovpn``, quietly) if the family is missing. Synchronous
    (pyroute2's sync API): call it with ``asyncio.to_thread`` from a running loop.
    """
    try:
        import pyroute2  # noqa: F401
    except ImportError:  # pragma: no cover - pyroute2 is a dependency
        return False, "pyroute2 is not installed"
    ok, why = _family_present()
    if ok or "generic netlink family" not in why:
        return ok, why
    try:
        subprocess.run(
            ["modprobe", "-q", "ovpn"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ok, f"{why}; {_WHAT_TO_DO}"
    ok, why2 = _family_present()
    if ok:
        return True, f"{why2} (after modprobe ovpn)"
    return False, f"{why2}; {_WHAT_TO_DO}"


def _userspace_backend(
    *, mssfix: int | None, engine: str = DEFAULT_ENGINE, workers: int | None = None
) -> DataChannel:
    """The userspace data channel: the multi-process engine, P2P and MP.

    ``engine`` is the ``userspace-engine`` option: ``inprocess`` forces the simple in-process
    backend; ``workers`` (``engine-workers``) caps the engine's worker processes.
    """
    from pyovpn.datachannel.userspace import UserspaceDataChannel

    if engine == "inprocess":
        log.info("DCO: userspace data channel in-process (userspace-engine inprocess or auto)")
        return UserspaceDataChannel()
    if engine != "multiprocess":
        raise BackendError(f"userspace-engine {engine!r}: use 'multiprocess' or 'inprocess'")
    from pyovpn.datachannel.engine.proxy import EngineDataChannel

    return EngineDataChannel(workers=workers, mssfix=mssfix if mssfix is not None else 1492)


async def open_backend(
    choice: str,
    *,
    mssfix: int | None = None,
    engine: str = DEFAULT_ENGINE,
    workers: int | None = None,
    kernel_refusal: str | None = None,
) -> DataChannel:
    """The backend ``--dco`` asks for; ``kernel_refusal`` says why the configuration needs userspace."""
    if kernel_refusal is not None:
        if choice == "kernel":
            raise BackendError(f"--dco kernel: {kernel_refusal}; use --dco auto or --dco userspace")
        # OpenVPN 2.6 disables DCO for such a configuration in the same way
        log.info("DCO: kernel data channel not used: %s", kernel_refusal)
        return _userspace_backend(mssfix=mssfix, engine=engine, workers=workers)
    # pyroute2's synchronous sockets cannot be created inside a running event loop's thread
    if choice == "kernel":
        ok, why = await asyncio.to_thread(kernel_ovpn_status)
        if not ok:
            raise BackendError(f"--dco kernel: {why}; or use --dco userspace")
        from pyovpn.datachannel.kernel import KernelDataChannel

        log.info("DCO: using the kernel ovpn driver (--dco kernel, %s)", why)
        return KernelDataChannel()
    if choice == "userspace":
        log.info("DCO: using the userspace data channel (--dco userspace)")
        return _userspace_backend(mssfix=mssfix, engine=engine, workers=workers)
    ok, why = await asyncio.to_thread(kernel_ovpn_status)
    if ok:
        from pyovpn.datachannel.kernel import KernelDataChannel

        log.info("DCO: using the kernel ovpn driver (%s)", why)
        return KernelDataChannel()
    log.info("DCO: auto selected the userspace data channel: %s", why)
    return _userspace_backend(mssfix=mssfix, engine=engine, workers=workers)
