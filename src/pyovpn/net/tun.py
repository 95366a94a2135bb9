"""TUN devices and their link configuration (MTU, state, addresses, routes) via rtnetlink.

``open_tun`` creates a layer-3 TUN device (``IFF_TUN | IFF_NO_PI``) through
``/dev/net/tun``; the device lives as long as the returned descriptor is open. The
other helpers are thin pyroute2 calls that turn netlink failures into
:class:`~pyovpn.errors.BackendError` messages saying what to do about them.

pyroute2's synchronous ``IPRoute`` drives a private event loop and refuses to run in
a thread whose asyncio loop is already running, so when called from such a thread
the helpers do their netlink work in a short-lived worker thread. Async callers that
must not block their loop for the (millisecond) round trip can wrap the calls in
``asyncio.to_thread``. Threads inherit the caller's network namespace.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import IPRoute, NetlinkError

from pyovpn.errors import BackendError
from pyovpn.net.blocking import call_outside_loop

__all__ = ["add_address", "add_route", "configure_link", "del_link", "open_null", "open_tun"]

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, padding to 40 bytes

IFA_F_NODAD = 0x02

_NEED_ROOT = "needs CAP_NET_ADMIN: run as root (or grant the capability)"

T = TypeVar("T")


def open_null() -> int:
    """OpenVPN's `dev null`: a descriptor that takes the packets a tun would and discards them.

    It is write-only and never readable, so the data plane watches nothing: no packet ever
    comes from it (OpenVPN's null device reads nothing either).
    """
    return os.open(os.devnull, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def open_tun(name: str | None = None, *, multi_queue: bool = False) -> tuple[int, str]:
    """Create (or attach to) a TUN device; return ``(fd, ifname)``.

    ``name`` None, ``""`` or ``"tun"`` lets the kernel pick ``tunN``; a name with
    ``%d`` is a pattern. The descriptor is non-blocking and close-on-exec; closing
    it removes a non-persistent device.
    """
    pattern = "tun%d" if name in (None, "", "tun") else name
    assert pattern is not None
    raw = pattern.encode()
    if len(raw) >= IFNAMSIZ:
        raise BackendError(f"interface name {pattern!r} is too long (at most {IFNAMSIZ - 1} bytes)")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackendError(
            f"{TUN_DEVICE} missing: modprobe tun (or mknod {TUN_DEVICE} c 10 200 in a container)"
        ) from None
    except PermissionError:
        raise BackendError(f"cannot open {TUN_DEVICE}: {_NEED_ROOT}") from None
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            raise BackendError(f"{TUN_DEVICE} has no driver behind it: modprobe tun") from None
        raise BackendError(f"cannot open {TUN_DEVICE}: {e.strerror}") from None
    flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
    try:
        result = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, flags))
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            reason = _NEED_ROOT
        elif e.errno == errno.EBUSY:
            reason = "the interface is already in use by another process"
        elif e.errno == errno.EINVAL:
            reason = (
                "invalid name, an interface of another kind already has it, or the "
                "existing device's flags (multi_queue) differ"
            )
        else:
            reason = e.strerror or str(e)
        raise BackendError(f"cannot create TUN interface {pattern!r}: {reason}") from None
    ifname = _IFREQ.unpack(result)[0].rstrip(b"\0").decode()
    return fd, ifname


def configure_link(ifname: str, mtu: int, up: bool = True) -> None:
    """Set ``ifname``'s MTU and bring it up (or down)."""
    if not 68 <= mtu <= 65535:
        raise BackendError(f"configure {ifname}: MTU {mtu} out of range 68..65535")

    def op(ipr: IPRoute) -> None:
        ipr.link("set", index=_index(ipr, ifname), mtu=mtu, state="up" if up else "down")

    _run(f"configure {ifname}", op)


def add_address(ifname: str, address: str, prefixlen: int, peer: str | None = None) -> None:
    """Add an IPv4 or IPv6 address; with ``peer`` it is a point-to-point address."""
    local, remote = _prefix_and_partner(
        f"add address {address}/{prefixlen} to {ifname}", ("address", address), prefixlen, ("peer", peer)
    )

    def op(ipr: IPRoute) -> None:
        spec: dict[str, object] = {"index": _index(ipr, ifname), "prefixlen": prefixlen}
        # IFA_LOCAL is our address; IFA_ADDRESS is the far end on a point-to-point link
        spec["local"] = str(local)
        spec["address"] = str(remote if remote is not None else local)
        if local.version == 6:
            spec["flags"] = IFA_F_NODAD  # usable at once; DAD is meaningless on a TUN
        ipr.addr("add", **spec)

    what = f"add address {address}/{prefixlen}" + (f" peer {peer}" if peer else "") + f" to {ifname}"
    _run(what, op)


def add_route(
    ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
) -> None:
    """Route ``network/prefixlen`` through ``ifname`` (optionally via ``gateway``)."""
    net, gw = _prefix_and_partner(
        f"add route {network}/{prefixlen} via {gateway or ifname}",
        ("network", network),
        prefixlen,
        ("gateway", gateway),
    )

    def op(ipr: IPRoute) -> None:
        ipr.route("add", **_route_attrs(ipr, ifname, net, prefixlen, gw, metric))

    _run(f"add route {network}/{prefixlen} via {gateway or ifname}", op)


def del_route(
    ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
) -> None:
    """Remove a route added with :func:`add_route`; a route that is already gone is not an error."""
    net = _ip(network, "network")
    gw = _ip(gateway, "gateway") if gateway is not None else None

    def op(ipr: IPRoute) -> None:
        try:
            ipr.route("del", **_route_attrs(ipr, ifname, net, prefixlen, gw, metric))
        except NetlinkError as e:
            if e.code != 3:  # ESRCH: no such route
                raise

    _run(f"delete route {network}/{prefixlen} via {gateway or ifname}", op)


def flush_addresses(ifname: str) -> None:
    """Remove every address (and so the routes that depend on them) from ``ifname``."""

    def op(ipr: IPRoute) -> None:
        index = _index(ipr, ifname)
        for msg in ipr.get_addr(index=index):
            ipr.addr("del", index=index, address=msg.get_attr("IFA_ADDRESS"), prefixlen=msg["prefixlen"])

    _run(f"flush addresses of {ifname}", op)


def del_link(ifname: str) -> None:
    """Delete the interface ``ifname``."""

    def op(ipr: IPRoute) -> None:
        ipr.link("del", index=_index(ipr, ifname))

    _run(f"delete {ifname}", op)


# ---------------------------------------------------------------------------- internals


def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise BackendError(f"{what} {text!r} is not an IP address") from None


def _prefix_and_partner(
    what: str, address: tuple[str, str], prefixlen: int, partner: tuple[str, str | None]
) -> tuple[
    ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address | None
]:
    """``address`` and its partner (a peer or gateway, may be absent), of one family, with a
    prefix length that fits the address."""
    ip = _ip(address[1], address[0])
    if not 0 <= prefixlen <= ip.max_prefixlen:
        raise BackendError(f"{what}: bad prefix length")
    label, text = partner
    other = _ip(text, label) if text is not None else None
    if other is not None and other.version != ip.version:
        raise BackendError(f"{what}: address families differ")
    return ip, other


def _route_attrs(
    ipr: IPRoute,
    ifname: str,
    net: ipaddress.IPv4Address | ipaddress.IPv6Address,
    prefixlen: int,
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    metric: int | None,
) -> dict[str, object]:
    attrs: dict[str, object] = {"dst": str(net), "dst_len": prefixlen, "oif": _index(ipr, ifname)}
    if gateway is not None:
        attrs["gateway"] = str(gateway)
    if metric is not None:
        attrs["priority"] = metric
    return attrs


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise BackendError(f"no interface named {ifname!r}")
    return int(found[0])


def _explain(what: str, code: int, message: str) -> BackendError:
    hints = {
        errno.EPERM: _NEED_ROOT,
        errno.EACCES: _NEED_ROOT,
        errno.EEXIST: "it already exists",
        errno.ENODEV: "no such interface",
        errno.ENETUNREACH: "the gateway is not reachable through that interface",
        errno.EADDRNOTAVAIL: "address not available on that interface",
        errno.EOPNOTSUPP: "not supported (is IPv6 disabled on the interface?)",
    }
    return BackendError(f"{what}: {hints.get(code, message or os.strerror(code))}")


def _call(what: str, op: Callable[[IPRoute], T]) -> T:
    try:
        with IPRoute() as ipr:
            return op(ipr)
    except NetlinkError as e:
        raise _explain(what, e.code, str(e)) from None
    except PermissionError:
        raise BackendError(f"{what}: {_NEED_ROOT}") from None
    except OSError as e:
        raise BackendError(f"{what}: {e.strerror or e}") from None


def _run(what: str, op: Callable[[IPRoute], T]) -> T:
    return call_outside_loop(lambda: _call(what, op))
