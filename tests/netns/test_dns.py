"""Pushed DNS end to end: stock OpenVPN 2.6 server, pyovpn client, a namespace-private resolv.conf.

`ip netns exec NS` bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf, so the client's
namespace has a resolver file of its own: pyovpn must point it at the pushed server (a tiny DNS
answerer in the server namespace) and put it back exactly as it was on SIGTERM, and after a
kill -9 at the next start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    INIT_LINE,
    Netns,
    Proc,
    TunnelSpec,
    client_config,
    netns_exec,
    server_config,
    vpn_argv,
    wait_for_lines,
    wait_listening,
)

pytestmark = pytest.mark.netns

ORIGINAL = (
    "# namespace-private resolver for a pyovpn test\nnameserver 192.0.2.53\noptions timeout:1 attempts:1\n"
)
ANSWER = "10.77.0.99"


@pytest.fixture
def client_resolv(net: Netns) -> Iterator[Path]:
    """/etc/netns/<client ns>/resolv.conf, removed after the test."""
    d = Path("/etc/netns") / net.a
    d.mkdir(parents=True, exist_ok=False)
    path = d / "resolv.conf"
    path.write_text(ORIGINAL)
    try:
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _getent(net: Netns, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*netns_exec(net.a), "getent", "hosts", name], capture_output=True, text=True, timeout=20, check=False
    )


def _start_client(net: Netns, cfg: Path, server: Proc, name: str) -> Proc:
    client = net.spawn("a", vpn_argv("pyovpn", cfg), name)
    wait_for_lines([server, client], INIT_LINE, 40)
    return client


def _wait_resolv(path: Path, want: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text() != want and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.read_text() == want


def test_pushed_dns_applied_and_restored(net: Netns, pki: Pki, client_resolv: Path) -> None:
    work = net.workdir
    spec = TunnelSpec(role="server", wrap="tls-crypt", verb=3)
    server_cfg = work / "server.conf"
    server_cfg.write_text(
        server_config(spec, pki, impl="openvpn", local=net.outer("b", 4))
        + 'push "dhcp-option DNS 10.77.0.1"\npush "dhcp-option DOMAIN example.test"\n'
    )
    client_cfg = work / "client.conf"
    client_cfg.write_text(client_config(spec, pki, impl="pyovpn", remote=net.outer("b", 4)))
    server = net.spawn("b", vpn_argv("openvpn", server_cfg), "server")
    wait_listening(net.b, "udp", spec.port, timeout=20, proc=server)
    responder = Path(__file__).with_name("dns_responder.py")
    dns = net.spawn("b", [sys.executable, str(responder), "0.0.0.0", "example.test", ANSWER], "dns")
    dns.wait_for_line("answering", 10)

    assert _getent(net, "foo.example.test").returncode != 0, "no resolver before the tunnel"
    client = _start_client(net, client_cfg, server, "client")
    client.wait_for_line(r"DNS 10\.77\.0\.1 \(domains example\.test\) applied via .*pyovpn-dns off", 10)
    text = client_resolv.read_text()
    assert "nameserver 10.77.0.1\nsearch example.test\n" in text and "192.0.2.53" not in text
    assert "options timeout:1 attempts:1" in text
    res = _getent(net, "foo.example.test")
    assert res.returncode == 0 and res.stdout.split()[0] == ANSWER, res
    res = _getent(net, "bar")  # the pushed DOMAIN is searched
    assert res.returncode == 0 and res.stdout.split()[:2] == [ANSWER, "bar.example.test"], res

    assert client.stop(timeout=15) == 0
    assert client_resolv.read_text() == ORIGINAL

    # kill -9: the file stays changed; the next start puts it back before anything else
    client = _start_client(net, client_cfg, server, "client2")
    assert "nameserver 10.77.0.1" in client_resolv.read_text()
    os.kill(client.pid, signal.SIGKILL)
    client.stop(timeout=10)
    assert "nameserver 10.77.0.1" in client_resolv.read_text()
    off_cfg = work / "client-off.conf"
    off_cfg.write_text(client_config(spec, pki, impl="pyovpn", remote=net.outer("b", 4)) + "pyovpn-dns off\n")
    client = net.spawn("a", vpn_argv("pyovpn", off_cfg), "client3")
    client.wait_for_line("undoing the DNS settings a previous pyovpn left", 20)
    _wait_resolv(client_resolv, ORIGINAL)
    wait_for_lines([server, client], INIT_LINE, 40)
    client.wait_for_line(r"not applied: `pyovpn-dns off`", 10)
    assert client_resolv.read_text() == ORIGINAL, "pyovpn-dns off leaves the resolver alone"
    assert client.stop(timeout=15) == 0
    assert client_resolv.read_text() == ORIGINAL
