"""openvpn-monitor's web page, fetched over HTTP, lists a server's clients: stock OpenVPN 2.6 and pyovpn.

The same P2MP configuration runs with stock OpenVPN and with pyovpn as the server, with two stock
clients; openvpn-monitor (the real package, run as its WSGI app) reads the server's management
socket on each page load. The page must show each client's common name, VPN address, real
address and port and bytes, agreeing with what the server itself says in `status 2`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki, issue_client
from tests.netns import harness as h
from tests.netns.monitor_web import MonitorPage, session_rows
from tests.netns.test_management import Mgmt

pytestmark = pytest.mark.netns

NAMES = ("alice", "bob")


def start_server_and_clients(star: h.Star, pki: Pki, impl: str) -> str:
    """A server (stock or pyovpn) with a unix management socket and the stock clients of NAMES, up."""
    sock = str(star.workdir / "mgmt.sock")
    conf = star.workdir / "server.conf"
    conf.write_text(h.p2mp_server_config(pki, "10.85.0.0", f"management {sock} unix"))
    argv = ["openvpn"] if impl == "openvpn" else [sys.executable, "-m", "pyovpn"]
    server = star.spawn(star.server, [*argv, "--config", str(conf)], f"server-{impl}")
    h.wait_listening(star.server, "udp", 1194, proc=server)
    clients = []
    for i, cn in enumerate(NAMES):
        crt, key = issue_client(pki, cn)
        cconf = star.workdir / f"{cn}.conf"
        cconf.write_text(h.p2mp_client_config(pki, star.server_addr(i), crt, key))
        clients.append(star.spawn(star.peers[i], ["openvpn", "--config", str(cconf)], f"client-{cn}"))
    h.wait_for_lines([server, *clients], h.INIT_LINE, 60)
    for i in range(len(NAMES)):
        assert h.ping(star.peers[i], "10.85.0.1", count=3).ok
    return sock


def _status_rows(sock: str) -> dict[str, list[str]]:
    m = Mgmt(sock)
    try:
        assert m.line().startswith(">INFO:")
        rows = [r.split(",") for r in m.command("status 2", multi=True)]
        m.sock.sendall(b"quit\n")
    finally:
        m.close()
    return {r[1]: r for r in rows if r[0] == "CLIENT_LIST"}


def _page_view(tmp_path: Path, pki: Pki, impl: str) -> list[tuple[str, str, str]]:
    (tmp_path / impl).mkdir()
    with h.Star(tmp_path / impl, len(NAMES), base=241) as star:
        sock = start_server_and_clients(star, pki, impl)
        truth = _status_rows(sock)
        with MonitorPage(star.workdir, sock, f"{impl} server") as monitor:
            page = monitor.fetch()
        (star.workdir / "page.html").write_text(page)
        rows = session_rows(page)
        assert sorted(r["name"] for r in rows) == sorted(NAMES), page
        for r in rows:
            row = truth[r["name"]]  # CLIENT_LIST,CN,real,virtual,virtual6,rx,tx,...
            assert f"{r['remote_ip']}:{r['port']}" == row[2], (r, row)
            assert r["vpn_ip"] == row[3], (r, row)
            # the page is a later look than `status 2`: the counts only grow
            assert int(r["bytes_in"]) >= int(row[5]) > 0 and int(r["bytes_out"]) >= int(row[6]) > 0, (r, row)
            assert r["remote_ip"] == star.peer_addr(NAMES.index(r["name"]))
        return sorted((r["name"], r["remote_ip"], r["vpn_ip"].rsplit(".", 1)[0]) for r in rows)


def test_openvpn_monitor_page_lists_the_clients(tmp_path: Path, pki: Pki) -> None:
    missing = [m for m in ("openvpn_monitor", "flask_wtf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"missing {missing}: run scripts/setup.sh (it installs openvpn-monitor and its web stack)"
        )
    stock = _page_view(tmp_path, pki, "openvpn")
    ours = _page_view(tmp_path, pki, "pyovpn")
    assert ours == stock, (stock, ours)
