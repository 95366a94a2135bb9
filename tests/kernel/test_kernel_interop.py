"""In the guest: pyovpn on the kernel ovpn backend against OpenVPN 2.7 with DCO, both directions.

Each cell brings the tunnel up with both ends offloaded to the kernel, checks that pyovpn's
interface is an `ovpn` device, pings both inner addresses and moves data with iperf3, and
measures pyovpn's own CPU time during the transfer (it must stay near zero: the kernel moves
the packets). One cell runs reneg-sec 10 and checks that keys are swapped without a stall.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.netns.harness import MAX_STALL_SECONDS, Netns, TunnelSpec, iperf3_transfer, ping, start_tunnel

from pyovpn.tools.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def net(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Netns(tmp_path / "net") as n:
        yield n


def _both_dco(**fields: Any) -> TunnelSpec:
    """A tunnel with both ends on the kernel driver: pyovpn's kernel backend, openvpn's DCO."""
    return TunnelSpec(dco="kernel", openvpn_dco=True).with_(**fields)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CELLS = [
    # (role, pyovpn side, proto, family, cipher)
    ("server", "client", "udp", 4, "AES-256-GCM"),  # pyovpn client -> openvpn --mode server (DCO)
    ("p2p", "server", "udp", 6, "CHACHA20-POLY1305"),
    ("p2p", "client", "tcp", 4, "AES-128-GCM"),
]


@pytest.mark.parametrize(("role", "side", "proto", "family", "cipher"), CELLS)
def test_kernel_backend_with_openvpn_dco(
    net: Netns, pki: Pki, role: str, side: str, proto: str, family: int, cipher: str
) -> None:
    spec = _both_dco(role=role, cipher=cipher, wrap="tls-crypt", proto=proto, family=family)
    impls = ("openvpn", "pyovpn") if side == "client" else ("pyovpn", "openvpn")
    tunnel = start_tunnel(net, pki, spec, server_impl=impls[0], client_impl=impls[1], timeout=60)
    py = tunnel.client if side == "client" else tunnel.server
    ov = tunnel.server if side == "client" else tunnel.client
    assert "using the kernel ovpn driver" in py.text()
    assert "DCO device tun0 opened" in ov.text() or "dco" in ov.text().lower()
    ns = net.a if side == "client" else net.b
    link = subprocess.run(
        ["ip", "-n", ns, "-d", "link", "show", "tun0"], capture_output=True, text=True
    ).stdout
    assert "ovpn" in link, link
    assert ping(net.a, tunnel.addrs.server4, timeout=20).ok
    assert ping(net.a, tunnel.addrs.server6, timeout=20).ok
    before = _cpu_seconds(py.pid)
    res = iperf3_transfer(net.a, net.b, tunnel.addrs.server4, seconds=5, log_dir=net.workdir)
    used = _cpu_seconds(py.pid) - before
    assert res["bytes"] > 0
    # the kernel moves the packets; the control plane only wakes for timers
    assert used < 0.02 * res["seconds"], (
        f"pyovpn used {used:.2f} s of CPU during a {res['seconds']:.1f} s transfer"
    )
    assert tunnel.stop()[side] == 0


def test_kernel_rekeys_during_transfer(net: Netns, pki: Pki) -> None:
    spec = _both_dco(role="server", cipher="AES-128-GCM", wrap="tls-auth", reneg_sec=10)
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="pyovpn", timeout=60)
    res = iperf3_transfer(net.a, net.b, tunnel.addrs.server4, seconds=40, log_dir=net.workdir)
    # openvpn 2.7 with DCO does not log each installed key, so count pyovpn's swaps; the ping
    # afterwards proves the stock end decrypts (and sends with) the newest key as well
    assert tunnel.client.text().count("data channel now sends with key_id") >= 3, tunnel.logs()
    assert tunnel.server.running(), tunnel.logs()
    assert res["max_stall"] <= MAX_STALL_SECONDS, res["intervals"]
    assert ping(net.a, tunnel.addrs.server4, timeout=20).ok
    assert tunnel.stop()["client"] == 0


def test_kernel_backend_after_dropping_to_nobody(net: Netns, pki: Pki) -> None:
    """The same privilege-drop scenario as tests/netns/test_privdrop.py, on the kernel backend."""
    from tests.netns.test_privdrop import test_user_nobody_keeps_only_cap_net_admin_and_rekeys as scenario

    scenario(net, pki, dco="kernel")


def test_silent_peer_is_expired_by_the_kernel_and_pyovpn_reconnects(net: Netns, pki: Pki) -> None:
    spec = _both_dco(role="p2p", cipher="AES-256-GCM", wrap="tls-auth", keepalive=(1, 4))
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="pyovpn", timeout=60)
    mark = tunnel.client.mark()
    # with DCO the peer's kernel keeps answering pings even if its process is stopped, so the
    # silence has to be on the wire: take the far end's link down
    subprocess.run(["ip", "-n", net.b, "link", "set", "veth0", "down"], check=True)
    try:
        tunnel.client.wait_for_line("Inactivity timeout", 30, since=mark)
    finally:
        subprocess.run(["ip", "-n", net.b, "link", "set", "veth0", "up"], check=True)
    tunnel.client.wait_for_line("Initialization Sequence Completed", 90, since=mark)
    assert ping(net.a, tunnel.addrs.server4, timeout=30).ok
    assert tunnel.stop()["client"] == 0


def test_kill_9_leaves_a_link_the_next_start_cleans_up(net: Netns, pki: Pki) -> None:
    import signal

    spec = _both_dco(role="p2p", cipher="AES-128-GCM", wrap="none")
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="pyovpn", timeout=60)
    os.kill(tunnel.client.pid, signal.SIGKILL)
    tunnel.client.wait(10)
    link = subprocess.run(["ip", "-n", net.a, "-d", "link", "show", "tun0"], capture_output=True, text=True)
    assert "ovpn" in link.stdout, "a SIGKILLed pyovpn leaves its ovpn link behind (nothing can remove it)"
    again = net.spawn("a", tunnel.client.argv, "client-pyovpn-again")
    again.wait_for_line("Initialization Sequence Completed", 90)
    assert "removed stale ovpn interface tun0" in again.text()
    assert ping(net.a, tunnel.addrs.server4, timeout=30).ok
    assert again.stop() == 0
    left = subprocess.run(["ip", "-n", net.a, "link", "show", "tun0"], capture_output=True, text=True)
    assert left.returncode != 0, "a clean exit must remove the ovpn link"
