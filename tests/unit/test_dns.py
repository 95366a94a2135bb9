"""DNS: the dhcp-option/dns parser, the resolv.conf text, the resolver state file, the script env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyovpn.config import parse_config_text
from pyovpn.edge.iface import tun_params
from pyovpn.errors import ConfigError, ProtocolError
from pyovpn.proto.dnsopts import parse_dns_lines, resolv_conf_fragment
from pyovpn.proto.push import parse_pushed_options
from pyovpn.resolver import ResolverSetup, merged_resolv_conf, named_netns, resolvectl_commands
from pyovpn.script_env import default_gateway, peer_env, session_env
from pyovpn.scripts import up_down_env

from .configtext import INLINE_CREDENTIALS

CLIENT = "client\ndev tun\nremote 192.0.2.1 1194 udp\n" + INLINE_CREDENTIALS


def test_dhcp_option_every_kind() -> None:
    s = parse_dns_lines(
        [
            "dhcp-option DNS 10.8.0.1",
            "dhcp-option DNS6 fd00::53",
            "dhcp-option DNS 10.8.0.1",  # repeated: once
            "dhcp-option DOMAIN corp.example.",
            "dhcp-option DOMAIN-SEARCH a.example",
            "dhcp-option DOMAIN-SEARCH b.example",
            "dhcp-option WINS 10.8.0.9",
        ]
    )
    assert s.servers == ["10.8.0.1", "fd00::53"]
    assert s.domains == ["corp.example", "a.example", "b.example"]
    assert s.windows_only == ["dhcp-option WINS 10.8.0.9"]
    assert parse_dns_lines(["dhcp-option ADAPTER_DOMAIN_SUFFIX x.test"]).domain == "x.test"


def test_dns_option_forms_and_priority() -> None:
    s = parse_dns_lines(
        [
            "dhcp-option DNS 10.0.0.1",
            "dns server 2 address 10.8.0.3",
            "dns server -1 address 10.8.0.1 fd00::1",
            "dns search-domains s1.test s2.test",
        ]
    )
    # `dns server` wins over dhcp-option DNS, ordered by priority (lower first)
    assert s.servers == ["10.8.0.1", "fd00::1", "10.8.0.3"]
    assert s.dns_search == ["s1.test", "s2.test"]
    both = parse_dns_lines(["dhcp-option DOMAIN-SEARCH a.test", "dns search-domains b.test"])
    assert both.domains == ["b.test"]  # `dns` replaces dhcp-option's search list, as in 2.6


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("dhcp-option DNS not-an-ip", "not an IPv4 or IPv6"),
        ("dhcp-option DNS fd00::1", "DNS6 an IPv6"),
        ("dhcp-option FOO 1", "unknown kind"),
        ("dhcp-option DNS", "needs a value"),
        ("dhcp-option DOMAIN bad..name", "not a domain"),
        ("dns server x address 10.0.0.1", "priority must be a number"),
        ("dns server 300 address 10.0.0.1", "between -128 and 127"),
        ("dns server 1 dnssec yes", "not supported"),
        ("dns server 1 address 10.0.0.1:5353", "port is not supported"),
        ("dns frobnicate", "not understood"),
    ],
)
def test_bad_forms_say_what_to_do(line: str, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        parse_dns_lines([line])


def test_config_accepts_and_refuses() -> None:
    opts = parse_config_text(CLIENT + "dhcp-option DNS 10.8.0.1\ndns search-domains x.test\n")
    assert opts.dns_lines == ("dhcp-option DNS 10.8.0.1", "dns search-domains x.test")
    assert opts.pyovpn_dns == "auto"
    assert parse_config_text(CLIENT + "pyovpn-dns off\n").pyovpn_dns == "off"
    assert not any(name == "dhcp-option" for name, _, _ in opts.ignored)
    with pytest.raises(ConfigError, match="not an IPv4"):
        parse_config_text(CLIENT + "dhcp-option DNS nope\n")
    with pytest.raises(ConfigError, match="'auto' or 'off'"):
        parse_config_text(CLIENT + "pyovpn-dns maybe\n")


def test_pushed_dns_lines_are_kept_not_ignored() -> None:
    p = parse_pushed_options(["dhcp-option DNS 10.8.0.1", "dns server 0 address 10.8.0.2", "block-ipv6"])
    assert p.dns_lines == ["dhcp-option DNS 10.8.0.1", "dns server 0 address 10.8.0.2"]
    assert p.ignored == ["block-ipv6"]


def test_resolv_conf_text() -> None:
    s = parse_dns_lines(["dhcp-option DNS 10.8.0.1", "dhcp-option DOMAIN example.test"])
    assert resolv_conf_fragment(s) == "nameserver 10.8.0.1\nsearch example.test\n"
    original = "# local\nnameserver 192.0.2.53\nsearch home.lan\noptions edns0\n"
    merged = merged_resolv_conf(original, s, "tun0")
    assert merged.splitlines()[1:] == [
        "nameserver 10.8.0.1",
        "search example.test",
        "# local",
        "options edns0",
    ]
    only_domain = parse_dns_lines(["dhcp-option DOMAIN example.test"])
    assert "nameserver 192.0.2.53" in merged_resolv_conf(original, only_domain, "tun0")
    assert resolvectl_commands("tun0", s) == [
        ["resolvectl", "dns", "tun0", "10.8.0.1"],
        ["resolvectl", "domain", "tun0", "example.test"],
        ["resolvectl", "default-route", "tun0", "true"],
    ]


def _file_method(monkeypatch: pytest.MonkeyPatch) -> None:
    # this machine has neither systemd-resolved nor resolvconf; make that explicit for the test
    monkeypatch.setattr(ResolverSetup, "pick_method", staticmethod(lambda writable=True: "file"))


def _state_name(dev: str) -> str:
    """The state file of ``dev`` in this process's network namespace."""
    return f"dns-{os.stat('/proc/self/ns/net').st_ino}-{dev}.json"


def test_file_apply_restore_and_stale_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _file_method(monkeypatch)
    conf = tmp_path / "resolv.conf"
    original = "nameserver 192.0.2.53\n"
    conf.write_text(original)
    state = tmp_path / "state"
    s = parse_dns_lines(["dhcp-option DNS 10.8.0.1"])
    r = ResolverSetup(state, conf)
    r.apply("tun9", s)
    assert "nameserver 10.8.0.1" in conf.read_text() and "192.0.2.53" not in conf.read_text()
    recorded = json.loads((state / _state_name("tun9")).read_text())
    assert recorded["original"] == original and recorded["pid"] == os.getpid()
    r.restore()
    assert conf.read_text() == original and not list(state.iterdir())

    # a killed process: its state stays; the next start in this namespace undoes it
    ResolverSetup(state, conf).apply("tun9", s)
    data = json.loads((state / _state_name("tun9")).read_text())
    data["pid"] = 2**22 + 1  # above pid_max's default: no such process
    (state / _state_name("tun9")).write_text(json.dumps(data))
    other_ns = tmp_path / "other.json"
    other_ns.write_text(json.dumps(data | {"netns": "0:0"}))
    (state / "dns-1-tun8.json").write_text(other_ns.read_text())
    ResolverSetup(state, conf).restore_stale()
    assert conf.read_text() == original
    assert [p.name for p in state.iterdir()] == ["dns-1-tun8.json"]  # another namespace's: left alone


def _named_here(tmp_path: Path) -> tuple[Path, Path]:
    """A /run/netns-like directory naming this process's own network namespace "ns-x"."""
    run_dir, etc_dir = tmp_path / "run-netns", tmp_path / "etc-netns"
    run_dir.mkdir()
    (etc_dir / "ns-x").mkdir(parents=True)
    (run_dir / "ns-x").symlink_to("/proc/self/ns/net")
    return run_dir, etc_dir


def test_named_namespace_uses_its_private_file_not_the_host_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a host where systemd-resolved runs: a tunnel in a named namespace must still not reach it
    monkeypatch.setattr(ResolverSetup, "pick_method", staticmethod(lambda writable=True: "resolved"))
    run_dir, etc_dir = _named_here(tmp_path)
    private = etc_dir / "ns-x" / "resolv.conf"
    private.write_text("nameserver 192.0.2.53\n")
    r = ResolverSetup(tmp_path / "state", private, (run_dir, etc_dir))
    r.apply("tun0", parse_dns_lines(["dhcp-option DNS 10.8.0.1"]))
    assert "nameserver 10.8.0.1" in private.read_text()
    r.restore()
    assert private.read_text() == "nameserver 192.0.2.53\n"


def test_named_namespace_without_private_file_leaves_the_host_resolver_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _file_method(monkeypatch)
    run_dir, etc_dir = _named_here(tmp_path)
    host_conf = tmp_path / "resolv.conf"  # stands for the host's /etc/resolv.conf
    host_conf.write_text("nameserver 192.0.2.53\n")
    r = ResolverSetup(tmp_path / "state", host_conf, (run_dir, etc_dir))
    with caplog.at_level("WARNING", logger="pyovpn.dns"):
        r.apply("tun0", parse_dns_lines(["dhcp-option DNS 10.8.0.1"]))
    assert host_conf.read_text() == "nameserver 192.0.2.53\n"
    assert not (tmp_path / "state").exists()
    assert f"create {etc_dir / 'ns-x' / 'resolv.conf'}, which `ip netns exec ns-x` mounts" in caplog.text


def test_named_netns_is_none_outside_any_named_namespace(tmp_path: Path) -> None:
    run_dir, _ = _named_here(tmp_path)
    assert named_netns(run_dir) == "ns-x"
    (run_dir / "ns-x").unlink()
    (run_dir / "other").write_text("")  # not a namespace file: no match
    assert named_netns(run_dir) is None
    assert named_netns(tmp_path / "missing") is None


def test_state_of_a_killed_process_not_yet_reaped_is_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # after kill -9 the parent (a supervisor, a test harness) may not have reaped the process yet:
    # its pid still answers kill(0), but it is a zombie and what it left must be undone
    _file_method(monkeypatch)
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\n")
    state = tmp_path / "state"
    ResolverSetup(state, conf).apply("tun9", parse_dns_lines(["dhcp-option DNS 10.8.0.1"]))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
        data = json.loads((state / _state_name("tun9")).read_text())
        (state / _state_name("tun9")).write_text(json.dumps(data | {"pid": child.pid}))
        ResolverSetup(state, conf).restore_stale()
    finally:
        child.wait()
    assert conf.read_text() == "nameserver 192.0.2.53\n" and not list(state.iterdir())


def test_restore_leaves_a_file_someone_else_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _file_method(monkeypatch)
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\n")
    r = ResolverSetup(tmp_path / "state", conf)
    r.apply("tun9", parse_dns_lines(["dhcp-option DNS 10.8.0.1"]))
    conf.write_text("nameserver 198.51.100.1\n")
    r.restore()
    assert conf.read_text() == "nameserver 198.51.100.1\n"


def test_session_env_names_and_values(tmp_path: Path) -> None:
    opts = parse_config_text(
        CLIENT + "verb 3\nroute 192.168.7.0 255.255.255.0 net_gateway 5\n", source=str(tmp_path / "c.conf")
    )
    pushed = parse_pushed_options(
        [
            "route-gateway 10.8.0.1",
            "topology subnet",
            "ifconfig 10.8.0.2 255.255.255.0",
            "route 10.20.0.0 255.255.0.0",
            "route-ipv6 fd00:20::/48",
            "dhcp-option DNS 10.8.0.1",
            "dhcp-option DOMAIN example.test",
            "dns search-domains s.test",
        ]
    )
    env = session_env(opts, pushed, "subnet", pushed.ifconfig, net_gateway="192.0.2.254")
    # a pushed `dns` option: the foreign options are rebuilt from the merged settings, as 2.6 does
    assert env["foreign_option_1"] == "dhcp-option DOMAIN example.test"
    assert env["foreign_option_2"] == "dhcp-option DNS 10.8.0.1"
    assert env["foreign_option_3"] == "dhcp-option DOMAIN-SEARCH s.test"
    assert "foreign_option_4" not in env
    assert env["route_vpn_gateway"] == "10.8.0.1" and env["route_net_gateway"] == "192.0.2.254"
    assert (env["route_network_1"], env["route_netmask_1"]) == ("192.168.7.0", "255.255.255.0")
    assert (env["route_gateway_1"], env["route_metric_1"]) == ("192.0.2.254", "5")
    assert (env["route_network_2"], env["route_gateway_2"]) == ("10.20.0.0", "10.8.0.1")
    assert "route_metric_2" not in env
    assert env["route_ipv6_network_1"] == "fd00:20::/48"
    assert env["dns_search_domain_1"] == "s.test"
    assert (env["remote_1"], env["remote_port_1"], env["proto_1"]) == ("192.0.2.1", "1194", "udp")
    assert env["verb"] == "3" and env["daemon"] == "0"
    # and the up/down env carries them next to the device variables
    full = up_down_env(tun_params("tun0", 1500, opts, pushed), "init")
    assert full["foreign_option_2"] == "dhcp-option DNS 10.8.0.1" and full["dev"] == "tun0"
    plain = parse_pushed_options(["dhcp-option DNS 10.8.0.1", "dhcp-option DOMAIN example.test"])
    verbatim = session_env(opts, plain, "subnet", None)
    assert (verbatim["foreign_option_1"], verbatim["foreign_option_2"]) == (
        "dhcp-option DNS 10.8.0.1",
        "dhcp-option DOMAIN example.test",
    )
    prio = parse_pushed_options(["dns server 5 address 10.0.0.5", "dns server -2 address 10.0.0.1 10.0.0.2"])
    by_position = session_env(opts, prio, "subnet", None)
    assert by_position["dns_server_1_address_2"] == "10.0.0.2"
    assert by_position["dns_server_2_address_1"] == "10.0.0.5"


def test_net30_vpn_gateway_is_the_remote_end() -> None:
    opts = parse_config_text(CLIENT)
    pushed = parse_pushed_options(["ifconfig 10.8.0.6 10.8.0.5"])
    assert session_env(opts, pushed, "net30", pushed.ifconfig)["route_vpn_gateway"] == "10.8.0.5"


def test_default_gateway_from_proc_route(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    assert default_gateway(str(table)) == "10.0.2.1"
    assert default_gateway(str(tmp_path / "missing")) is None


def test_peer_env() -> None:
    assert peer_env(("::ffff:192.0.2.1", 1194), "server") == {
        "trusted_ip": "192.0.2.1",
        "trusted_port": "1194",
        "untrusted_ip": "192.0.2.1",
        "untrusted_port": "1194",
        "common_name": "server",
    }
    assert peer_env(("2001:db8::1", 443), "")["trusted_ip6"] == "2001:db8::1"
    assert peer_env(None, "") == {}


def _applied_to_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, ResolverSetup]:
    """DNS applied by rewriting a resolv.conf (nameserver 192.0.2.53 before, 10.8.0.1 after)."""
    _file_method(monkeypatch)
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\n")
    state = tmp_path / "state"
    r = ResolverSetup(state, conf)
    r.apply("tun9", parse_dns_lines(["dhcp-option DNS 10.8.0.1"]))
    return conf, state, r


def test_failed_undo_keeps_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, state, r = _applied_to_file(tmp_path, monkeypatch)
    conf.unlink()
    conf.mkdir()  # cannot be read or written as a file: the undo fails
    r.restore()
    assert (state / _state_name("tun9")).exists()
    conf.rmdir()
    conf.write_text("something else\n")
    ResolverSetup(state, conf).restore_stale()  # own pid counts as gone: a new process retries
    assert conf.read_text() == "something else\n"  # changed by someone else: left alone
    assert not (state / _state_name("tun9")).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody in a child process")
def test_restore_after_privdrop_keeps_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After `user nobody` the state (in a root-only directory) is out of reach: the restore says so
    and leaves everything for the next start as root instead of failing at exit."""
    conf, state, r = _applied_to_file(tmp_path, monkeypatch)
    state.chmod(0o700)
    tmp_path.chmod(0o755)
    pid = os.fork()
    if pid == 0:  # the child: unprivileged, as the daemon after its privilege drop
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            r.restore()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert list(state.glob("dns-*-tun9.json")) and "10.8.0.1" in conf.read_text()
    ResolverSetup(state, conf).restore_stale()  # the next start, as root, undoes it
    assert conf.read_text() == "nameserver 192.0.2.53\n"


def test_certificate_env_formats() -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from pyovpn.proto.tls import certificate_env

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.COMMON_NAME, "vpn.example"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@example.test"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = x509.CertificateBuilder(
        name, name, key.public_key(), 0x80FF, now, now + datetime.timedelta(days=1)
    ).sign(key, hashes.SHA256())
    env = certificate_env([cert])
    assert env["tls_id_0"] == "C=DE, O=Example, CN=vpn.example, emailAddress=ops@example.test"
    assert (env["X509_0_CN"], env["X509_0_C"], env["X509_0_emailAddress"]) == (
        "vpn.example",
        "DE",
        "ops@example.test",
    )
    assert env["tls_serial_0"] == str(0x80FF) and env["tls_serial_hex_0"] == "80:ff"
    assert env["tls_digest_sha256_0"] == ":".join(f"{b:02x}" for b in cert.fingerprint(hashes.SHA256()))
    assert len(env["tls_digest_0"].split(":")) == 20
