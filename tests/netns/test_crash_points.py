"""kill -9 of the pyovpn daemon at the moments that matter, then the same command again.

A pyovpn client (default userspace engine) of a stock OpenVPN 2.6 server is killed with SIGKILL
during its handshake, during a renegotiation, or during a bulk transfer (the moment within each
phase is random; the seed is printed). Then it is started again with the same config, as
systemd's Restart= would. The new process must find nothing of the old one in its way: the
engine processes died with their parent, the old TUN device is gone, and the tunnel comes up and
carries data again. The stock server must end up with exactly one session for the client: the
new connection replaces the one the dead process left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    INIT_LINE,
    HarnessError,
    Netns,
    Proc,
    TunnelSpec,
    inner_addrs,
    iperf3_transfer,
    netns_exec,
    ping,
    spawn_tunnel,
    vpn_argv,
)

pytestmark = pytest.mark.netns


def _engine_processes(ns: str) -> list[int]:
    out = subprocess.run(
        [*netns_exec(ns), "pgrep", "-f", "pyovpn.datachannel.engine"], capture_output=True, text=True
    )
    return [int(p) for p in out.stdout.split()]


def _tun_devices(ns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "type", "tun"], capture_output=True, text=True
    )
    return [line.split(":")[1].strip() for line in out.stdout.splitlines()]


def _client_rows(status: Path) -> list[str]:
    try:
        return [ln for ln in status.read_text().splitlines() if ln.startswith("CLIENT_LIST,")]
    except OSError:
        return []


def _kill_9(proc: Proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def _wait_engine_and_tun_gone(net: Netns) -> None:
    # the engine goes with its parent (PR_SET_PDEATHSIG), and with it the last descriptor of the TUN
    deadline = time.monotonic() + 10
    while (_engine_processes(net.a) or _tun_devices(net.a)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _engine_processes(net.a) == [], "engine processes outlived the killed daemon"
    assert _tun_devices(net.a) == [], "the killed daemon's TUN device is still there"


@pytest.mark.parametrize("moment", ["handshake", "rekey", "bulk"])
def test_kill_9_of_the_daemon_then_the_same_command_again(net: Netns, pki: Pki, moment: str) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    spec = TunnelSpec(role="server", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4, verb=4)
    status = net.workdir / "status.txt"
    server, client = spawn_tunnel(
        net,
        pki,
        spec,
        "openvpn",
        "pyovpn",
        server_extra=f"status {status} 1\nstatus-version 2\n",
        client_extra="reneg-sec 4\n" if moment == "rekey" else "",
    )
    addrs = inner_addrs(spec)
    transfer: dict[str, Any] = {}
    if moment == "handshake":
        # the handshake can be over within the random wait; then that kill missed the moment meant,
        # so start the client again and kill it sooner (the restart after a kill is tested below too)
        for attempt in range(1, 4):
            client.wait_for_line("UDP link local", 15)
            time.sleep(rng.uniform(0.0, 0.3 / attempt))
            _kill_9(client)
            if INIT_LINE not in client.text():
                break
            print(f"attempt {attempt}: the handshake was over before the kill; again, sooner")
            net.procs.remove(client)
            _wait_engine_and_tun_gone(net)
            client = net.spawn("a", vpn_argv("pyovpn", net.workdir / "c.conf"), f"client-{attempt + 1}")
    else:
        client.wait_for_line(INIT_LINE, 30)
        if moment == "rekey":
            mark = client.mark()
            client.wait_for_line("starting renegotiation|peer started renegotiation", 20, since=mark)
            time.sleep(rng.uniform(0.0, 0.2))
        else:

            def bulk() -> None:
                try:
                    transfer["run"] = iperf3_transfer(net.a, net.b, addrs.server4, seconds=20, timeout=40)
                except HarnessError as e:  # the tunnel went away under it: expected here
                    transfer["error"] = e

            threading.Thread(target=bulk, daemon=True).start()
            time.sleep(rng.uniform(1.0, 4.0))
        _kill_9(client)
    if moment == "handshake":
        assert INIT_LINE not in client.text(), "the handshake was over before all three kills"
    net.procs.remove(client)
    _wait_engine_and_tun_gone(net)

    again = net.spawn("a", vpn_argv("pyovpn", net.workdir / "c.conf"), "client-again")
    again.wait_for_line(INIT_LINE, 60)
    assert ping(net.a, addrs.server4, count=3, timeout=20).ok, "no traffic after the restart"
    assert len(_tun_devices(net.a)) == 1
    # the server replaced the dead client's session by the new one (same common name)
    deadline = time.monotonic() + 15
    while len(_client_rows(status)) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    rows = _client_rows(status)
    assert len(rows) == 1, f"the stock server keeps {len(rows)} sessions for the client: {rows}"
    assert server.running()


def test_kill_9_of_a_server_daemon_then_restart_and_the_stock_client_comes_back(net: Netns, pki: Pki) -> None:
    """The server dies with a client connected; started again, it takes the client back, which
    notices the outage by itself (ping-restart) as it would with a stock server."""
    spec = TunnelSpec(
        role="server", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4, keepalive=(1, 6), verb=4
    )
    server, client = spawn_tunnel(net, pki, spec, "pyovpn", "openvpn", init_timeout=30)
    addrs = inner_addrs(spec)
    assert ping(net.a, addrs.server4).ok
    mark = client.mark()
    os.kill(server.pid, signal.SIGKILL)
    assert server.wait(10) == -signal.SIGKILL
    net.procs.remove(server)
    deadline = time.monotonic() + 10
    while _tun_devices(net.b) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tun_devices(net.b) == [], "the killed server's TUN device is still there"
    again = net.start_server("pyovpn", net.workdir / "s.conf", proto=spec.proto, port=spec.port)
    again.wait_for_line(INIT_LINE, 30)
    client.wait_for_line("Inactivity timeout|SIGUSR1", 30, since=mark)
    client.wait_for_line(INIT_LINE, 60, since=mark)
    assert ping(net.a, addrs.server4, count=3, timeout=20).ok, "the client did not come back"
    assert again.running() and client.running()
