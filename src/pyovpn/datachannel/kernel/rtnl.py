"""The ``ovpn`` link over rtnetlink: create it, delete it, read its kind and mode, and
remove one a killed earlier run left behind.

These calls use pyroute2's synchronous ``IPRoute``; pyroute2 0.9 refuses to run it in a
thread whose asyncio loop is running, so the backend calls them through
``asyncio.to_thread`` and :func:`cleanup_stale_iface` through ``call_outside_loop``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable

from pyroute2 import IPRoute, NetlinkError

from pyovpn.datachannel.api import IfaceMode
from pyovpn.datachannel.kernel.genl import NEED_CAP, NO_DRIVER, OvpnNetlink
from pyovpn.datachannel.kernel.uapi import OVPN_LINK_KIND, ovpnmsg
from pyovpn.errors import BackendError
from pyovpn.net.blocking import call_outside_loop

__all__ = ["cleanup_stale_iface", "create_link", "delete_link"]

log = logging.getLogger(__name__)


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    for msg in ipr.get_links(index):
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return None if kind is None else str(kind)
    return None


def _link_mode(ipr: IPRoute, index: int) -> int | None:
    """IFLA_OVPN_MODE of an ovpn link as the kernel reports it (None if not reported)."""
    for msg in ipr.get_links(index):
        info = msg.get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        if data is not None and hasattr(data, "get_attr"):
            mode = data.get_attr("IFLA_OVPN_MODE")
            return None if mode is None else int(mode)
    return None


def _explain(what: str, e: NetlinkError) -> BackendError:
    code = e.code
    if code in (errno.EPERM, errno.EACCES):
        return BackendError(f"{what}: {NEED_CAP}")
    if code == errno.EOPNOTSUPP:
        return BackendError(f"{what}: {NO_DRIVER}")
    text = e.args[1] if len(e.args) > 1 and e.args[1] else os.strerror(code)
    return BackendError(f"{what}: {text} ({errno.errorcode.get(code, code)})")


def _add_link(ipr: IPRoute, what: str, pattern: str, mode: IfaceMode) -> str:
    """Add the link under the first free name ``pattern`` allows; returns that name."""
    numbered = "%d" in pattern
    candidates = (pattern.replace("%d", str(i), 1) for i in range(4096)) if numbered else iter([pattern])
    for cand in candidates:
        try:
            ipr.link("add", ifname=cand, kind=OVPN_LINK_KIND, IFLA_OVPN_MODE=int(mode))
        except NetlinkError as e:
            if e.code == errno.EEXIST and numbered:
                continue
            if e.code == errno.EEXIST:
                index = ipr.link_lookup(ifname=cand)
                kind = _link_kind(ipr, index[0]) if index else None
                if kind == OVPN_LINK_KIND:
                    raise BackendError(
                        f"{what}: an ovpn interface named {cand!r} already exists (another pyovpn/"
                        f"openvpn, or left by a killed run: remove it with 'ip link del {cand}' or "
                        "pyovpn.datachannel.kernel.rtnl.cleanup_stale_iface)"
                    ) from None
                raise BackendError(
                    f"{what}: an interface named {cand!r} already exists and is not an ovpn device "
                    f"(kind {kind or 'unknown'})"
                ) from None
            raise _explain(f"{what}: create ovpn interface {cand!r}", e) from None
        return cand
    raise BackendError(f"{what}: no free interface name for pattern {pattern!r}")


def create_link(name: str, mode: IfaceMode, mtu: int) -> tuple[int, str]:
    """Create an ``ovpn`` link named ``name`` (``%d`` picks a free number, default ``tun%d``)
    and bring it up with ``mtu``; returns its index and name."""
    what = "NewIface"
    pattern = "tun%d" if name in ("", "tun") else name
    if len(pattern.replace("%d", "99").encode()) >= 16:
        raise BackendError(f"{what}: interface name {pattern!r} is too long (at most 15 bytes)")
    try:
        with IPRoute() as ipr:
            ifname = _add_link(ipr, what, pattern, mode)
            index = int(ipr.link_lookup(ifname=ifname)[0])
            try:
                ipr.link("set", index=index, mtu=mtu, state="up")
            except NetlinkError as e:
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=index)
                if e.code in (errno.EINVAL, errno.ERANGE):
                    raise BackendError(f"{what}: MTU {mtu} is not accepted by the ovpn device") from None
                raise _explain(f"{what}: configure {ifname}", e) from None
            return index, ifname
    except PermissionError:
        raise BackendError(f"{what}: {NEED_CAP}") from None
    except OSError as e:
        raise BackendError(f"{what}: {e.strerror or e}") from None


def _run(what: str, work: Callable[[IPRoute], bool]) -> bool:
    """``work`` on a fresh rtnetlink socket; False if a link it touched was gone (ENODEV)."""
    try:
        with IPRoute() as ipr:
            return work(ipr)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise _explain(what, e) from None
    except PermissionError:
        raise BackendError(f"{what}: {NEED_CAP}") from None


def delete_link(what: str, index: int) -> bool:
    """Delete a link by index; False if it was already gone."""

    def work(ipr: IPRoute) -> bool:
        ipr.link("del", index=index)
        return True

    return _run(what, work)


def _in_use(name: str, index: int) -> bool:
    """Whether the ovpn link still has peers (a failed query counts as none)."""
    peers: list[ovpnmsg] = []
    with contextlib.suppress(Exception), OvpnNetlink() as genl:
        genl.bind()
        peers = genl.peers(index)
    if peers:
        log.warning("not removing ovpn interface %s: it has %d peer(s), so it is in use", name, len(peers))
    return bool(peers)


def cleanup_stale_iface(name: str, *, force: bool = False) -> bool:
    """Delete the ``ovpn`` interface ``name`` left behind by a killed previous run.

    Only a link whose kind is ``ovpn`` is ever deleted; any other link of that name is
    left alone. A link that still has peers belongs to a live process (the kernel drops a
    peer when the last descriptor of its socket is closed, e.g. when its process dies),
    so it is kept unless ``force``. Returns True if a link was deleted. Safe to call from
    a thread that runs an asyncio loop (the netlink work then happens in a helper thread).
    """

    def work(ipr: IPRoute) -> bool:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        index = int(found[0])
        kind = _link_kind(ipr, index)
        if kind != OVPN_LINK_KIND:
            log.info("not removing %s: it is a %s interface, not ovpn", name, kind or "unknown")
            return False
        if not force and _in_use(name, index):
            return False
        ipr.link("del", index=index)
        log.warning("removed stale ovpn interface %s (ifindex %d) left by a previous run", name, index)
        return True

    return call_outside_loop(lambda: _run(f"remove stale interface {name}", work))
