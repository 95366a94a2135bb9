"""`passtos` and `dev null` on pyovpn's userspace data plane, against stock OpenVPN 2.6.

`passtos`: the inner packet's TOS byte (IPv4) or traffic class (IPv6) is copied to the outer UDP
packet. Inner pings marked with ``ping -Q`` cross the tunnel; an nftables counter in the
receiving namespace counts the outer packets that carry the mark. Stock OpenVPN with `passtos` is
the oracle for IPv4 (it copies only IPv4 TOS); without `passtos` no outer packet is marked.

`dev null`: no device at both ends, so nothing but keepalive pings and control packets crosses
the link. With `ping 1`/`ping-restart 4` and `reneg-sec 6`, both ends staying up for 12 s
without a ping-restart shows pings flowing both ways, and a second key negotiation shows rekeying.
"""

from __future__ import annotations

import re
import time

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness as h
from tests.netns.harness import Impl, Netns, TunnelSpec
from tests.netns.outer_counters import count_outer, outer_counts, pings_pass

pytestmark = pytest.mark.netns

AF41, EF = 0x88, 0xB8  # TOS bytes: DSCP AF41 / EF with ECN 0
PINGS = 5
MARKS = {"af41": "ip dscp af41", "ef": "ip dscp ef"}  # counters of outer packets by DSCP
KERNEL_NOT_USED = "kernel data channel not used: `passtos`"


@pytest.mark.parametrize(
    ("impl", "engine", "passtos"),
    [
        ("openvpn", "", True),
        ("pyovpn", "multiprocess", True),
        ("pyovpn", "inprocess", True),
        ("pyovpn", "multiprocess", False),
    ],
)
def test_p2p_client_copies_the_tos(net: Netns, pki: Pki, impl: Impl, engine: str, passtos: bool) -> None:
    """A P2P client's outer packets carry its inner packets' DSCP with `passtos`, and only then."""
    spec = TunnelSpec(role="p2p", dco=None, pyovpn_extra=(f"userspace-engine {engine}",) if engine else ())
    count_outer(net.b, "dport", MARKS, "passtos")
    server, client = h.spawn_tunnel(
        net, pki, spec, "openvpn", impl, client_extra="passtos\n" if passtos else ""
    )
    h.wait_for_lines([server, client], h.INIT_LINE, 40)
    addrs = h.inner_addrs(spec)
    pings_pass(net.a, addrs.server4, PINGS, "-Q", hex(AF41))
    if impl == "pyovpn":
        pings_pass(net.a, addrs.server6, PINGS, "-Q", hex(EF))  # pyovpn copies IPv6 traffic classes too
    seen = outer_counts(net.b)
    assert seen["all"] >= PINGS, seen
    if passtos:
        assert seen["af41"] >= PINGS, seen
        if impl == "pyovpn":
            assert seen["ef"] >= PINGS, seen
    else:
        assert seen["af41"] == 0 and seen["ef"] == 0, seen
    if impl == "pyovpn":
        assert client.text().count(KERNEL_NOT_USED) == (1 if passtos else 0), client.tail()


def test_p2mp_server_copies_the_tos(net: Netns, pki: Pki) -> None:
    """A pyovpn P2MP server with `passtos`: packets to a stock client carry the inner DSCP."""
    spec = TunnelSpec(role="server", dco=None)
    count_outer(net.a, "sport", MARKS, "passtos")
    server, client = h.spawn_tunnel(net, pki, spec, "pyovpn", "openvpn", server_extra="passtos\n")
    h.wait_for_lines([server, client], h.INIT_LINE, 40)
    addrs = h.inner_addrs(spec)
    pings_pass(net.b, addrs.client4, PINGS, "-Q", hex(AF41))
    seen = outer_counts(net.a)
    assert seen["af41"] >= PINGS, seen
    assert server.text().count(KERNEL_NOT_USED) == 1, server.tail()


def _null_config(text: str) -> str:
    """The harness's P2P config with `dev null`: no device, so no addresses for it."""
    lines = [ln for ln in text.splitlines() if not ln.startswith(("ifconfig", "dev ", "keepalive"))]
    return "\n".join([*lines, "dev null", "ping 1", "ping-restart 4"]) + "\n"


@pytest.mark.parametrize(
    ("server_impl", "client_impl", "plane"),
    [("openvpn", "pyovpn", "auto"), ("pyovpn", "openvpn", "auto"), ("openvpn", "pyovpn", "inprocess")],
)
def test_dev_null_handshakes_pings_and_rekeys(
    net: Netns, pki: Pki, server_impl: Impl, client_impl: Impl, plane: str
) -> None:
    """`dev null` with stock OpenVPN at the other end: up, keepalive both ways, a rekey.

    ``plane``: pyovpn's userspace plane, the engine (``auto``) or in-process.
    """
    spec = TunnelSpec(role="p2p", dco=None, keepalive=None, reneg_sec=6)
    server_text = h.server_config(spec, pki, impl=server_impl, local=net.outer("b", 4))
    client_text = h.client_config(spec, pki, impl=client_impl, remote=net.outer("b", 4))
    for name, text, impl in (("s.conf", server_text, server_impl), ("c.conf", client_text, client_impl)):
        extra = f"userspace-engine {plane}\n" if impl == "pyovpn" else ""
        (net.workdir / name).write_text(_null_config(text) + extra)
    server = net.spawn("b", h.vpn_argv(server_impl, net.workdir / "s.conf"), f"server-{server_impl}")
    h.wait_listening(net.b, "udp", h.DEFAULT_PORT, proc=server)
    client = net.spawn("a", h.vpn_argv(client_impl, net.workdir / "c.conf"), f"client-{client_impl}")
    h.wait_for_lines([server, client], h.INIT_LINE, 40)
    time.sleep(12)  # two renegotiations and three ping-restart periods
    for proc in (server, client):
        assert proc.running(), proc.tail()
        text = proc.text()
        assert not re.search(r"Inactivity timeout|ping-restart\]|restarting", text), proc.tail()
    py = server if server_impl == "pyovpn" else client
    stock = client if py is server else server
    assert "kernel data channel not used: `dev null`" in py.text(), py.tail()
    assert "null device opened" in py.text(), py.tail()
    where = "offload engine: null device" if plane == "auto" else "userspace data channel: null device"
    assert where in py.text(), py.tail()
    # stock logs a new "Data Channel: ... cipher" line for each key negotiated (initial + rekeys)
    assert len(re.findall(r"Outgoing Data Channel: Cipher", stock.text())) >= 2, stock.tail()
