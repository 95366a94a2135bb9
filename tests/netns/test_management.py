"""The management interface against stock OpenVPN 2.6: same commands, same reply layout; several clients.

Each test runs a P2P tunnel in two namespaces with the management interface on a unix socket
(the way NetworkManager starts OpenVPN). The differential test sends the same commands to stock
OpenVPN's interface and to pyovpn's and compares the replies with values masked; the others
check what OpenVPN cannot do (three clients at once) and that garbage never disturbs the tunnel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    INIT_LINE,
    Netns,
    Proc,
    TunnelSpec,
    client_config,
    inner_addrs,
    ping,
    server_config,
    vpn_argv,
    wait_for_lines,
    wait_listening,
)
from tests.netns.mgmt import Mgmt

pytestmark = pytest.mark.netns

SPEC = TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4)


def _start(net: Netns, pki: Pki, impl: str, sock_path: str, extra: str = "", pw_file: str = "") -> Proc:
    (net.workdir / "s.conf").write_text(server_config(SPEC, pki, impl="openvpn", local=net.outer("b", 4)))
    (net.workdir / "c.conf").write_text(
        client_config(SPEC, pki, impl=impl, remote=net.outer("b", 4))  # type: ignore[arg-type]
        + f"management {sock_path} unix {pw_file}\n{extra}"
    )
    server = net.spawn("b", vpn_argv("openvpn", net.workdir / "s.conf"), "server-openvpn")
    wait_listening(net.b, "udp", SPEC.port, proc=server)
    client = net.spawn("a", vpn_argv(impl, net.workdir / "c.conf"), f"client-{impl}")  # type: ignore[arg-type]
    wait_for_lines([server, client], INIT_LINE, 30)
    return client


_NUM = re.compile(r"\d+")


def _mask(text: str) -> str:
    text = re.sub(r"OpenVPN Version: .*", "OpenVPN Version: <v>", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<date>", text)
    text = re.sub(r"\d+\.\d+\.\d+\.\d+", "<ip>", text)
    return _NUM.sub("<n>", text)


COMMANDS = [
    ("pid", False),
    ("version", True),
    ("state", True),
    ("state on", False),
    ("state off", False),
    ("log on", False),
    ("log off", False),
    ("bytecount 0", False),
    ("hold", False),
    ("status", True),
    ("no-such-command", False),
]


def test_replies_match_stock_openvpn(tmp_path: Path, pki: Pki) -> None:
    replies: dict[str, list[list[str]]] = {}
    for impl in ("openvpn", "pyovpn"):
        with Netns(tmp_path / impl) as net:
            path = str(net.workdir / "mgmt.sock")
            _start(net, pki, impl, path)
            m = Mgmt(path)
            try:
                assert m.line().startswith(">INFO:OpenVPN Management Interface Version 5")
                replies[impl] = [[_mask(x) for x in m.command(c, multi)] for c, multi in COMMANDS]
                state = m.command("state", True)[0].split(",")
                assert state[1] == "CONNECTED" and len(state) >= 8, state
            finally:
                m.close()
    for (cmd, _), stock, ours in zip(COMMANDS, replies["openvpn"], replies["pyovpn"], strict=True):
        if cmd == "status":  # the STATISTICS block: same lines (values masked)
            assert ours == stock, (cmd, stock, ours)
        elif cmd == "state":
            assert [len(x.split(",")) for x in ours] == [len(x.split(",")) for x in stock], (stock, ours)
        else:
            assert ours == stock, (cmd, stock, ours)


def test_three_clients_get_state_and_garbage_does_not_hurt(net: Netns, pki: Pki, tmp_path: Path) -> None:
    path = str(net.workdir / "mgmt.sock")
    client = _start(net, pki, "pyovpn", path)
    clients = [Mgmt(path) for _ in range(3)]
    try:
        for m in clients:
            assert m.line().startswith(">INFO:")
            assert m.command("state on") == ["SUCCESS: real-time state notification set to ON"]
        # garbage, overlong lines and unknown commands get error replies; nothing else happens
        junk = clients[0]
        junk.sock.sendall(b"\x00\xff\xfe garbage\n" + b"x" * 10000 + b"\nsignal SIGFOO\n")
        assert junk.line().startswith("ERROR: unknown command")
        assert junk.line().startswith("ERROR: command line too long")
        assert junk.line().startswith("ERROR: signal")
        rnd = os.urandom(4000).replace(b"\n", b" ").replace(b"\r", b" ")
        junk.sock.sendall(b"z" + rnd + b"\n")  # a word first: a leading # or ; would be a comment
        assert junk.line().startswith("ERROR:")
        assert ping(net.a, inner_addrs(SPEC).server4, count=2).ok
        # a restart through the interface: every client sees it
        assert clients[1].command("signal SIGUSR1") == ["SUCCESS: signal SIGUSR1 thrown"]
        for m in clients:
            seen = m.until(r"^>STATE:\d+,CONNECTED,SUCCESS,")
            assert any(",RECONNECTING,SIGUSR1," in s for s in seen), seen
        assert clients[2].command("bytecount 1") == ["SUCCESS: bytecount interval changed"]
        assert re.fullmatch(r">BYTECOUNT:\d+,\d+", clients[2].until(r"^>BYTECOUNT:")[-1])
        assert ping(net.a, inner_addrs(SPEC).server4, count=2).ok
        # one client leaving abruptly leaves the others (and the tunnel) alone
        clients[0].sock.close()
        assert clients[1].command("pid") == [f"SUCCESS: pid={client.pid}"]
    finally:
        for m in clients:
            m.close()
    assert client.running()


def test_hold_waits_for_release(net: Netns, pki: Pki) -> None:
    path = str(net.workdir / "mgmt.sock")
    (net.workdir / "s.conf").write_text(server_config(SPEC, pki, impl="openvpn", local=net.outer("b", 4)))
    (net.workdir / "c.conf").write_text(
        client_config(SPEC, pki, impl="pyovpn", remote=net.outer("b", 4))
        + f"management {path} unix\nmanagement-hold\n"
    )
    server = net.spawn("b", vpn_argv("openvpn", net.workdir / "s.conf"), "server-openvpn")
    wait_listening(net.b, "udp", SPEC.port, proc=server)
    client = net.spawn("a", vpn_argv("pyovpn", net.workdir / "c.conf"), "client-pyovpn")
    m = Mgmt(path)
    try:
        assert m.line().startswith(">INFO:")
        assert m.line() == ">HOLD:Waiting for hold release:0"
        time.sleep(1)
        assert INIT_LINE not in client.text()  # held: no connection yet
        assert m.command("hold release") == ["SUCCESS: hold release succeeded"]
        client.wait_for_line(INIT_LINE, 30)
    finally:
        m.close()


def test_pyovpn_show_lists_the_tunnel(net: Netns, pki: Pki) -> None:
    """`pyovpn show --json` finds this daemon through its control socket, with the peer and its bytes."""
    path = str(net.workdir / "mgmt.sock")
    client = _start(net, pki, "pyovpn", path)
    assert ping(net.a, inner_addrs(SPEC).server4, count=3).ok
    res = subprocess.run(
        [sys.executable, "-m", "pyovpn", "show", "--json"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    (me,) = [i for i in json.loads(res.stdout) if i["pid"] == client.pid]
    assert me["schema"] == 1 and me["role"] == "p2p-client" and me["interface"] == "tun0"
    assert me["backend"] == "userspace-offload" and me["backend_reason"]
    (peer,) = me["peers"]
    assert peer["common_name"] == "server" and peer["cipher"] == "AES-256-GCM"
    assert peer["real_address"] == f"{net.outer('b', 4)}:{SPEC.port}"
    assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0 and peer["key_age_s"] >= 0
    assert peer["keepalive"] == {"interval": 10, "timeout": 60}  # SPEC: keepalive 10 60
    assert "rx_rate_bps" in peer
    text = subprocess.run(
        [sys.executable, "-m", "pyovpn", "show", "tun0"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "peer: server (" in text and "cipher: AES-256-GCM" in text and "transfer:" in text
