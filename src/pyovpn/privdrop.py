"""Dropping root after setup: `chroot DIR`, then become ``user``/``group`` keeping only CAP_NET_ADMIN.

OpenVPN 2.6/2.7 need CAP_SETPCAP for this (libcap-ng) and otherwise silently turn DCO off.
pyovpn needs nothing extra: PR_SET_KEEPCAPS keeps the permitted set across setuid(), then
capset() narrows permitted and effective to CAP_NET_ADMIN alone, which is what every data
channel command (netlink to the kernel ``ovpn`` driver, routes, addresses) needs afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import importlib
import logging
import os
import pwd

from pyovpn.errors import ConfigError, PyovpnError

log = logging.getLogger("pyovpn")

CAP_NET_ADMIN = 12
_PR_SET_KEEPCAPS = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _capset_only(cap: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[cap // 32].effective = data[cap // 32].permitted = 1 << (cap % 32)
    if _libc().capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PyovpnError(f"capset failed: {os.strerror(err)}")


def resolve(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    """uid/gid for the configured names; ConfigError when they do not exist."""
    uid = gid = None
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"user '{user}' does not exist") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"group '{group}' does not exist") from None
    return uid, gid


# Modules Python imports on first use that a running daemon may still need once the files are out
# of reach: the IDNA codec (resolving a remote's name), the default executor (asyncio.to_thread),
# the LZ4 decompressor (the first compressed packet).
_IMPORT_BEFORE_CHROOT = ("encodings.idna", "concurrent.futures.thread", "lz4.block")


def chroot(directory: str) -> None:
    """`chroot DIR`: make DIR the root and / the working directory (OpenVPN's platform_chroot)."""
    for name in _IMPORT_BEFORE_CHROOT:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    os.chroot(directory)
    os.chdir("/")
    log.info("chroot to '%s' and cd to '/' succeeded", directory)


def drop_privileges(user: str | None, group: str | None, *, chroot_dir: str | None = None) -> None:
    """`chroot DIR` if given, then switch to user/group, keeping CAP_NET_ADMIN only (effective and
    permitted). The names are looked up first: inside the new root there is no user database."""
    uid, gid = resolve(user, group)
    if chroot_dir is not None:
        chroot(chroot_dir)
    if uid is None and gid is None:
        return
    if os.geteuid() != 0:
        raise PyovpnError("user/group need pyovpn to start as root (or with CAP_SETUID/CAP_SETGID)")
    libc = _libc()
    if libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise PyovpnError(f"prctl(PR_SET_KEEPCAPS): {os.strerror(ctypes.get_errno())}")
    os.setgroups([])
    if gid is not None:
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)
    libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0)
    _capset_only(CAP_NET_ADMIN)
    log.info("privileges dropped to uid %d gid %d, keeping CAP_NET_ADMIN only", os.getuid(), os.getgid())


def effective_capabilities(pid: int | str = "self") -> int:
    """CapEff of a process as a bit mask (for tests and diagnostics)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0
