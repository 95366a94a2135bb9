"""Control group: the netns harness driving stock OpenVPN on both ends.

If these fail, the harness or the machine is broken, not pyovpn; the interop matrix in
test_interop.py only means something while these pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    Netns,
    Tunnel,
    TunnelSpec,
    count_rekeys,
    describe_iperf,
    iperf3_transfer,
    max_stall_seconds,
    ping,
    start_tunnel,
    sweep_stale_namespaces,
)

MB = 1_000_000

pytestmark = pytest.mark.netns


def _ping_both(net: Netns, tunnel: Tunnel) -> None:
    for addr in (tunnel.addrs.server4, tunnel.addrs.server6):
        res = ping(net.a, addr)
        assert res.ok, f"ping {addr} from client ns failed:\n{res.output}\n{tunnel.logs()}"


def _stop_clean(tunnel: Tunnel) -> None:
    codes = tunnel.stop()
    assert codes == {"client": 0, "server": 0}, f"exit codes {codes}\n{tunnel.logs()}"


def test_server_mode_udp4_tls_crypt(net: Netns, pki: Pki) -> None:
    """(a) openvpn --mode server <-> openvpn client, UDP over IPv4, tls-crypt, AES-256-GCM."""
    spec = TunnelSpec(role="server", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4)
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="openvpn")
    _ping_both(net, tunnel)
    res = iperf3_transfer(net.a, net.b, tunnel.addrs.server4, nbytes=50 * MB, log_dir=net.workdir)
    assert res["bytes"] >= 50 * MB, describe_iperf(res) + "\n" + tunnel.logs()
    assert "Data Channel: cipher 'AES-256-GCM'" in tunnel.server.text()
    _stop_clean(tunnel)


def test_p2p_tcp6_tls_auth(net: Netns, pki: Pki) -> None:
    """(b) openvpn P2P tls-server <-> tls-client, TCP over IPv6, tls-auth."""
    spec = TunnelSpec(role="p2p", cipher="AES-128-GCM", wrap="tls-auth", proto="tcp", family=6)
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="openvpn")
    _ping_both(net, tunnel)
    assert "[AF_INET6]" in tunnel.client.text()
    _stop_clean(tunnel)


def test_rekey_under_load(net: Netns, pki: Pki) -> None:
    """(c) reneg-sec 10 for ~25 s of iperf3: at least 2 completed renegotiations, no stall."""
    spec = TunnelSpec(role="server", cipher="CHACHA20-POLY1305", wrap="tls-auth", proto="udp", reneg_sec=10)
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="openvpn")
    res = iperf3_transfer(net.a, net.b, tunnel.addrs.server6, seconds=25, log_dir=net.workdir)
    detail = describe_iperf(res) + "\n" + tunnel.logs()
    for name, proc in (("server", tunnel.server), ("client", tunnel.client)):
        rekeys = count_rekeys(proc.text())
        assert rekeys >= 2, f"{name} logged {rekeys} rekeys\n{detail}"
    assert res["max_stall"] <= 2.0, detail
    _stop_clean(tunnel)


def test_inline_p2p_udp6_tls_crypt(net: Netns, pki: Pki) -> None:
    """Inline <ca>/<cert>/<key>/<tls-crypt> blocks as written by the config writer."""
    spec = TunnelSpec(role="p2p", wrap="tls-crypt", proto="udp", family=6, inline=True)
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="openvpn")
    _ping_both(net, tunnel)
    _stop_clean(tunnel)


def test_netns_teardown_kills_and_deletes() -> None:
    """Leaving the context (here by an exception) kills every process and deletes both namespaces."""
    procs = []
    with pytest.raises(RuntimeError), Netns() as n:
        names = list(n.names.values())
        for side in ("a", "b"):
            procs.append(n.spawn(side, ["sleep", "600"], f"sleep-{side}"))
        # A stray process started behind the harness' back must be killed too.
        stray = subprocess.Popen(["ip", "netns", "exec", n.b, "sleep", "600"])
        raise RuntimeError("boom")
    assert stray.wait(timeout=10) == -9
    assert all(p.returncode is not None for p in procs)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listed for name in names)


def test_stale_namespaces_of_dead_runs_are_swept() -> None:
    """A run killed with SIGKILL leaves pov-<pid>-* behind; the next Netns removes them."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"pov-{dead.pid}-0ddba1-a"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in sweep_stale_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
    # Our own (live) namespaces are never swept.
    with Netns() as n:
        assert not set(n.names.values()) & set(sweep_stale_namespaces())


def test_teardown_removes_pyovpn_state_of_its_namespaces() -> None:
    """What a pyovpn killed with -9 keeps for its namespace in /run/pyovpn (named by the
    namespace's inode, as pyovpn names it) goes with the namespace; nothing stays behind."""
    code = (
        "from pyovpn.edge.routejournal import journal_path\n"
        "from pyovpn.rundir import RUN_DIR\n"
        "p = journal_path(RUN_DIR, 'tun7')\n"
        "p.parent.mkdir(parents=True, exist_ok=True)\n"
        "p.write_text('{\"pid\": 1}\\n')\n"
        "print(p, flush=True)\n"
    )
    with Netns() as n:
        writer = n.spawn("a", [sys.executable, "-c", code], "writer")
        assert writer.wait(20) == 0, writer.tail()
        left = Path(writer.text().strip().splitlines()[-1])
        assert left.exists() and left.name == f"routes-{os.stat(f'/run/netns/{n.a}').st_ino}-tun7.journal"
    assert not left.exists()


def test_count_rekeys_and_stall_parsing() -> None:
    """Pure parsing checks on hand-written log lines and interval lists."""
    peer = "2026-11-25 10:18:06 us=1 client/172.31.254.1:5"
    installed = [
        f"{peer} Outgoing Data Channel: Cipher 'AES-256-GCM' initialized with 256 bit key",
        f"{peer} Incoming Data Channel: Cipher 'AES-256-GCM' initialized with 256 bit key",
    ]
    log = "\n".join(
        [
            "x [client] Peer Connection Initiated with [AF_INET]172.31.254.1:5",
            *installed,
            f"{peer} TLS: soft reset sec=10/10 bytes=1/-1 pkts=1/0",
            *installed,
        ]
    )
    assert count_rekeys(log) == 1
    assert count_rekeys("") == 0
    ivs = [
        {"start": float(i), "end": float(i + 1), "bytes": b} for i, b in enumerate([5, 0, 0, 7, 0, 0, 0, 1])
    ]
    assert max_stall_seconds(ivs) == 3.0
