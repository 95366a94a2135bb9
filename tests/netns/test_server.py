"""pyovpn as a P2MP server with several stock OpenVPN 2.6 clients, each in its own namespace.

Layout (harness.Star): namespace ``s`` (the pyovpn server) has one veth to each client namespace ``p<i>``,
172.31.(210+i).1/24 on the server side and .2 on the client side. Inside the tunnel the
server is 10.78.0.1 / fd00:78::1; clients get pool addresses (or ccd ones).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki, issue_client
from tests.netns.harness import (
    INIT_LINE,
    Proc,
    Star,
    engine_processes,
    p2mp_client_config,
    p2mp_server_config,
    ping,
    wait_for_lines,
    wait_listening,
)

pytestmark = pytest.mark.netns

SERVER4, SERVER6 = "10.78.0.1", "fd00:78::1"
# PYOVPN_TEST_DCO=kernel (inside the guest): the pyovpn server on the kernel ovpn driver, and the
# stock clients with their DCO too
DCO = os.environ.get("PYOVPN_TEST_DCO", "userspace") or "userspace"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def star(tmp_path: Path) -> Iterator[Star]:
    with Star(tmp_path, 3, base=210) as s:
        yield s


def server_conf(pki: Pki, workdir: Path, *, client_to_client: bool, extra: str = "") -> Path:
    ccd = workdir / "ccd"
    ccd.mkdir(exist_ok=True)
    # client "carol" gets a fixed address and a network behind her (iroute)
    (ccd / "carol").write_text("ifconfig-push 10.78.0.50 255.255.255.0\niroute 10.66.0.0 255.255.255.0\n")
    conf = workdir / "server.conf"
    conf.write_text(
        p2mp_server_config(
            pki,
            "10.78.0.0",
            "server-ipv6 fd00:78::/64",
            "data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
            f"client-config-dir {ccd}",
            "route 10.66.0.0 255.255.255.0",
            'push "route 10.66.0.0 255.255.255.0"',
            *(["client-to-client"] if client_to_client else []),
            f"dco {DCO}",
            "verb 4",
            extra,
        )
    )
    return conf


def client_conf(pki: Pki, workdir: Path, cn: str, remote: str, cipher: str, extra: str = "") -> Path:
    crt, key = issue_client(pki, cn)
    conf = workdir / f"{cn}.conf"
    conf.write_text(
        p2mp_client_config(
            pki,
            remote,
            crt,
            key,
            f"data-ciphers {cipher}",
            *(["disable-dco"] if DCO != "kernel" else []),
            "explicit-exit-notify 1",
            "verb 4",
            extra,
        )
    )
    return conf


CLIENTS = [("alice", "AES-128-GCM"), ("bob", "CHACHA20-POLY1305"), ("carol", "AES-256-GCM")]


# the userspace planes a server can run on: in-process (the default, `auto`) and the engine
PLANES = ["auto", "multiprocess"]


def plane_line(plane: str) -> str:
    """The config line for ``plane``; in the guest the kernel driver carries the data instead."""
    if plane != "auto" and DCO == "kernel":
        print(f"skipping: userspace-engine {plane} is for the userspace data channel, not the kernel's")
        pytest.skip("the userspace plane does not apply on the kernel data channel")
    return f"userspace-engine {plane}"


def assert_plane(server: Proc, plane: str) -> None:
    """The server's log names the plane it runs on."""
    if DCO != "userspace":
        return
    engine = "offload engine: created" in server.text()
    assert engine == (plane == "multiprocess"), f"the server is not on the {plane} plane"


def start_all(
    star: Star, pki: Pki, *, client_to_client: bool, plane: str = "auto"
) -> tuple[Proc, list[Proc]]:
    conf = server_conf(pki, star.workdir, client_to_client=client_to_client, extra=plane_line(plane))
    return spawn_all(star, pki, conf, CLIENTS)


def spawn_all(star: Star, pki: Pki, conf: Path, clients: list[tuple[str, str]]) -> tuple[Proc, list[Proc]]:
    """The pyovpn server on ``conf`` and a stock client per ``(cn, cipher)``, all up."""
    server = star.spawn(star.server, [sys.executable, "-m", "pyovpn", "--config", str(conf)], "server-pyovpn")
    wait_listening(star.server, "udp", 1194, proc=server)
    procs = []
    for i, (cn, cipher) in enumerate(clients):
        cconf = client_conf(pki, star.workdir, cn, star.server_addr(i), cipher)
        procs.append(star.spawn(star.peers[i], ["openvpn", "--config", str(cconf)], f"client-{cn}"))
    wait_for_lines([server, *procs], INIT_LINE, 40)
    return server, procs


def pushed_ip(log: str) -> str:
    for line in log.splitlines():
        if "PUSH: Received control message" in line and "ifconfig " in line:
            return line.split("ifconfig ", 1)[1].split()[0].rstrip(",'")
    raise AssertionError("no pushed ifconfig in the client log")


@pytest.mark.parametrize("plane", PLANES)
def test_three_openvpn_clients_with_their_own_ciphers(star: Star, pki: Pki, plane: str) -> None:
    server, clients = start_all(star, pki, client_to_client=True, plane=plane)
    assert_plane(server, plane)
    addrs = [pushed_ip(c.text()) for c in clients]
    assert addrs[2] == "10.78.0.50"  # ccd ifconfig-push
    assert len(set(addrs)) == 3 and all(a.startswith("10.78.0.") for a in addrs)
    for (cn, cipher), c in zip(CLIENTS, clients, strict=True):
        assert f"Data Channel: cipher '{cipher}'" in c.text(), f"{cn} did not get {cipher}"
    for i in range(3):
        assert ping(star.peers[i], SERVER4).ok, f"client {i} cannot reach the server"
        assert ping(star.peers[i], SERVER6).ok, f"client {i} cannot reach the server over IPv6"
    # client-to-client through the server
    assert ping(star.peers[0], addrs[1]).ok
    # iroute: a network behind carol, reachable from alice via the pushed route
    _ip("-n", star.peers[2], "addr", "add", "10.66.0.1/32", "dev", "lo")
    subprocess.run(
        ["ip", "netns", "exec", star.peers[2], "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True
    )
    assert ping(star.peers[0], "10.66.0.1").ok, "iroute behind carol not reachable from alice"


def test_client_to_client_refused_when_disabled(star: Star, pki: Pki) -> None:
    _server, clients = start_all(star, pki, client_to_client=False)
    addrs = [pushed_ip(c.text()) for c in clients]
    assert ping(star.peers[0], SERVER4).ok
    assert not ping(star.peers[0], addrs[1], count=2, timeout=4).ok


@pytest.mark.parametrize("plane", PLANES)
def test_disconnected_client_address_is_reused_and_others_unaffected(
    star: Star, pki: Pki, plane: str
) -> None:
    server, clients = start_all(star, pki, client_to_client=False, plane=plane)
    first = pushed_ip(clients[0].text())
    mark = server.mark()
    clients[0].stop()
    server.wait_for_line("alice.*client disconnected", 20, since=mark)
    assert ping(star.peers[1], SERVER4).ok
    # a new client (another identity) gets a never-used address, as OpenVPN picks the free one
    # released earliest: alice's stays hers while the pool has others
    cconf = client_conf(pki, star.workdir, "dave", star.server_addr(0), "AES-128-GCM")
    dave = star.spawn(star.peers[0], ["openvpn", "--config", str(cconf)], "client-dave")
    dave.wait_for_line(INIT_LINE, 30)
    assert pushed_ip(dave.text()) not in (first, *(pushed_ip(c.text()) for c in clients[1:]))
    assert ping(star.peers[0], SERVER4).ok
    mark = server.mark()
    dave.stop()
    server.wait_for_line("dave.*client disconnected", 20, since=mark)
    alice = star.spawn(
        star.peers[0], ["openvpn", "--config", str(star.workdir / "alice.conf")], "client-alice2"
    )
    alice.wait_for_line(INIT_LINE, 30)
    assert pushed_ip(alice.text()) == first  # the freed address went back to its owner


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_auth_user_pass_verify_rejects_one_client_only(star: Star, pki: Pki, proto: str) -> None:
    """The rejected client gets AUTH_FAILED (over TCP too: the message leaves before the close)."""
    script = star.workdir / "verify.sh"
    script.write_text('#!/bin/sh\n[ "$(sed -n 2p "$1")" = good ]\n')
    script.chmod(0o755)
    conf = server_conf(
        pki,
        star.workdir,
        client_to_client=False,
        extra=f"script-security 2\nauth-user-pass-verify {script} via-file\nproto {proto}",
    )
    server = star.spawn(star.server, [sys.executable, "-m", "pyovpn", "--config", str(conf)], "server-pyovpn")
    wait_listening(star.server, proto, 1194, proc=server)  # type: ignore[arg-type]
    procs = []
    for i, (cn, cipher) in enumerate(CLIENTS):
        creds = star.workdir / f"{cn}.pass"
        creds.write_text(f"{cn}\n{'bad' if cn == 'bob' else 'good'}\n")
        extra = f"auth-user-pass {creds}" + ("\nproto tcp-client" if proto == "tcp" else "")
        cconf = client_conf(pki, star.workdir, cn, star.server_addr(i), cipher, extra=extra)
        procs.append(star.spawn(star.peers[i], ["openvpn", "--config", str(cconf)], f"client-{cn}"))
    wait_for_lines([procs[0], procs[2]], INIT_LINE, 40)
    deadline = time.monotonic() + 30
    while "AUTH_FAILED" not in procs[1].text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "AUTH_FAILED" in procs[1].text()
    assert ping(star.peers[0], SERVER4).ok and ping(star.peers[2], SERVER4).ok


def _udp_sockets_on(ns: str, port: int) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-H", "-u", "-a", "-n"], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in out.splitlines() if line.split()[3].endswith(f":{port}"))


def test_idle_clients_live_on_keepalive_pings(star: Star, pki: Pki) -> None:
    """An idle tunnel carries only keepalive pings. With the userspace backend they take the
    keepalive lane (a second socket on the server port that nobody polls): the server must
    drain it in time, or every client would time out here."""
    conf = server_conf(pki, star.workdir, client_to_client=False, extra="keepalive 1 3")
    server, clients = spawn_all(star, pki, conf, CLIENTS[:2])
    if DCO == "userspace":
        assert _udp_sockets_on(star.server, 1194) == 2, "no keepalive lane next to the server socket"
    else:
        print(f"(dco {DCO}: the kernel answers keepalive itself, no lane to check)")
    mark = server.mark()
    client_marks = [c.mark() for c in clients]
    # 2.5 server timeouts; the clients' IPv6 router solicitations (at about 0, 4 and 12 s, then
    # rarer) leave gaps longer than the timeout in which only pings can keep a client alive
    time.sleep(15)
    assert "Inactivity timeout" not in server.text()[mark:]
    for c, m in zip(clients, client_marks, strict=True):
        assert "Inactivity timeout" not in c.text()[m:], f"{c.name} timed out: the server's pings stopped"
    for i in range(2):
        assert ping(star.peers[i], SERVER4).ok


def _routes6(ns: str, network: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, "-6", "route", "show", network], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_client_with_an_ipv6_iroute_reconnects(star: Star, pki: Pki) -> None:
    """Leaving removes the client's iroute-ipv6 routes too: else its next connect hits EEXIST
    adding them again and the server drops it right after the handshake."""
    conf = server_conf(pki, star.workdir, client_to_client=False)
    (star.workdir / "ccd" / "alice").write_text("iroute-ipv6 fd00:66::/64\n")
    server, (alice,) = spawn_all(star, pki, conf, CLIENTS[:1])
    server.wait_for_line("alice.*Data Channel: cipher", 20)
    assert "fd00:66::/64" in _routes6(star.server, "fd00:66::/64"), "iroute-ipv6 not installed"
    mark = server.mark()
    alice.stop()
    server.wait_for_line("alice.*client disconnected", 20, since=mark)
    assert _routes6(star.server, "fd00:66::/64") == "", "iroute-ipv6 left behind after the client left"
    cconf = star.workdir / "alice.conf"  # written by spawn_all
    again = star.spawn(star.peers[0], ["openvpn", "--config", str(cconf)], "client-alice-again")
    again.wait_for_line(INIT_LINE, 30)
    server.wait_for_line("alice.*Data Channel: cipher", 20, since=mark)
    assert ping(star.peers[0], SERVER6).ok, "the reconnected client was dropped"
    assert "data channel error" not in server.text()[mark:]
    assert "fd00:66::/64" in _routes6(star.server, "fd00:66::/64")


def test_server_on_the_engine_starts_again_when_an_engine_process_dies(star: Star, pki: Pki) -> None:
    """kill -9 of an engine worker under a P2MP server: the server restarts, its clients come back.

    The device and every client went with the engine. Like OpenVPN's soft restart, the
    server opens its device again on a new engine; the stock clients notice the silence at
    their ping-restart and connect again.
    """
    if DCO != "userspace":
        print("skipping: the engine is the userspace data channel's, the guest runs the kernel's")
        pytest.skip("the engine is the userspace data channel's")
    conf = server_conf(
        pki, star.workdir, client_to_client=False, extra="userspace-engine multiprocess\nkeepalive 1 4"
    )
    server, clients = spawn_all(star, pki, conf, CLIENTS[:2])
    assert_plane(server, "multiprocess")
    controller, workers = engine_processes(server.pid)
    assert workers, "the engine has no worker processes"

    mark, client_marks = server.mark(), [c.mark() for c in clients]
    os.kill(workers[-1], signal.SIGKILL)
    server.wait_for_line("offload engine exited unexpectedly", 15, since=mark)
    server.wait_for_line(INIT_LINE, 30, since=mark)
    for c, cmark in zip(clients, client_marks, strict=True):
        c.wait_for_line(INIT_LINE, 40, since=cmark)
    assert server.running(), f"the server exited:\n{server.tail(40)}"
    for i in range(2):
        assert ping(star.peers[i], SERVER4, count=3, timeout=20).ok, f"client {i} is not back"
    assert engine_processes(server.pid)[0] != controller  # exactly one engine, a new one
