"""Full tunnel against stock OpenVPN 2.6: a pushed `redirect-gateway def1 bypass-dhcp` really sends
the client's traffic through the tunnel, and the client's routes are exactly as before after
SIGTERM, after SIGUSR1 and reconnect, and after kill -9 followed by the next start. The same
against stock servers running the installers' configs unchanged (Nyr with and without IPv6,
angristan, docker-openvpn), with the pushed DNS in a namespace-private resolv.conf.

Three namespaces this test creates: the client (a), the server (b), and "beyond" (c) behind the
server, which routes it (no NAT), so beyond sees the client's VPN address as the source.

    a  veth0 172.31.254.1/24, default via 172.31.254.2 (the server is its LAN router)
    b  veth0 172.31.254.2/24, veth1 198.18.0.1/24, forwarding on; stock openvpn server on tun0
    c  veth0 198.18.0.2/24, default via 198.18.0.1; a TCP echo-the-peer server on :7000
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    INIT_LINE,
    NS_PREFIX,
    OUTER6,
    Netns,
    Proc,
    TunnelSpec,
    client_config,
    inner_addrs,
    netns_exec,
    server_config,
    vpn_argv,
    wait_listening,
)
from tests.netns.installers import TEMPLATES, lay_out

BEYOND = "198.18.0.2"
BEYOND6 = "fd00:c6:12::2"
BEYOND_PORT = 7000
SERVER = "172.31.254.2"
SPEC = TunnelSpec(role="server")
PUSH = 'push "redirect-gateway def1 bypass-dhcp"\n'

# Answers each TCP connection with the peer address it saw, then closes.
ECHO_PEER = textwrap.dedent(
    f"""
    import socket, sys
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], {BEYOND_PORT}))
    s.listen(8)
    print("listening", flush=True)
    while True:
        c, peer = s.accept()
        c.sendall(peer[0].encode())
        c.close()
    """
)

# Counts what crosses veth0 for a few seconds: VPN UDP to/from the server, and anything else
# at the IP level (link-layer housekeeping such as ARP and IPv6 link-local is not traffic).
# argv: seconds [VPN port [marker ...]]; plain= counts frames in which any marker is readable.
CAPTURE = textwrap.dedent(
    f"""
    import socket, struct, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind(("veth0", 0))
    s.settimeout(0.2)
    port = int(sys.argv[2]) if len(sys.argv) > 2 else {SPEC.port}
    markers = [m.encode() for m in sys.argv[3:]]
    print("capturing", flush=True)
    vpn = other = plain = 0
    others = []
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        try:
            frame = s.recv(65535)
        except TimeoutError:
            continue
        plain += any(m in frame for m in markers)
        ethertype = struct.unpack("!H", frame[12:14])[0]
        if ethertype != 0x0800:
            if ethertype == 0x86DD and frame[22] == 0xFE and frame[23] & 0xC0 == 0x80:
                continue  # IPv6 from a link-local address: neighbour discovery and friends
            if ethertype == 0x86DD and frame[38] == 0xFF:
                continue  # IPv6 multicast housekeeping
            if ethertype == 0x86DD and frame[20] == 58 and 133 <= frame[54] <= 137:
                continue  # neighbour discovery between global addresses (reachability probes)
            if ethertype == 0x0806:
                continue  # ARP
            other += 1
            if ethertype == 0x86DD:
                v6src = socket.inet_ntop(socket.AF_INET6, frame[22:38])
                v6dst = socket.inet_ntop(socket.AF_INET6, frame[38:54])
                others.append(f"ipv6 nh={{frame[20]}} {{v6src}}->{{v6dst}}")
            else:
                others.append(hex(ethertype))
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        proto = ip[9]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4]) if proto in (6, 17) else (0, 0)
        if proto == 17 and {{src, dst}} == {{"172.31.254.1", "{SERVER}"}} and port in (sport, dport):
            vpn += 1
        else:
            other += 1
            others.append(f"{{proto}} {{src}}:{{sport}}->{{dst}}:{{dport}}")
    print(f"vpn={{vpn}} other={{other}} plain={{plain}} {{others[:5]}}", flush=True)
    """
)


class ThreeNamespaces(Netns):
    """The harness's client/server pair plus a third namespace routed behind the server."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.beyond = f"{NS_PREFIX}{self.run_id}-c"

    def namespaces(self) -> Iterable[str]:
        return [*self.names.values(), self.beyond]

    def _create(self) -> None:
        super()._create()
        run(["ip", "netns", "add", self.beyond])
        run(
            [
                "ip",
                "-n",
                self.b,
                "link",
                "add",
                "veth1",
                "type",
                "veth",
                "peer",
                "name",
                "veth0",
                "netns",
                self.beyond,
            ]
        )
        run(["ip", "-n", self.b, "addr", "add", "198.18.0.1/24", "dev", "veth1"])
        run(["ip", "-n", self.b, "link", "set", "veth1", "up"])
        run([*netns_exec(self.b), "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        run(["ip", "-n", self.beyond, "link", "set", "lo", "up"])
        run(["ip", "-n", self.beyond, "addr", "add", f"{BEYOND}/24", "dev", "veth0"])
        run(["ip", "-n", self.beyond, "link", "set", "veth0", "up"])
        run(["ip", "-n", self.beyond, "route", "add", "default", "via", "198.18.0.1"])
        run(["ip", "-n", self.a, "route", "add", "default", "via", SERVER])
        # the same for IPv6
        run([*netns_exec(self.beyond), "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"])
        run([*netns_exec(self.b), "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        run(["ip", "-n", self.b, "addr", "add", "fd00:c6:12::1/64", "dev", "veth1", "nodad"])
        run(["ip", "-n", self.beyond, "addr", "add", f"{BEYOND6}/64", "dev", "veth0", "nodad"])
        run(["ip", "-n", self.beyond, "-6", "route", "add", "default", "via", "fd00:c6:12::1"])
        run(["ip", "-n", self.a, "-6", "route", "add", "default", "via", OUTER6["b"]])


def run(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"
    return res.stdout


def routes(ns: str) -> list[str]:
    """The client namespace's main routing tables, IPv4 and IPv6, as sorted lines."""
    lines = run(["ip", "-n", ns, "-4", "route", "show", "table", "main"]).splitlines()
    lines += run(["ip", "-n", ns, "-6", "route", "show", "table", "main"]).splitlines()
    return sorted(line.strip() for line in lines)


def peer_seen_beyond(ns: str, beyond: str = BEYOND, say: str = "") -> str:
    """Connect from ``ns`` to the beyond server; the source address it saw. ``say`` is sent after
    the answer (the server has closed by then, but the bytes still cross the wire)."""
    code = (
        "import socket; s = socket.create_connection(("
        f"'{beyond}', {BEYOND_PORT}), timeout=5); print(s.recv(100).decode()); s.sendall({say.encode()!r})"
    )
    return run([*netns_exec(ns), sys.executable, "-c", code]).strip()


def start_client(net: ThreeNamespaces, name: str) -> Proc:
    client = net.spawn("a", vpn_argv("pyovpn", net.workdir / "c.conf"), name)
    client.wait_for_line(INIT_LINE, 30)
    return client


@pytest.mark.parametrize("ipv6", [False, True], ids=["def1", "def1-ipv6"])
def test_pushed_redirect_gateway_carries_traffic_and_routes_are_restored(
    pki: Pki, tmp_path: Path, ipv6: bool
) -> None:
    with ThreeNamespaces(tmp_path / "net") as net:
        vpn_client = inner_addrs(SPEC).client4
        push = PUSH.replace('bypass-dhcp"', 'bypass-dhcp ipv6"') if ipv6 else PUSH
        (net.workdir / "s.conf").write_text(server_config(SPEC, pki, impl="openvpn", local=SERVER) + push)
        (net.workdir / "c.conf").write_text(client_config(SPEC, pki, impl="pyovpn", remote=SERVER))
        for address in (BEYOND, BEYOND6):
            echo = net.spawn(net.beyond, [sys.executable, "-c", ECHO_PEER, address], f"beyond-echo-{address}")
            echo.wait_for_line("listening", 10)
        original = routes(net.a)
        # without the tunnel, beyond is reached in the clear through the LAN router
        assert peer_seen_beyond(net.a) == "172.31.254.1"
        assert peer_seen_beyond(net.a, BEYOND6) == OUTER6["a"]

        server = net.spawn("b", vpn_argv("openvpn", net.workdir / "s.conf"), "server-openvpn")
        wait_listening(net.b, "udp", SPEC.port, proc=server)
        client = start_client(net, "client-1")
        tunnel_routes = routes(net.a)
        assert any(r.startswith("0.0.0.0/1 dev tun0") for r in tunnel_routes), tunnel_routes
        assert any(r.startswith("128.0.0.0/1 dev tun0") for r in tunnel_routes), tunnel_routes
        assert any(r.startswith(f"{SERVER} via {SERVER} dev veth0") for r in tunnel_routes), tunnel_routes
        assert "bypass-dhcp" in client.text() and "Windows only" in client.text()
        if ipv6:
            assert {"::/3 dev tun0", "2000::/4 dev tun0", "3000::/4 dev tun0", "fc00::/7 dev tun0"} <= {
                " ".join(r.split()[:3]) for r in tunnel_routes
            }, tunnel_routes

        # the traffic goes through the tunnel: beyond sees the VPN address, the wire only VPN UDP
        capture = net.spawn("a", [sys.executable, "-c", CAPTURE, "4"], "capture")
        capture.wait_for_line("capturing", 10)
        for _ in range(3):
            assert peer_seen_beyond(net.a) == vpn_client
        if ipv6:  # fd00::/8 lies in fc00::/7: through the tunnel, from the VPN's IPv6 address
            assert peer_seen_beyond(net.a, BEYOND6) == inner_addrs(SPEC).client6
        ping = subprocess.run(
            [*netns_exec(net.a), "ping", "-c", "5", "-i", "0.2", "-W", "2", BEYOND],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        seen = capture.wait_for_line(r"vpn=(\d+) other=(\d+)", 15)
        assert int(seen.group(1)) >= 10 and int(seen.group(2)) == 0, capture.text()

        # SIGUSR1: reconnects, the same routes, traffic still tunneled
        mark = client.mark()
        os.kill(client.pid, signal.SIGUSR1)
        client.wait_for_line(INIT_LINE, 30, since=mark)
        assert routes(net.a) == tunnel_routes
        assert peer_seen_beyond(net.a) == vpn_client

        # SIGTERM: every route as it was
        assert client.stop(15) == 0
        assert routes(net.a) == original
        assert peer_seen_beyond(net.a) == "172.31.254.1"

        # kill -9 leaves the server host route behind; the next start undoes it first
        crashed = start_client(net, "client-2")
        os.kill(crashed.pid, signal.SIGKILL)
        crashed.wait(10)
        leftover = routes(net.a)
        assert any(r.startswith(f"{SERVER} via {SERVER} dev veth0") for r in leftover), leftover
        again = start_client(net, "client-3")
        assert "left by a pyovpn process that did not exit cleanly" in again.text()
        assert routes(net.a) == tunnel_routes
        assert peer_seen_beyond(net.a) == vpn_client
        assert again.stop(15) == 0
        assert routes(net.a) == original


def normalized(lines: list[str], vpn_gateway: str) -> list[str]:
    """Routes without what does not change where packets go: a next hop inside the tun device
    (a layer-3 device has no neighbours)."""
    out = []
    for line in lines:
        line = line.replace(f"via {vpn_gateway} dev tun0", "dev tun0")
        out.append(" ".join(line.split()))
    return sorted(out)


@pytest.mark.parametrize(
    ("server_extra", "client_extra"),
    [
        (PUSH, ""),
        ("", "redirect-gateway def1 block-local\n"),
        ("", "route 0.0.0.0 0.0.0.0\nroute 198.18.0.0 255.255.255.0 net_gateway 7\nroute-metric 5\n"),
        ('push "route remote_host 255.255.255.255 net_gateway"\npush "route 10.200.0.0 255.255.0.0"\n', ""),
        ('push "redirect-gateway def1 ipv6"\n', "route-ipv6 fd00:c6:12::/64 net_gateway\n"),
        ("", "redirect-gateway\n"),
        ("", "redirect-gateway def1 local\n"),
        ("", "redirect-gateway def1 autolocal\n"),
        ('push "redirect-private"\npush "route 10.200.0.0 255.255.0.0"\n', ""),
        (
            'push "route 10.200.0.0 255.255.0.0"\npush "route 10.201.0.0 255.255.0.0"\n',
            'pull-filter accept "route 10.200"\npull-filter ignore "route "\n',
        ),
        ('push "redirect-gateway def1"\npush "route 10.200.0.0 255.255.0.0"\n', "route-nopull\n"),
        ('push "redirect-gateway def1 bypass-dhcp"\npush "block-ipv6"\n', ""),
    ],
    ids=[
        "pushed-def1",
        "local-block-local",
        "route-default",
        "pushed-keywords",
        "ipv6",
        "replace-default",
        "local",
        "autolocal",
        "redirect-private",
        "pull-filter",
        "route-nopull",
        "angristan-block-ipv6",
    ],
)
def test_routes_match_stock_openvpn_client(
    pki: Pki, tmp_path: Path, server_extra: str, client_extra: str
) -> None:
    """The stock OpenVPN 2.6 client is the oracle: pyovpn installs the same routes, and both put
    the routing table back as it was."""
    with ThreeNamespaces(tmp_path / "net") as net:
        (net.workdir / "s.conf").write_text(
            server_config(SPEC, pki, impl="openvpn", local=SERVER) + server_extra
        )
        server = net.spawn("b", vpn_argv("openvpn", net.workdir / "s.conf"), "server-openvpn")
        wait_listening(net.b, "udp", SPEC.port, proc=server)
        original = routes(net.a)
        seen: dict[str, list[str]] = {}
        for impl in ("openvpn", "pyovpn"):
            config = net.workdir / f"c-{impl}.conf"
            config.write_text(client_config(SPEC, pki, impl=impl, remote=SERVER) + client_extra)
            client = net.spawn("a", vpn_argv(impl, config), f"client-{impl}")
            client.wait_for_line(INIT_LINE, 30)
            seen[impl] = normalized(routes(net.a), inner_addrs(SPEC).server4)
            client.stop(15)
            assert routes(net.a) == original, f"{impl} left the routes changed"
        assert seen["pyovpn"] == seen["openvpn"]


def test_pull_filter_reject_restarts_without_touching_routes(pki: Pki, tmp_path: Path) -> None:
    """`pull-filter reject` on a pushed option: the session restarts (SIGUSR1 in OpenVPN) and the
    tunnel never comes up, so no route changes."""
    with ThreeNamespaces(tmp_path / "net") as net:
        (net.workdir / "s.conf").write_text(server_config(SPEC, pki, impl="openvpn", local=SERVER) + PUSH)
        config = net.workdir / "c.conf"
        config.write_text(
            client_config(SPEC, pki, impl="pyovpn", remote=SERVER) + 'pull-filter reject "redirect-"\n'
        )
        server = net.spawn("b", vpn_argv("openvpn", net.workdir / "s.conf"), "server-openvpn")
        wait_listening(net.b, "udp", SPEC.port, proc=server)
        original = routes(net.a)
        client = net.spawn("a", vpn_argv("pyovpn", config), "client-pyovpn")
        client.wait_for_line(r"Pushed option rejected by filter.*redirect-gateway def1 bypass-dhcp", 30)
        client.wait_for_line(r"restarting", 10)
        assert INIT_LINE not in client.text()
        assert routes(net.a) == original


# The installers push `redirect-gateway def1 bypass-dhcp` (Nyr adds `ipv6` when it has an IPv6
# address) and DNS 1.1.1.1 and 1.0.0.1. Here those are addresses of the beyond namespace, so the
# pushed resolvers are reached only through the tunnel; the namespace-private resolv.conf that
# the client namespace starts with points nowhere.
PUSHED_DNS = ("1.1.1.1", "1.0.0.1")
NAME, ANSWER = "www.example.test", "10.77.0.99"
MARKER = "pyovpn-plaintext-marker"
RESOLV_BEFORE = (
    "# namespace-private resolver for a pyovpn test\nnameserver 192.0.2.53\noptions timeout:1 attempts:1\n"
)


def resolves(ns: str) -> str:
    """The address ``NAME`` resolves to in ``ns`` ("" if it does not)."""
    res = subprocess.run(
        [*netns_exec(ns), "getent", "ahostsv4", NAME], capture_output=True, text=True, timeout=20, check=False
    )
    return res.stdout.split()[0] if res.returncode == 0 and res.stdout else ""


def wait_equal(read: Callable[[], object], want: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while read() != want and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read() == want, f"{what}: {read()!r} != {want!r}"


def leftovers(ns: str) -> list[str]:
    """What pyovpn keeps for namespace ``ns`` under /run/pyovpn (route journals, DNS state)."""
    ino = os.stat(f"/run/netns/{ns}").st_ino
    run_dir = Path("/run/pyovpn")
    return sorted(p.name for p in run_dir.glob(f"*-{ino}-*")) if run_dir.is_dir() else []


@pytest.mark.parametrize("installer", ["nyr", "nyr-ipv6", "angristan"])
def test_installer_server_full_tunnel_and_dns_restored_after_every_exit(pki: Pki, installer: str) -> None:
    """Stock OpenVPN 2.6 running an installer's server config unchanged; pyovpn runs its client config.
    Traffic beyond the server and the pushed resolver go through the tunnel (the outer link carries
    only VPN packets, none with readable payload); SIGUSR1 keeps, SIGTERM and kill -9 + next start
    restore routes and resolv.conf exactly; nothing stays in /run/pyovpn for the namespace."""
    # like the installer's /etc/openvpn/server (chmod o+x): the server as `user nobody` rereads crl.pem
    workdir = Path(tempfile.mkdtemp(prefix="pyovpn-installer-"))
    workdir.chmod(0o711)
    resolv_dir: Path | None = None
    try:
        with ThreeNamespaces(workdir / "net") as net:
            resolv_dir = Path("/etc/netns") / net.a
            resolv_dir.mkdir(parents=True, exist_ok=False)
            resolv = resolv_dir / "resolv.conf"
            resolv.write_text(RESOLV_BEFORE)
            responder = Path(__file__).with_name("dns_responder.py")
            for address in PUSHED_DNS:
                run(["ip", "-n", net.beyond, "addr", "add", f"{address}/32", "dev", "lo"])
                run(["ip", "-n", net.b, "route", "add", f"{address}/32", "via", BEYOND])
                answerer = [sys.executable, str(responder), address, "example.test", ANSWER]
                dns = net.spawn(net.beyond, answerer, f"dns-{address}")
                dns.wait_for_line("answering", 10)
            for address in (BEYOND, BEYOND6):
                echo = net.spawn(net.beyond, [sys.executable, "-c", ECHO_PEER, address], f"echo-{address}")
                echo.wait_for_line("listening", 10)

            server_conf = lay_out(pki, workdir, installer, SERVER)
            # as the harness does for every stock server: the kernel's DCO module is not under test
            server_conf.write_text(server_conf.read_text() + "disable-dco\n")
            client_conf = workdir / "client.conf"
            template = TEMPLATES / f"{installer.removesuffix('-ipv6')}-client.conf"
            client_conf.write_text(
                template.read_text().replace("SERVER_IP", SERVER)
                + f"ca {pki.ca_crt}\ncert {pki.client_crt}\nkey {pki.client_key}\ntls-crypt {pki.tc_key}\n"
            )
            original = routes(net.a)
            # the capture sees a marker sent in the clear (so it would see one that leaked)
            argv = [sys.executable, "-c", CAPTURE, "3", "1194", MARKER]
            capture = net.spawn("a", argv, "capture-clear")
            capture.wait_for_line("capturing", 10)
            assert peer_seen_beyond(net.a, say=MARKER) == "172.31.254.1" and resolves(net.a) == ""
            seen = capture.wait_for_line(r"vpn=(\d+) other=(\d+) plain=(\d+)", 15)
            assert int(seen.group(2)) > 0 and int(seen.group(3)) > 0, capture.text()

            server = net.spawn("b", ["openvpn", "--config", str(server_conf)], "server-openvpn", cwd=workdir)
            wait_listening(net.b, "udp", 1194, proc=server)

            def start(name: str) -> Proc:
                client = net.spawn("a", vpn_argv("pyovpn", client_conf), name)
                client.wait_for_line(INIT_LINE, 40)
                return client

            def tunneled() -> None:
                """Beyond sees the VPN addresses; the pushed resolver answers; nothing readable outside."""
                argv = [sys.executable, "-c", CAPTURE, "5", "1194", MARKER, "example"]
                capture = net.spawn("a", argv, "capture")
                capture.wait_for_line("capturing", 10)
                for _ in range(3):
                    assert peer_seen_beyond(net.a, say=MARKER).startswith("10.8.0.")
                if installer == "nyr-ipv6":
                    assert peer_seen_beyond(net.a, BEYOND6, say=MARKER).startswith("fddd:1194:1194:1194:")
                assert resolves(net.a) == ANSWER
                seen = capture.wait_for_line(r"vpn=(\d+) other=(\d+) plain=(\d+)", 15)
                assert int(seen.group(1)) >= 10 and seen.group(2) == seen.group(3) == "0", capture.text()

            client = start("client-1")
            wait_equal(lambda: "nameserver 1.0.0.1" in resolv.read_text(), True, "pushed DNS in resolv.conf")
            tunnel_routes, tunnel_resolv = routes(net.a), resolv.read_text()
            assert any(r.startswith("0.0.0.0/1 dev tun0") for r in tunnel_routes), tunnel_routes
            assert any(r.startswith("128.0.0.0/1 dev tun0") for r in tunnel_routes), tunnel_routes
            assert any(r.startswith(f"{SERVER} via {SERVER} dev veth0") for r in tunnel_routes), tunnel_routes
            v6_halves = {"::/3 dev tun0", "2000::/4 dev tun0", "3000::/4 dev tun0", "fc00::/7 dev tun0"}
            v6_routed = v6_halves <= {" ".join(r.split()[:3]) for r in tunnel_routes}
            assert v6_routed == (installer == "nyr-ipv6"), tunnel_routes
            # the pushed servers, in the order pushed, in place of the namespace's own
            pushed = re.findall(r'push "dhcp-option DNS (\S+)"', server_conf.read_text())
            assert sorted(pushed) == sorted(PUSHED_DNS)
            assert re.findall(r"^nameserver (\S+)$", tunnel_resolv, re.M) == pushed, tunnel_resolv
            assert "192.0.2.53" not in tunnel_resolv
            tunneled()

            # SIGUSR1: reconnects to the same state
            mark = client.mark()
            os.kill(client.pid, signal.SIGUSR1)
            client.wait_for_line(INIT_LINE, 40, since=mark)
            wait_equal(lambda: routes(net.a), tunnel_routes, "routes after SIGUSR1")
            wait_equal(resolv.read_text, tunnel_resolv, "resolv.conf after SIGUSR1")
            tunneled()

            # SIGTERM: everything as before
            assert client.stop(15) == 0
            assert routes(net.a) == original and resolv.read_text() == RESOLV_BEFORE
            assert peer_seen_beyond(net.a) == "172.31.254.1" and resolves(net.a) == ""
            assert leftovers(net.a) == []

            # kill -9 leaves both changed; the next start undoes that first, then sets up again
            crashed = start("client-2")
            wait_equal(resolv.read_text, tunnel_resolv, "resolv.conf of the second run")
            os.kill(crashed.pid, signal.SIGKILL)
            crashed.wait(10)
            assert resolv.read_text() == tunnel_resolv and routes(net.a) != original
            again = start("client-3")
            assert "left by a pyovpn process that did not exit cleanly" in again.text(), again.tail()
            assert "undoing the DNS settings a previous pyovpn left" in again.text(), again.tail()
            wait_equal(lambda: routes(net.a), tunnel_routes, "routes after the restart")
            wait_equal(resolv.read_text, tunnel_resolv, "resolv.conf after the restart")
            tunneled()
            assert again.stop(15) == 0
            assert routes(net.a) == original and resolv.read_text() == RESOLV_BEFORE
            assert leftovers(net.a) == []
            assert server.running(), server.tail()
    finally:
        if resolv_dir is not None:
            shutil.rmtree(resolv_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def test_docker_openvpn_server_pushing_comp_lzo_no_with_a_pyovpn_client(pki: Pki) -> None:
    """Stock OpenVPN running docker-openvpn's generated server config (net30, `comp-lzo no` pushed)
    and pyovpn running the client config its ovpn_getclient writes: traffic both ways through the
    framing userspace data plane, one log line saying why the kernel's is not used, and the stock
    server never sees a packet it cannot parse. The client namespace has no resolv.conf of its own:
    the pushed DNS must not reach the host's."""
    workdir = Path(tempfile.mkdtemp(prefix="pyovpn-docker-"))
    workdir.chmod(0o711)
    try:
        host_resolv = Path("/etc/resolv.conf").read_bytes()
        with ThreeNamespaces(workdir / "net") as net:
            server_conf = lay_out(pki, workdir, "docker-openvpn", SERVER)
            # the one absolute path (the container's /tmp) kept inside the test's directory
            text = server_conf.read_text().replace("/tmp/openvpn-status.log", "openvpn-status.log")
            server_conf.write_text(text + "disable-dco\n")
            echo = net.spawn(net.beyond, [sys.executable, "-c", ECHO_PEER, BEYOND], "beyond-echo")
            echo.wait_for_line("listening", 10)
            client_conf = workdir / "docker-client.conf"
            client_conf.write_text(
                "client\nnobind\ndev tun\nremote-cert-tls server\n\n"
                f"remote {SERVER} 1194 udp\n"
                f"ca {pki.ca_crt}\ncert {pki.client_crt}\nkey {pki.client_key}\n"
                f"key-direction 1\ntls-auth {pki.ta_key}\nredirect-gateway def1\n"
            )
            server = net.spawn("b", ["openvpn", "--config", str(server_conf)], "server-openvpn", cwd=workdir)
            wait_listening(net.b, "udp", 1194, proc=server)
            client = net.spawn("a", vpn_argv("pyovpn", client_conf), "client-pyovpn")
            client.wait_for_line(INIT_LINE, 40)
            server.wait_for_line(r"MULTI: primary virtual IP for \S+: 192\.168\.255\.6", 20)
            for ns, address in ((net.a, "192.168.255.1"), (net.b, "192.168.255.6")):
                res = subprocess.run(
                    [*netns_exec(ns), "ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", "-s", "1000", address],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                assert res.returncode == 0 and " 0% packet loss" in res.stdout, res.stdout + client.tail()
            assert peer_seen_beyond(net.a) == "192.168.255.6"  # redirect-gateway def1: beyond via the VPN
            log = client.text()
            assert len(re.findall(r"kernel data channel not used: .*comp-lzo no", log)) == 1, client.tail()
            assert not re.search(r"Bad .*decompression header|bad compression", server.text()), server.tail()
            # its pushed DNS: this namespace has no resolver file of its own, so the host's stays as it is
            assert f"DNS 8.8.8.8, 8.8.4.4 not applied: network namespace {net.a} has no resolver file" in log
            assert Path("/etc/resolv.conf").read_bytes() == host_resolv
            assert client.stop(15) == 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
