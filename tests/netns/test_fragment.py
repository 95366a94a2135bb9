"""OpenVPN's `fragment` on both of pyovpn's userspace planes, against stock OpenVPN 2.6 (P2P, UDP).

Both ends run `fragment 1000`; inner pings of up to the tun MTU (1500) and beyond (the kernel
splits those at the tun) cross both ways, while an nftables counter in each namespace sees no
outer UDP datagram with more than 1000 bytes of payload: every packet larger than that must have
been cut by the sender and put back together by the receiver. Keepalive pings (1 s, restart
after 5 s) then keep both ends up with nothing else crossing.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness as h
from tests.netns.harness import Impl, Netns, TunnelSpec
from tests.netns.outer_counters import count_outer, outer_counts, pings_pass

pytestmark = pytest.mark.netns

MAX = 1000
PINGS = 4


@pytest.mark.parametrize(
    ("server_impl", "client_impl", "plane"),
    [("openvpn", "pyovpn", "auto"), ("pyovpn", "openvpn", "auto"), ("openvpn", "pyovpn", "inprocess")],
)
def test_fragment_with_stock_openvpn(
    net: Netns, pki: Pki, server_impl: Impl, client_impl: Impl, plane: str
) -> None:
    """``plane``: pyovpn's userspace plane, the engine (``auto``) or in-process."""
    spec = TunnelSpec(role="p2p", dco=None, keepalive=(1, 5))
    for ns in (net.a, net.b):
        # a UDP GSO train would cross the veth as one super-packet: have it cut before the counters
        subprocess.run([*h.netns_exec(ns), "ip", "link", "set", "veth0", "gso_max_segs", "1"], check=True)
    # data packets only (opcode DATA_V2 in the payload's top 5 bits; control packets are not
    # fragmented, as in OpenVPN); `udp length` counts the 8-byte UDP header
    big = {"big": f"@th,64,5 9 udp length > {MAX + 8}"}
    count_outer(net.b, "dport", big, "fragment")
    count_outer(net.a, "sport", big, "fragment")
    extra = f"fragment {MAX}\n"
    py_extra = extra + f"userspace-engine {plane}\n"
    server, client = h.spawn_tunnel(
        net,
        pki,
        spec,
        server_impl,
        client_impl,
        server_extra=py_extra if server_impl == "pyovpn" else extra,
        client_extra=py_extra if client_impl == "pyovpn" else extra,
    )
    h.wait_for_lines([server, client], h.INIT_LINE, 40)
    addrs = h.inner_addrs(spec)
    for size in (1200, 1472, 3000):
        pings_pass(net.a, addrs.server4, PINGS, "-s", str(size))
        pings_pass(net.b, addrs.client4, PINGS, "-s", str(size))
    to_server, to_client = outer_counts(net.b), outer_counts(net.a)
    assert to_server["big"] == 0 and to_client["big"] == 0, (to_server, to_client)
    assert to_server["all"] >= 6 * PINGS * 2 and to_client["all"] >= 6 * PINGS * 2, (to_server, to_client)
    py = server if server_impl == "pyovpn" else client
    assert "kernel data channel not used: `fragment`" in py.text(), py.tail()
    assert ("offload engine" in py.text()) == (plane == "auto"), py.tail()
    # keepalive pings carry the fragment header too: with nothing else crossing, no ping-restart
    time.sleep(7)
    for proc in (server, client):
        assert proc.running(), proc.tail()
        assert not re.search(r"Inactivity timeout|restarting", proc.text()), proc.tail()
