"""The network-namespace laboratory shared by the data-channel backend tests.

Each side of a tunnel is a :class:`Site`: a thread that has ``setns()``-ed into its own
namespace (namespaces are per thread on Linux, and threads it starts inherit it) and runs
its own asyncio loop; a test drives the sites from the main thread, which never leaves
the host namespace. :class:`Lab` creates the namespaces (two of them joined by a veth pair
with :meth:`Lab.pair`) and always deletes exactly those it created, also on failure. All
traffic goes to addresses inside the namespaces.

Used by ``tests/unit`` (userspace and offload backends, in-process multipoint) and by
``tests/kernel`` inside the qemu guest, where ``tests.nslab`` is importable the same way
(the repository root is on ``sys.path`` through pytest's rootdir).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from pyovpn.datachannel.api import Cipher, IfaceMode, KeyDirection, KeySlot, NewIface, NewKey, Notification
from pyovpn.net import tun
from pyovpn.proto.keys import split_key2

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33  # not exported by the socket module
SO_TIMESTAMPNS = 35  # also the cmsg type (SCM_TIMESTAMPNS); not in the socket module
SOL_PACKET, PACKET_VNET_HDR = 263, 15
ETH_P_ALL = 0x0003
_libc = ctypes.CDLL(None, use_errno=True)

VETH_A, VETH_B = "198.18.0.1", "198.18.0.2"  # benchmarking range, only inside our namespaces
TUN_A, TUN_B = "10.99.0.1", "10.99.0.2"
TUN6_A, TUN6_B = "fd99::1", "fd99::2"
PORT = 1194
CIPHER = Cipher.AES_256_GCM


def require_root() -> None:
    """Skip unless this process can create TUN devices and network namespaces."""
    if os.geteuid() != 0:
        print("skipping: the data-channel backend tests need root (TUN devices, network namespaces)")
        pytest.skip("needs root for TUN devices and network namespaces")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun missing (modprobe tun)")
    if shutil.which("ip") is None:
        pytest.skip("needs the iproute2 'ip' command")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Site:
    """One side of a tunnel: a thread inside a namespace running an asyncio loop.

    ``timeout`` bounds :meth:`run`, :meth:`call`, :meth:`sync` and :meth:`request`;
    ``note_timeout`` is the default wait of :meth:`wait_note` (the kernel tests run in an
    emulated guest and pass longer ones).
    """

    def __init__(self, netns: str, *, timeout: float = 30, note_timeout: float = 10) -> None:
        self.netns = netns
        self.timeout = timeout
        self.note_timeout = note_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backend: Any = None
        self.notes: list[Notification] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"site-{netns}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("site thread did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            fd = os.open(f"/var/run/netns/{self.netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            self.loop = asyncio.new_event_loop()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or self.timeout)

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` in the loop's thread (inside the namespace)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def sync(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` in a worker thread of the namespace (no running loop: pyroute2 sync API)."""
        return self.run(asyncio.to_thread(fn), timeout)

    def request(self, cmd: Any, timeout: float | None = None) -> Any:
        assert self.backend is not None
        return self.run(self.backend.request(cmd), timeout)

    def wait_note(self, pred: Callable[[Notification], bool], timeout: float | None = None) -> Notification:
        timeout = timeout or self.note_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in list(self.notes):
                if pred(n):
                    return n
            time.sleep(0.02)
        raise AssertionError(f"{self.netns}: no matching notification in {timeout}s; got {self.notes}")

    def stop(self) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        if self.backend is not None:
            with contextlib.suppress(Exception):
                self.run(self.backend.close(), timeout=max(10, self.timeout / 3))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Lab:
    """Private namespaces, created on demand; :meth:`pair` makes A and B joined by a veth pair.

    ``prefix`` names the namespaces (``pyovpn-<prefix>-<tag>-a``) and ``veth`` the veth
    devices; ``no_ipv6`` turns IPv6 off in every namespace (no router solicitations or MLD
    reports taking packet ids); ``site_options`` go to every :class:`Site`.
    """

    def __init__(
        self, prefix: str = "t", veth: str = "pv", *, no_ipv6: bool = False, **site_options: Any
    ) -> None:
        self.tag = secrets.token_hex(3)
        self.prefix = prefix
        self.ns_a = self.ns("a")
        self.ns_b = self.ns("b")
        self.veth_a = f"{veth}{self.tag}a"
        self.veth_b = f"{veth}{self.tag}b"
        self.no_ipv6 = no_ipv6
        self.site_options = site_options
        self.namespaces: list[str] = []  # exactly those created, for cleanup
        self.sites: list[Site] = []

    def ns(self, name: str) -> str:
        return f"pyovpn-{self.prefix}-{self.tag}-{name}"

    def add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        if self.no_ipv6:
            for key in ("all", "default"):
                subprocess.run(
                    ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"],
                    capture_output=True,
                    timeout=30,
                )

    def veth(self, dev_a: str, ns_a: str, addr_a: str, dev_b: str, ns_b: str, addr_b: str) -> None:
        """A veth pair between two of our namespaces, each end with its /24 address and up."""
        ip("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")

    def pair(self) -> None:
        """Namespaces A and B joined by ``veth_a`` (VETH_A) and ``veth_b`` (VETH_B)."""
        self.add_ns(self.ns_a)
        self.add_ns(self.ns_b)
        self.veth(self.veth_a, self.ns_a, VETH_A, self.veth_b, self.ns_b, VETH_B)

    def site(self, ns: str) -> Site:
        s = Site(ns, **self.site_options)
        self.sites.append(s)
        return s

    def close(self) -> None:
        for s in self.sites:
            with contextlib.suppress(Exception):
                s.stop()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@contextlib.contextmanager
def open_lab(lab: Lab, *, pair: bool = False) -> Iterator[Lab]:
    """Yield ``lab`` (paired if asked) and close it afterwards, also when setup fails."""
    try:
        if pair:
            lab.pair()
        yield lab
    finally:
        lab.close()


# ---------------------------------------------------------------------------- helpers run in a site


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


async def ping(dst: str, count: int = 3, timeout: float = 2.0, size: int = 48) -> int:
    """ICMP echo over a raw socket (no ping binary needed); returns the number of replies."""
    loop = asyncio.get_running_loop()
    ident = secrets.randbelow(0xFFFF)
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.setblocking(False)
        for seq in range(count):
            body = struct.pack("!HH", ident, seq) + os.urandom(size)
            pkt = struct.pack("!BBH", 8, 0, checksum(b"\x08\0\0\0" + body)) + body
            await loop.sock_sendto(sock, pkt, (dst, 0))
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
                except TimeoutError:
                    break
                ihl = (data[0] & 0x0F) * 4
                if data[ihl] == 0 and struct.unpack_from("!HH", data, ihl + 4) == (ident, seq):
                    replies += 1
                    break
    return replies


def udp_socket(
    site: Site, bind: tuple[str, int] = ("127.0.0.1", 0), family: int = socket.AF_INET
) -> socket.socket:
    """A bound UDP socket created inside ``site``'s namespace (usable from any thread)."""

    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(bind)
        return s

    return site.call(make)


def tcp_listener(site: Site, bind: tuple[str, int]) -> socket.socket:
    """A listening TCP socket created inside ``site``'s namespace."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(bind)
        s.listen(1)
        return s

    return site.call(make)


def tcp_pair(site: Site) -> tuple[socket.socket, socket.socket]:
    """(accepted, connecting) ends of a loopback TCP connection inside ``site``'s namespace."""
    ls = tcp_listener(site, ("127.0.0.1", 0))
    try:
        client = site.call(lambda: socket.create_connection(ls.getsockname()))
        server, _ = ls.accept()
    finally:
        ls.close()
    return server, client


def packet_socket(
    site: Site, ifname: str, *, vnet_hdr: bool = False, timestamps: bool = False, timeout: float = 0.2
) -> socket.socket:
    """An AF_PACKET socket in ``site``'s namespace that sees every frame on ``ifname``, both ways.

    ``vnet_hdr``: each frame starts with its virtio_net_hdr (a GSO train shows its segment
    size); ``timestamps``: SO_TIMESTAMPNS ancillary data; ``timeout`` 0 makes it non-blocking.
    The large buffer keeps a capture from dropping frames during bulk transfers.
    """

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        if vnet_hdr:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind((ifname, 0))
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        if timestamps:
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.settimeout(timeout)
        return s

    return site.call(make)


# ---------------------------------------------------------------------------- keys


def keys(key2: bytes, *, client: bool, cipher: Cipher = CIPHER) -> tuple[KeyDirection, KeyDirection]:
    """(encrypt, decrypt) directions of a 256-byte key2 block, as OpenVPN splits it."""
    return split_key2(key2, cipher, tls_client=client)


def keydir(cipher: Cipher = CIPHER) -> KeyDirection:
    """A random key direction for ``cipher``."""
    return KeyDirection(os.urandom(cipher.key_len), os.urandom(8))


def install_key(
    site: Site,
    peer_id: int,
    slot: KeySlot,
    key_id: int,
    key2: bytes,
    *,
    client: bool,
    cipher: Cipher = CIPHER,
) -> None:
    enc, dec = keys(key2, client=client, cipher=cipher)
    site.request(NewKey(peer_id, slot, key_id, cipher, enc, dec))


# ---------------------------------------------------------------------------- tunnel endpoints


def start_side(site: Site, backend: Any, tun_addr: str, tun_peer: str, tun6: str, mtu: int = 1400) -> str:
    """``backend`` drives a P2P TUN in ``site`` with ``tun_addr`` (peer ``tun_peer``) and ``tun6``.

    Its notifications go to ``site.notes``; returns the interface name.
    """
    site.backend = backend
    backend.subscribe(site.notes.append)
    site.request(NewIface("tun", IfaceMode.P2P, mtu))
    ifname: str = backend.ifname
    assert ifname and ifname.startswith("tun")

    def addresses() -> None:
        # called with the site's loop running: exercises tun.py's worker-thread path
        tun.add_address(ifname, tun_addr, 32, peer=tun_peer)
        tun.add_address(ifname, tun6, 64)

    site.call(addresses)
    return ifname


def tcp_bulk(a: Site, b: Site, nbytes: int, port: int = 5201, dst: str = TUN_B) -> float:
    """Send ``nbytes`` over one TCP connection A -> B through the tunnel; returns seconds.

    Sockets are created inside the sites' namespaces; using them from this thread is fine
    (a socket keeps the namespace it was created in).
    """
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET

    def listen() -> socket.socket:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((dst, port))
        s.listen(1)
        return s

    ls = b.call(listen)
    got = bytearray()
    errors: list[BaseException] = []

    def sink() -> None:
        try:
            ls.settimeout(30)
            conn, _ = ls.accept()
            conn.settimeout(30)
            with conn:
                while True:
                    d = conn.recv(1 << 20)
                    if not d:
                        break
                    got.extend(d)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    payload = os.urandom(nbytes)
    start = time.monotonic()
    c = a.call(lambda: socket.socket(fam, socket.SOCK_STREAM))
    try:
        c.settimeout(30)
        c.connect((dst, port))
        c.sendall(payload)
    finally:
        c.close()
    t.join(60)
    ls.close()
    elapsed = time.monotonic() - start
    assert not errors, errors
    assert bytes(got) == payload, f"the stream must arrive intact ({len(got)} of {nbytes} bytes)"
    return elapsed
