"""user/group: after setup pyovpn runs unprivileged with only CAP_NET_ADMIN, and rekeys keep working."""

from __future__ import annotations

import os
import pwd
import signal
from pathlib import Path

import pytest

from pyovpn.privdrop import CAP_NET_ADMIN, effective_capabilities
from pyovpn.tools.pki import Pki
from tests.netns.harness import INIT_LINE, Netns, TunnelSpec, ping, spawn_tunnel

pytestmark = pytest.mark.netns


def test_user_nobody_keeps_only_cap_net_admin_and_rekeys(
    net: Netns, pki: Pki, dco: str = "userspace"
) -> None:
    spec = TunnelSpec(role="p2p", wrap="tls-crypt", reneg_sec=5, dco=dco, openvpn_dco=dco == "kernel")
    # the unprivileged process must still be able to read nothing else: certs are loaded before the drop
    _server, client = spawn_tunnel(
        net, pki, spec, "openvpn", "pyovpn", client_extra="user nobody\ngroup nogroup\n", init_timeout=30
    )
    client.wait_for_line("privileges dropped", 10)
    status = Path(f"/proc/{client.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert all(int(u) == pwd.getpwnam("nobody").pw_uid for u in uid_line.split()[1:])
    assert effective_capabilities(client.pid) == 1 << CAP_NET_ADMIN
    perm = next(line for line in status.splitlines() if line.startswith("CapPrm:"))
    assert int(perm.split()[1], 16) == 1 << CAP_NET_ADMIN
    for n in range(1, 3):
        client.wait_for_line(f"data channel now sends with key_id={n}", 30)
    assert ping(net.a, "10.77.0.1").ok
    assert client.stop() == 0


def test_chroot_then_reconnects_inside_it(net: Netns, pki: Pki) -> None:
    """`chroot DIR` (NetworkManager passes one): once up, pyovpn's root is DIR and it runs as nobody;
    a SIGUSR1 restart afterwards (new TLS session, keys, push) still works from inside the empty root."""
    root = net.workdir / "chroot"
    root.mkdir()
    spec = TunnelSpec(role="server", wrap="tls-crypt")
    drop = f"chroot {root}\nuser nobody\ngroup nogroup\n"
    _server, client = spawn_tunnel(net, pki, spec, "openvpn", "pyovpn", client_extra=drop, init_timeout=30)
    client.wait_for_line("privileges dropped", 10)
    assert os.readlink(f"/proc/{client.pid}/root") == str(root)
    assert ping(net.a, "10.77.0.1").ok
    mark = client.mark()
    os.kill(client.pid, signal.SIGUSR1)
    client.wait_for_line(INIT_LINE, 40, since=mark)
    assert ping(net.a, "10.77.0.1").ok, client.tail()
    assert "Traceback" not in client.text()
    assert client.stop() == 0, client.tail()
