"""pyovpn as a P2MP server over TCP (`proto tcp-server`) with three stock OpenVPN 2.6 clients.

The same Star layout as test_server.py. Every client has its own TCP connection, which the
server reads until the client's tunnel is up and then hands to the data channel. PYOVPN_TEST_DCO
=kernel (in the guest) runs the server on the kernel ovpn driver.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import INIT_LINE, Proc, Star, ping, wait_for_lines, wait_listening
from tests.netns.test_server import (
    CLIENTS,
    PLANES,
    SERVER4,
    SERVER6,
    assert_plane,
    client_conf,
    plane_line,
    pushed_ip,
    server_conf,
)

pytestmark = pytest.mark.netns


@pytest.fixture
def star(tmp_path: Path) -> Iterator[Star]:
    with Star(tmp_path, 3, base=220) as s:
        yield s


def _start(star: Star, pki: Pki, plane: str = "auto") -> tuple[Proc, list[Proc], Path]:
    status = star.workdir / "status.txt"
    extra = f"proto tcp-server\nstatus {status} 1\nstatus-version 2\n{plane_line(plane)}"
    conf = server_conf(pki, star.workdir, client_to_client=True, extra=extra)
    server = star.spawn(star.server, [sys.executable, "-m", "pyovpn", "--config", str(conf)], "server-pyovpn")
    wait_listening(star.server, "tcp", 1194, timeout=30, proc=server)  # the guest's emulated CPUs are slow
    clients = []
    for i, (cn, cipher) in enumerate(CLIENTS):
        cconf = client_conf(pki, star.workdir, cn, star.server_addr(i), cipher, extra="proto tcp-client")
        clients.append(star.spawn(star.peers[i], ["openvpn", "--config", str(cconf)], f"client-{cn}"))
    wait_for_lines([server, *clients], INIT_LINE, 60)
    return server, clients, status


def _client_rows(status: Path) -> list[str]:
    return [ln for ln in status.read_text().splitlines() if ln.startswith("CLIENT_LIST,")]


@pytest.mark.parametrize("plane", PLANES)
def test_three_stock_clients_over_tcp(star: Star, pki: Pki, plane: str) -> None:
    server, clients, status = _start(star, pki, plane)
    assert_plane(server, plane)
    addrs = [pushed_ip(c.text()) for c in clients]
    assert len(set(addrs)) == 3
    for (cn, cipher), c in zip(CLIENTS, clients, strict=True):
        assert f"Data Channel: cipher '{cipher}'" in c.text(), f"{cn} did not get {cipher}"
        assert "TCP connection established with" in c.text(), f"{cn} did not connect over TCP"
    assert server.text().count("TCP connection established with") == 3
    assert "Listening for incoming TCP connection" in server.text()
    for i in range(3):
        assert ping(star.peers[i], SERVER4).ok, f"client {i} cannot reach the server over TCP"
        assert ping(star.peers[i], SERVER6).ok, f"client {i} cannot reach the server over IPv6 in TCP"
    assert ping(star.peers[0], addrs[1]).ok, "client-to-client over two TCP connections"
    deadline = time.monotonic() + 5
    while len(_client_rows(status)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = _client_rows(status)
    assert len(rows) == 3, rows
    for i in range(3):  # each client's real address and port is its TCP connection's
        assert any(f",{star.peer_addr(i)}:" in r for r in rows), rows
    assert server.running()


def test_tcp_client_leaves_and_comes_back(star: Star, pki: Pki) -> None:
    """A client's connection closing removes that client only; it reconnects on a new connection."""
    server, clients, _status = _start(star, pki)
    mark = server.mark()
    clients[0].stop()
    server.wait_for_line("client disconnected", 20, since=mark)
    assert ping(star.peers[1], SERVER4).ok, "another client lost its tunnel"
    cconf = star.workdir / f"{CLIENTS[0][0]}.conf"
    again = star.spawn(star.peers[0], ["openvpn", "--config", str(cconf)], "client-again")
    wait_for_lines([again], INIT_LINE, 60)
    assert ping(star.peers[0], SERVER4).ok, "the client did not come back over a new connection"
    assert ping(star.peers[2], SERVER4).ok
    assert server.running()
