"""Full-tunnel routing: the route plan for every redirect flag and route keyword (as OpenVPN 2.6
computes it on Linux), pushed-option filtering, the warnings for unapplied pushed options, and
the route journal (write, undo, replay after a crash)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyovpn.config import Options, Route, RouteV6, parse_config_text
from pyovpn.edge.clientroutes import ClientRoutes
from pyovpn.edge.fulltunnel import HostRoute, NetGateway, RouteChange, inputs_for, plan_routes
from pyovpn.edge.iface import configure_addresses
from pyovpn.edge.pushwarn import warn_unapplied
from pyovpn.edge.routejournal import RouteJournal, journal_path, replay_stale
from pyovpn.errors import ConfigError, ProtocolError
from pyovpn.proto.push import parse_pushed_options
from pyovpn.proto.redirect import BadRedirectFlag, filter_pushed, redirect_from
from tests.unit.configtext import INLINE_CREDENTIALS
from tests.unit.edgefakes import RecordingNetwork

TUN = "tun0"
LAN = NetGateway("eth0", "192.168.1.1", ("192.168.1.0/24",), metric=100)
LAN6 = NetGateway("eth0", "fe80::1", (), metric=1024)
SERVER = "203.0.113.5"
PUSH_BASE = ["ifconfig 10.8.0.6 10.8.0.5", "route-gateway 10.8.0.5", "topology net30"]


def parse_text(lines: str) -> Options:
    return parse_config_text("remote vpn.example.com 1194\n" + lines + INLINE_CREDENTIALS)


def plan_for(
    push: list[str],
    opts: Options | None = None,
    *,
    remote: str = SERVER,
    gw: NetGateway | None = LAN,
    gw6: NetGateway | None = None,
) -> tuple[list[str], list[str]]:
    pushed = parse_pushed_options(PUSH_BASE + push)
    inp = inputs_for(opts or Options(), pushed, TUN, remote_host=remote, net_gateway=gw, net_gateway_v6=gw6)
    plan = plan_routes(inp)
    return [str(c) for c in plan.changes], plan.notes


_KEEP_SERVER = f"add {SERVER}/32 via 192.168.1.1 dev eth0"


@pytest.mark.parametrize(
    ("pushed", "expected"),
    [
        # def1 adds two halves and keeps the server on the original gateway
        ("redirect-gateway def1", [_KEEP_SERVER, "add 0.0.0.0/1 dev tun0", "add 128.0.0.0/1 dev tun0"]),
        # without def1 the default route is replaced (and put back exactly)
        (
            "redirect-gateway",
            [_KEEP_SERVER, "del 0.0.0.0/0 via 192.168.1.1 dev eth0 metric 100", "add 0.0.0.0/0 dev tun0"],
        ),
        # local skips the server host route
        ("redirect-gateway def1 local", ["add 0.0.0.0/1 dev tun0", "add 128.0.0.0/1 dev tun0"]),
        # redirect-private keeps the default route
        ("redirect-private", [_KEEP_SERVER]),
    ],
)
def test_redirect_plan(pushed: str, expected: list[str]) -> None:
    changes, notes = plan_for([pushed])
    assert changes == expected
    assert notes == []


def test_autolocal_decides_by_the_gateway_subnet() -> None:
    on_lan, _ = plan_for(["redirect-gateway def1 autolocal"], remote="192.168.1.20")
    assert on_lan == ["add 0.0.0.0/1 dev tun0", "add 128.0.0.0/1 dev tun0"]
    far, _ = plan_for(["redirect-gateway def1 autolocal"])
    assert far[0] == f"add {SERVER}/32 via 192.168.1.1 dev eth0"


def test_block_local_sends_the_lan_into_the_tunnel_but_not_the_gateway() -> None:
    changes, _ = plan_for(["redirect-gateway def1 block-local"])
    assert changes == [
        f"add {SERVER}/32 via 192.168.1.1 dev eth0",
        "add 192.168.1.1/32 dev eth0",
        "add 0.0.0.0/1 dev tun0",
        "add 128.0.0.0/1 dev tun0",
        "add 192.168.1.0/25 dev tun0",
        "add 192.168.1.128/25 dev tun0",
    ]
    # a server on the LAN itself: OpenVPN does not block the LAN then
    on_lan, _ = plan_for(["redirect-gateway def1 block-local"], remote="192.168.1.20")
    assert not any("192.168.1.0/25" in c for c in on_lan)


def test_bypass_flags_add_nothing_on_linux_but_say_so() -> None:
    changes, notes = plan_for(["redirect-gateway def1 bypass-dhcp bypass-dns"])
    assert len(changes) == 3
    assert len(notes) == 2 and all("Windows only" in n and "net_gateway" in n for n in notes)


def test_ipv6_flag_routes_the_v6_internet_and_keeps_a_v6_server_outside() -> None:
    push = ["ifconfig-ipv6 fd00::1000/64 fd00::1", "redirect-gateway def1 ipv6"]
    changes, _ = plan_for(push, remote="2001:db8::5", gw=None, gw6=LAN6)
    assert changes == [
        "add 0.0.0.0/1 dev tun0",  # an IPv6 server needs no IPv4 host route, so no IPv4 gateway either
        "add 128.0.0.0/1 dev tun0",
        "add 2001:db8::5/128 via fe80::1 dev eth0 metric 1",
        "add ::/3 dev tun0",
        "add 2000::/4 dev tun0",
        "add 3000::/4 dev tun0",
        "add fc00::/7 dev tun0",
    ]
    # !ipv4: only IPv6 is redirected, and no IPv4 host route is needed
    v6only, _ = plan_for(["ifconfig-ipv6 fd00::1000/64 fd00::1", "redirect-gateway ipv6 !ipv4"])
    assert v6only == [
        "add ::/3 dev tun0",
        "add 2000::/4 dev tun0",
        "add 3000::/4 dev tun0",
        "add fc00::/7 dev tun0",
    ]


def test_ipv6_flag_without_a_tunnel_address_is_a_note() -> None:
    changes, notes = plan_for(["redirect-gateway def1 ipv6"])
    assert not any("::" in c for c in changes)
    assert any("no IPv6 address" in n for n in notes)


def test_unknown_gateway_refuses_to_redirect_with_a_reason() -> None:
    changes, notes = plan_for(["redirect-gateway def1"], gw=None)
    assert changes == [] and "default gateway" in notes[0]
    subnet = parse_pushed_options(
        ["ifconfig 10.8.0.2 255.255.255.0", "topology subnet", "redirect-gateway def1"]
    )
    plan = plan_routes(inputs_for(Options(), subnet, TUN, remote_host=SERVER, net_gateway=LAN))
    assert plan.changes == [] and "route-gateway" in plan.notes[0]


def test_route_keywords_and_metrics() -> None:
    push = [
        "route-metric 50",
        "route 198.51.100.0 255.255.255.0 net_gateway",
        "route remote_host 255.255.255.255 net_gateway",
        "route 10.20.0.0 255.255.0.0 vpn_gateway 7",
        "route 10.30.0.0 255.255.0.0",
        "route-ipv6 2001:db8:1::/48",
    ]
    changes, notes = plan_for(push)
    assert changes == [
        "add 198.51.100.0/24 via 192.168.1.1 dev eth0 metric 50",
        f"add {SERVER}/32 via 192.168.1.1 dev eth0 metric 50",
        "add 10.20.0.0/16 dev tun0 metric 7",
        "add 10.30.0.0/16 dev tun0 metric 50",
        "add 2001:db8:1::/48 dev tun0 metric 50",
    ]
    assert notes == []


def test_local_options_and_push_add_up() -> None:
    opts = parse_text(
        "client\nredirect-gateway def1\nroute 172.16.0.0 255.240.0.0 net_gateway\nroute-metric 9\n"
    )
    changes, _ = plan_for(["redirect-gateway block-local"], opts)
    assert "add 0.0.0.0/1 dev tun0" in changes and "add 192.168.1.0/25 dev tun0" in changes
    assert "add 172.16.0.0/12 via 192.168.1.1 dev eth0 metric 9" in changes


def test_route_default_route_is_added_like_any_other() -> None:
    opts = Options(routes=(Route("0.0.0.0", "0.0.0.0"),), routes_ipv6=(RouteV6("::/0"),))
    changes, _ = plan_for([], opts)
    assert changes == ["add 0.0.0.0/0 dev tun0", "add ::/0 dev tun0"]


# ---------------------------------------------------------------------------- config and push text


def test_config_accepts_the_routing_options() -> None:
    o = parse_text(
        "client\nredirect-gateway def1 bypass-dhcp\nredirect-private local\nroute-gateway 10.8.0.1\n"
        "route-metric 20\nroute-nopull\nroute-noexec\nifconfig-noexec\n"
        'pull-filter ignore "route 10."\npull-filter reject "redirect-gateway"\n'
    )
    assert o.redirects == (("redirect-gateway", "def1", "bypass-dhcp"), ("redirect-private", "local"))
    assert (o.route_gateway, o.route_metric) == ("10.8.0.1", 20)
    assert o.route_nopull and o.route_noexec and o.ifconfig_noexec
    assert o.pull_filters == (("ignore", "route 10."), ("reject", "redirect-gateway"))
    assert redirect_from(o.redirects).def1


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("redirect-gateway def2", "unknown redirect-gateway flag 'def2'"),
        ("pull-filter drop route", "use accept, ignore or reject"),
        ("route-gateway dhcp", "TAP"),
    ],
)
def test_config_refuses_bad_routing_options(line: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_text(f"client\n{line}\n")


def test_bad_pushed_redirect_flag_skips_the_option_and_bad_routes_are_protocol_errors() -> None:
    pushed = parse_pushed_options(["redirect-gateway def1 sideways"])
    assert pushed.redirects == [] and pushed.ignored == ["redirect-gateway def1 sideways"]
    with pytest.raises(BadRedirectFlag):
        redirect_from([("redirect-gateway", "def1", "sideways")])
    with pytest.raises(ProtocolError):
        parse_pushed_options(["route 10.0.0.0 255.0.0.0 not-an-ip"])


def test_pull_filter_first_match_wins_and_route_nopull_drops_route_options() -> None:
    pushed = [
        "route 10.1.0.0 255.255.0.0",
        "route 10.2.0.0 255.255.0.0",
        "dhcp-option DNS 10.8.0.1",
        "ping 10",
    ]
    r = filter_pushed(pushed, [("accept", "route 10.1"), ("ignore", "route ")], route_nopull=False)
    assert r.kept == ["route 10.1.0.0 255.255.0.0", "dhcp-option DNS 10.8.0.1", "ping 10"]
    assert r.removed == ["route 10.2.0.0 255.255.0.0"] and r.rejected is None
    nopull = filter_pushed(pushed, [], route_nopull=True)
    assert nopull.kept == ["ping 10"]
    rejected = filter_pushed(pushed, [("reject", "dhcp-option")], route_nopull=False)
    assert rejected.rejected == "dhcp-option DNS 10.8.0.1"


def test_unapplied_pushed_options_are_warned_about_unless_handled(caplog: pytest.LogCaptureFixture) -> None:
    pushed = parse_pushed_options(
        ["redirect-gateway def1", "dhcp-option DNS 10.8.0.1", "inactive 300", "ping 10"]
    )
    with caplog.at_level(logging.WARNING, logger="pyovpn"):
        warned = warn_unapplied(pushed, handled={"dhcp-option"})
    assert warned == ["inactive 300"]
    assert "inactive 300" in caplog.text and "pull-filter ignore" in caplog.text
    assert "redirect-gateway" not in caplog.text


# ---------------------------------------------------------------------------- the journal

CHANGES = [
    RouteChange("add", HostRoute(SERVER, 32, "eth0", "192.168.1.1")),
    RouteChange("del", HostRoute("0.0.0.0", 0, "eth0", "192.168.1.1", 100)),
    RouteChange("add", HostRoute("0.0.0.0", 0, TUN)),
]


class LanHost(RecordingNetwork):
    """A host on a LAN behind 192.168.1.1, which answers route lookups as the kernel would."""

    def gateway_to(self, address: str) -> NetGateway | None:
        return None if ":" in address else LAN


def lan_host() -> LanHost:
    net = LanHost()
    net.add_route("eth0", "0.0.0.0", 0, "192.168.1.1", 100)
    net.add_route("eth0", "192.168.1.0", 24)
    return net


def test_journal_is_written_before_each_change_and_undo_restores_the_host(tmp_path: Path) -> None:
    net = lan_host()
    before = set(net.routes)
    path = journal_path(tmp_path, TUN)
    journal = RouteJournal(net, path)
    assert journal.apply(CHANGES) == []
    assert (TUN, "0.0.0.0", 0, None, None) in net.routes and (
        "eth0",
        "0.0.0.0",
        0,
        "192.168.1.1",
        100,
    ) not in net.routes
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0] == {"pid": os.getpid()}
    assert [r.get("done") for r in records[1:]] == [None, 0, None, 1, None, 2]
    journal.undo()
    assert net.routes == before
    assert not path.exists()


def test_no_changes_leave_no_journal_behind(tmp_path: Path) -> None:
    # a tunnel without routes that is killed must not leave a journal file in /run/pyovpn
    path = journal_path(tmp_path, TUN)
    assert RouteJournal(lan_host(), path).apply([]) == []
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_failed_change_is_not_undone(tmp_path: Path) -> None:
    net = lan_host()
    net.add_route("eth0", "10.9.0.0", 16)  # someone else's route, which our add collides with
    before = set(net.routes)
    journal = RouteJournal(net, journal_path(tmp_path, TUN))
    failures = journal.apply([RouteChange("add", HostRoute("10.9.0.0", 16, TUN))])
    assert len(failures) == 1 and "already exists" in failures[0]
    journal.undo()
    assert net.routes == before  # the foreign route survives


def test_replay_after_a_crash_undoes_what_the_dead_process_did(tmp_path: Path) -> None:
    net = lan_host()
    before = set(net.routes)
    path = journal_path(tmp_path, TUN)
    RouteJournal(net, path).apply(CHANGES)
    # the journal now names a process that is gone, as after kill -9
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lines = path.read_text().splitlines()
    path.write_text("\n".join([json.dumps({"pid": int(dead.stdout)}), *lines[1:]]) + "\n")
    assert replay_stale(net, path) == 3
    assert net.routes == before and not path.exists()
    assert replay_stale(net, path) == 0


def test_replay_leaves_a_live_process_journal_alone(tmp_path: Path) -> None:
    net = lan_host()
    path = journal_path(tmp_path, TUN)
    RouteJournal(net, path).apply(CHANGES)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([json.dumps({"pid": os.getppid()}), *lines[1:]]) + "\n")
    assert replay_stale(net, path) == 0 and path.exists()


def test_client_routes_keep_unchanged_routes_and_redo_on_change(tmp_path: Path) -> None:
    net = lan_host()
    before = set(net.routes)
    routes = ClientRoutes(net, tmp_path)
    pushed = parse_pushed_options([*PUSH_BASE, "redirect-gateway def1"])
    routes.configure(Options(), pushed, TUN, SERVER, force=False)
    after = set(net.routes)
    assert (TUN, "0.0.0.0", 1, None, None) in after
    history = len(net.route_history)
    routes.configure(Options(), pushed, TUN, SERVER, force=False)  # a restart with the same push
    assert len(net.route_history) == history
    routes.configure(Options(), pushed, TUN, "198.51.100.9", force=False)  # another server
    assert net.routes == before | {
        ("eth0", "198.51.100.9", 32, "192.168.1.1", None),
        (TUN, "0.0.0.0", 1, None, None),
        (TUN, "128.0.0.0", 1, None, None),
    }
    routes.undo()
    assert net.routes == before


def test_route_noexec_changes_nothing_but_keeps_the_plan() -> None:
    net = lan_host()
    before = set(net.routes)
    routes = ClientRoutes(net, None)
    pushed = parse_pushed_options([*PUSH_BASE, "redirect-gateway def1"])
    routes.configure(Options(route_noexec=True), pushed, TUN, SERVER, force=True)
    assert net.routes == before
    assert routes.plan is not None and "add 0.0.0.0/1 dev tun0" in [str(c) for c in routes.plan.changes]


def test_explicit_gateways_inside_and_outside_the_tunnel() -> None:
    push = [
        "route 10.40.0.0 255.255.0.0 10.8.0.5",  # the VPN gateway: through the device
        "route 10.50.0.0 255.255.0.0 192.168.1.50",  # a LAN router: where the kernel reaches it
        "route 10.60.0.0 255.255.0.0 remote_host",
    ]
    changes, _ = plan_for(push)
    assert changes == [
        "add 10.40.0.0/16 dev tun0",
        "add 10.50.0.0/16 via 192.168.1.50",
        f"add 10.60.0.0/16 via {SERVER}",
    ]


def test_route_ipv6_net_gateway_goes_into_the_tunnel_as_in_openvpn_2_6_with_a_note() -> None:
    opts = parse_text("client\nroute-ipv6 2001:db8:9::/48 net_gateway\nroute-ipv6 2001:db8:8::/48 fe80::99\n")
    changes, notes = plan_for(["ifconfig-ipv6 fd00::1000/64 fd00::1"], opts)
    assert changes == ["add 2001:db8:9::/48 dev tun0", "add 2001:db8:8::/48 via fe80::99"]
    assert len(notes) == 1 and "cannot parse net_gateway for IPv6" in notes[0]


def test_ifconfig_noexec_leaves_the_addresses_alone() -> None:
    net = RecordingNetwork()
    pushed = parse_pushed_options([*PUSH_BASE, "ifconfig-ipv6 fd00::1000/64 fd00::1"])
    configure_addresses(net, TUN, Options(ifconfig_noexec=True), pushed)
    assert net.addresses == []
    configure_addresses(net, TUN, Options(), pushed)
    assert net.has_address(TUN, "10.8.0.6", 32) and net.has_address(TUN, "fd00::1000", 64)


def test_a_server_refuses_client_routing_options() -> None:
    server = "server 10.8.0.0 255.255.255.0\ntopology subnet\ndh none\n"
    with pytest.raises(ConfigError, match="`route-noexec` is a client's routing option"):
        parse_config_text(server + "route-noexec\n" + INLINE_CREDENTIALS)


def test_an_unwritable_journal_still_changes_and_undoes_routes(tmp_path: Path) -> None:
    net = lan_host()
    before = set(net.routes)
    path = journal_path(tmp_path, TUN)
    journal = RouteJournal(net, path)
    journal.apply(CHANGES[:1])
    path.unlink()
    path.mkdir()  # appending to the journal now fails, as for a user without rights to it
    assert journal.apply(CHANGES[1:]) == []
    assert journal.path is None
    journal.undo()
    assert net.routes == before
