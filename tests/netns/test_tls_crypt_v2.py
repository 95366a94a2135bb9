"""tls-crypt-v2 interop: pyovpn and stock OpenVPN 2.6 on either end, keys made by stock openvpn.

Each cell brings a tunnel up with per-client tls-crypt-v2 keys and pings through it. The
P2MP server cells use `server 10.77.0.0 255.255.255.0` as installers do; pyovpn's P2MP server
is UDP-only, so the TCP cell with a pyovpn server is P2P `tls-server`. A client key made for
another server key must be refused by the pyovpn server with a clear log line.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    Impl,
    Netns,
    Proto,
    Role,
    TunnelSpec,
    ping,
    spawn_tunnel,
    start_tunnel,
    wait_for_lines,
)

pytestmark = pytest.mark.netns

INIT_TIMEOUT = 40.0


def _genkeys(workdir: Path) -> dict[str, Path]:
    keys = {n: workdir / f"v2-{n}.key" for n in ("server", "client", "other_server", "foreign_client")}

    def stock(*args: str | Path) -> None:
        subprocess.run(["openvpn", *map(str, args)], check=True, capture_output=True, timeout=60)

    stock("--genkey", "tls-crypt-v2-server", keys["server"])
    stock("--tls-crypt-v2", keys["server"], "--genkey", "tls-crypt-v2-client", keys["client"])
    stock("--genkey", "tls-crypt-v2-server", keys["other_server"])
    stock("--tls-crypt-v2", keys["other_server"], "--genkey", "tls-crypt-v2-client", keys["foreign_client"])
    return keys


def _spec(role: Role, proto: Proto, server_impl: Impl, keys: dict[str, Path], client_key: str) -> TunnelSpec:
    server_line = f"tls-crypt-v2 {keys['server']}"
    client_line = f"tls-crypt-v2 {keys[client_key]}"
    # the *_extra lines go to the end of that implementation; the ends are different impls here
    py_line, ovpn_line = (server_line, client_line) if server_impl == "pyovpn" else (client_line, server_line)
    return TunnelSpec(
        role=role, proto=proto, wrap="none", pyovpn_extra=(py_line,), openvpn_extra=(ovpn_line,)
    )


CELLS = [
    # (role, proto, server impl, client impl)
    ("server", "udp", "openvpn", "pyovpn"),
    ("server", "tcp", "openvpn", "pyovpn"),
    ("server", "udp", "pyovpn", "openvpn"),
    ("p2p", "tcp", "pyovpn", "openvpn"),
]


@pytest.mark.parametrize(("role", "proto", "server_impl", "client_impl"), CELLS, ids=lambda v: str(v))
def test_tls_crypt_v2_tunnel_and_ping(
    net: Netns, pki: Pki, role: Role, proto: Proto, server_impl: Impl, client_impl: Impl
) -> None:
    keys = _genkeys(net.workdir)
    spec = _spec(role, proto, server_impl, keys, "client")
    tunnel = start_tunnel(
        net, pki, spec, server_impl=server_impl, client_impl=client_impl, timeout=INIT_TIMEOUT
    )
    res = ping(net.a, tunnel.addrs.server4)
    assert res.ok, f"ping through the tls-crypt-v2 tunnel failed:\n{res.output}\n{tunnel.logs()}"
    # the stock end really ran tls-crypt-v2 with the key we gave it (not some fallback)
    stock_log = tunnel.openvpn_log()
    if server_impl == "openvpn":
        assert "Control Channel: using tls-crypt-v2 key" in stock_log, tunnel.logs()
    else:
        assert f"tls_crypt_v2_file = '{keys['client']}'" in stock_log, tunnel.logs()
        assert "Control Channel Encryption: Cipher 'AES-256-CTR'" in stock_log, tunnel.logs()
    if server_impl == "pyovpn" and role == "server":
        # a 2.6 client offers early negotiation: the stateless cookie path, as 2.6 servers take
        assert "cookie verified, tls-crypt-v2 client key accepted" in tunnel.server.text(), tunnel.logs()
    rcs = tunnel.stop()
    pyovpn_end = "server" if server_impl == "pyovpn" else "client"
    assert rcs[pyovpn_end] == 0, tunnel.logs()


def test_pyovpn_server_refuses_a_client_key_of_another_server(net: Netns, pki: Pki) -> None:
    keys = _genkeys(net.workdir)
    spec = _spec("server", "udp", "pyovpn", keys, "foreign_client")
    server, client = spawn_tunnel(net, pki, spec, "pyovpn", "openvpn")
    wait_for_lines([server], r"tls-crypt-v2 client key refused: .*not made with this server", 30.0)
    time.sleep(2)
    assert "Initialization Sequence Completed" not in client.text()


def test_pyovpn_server_runs_tls_crypt_v2_verify(net: Netns, pki: Pki) -> None:
    """The verify script sees the metadata of a key stock openvpn made (a timestamp, type 1);
    exiting 0 lets the client in, exiting non-zero keeps it out with a clear log line."""
    keys = _genkeys(net.workdir)
    seen = net.workdir / "verify-seen"
    script = net.workdir / "verify.sh"
    script.write_text(
        f'#!/bin/sh\necho "$script_type $metadata_type $(wc -c < "$metadata_file")" >> {seen}\n'
        f"[ ! -e {net.workdir / 'deny'} ]\n"
    )
    script.chmod(0o755)
    base = _spec("server", "udp", "pyovpn", keys, "client")
    spec = base.with_(pyovpn_extra=(*base.pyovpn_extra, "script-security 2", f"tls-crypt-v2-verify {script}"))
    tunnel = start_tunnel(net, pki, spec, server_impl="pyovpn", client_impl="openvpn", timeout=INIT_TIMEOUT)
    assert ping(net.a, tunnel.addrs.server4).ok, tunnel.logs()
    assert seen.read_text().split() == ["tls-crypt-v2-verify", "1", "8"], tunnel.logs()
    tunnel.stop()

    (net.workdir / "deny").touch()
    server, client = spawn_tunnel(net, pki, spec, "pyovpn", "openvpn")
    wait_for_lines([server], r"tls-crypt-v2 client key refused: tls-crypt-v2-verify script refused", 30.0)
    time.sleep(2)
    # the client's log file is the first run's, appended to: only that run came up
    assert client.text().count("Initialization Sequence Completed") == 1
