"""Operations against stock OpenVPN 2.6: the status file line by line, and sd_notify READY at tunnel-up.

The status tests run the same configuration once with stock OpenVPN and once with pyovpn as
the server (or the P2P client), with the same stock peer, and compare the files' shape: the
same lines, sections and columns; only values that differ by nature (times, byte counts,
ports, the TITLE text) are masked.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness as h

pytestmark = pytest.mark.netns

_DATE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
_ADDR = re.compile(r"^[0-9a-f.:]+:\d+$")  # ip:port
_IP = re.compile(r"^[0-9a-f.:]+(/\d+)?$")


def shape(text: str) -> list[list[str]]:
    """Each line as its fields, with times, numbers, addresses and the TITLE text masked."""
    sep = "\t" if "\t" in text else ","
    out = []
    for line in text.splitlines():
        fields = line.split(sep)
        if fields[0] == "TITLE":
            out.append(["TITLE", "<title>"])
            continue
        masked = []
        for f in fields:
            if _DATE.match(f):
                masked.append("<date>")
            elif f.isdigit():
                masked.append("<n>")
            elif _ADDR.match(f) and f.count(".") == 3:
                masked.append("<addr>")
            elif _IP.match(f) and any(c.isdigit() for c in f) and ("." in f or ":" in f):
                masked.append("<ip>")
            else:
                masked.append(f)
        out.append(masked)
    return out


def _wait_status(path: Path, ready: re.Pattern[str], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if ready.search(text) and text.rstrip().endswith("END"):
            return text
        time.sleep(0.3)
    raise AssertionError(f"{path} never matched {ready.pattern!r}; last content:\n{text}")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_server_status_file_matches_stock_openvpn(tmp_path: Path, pki: Pki, version: int) -> None:
    files: dict[str, str] = {}
    for impl in ("openvpn", "pyovpn"):
        with h.Netns(tmp_path / impl) as net:
            status = net.workdir / "status.log"
            conf = net.workdir / "s.conf"
            conf.write_text(
                h.p2mp_server_config(
                    pki,
                    "10.79.0.0",
                    "server-ipv6 fd00:79::/64",
                    f"status {status} 1",
                    f"status-version {version}",
                    "data-ciphers AES-256-GCM",
                )
            )
            server = net.start_server(impl, conf)
            cconf = net.workdir / "c.conf"
            cconf.write_text(h.p2mp_client_config(pki, net.outer("b", 4), pki.client_crt, pki.client_key))
            client = net.spawn("a", h.vpn_argv("openvpn", cconf), "client-openvpn")
            h.wait_for_lines([server, client], h.INIT_LINE, 30)
            assert h.ping(net.a, "10.79.0.1").ok
            row = r"^CLIENT_LIST[,\t]client[,\t]" if version > 1 else r"^client,"
            files[impl] = _wait_status(status, re.compile(row, re.M))
            assert (status.stat().st_mode & 0o777) == 0o600 or impl == "openvpn"
    stock, ours = shape(files["openvpn"]), shape(files["pyovpn"])
    assert ours == stock, f"stock:\n{files['openvpn']}\npyovpn:\n{files['pyovpn']}"


def test_client_status_file_matches_stock_openvpn(tmp_path: Path, pki: Pki) -> None:
    spec = h.TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4)
    files: dict[str, str] = {}
    for impl in ("openvpn", "pyovpn"):
        with h.Netns(tmp_path / impl) as net:
            status = net.workdir / "status.log"
            status_line = f"status {status} 1\n"
            h.spawn_tunnel(net, pki, spec, "openvpn", impl, client_extra=status_line, init_timeout=30)
            assert h.ping(net.a, h.inner_addrs(spec).server4).ok
            files[impl] = _wait_status(status, re.compile(r"^TUN/TAP write bytes,[1-9]", re.M))
    assert shape(files["pyovpn"]) == shape(files["openvpn"]), files


def test_sd_notify_ready_only_when_traffic_flows(net: h.Netns, pki: Pki, tmp_path: Path) -> None:
    """READY=1 comes after the tunnel is up (a ping through it works at once), STOPPING=1 at exit."""
    spec = h.TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4)
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(40)
    try:
        server_at = net.outer("b", 4)
        (net.workdir / "s.conf").write_text(h.server_config(spec, pki, impl="openvpn", local=server_at))
        (net.workdir / "c.conf").write_text(h.client_config(spec, pki, impl="pyovpn", remote=server_at))
        net.start_server("openvpn", net.workdir / "s.conf", port=spec.port)
        argv = ["env", f"NOTIFY_SOCKET={notify_path}", *h.vpn_argv("pyovpn", net.workdir / "c.conf")]
        client = net.spawn("a", argv, "client-pyovpn")
        first = listener.recv(4096).decode()
        assert first.startswith("READY=1\n"), first
        assert h.INIT_LINE in client.text()
        # at READY the tunnel already carries traffic: the first ping gets its answer
        assert h.ping(net.a, h.inner_addrs(spec).server4, count=1, timeout=3).ok
        os.kill(client.pid, signal.SIGTERM)
        states = []
        while not any(s.startswith("STOPPING=1") for s in states):
            states.append(listener.recv(4096).decode())
        assert client.wait(15) == 0
    finally:
        listener.close()
