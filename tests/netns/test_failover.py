"""The client's connection list against stock OpenVPN servers: failover past a silent server to one
given by host name, a <connection> list whose TCP entry is down, and connect-retry-max giving up.

The servers run in namespace b; the pyovpn client in namespace a resolves the server's name from a
namespace-private hosts file (/etc/netns/<ns>/hosts, which `ip netns exec` mounts over /etc/hosts).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
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
    server_config,
    vpn_argv,
    wait_for_lines,
    wait_listening,
)

SERVER_NAME = "vpn.failover.test"
DEAD_PORT = 1199  # nothing listens there: a silent UDP server, a refused TCP connect
POLL = 3  # server-poll-timeout of the silent entry
SPEC = TunnelSpec(role="server")
BLACKHOLED = "198.51.100.7"  # TEST-NET-2, routed to a blackhole inside the test's namespace b


@contextlib.contextmanager
def hosts_file(net: Netns, line: str) -> Iterator[None]:
    """A hosts file only namespace a sees; removed again even on failure."""
    directory = Path("/etc/netns") / net.a
    directory.mkdir(parents=True, exist_ok=False)
    try:
        (directory / "hosts").write_text(f"127.0.0.1 localhost\n{line}\n")
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def start_stock_server(net: Netns, pki: Pki) -> Proc:
    cfg = net.workdir / "server.conf"
    cfg.write_text(server_config(SPEC, pki, impl="openvpn", local=net.outer("b", 4)))
    server = net.spawn("b", vpn_argv("openvpn", cfg), "server-openvpn")
    wait_listening(net.b, "udp", SPEC.port, proc=server)
    return server


def start_client(net: Netns, pki: Pki, connection_lines: str) -> Proc:
    """A pyovpn client whose `proto`/`remote` lines are replaced by ``connection_lines``."""
    base = client_config(SPEC, pki, impl="pyovpn", remote="unused")
    kept = [line for line in base.splitlines() if not line.startswith(("remote ", "proto "))]
    cfg = net.workdir / "client.conf"
    cfg.write_text("\n".join(kept) + "\n" + connection_lines)
    return net.spawn("a", vpn_argv("pyovpn", cfg), "client-pyovpn")


def blackhole(net: Netns) -> str:
    """An address whose packets namespace b (the client's router to it) drops without a word:
    no ICMP error comes back, as with a server behind a firewall that drops."""
    run(["ip", "-n", net.a, "route", "add", f"{BLACKHOLED}/32", "via", net.outer("b", 4)])
    run(["ip", "netns", "exec", net.b, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    run(["ip", "-n", net.b, "route", "add", "blackhole", f"{BLACKHOLED}/32"])
    return BLACKHOLED


def run(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"


@pytest.mark.parametrize("first", ["closed-port", "blackholed"])
def test_silent_first_remote_fails_over_to_a_named_second(net: Netns, pki: Pki, first: str) -> None:
    server = start_stock_server(net, pki)
    dead = f"{net.outer('b', 4)} {DEAD_PORT}" if first == "closed-port" else f"{blackhole(net)} {SPEC.port}"
    with hosts_file(net, f"{net.outer('b', 4)} {SERVER_NAME}"):
        started = time.monotonic()
        client = start_client(
            net,
            pki,
            f"proto udp\nserver-poll-timeout {POLL}\nconnect-retry 1\n"
            f"remote {dead}\nremote {SERVER_NAME} {SPEC.port}\n",
        )
        wait_for_lines([client, server], INIT_LINE, POLL + 40)
        took = time.monotonic() - started
    log = client.text()
    assert "Connection entry 1/2" in log and "Server poll timeout" in log
    assert f"Connection entry 2/2: {SERVER_NAME}:{SPEC.port} (udp)" in log
    # the named entry connected within its own server-poll-timeout: it never timed out
    assert log.count("Server poll timeout") == 1, log
    # at least the poll timeout of the silent entry, and not much more (generous: shared CPU)
    assert POLL <= took < POLL + 40

    # SIGUSR1 on a working tunnel: OpenVPN tries the same entry again first, not the next one
    mark = client.mark()
    os.kill(client.pid, signal.SIGUSR1)
    wait_for_lines([client], INIT_LINE, 40, since={client: mark})
    again = client.text()[mark:]
    assert "Connection entry 2/2" in again and "Connection entry 1/2" not in again


def test_connection_blocks_skip_a_dead_tcp_entry(net: Netns, pki: Pki) -> None:
    server = start_stock_server(net, pki)
    client = start_client(
        net,
        pki,
        "connect-retry 1\n"
        f"<connection>\nremote {net.outer('b', 4)} {SPEC.port} tcp-client\n</connection>\n"
        f"<connection>\nremote {net.outer('b', 4)} {SPEC.port} udp\n</connection>\n",
    )
    wait_for_lines([client, server], INIT_LINE, 40)
    log = client.text()
    assert "Connection entry 1/2" in log and "TCP connection to" in log and "failed" in log
    assert "Connection entry 2/2" in log and "(udp)" in log


def test_connect_retry_max_exits_when_no_server_answers(net: Netns, pki: Pki) -> None:
    client = start_client(
        net,
        pki,
        "proto udp\nserver-poll-timeout 1\nconnect-retry 1\nconnect-retry-max 2\n"
        f"remote {net.outer('b', 4)} {DEAD_PORT}\n",
    )
    rc = client.wait(60)
    log = client.text()
    assert rc == 1, log
    assert "All connections have been connect-retry-max (2) times unsuccessful, exiting" in log
    assert log.count("Server poll timeout") == 2


def test_connection_list_moves_from_udp_to_a_tcp_server(net: Netns, pki: Pki) -> None:
    tcp = TunnelSpec(role="server", proto="tcp")
    cfg = net.workdir / "server.conf"
    cfg.write_text(server_config(tcp, pki, impl="openvpn", local=net.outer("b", 4)))
    server = net.spawn("b", vpn_argv("openvpn", cfg), "server-openvpn")
    wait_listening(net.b, "tcp", tcp.port, proc=server)
    client = start_client(
        net,
        pki,
        "proto udp\nconnect-retry 1\n"
        f"<connection>\nremote {net.outer('b', 4)} {DEAD_PORT}\nserver-poll-timeout 2\n</connection>\n"
        f"<connection>\nremote {net.outer('b', 4)} {tcp.port} tcp\n</connection>\n",
    )
    wait_for_lines([client, server], INIT_LINE, 40)
    assert "Server poll timeout" in client.text()
    assert "Connection entry 2/2" in client.text() and "(tcp-client)" in client.text()
