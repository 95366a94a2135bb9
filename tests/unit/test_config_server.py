"""Tests for pyovpn.config in P2MP server mode: `server`/`server-ipv6` expansion, server options,
scripts, and client-config-dir files (parse_ccd)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyovpn.config import CcdOptions, Options, parse_args, parse_ccd, parse_config_text
from pyovpn.errors import ConfigError
from tests.unit.configtext import INLINE_CREDENTIALS, KEY_BYTES, static_key_text

CRL = b"-----BEGIN X509 CRL-----\nMIIB...\n-----END X509 CRL-----\n"

# The smallest valid server: tests add lines to it. Inline blocks keep it independent of files.
BASE = INLINE_CREDENTIALS + "dh none\n"
SERVER = BASE + "topology subnet\nserver 10.8.0.0 255.255.255.0\n"

# A typical OpenVPN 2.6 server.conf (the relative files live in the `etc` fixture).
SERVER_CONF = """\
port 1194
proto udp
dev tun
ca ca.crt
cert server.crt
key server.key  # keep this secret
dh none
topology subnet
server 10.8.0.0 255.255.255.0
server-ipv6 fd00:8::/64
ifconfig-pool-persist ipp.txt
push "route 192.168.10.0 255.255.255.0"
push "dhcp-option DNS 10.8.0.1"
push "redirect-gateway def1 bypass-dhcp"
client-config-dir ccd
client-to-client
keepalive 10 60
tls-crypt ta.key
data-ciphers AES-256-GCM:AES-128-GCM
max-clients 100
persist-key
persist-tun
status /var/log/openvpn/openvpn-status.log
verb 3
explicit-exit-notify 1
crl-verify crl.pem
script-security 2
auth-user-pass-verify "/usr/local/bin/check-pw --db /etc/openvpn/users" via-file
"""


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    (d / "ccd").mkdir(parents=True)
    (d / "ca.crt").write_bytes(b"CA FROM FILE\n")
    (d / "server.crt").write_bytes(b"CERT FROM FILE\n")
    (d / "server.key").write_bytes(b"KEY FROM FILE\n")
    (d / "ta.key").write_text(static_key_text())
    (d / "crl.pem").write_bytes(CRL)
    return d


def server_error(text: str, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, **kw)  # type: ignore[arg-type]
    return info.value


def line_of(text: str, prefix: str) -> int:
    """1-based number of the first line of `text` starting with `prefix`."""
    return next(n for n, ln in enumerate(text.splitlines(), 1) if ln.startswith(prefix))


# --------------------------------------------------------------------------------------------------
# A typical server.conf: every derived field
# --------------------------------------------------------------------------------------------------


def test_typical_server_conf(etc: Path, tmp_path: Path) -> None:
    o = parse_config_text(SERVER_CONF, source="server.conf", base_dir=str(etc), cwd=str(tmp_path))
    assert o.mode == "server"
    assert o.tls_role == "server" and not o.pull
    assert o.topology == "subnet"
    assert (o.proto, o.port, o.dev, o.remotes) == ("udp", 1194, "tun", ())
    assert (o.ca, o.cert, o.key) == (b"CA FROM FILE\n", b"CERT FROM FILE\n", b"KEY FROM FILE\n")
    assert o.tls_crypt == KEY_BYTES
    assert o.dh == "none"
    assert o.crl_verify == CRL
    # server 10.8.0.0 255.255.255.0 with topology subnet
    assert o.server_network == ("10.8.0.0", "255.255.255.0")
    assert not o.server_nopool
    assert o.ifconfig == ("10.8.0.1", "255.255.255.0")
    assert o.ifconfig_pool == ("10.8.0.2", "10.8.0.254", "255.255.255.0")
    # server-ipv6 fd00:8::/64
    assert o.server_ipv6 == "fd00:8::/64"
    assert o.ifconfig_ipv6 == ("fd00:8::1/64", "fd00:8::2")
    assert o.ifconfig_ipv6_pool == "fd00:8::1000/64"
    assert o.ifconfig_pool_persist == ("ipp.txt", 600)
    # the config's pushes verbatim, then OpenVPN's helper pushes in OpenVPN's order
    assert o.push == (
        "route 192.168.10.0 255.255.255.0",
        "dhcp-option DNS 10.8.0.1",
        "redirect-gateway def1 bypass-dhcp",
        "tun-ipv6",
        "route-gateway 10.8.0.1",
        "topology subnet",
        "ping 10",
        "ping-restart 60",
    )
    # keepalive 10 60 in server mode: the server waits twice as long as its clients
    assert (o.keepalive, o.ping, o.ping_restart) == ((10, 60), 10, 120)
    assert o.client_config_dir == str(tmp_path / "etc" / "ccd")
    assert o.client_to_client and not o.ccd_exclusive and not o.duplicate_cn
    assert o.max_clients == 100
    assert o.script_security == 2
    assert o.auth_user_pass_verify == ("/usr/local/bin/check-pw --db /etc/openvpn/users", "via-file")
    assert o.verify_client_cert == "require" and not o.username_as_common_name
    assert o.explicit_exit_notify == 1
    assert o.ignored == ()  # `status` is carried out now (the status file)
    assert o.status_file is not None


def test_server_defaults() -> None:
    o = parse_config_text(SERVER)
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    for name in (
        "ccd_exclusive", "client_to_client", "duplicate_cn", "max_clients", "float_", "verify_client_cert",
        "username_as_common_name", "script_security", "auth_user_pass_verify", "tls_verify",
        "client_connect", "client_disconnect", "learn_address", "up", "down", "crl_verify",
        "ifconfig_pool_persist", "client_config_dir", "server_ipv6", "ifconfig_ipv6", "ifconfig_ipv6_pool",
    ):  # fmt: skip
        assert getattr(o, name) == defaults[name], name
    assert (o.max_clients, o.verify_client_cert, o.script_security) == (1024, "require", 1)
    assert o.push == ("route-gateway 10.8.0.1", "topology subnet")
    assert (o.ping, o.ping_restart) == (0, 0)


def test_server_on_the_command_line(etc: Path) -> None:
    argv = [
        "--topology", "subnet", "--server", "10.9.0.0", "255.255.0.0", "--ca", "ca.crt", "--cert",
        "server.crt", "--key", "server.key", "--proto", "tcp", "--push", "route 10.1.0.0 255.255.0.0",
    ]  # fmt: skip
    o = parse_args(argv, cwd=str(etc))
    assert o.mode == "server" and o.proto == "tcp-server"  # a bare "tcp" is the server side here
    assert o.ifconfig == ("10.9.0.1", "255.255.0.0")
    assert o.ifconfig_pool == ("10.9.0.2", "10.9.255.254", "255.255.0.0")
    assert o.push[0] == "route 10.1.0.0 255.255.0.0"


@pytest.mark.parametrize(
    ("server", "ifconfig", "pool"),
    [
        ("10.8.0.0 255.255.255.248", ("10.8.0.1", "255.255.255.248"), ("10.8.0.2", "10.8.0.6")),
        ("172.16.0.0 255.255.0.0", ("172.16.0.1", "255.255.0.0"), ("172.16.0.2", "172.16.255.254")),
        ("192.168.4.128 255.255.255.128", ("192.168.4.129", "255.255.255.128"),
         ("192.168.4.130", "192.168.4.254")),
    ],
)  # fmt: skip
def test_server_network_sizes(server: str, ifconfig: tuple[str, str], pool: tuple[str, str]) -> None:
    o = parse_config_text(BASE + f"topology subnet\nserver {server}\n")
    assert o.ifconfig == ifconfig
    assert o.ifconfig_pool == (*pool, ifconfig[1])


def test_server_nopool_and_own_pool() -> None:
    o = parse_config_text(BASE + "topology subnet\nserver 10.8.0.0 255.255.255.0 nopool\n")
    assert o.server_nopool and o.ifconfig_pool is None
    assert o.ifconfig == ("10.8.0.1", "255.255.255.0")
    o = parse_config_text(
        BASE + "topology subnet\nserver 10.8.0.0 255.255.255.0 nopool\nifconfig-pool 10.8.0.100 10.8.0.199\n"
    )
    assert o.ifconfig_pool == ("10.8.0.100", "10.8.0.199", None)


@pytest.mark.parametrize(
    ("net", "local", "remote", "pool"),
    [
        ("fd00:8::/64", "fd00:8::1/64", "fd00:8::2", "fd00:8::1000/64"),
        ("2001:db8:0:1::/111", "2001:db8:0:1::1/111", "2001:db8:0:1::2", "2001:db8:0:1::1000/111"),
        # too small to reach +0x1000: OpenVPN starts the pool at +2
        ("fd00:8::100/120", "fd00:8::101/120", "fd00:8::102", "fd00:8::102/120"),
    ],
)
def test_server_ipv6(net: str, local: str, remote: str, pool: str) -> None:
    o = parse_config_text(SERVER + f"server-ipv6 {net}\n")
    assert o.ifconfig_ipv6 == (local, remote)
    assert o.ifconfig_ipv6_pool == pool


def test_ipv6_only_server() -> None:
    o = parse_config_text(BASE + "topology subnet\nserver-ipv6 fd00:8::/64\nkeepalive 5 30\n")
    assert o.mode == "server" and o.tls_role == "server"
    assert o.ifconfig is None and o.ifconfig_pool is None and o.server_network is None
    assert o.ifconfig_ipv6_pool == "fd00:8::1000/64"
    assert o.push == ("tun-ipv6", "ping 5", "ping-restart 30")
    assert (o.ping, o.ping_restart) == (5, 60)


def test_manual_mode_server() -> None:
    o = parse_config_text(
        BASE
        + "mode server\ntls-server\ntopology subnet\nifconfig 10.8.0.1 255.255.255.0\n"
        + "ifconfig-pool 10.8.0.10 10.8.0.20 255.255.255.0\nifconfig-ipv6 fd00::1/64 fd00::2\n"
        + 'ifconfig-ipv6-pool fd00:0::100/64\npush "topology subnet"\nkeepalive 10 60\n'
        + "ifconfig-pool-persist /var/lib/ipp.txt 0\nduplicate-cn\nccd-exclusive\n"
        + f"client-config-dir {os.path.dirname(__file__)}\n"
    )
    assert o.mode == "server" and o.server_network is None
    assert o.ifconfig == ("10.8.0.1", "255.255.255.0")
    assert o.ifconfig_pool == ("10.8.0.10", "10.8.0.20", "255.255.255.0")
    assert o.ifconfig_ipv6_pool == "fd00::100/64"
    assert o.ifconfig_pool_persist == ("/var/lib/ipp.txt", 0)
    assert o.push == ("topology subnet", "ping 10", "ping-restart 60")  # no helper pushes without `server`
    assert o.duplicate_cn and o.ccd_exclusive


def test_server_options() -> None:
    o = parse_config_text(
        SERVER
        + "script-security 3\nauth-user-pass-verify /bin/check via-env\nverify-client-cert optional\n"
        + "username-as-common-name\ntls-verify /bin/tv arg\nclient-connect '/bin/cc x'\n"
        + "client-disconnect /bin/cd\nlearn-address /bin/la\nup /bin/up\ndown /bin/down\nfloat\n"
        + "max-clients 1048576\n"
    )
    assert o.auth_user_pass_verify == ("/bin/check", "via-env")
    assert o.verify_client_cert == "optional" and o.username_as_common_name
    assert (o.tls_verify, o.client_connect, o.client_disconnect) == ("/bin/tv arg", "/bin/cc x", "/bin/cd")
    assert (o.learn_address, o.up, o.down) == ("/bin/la", "/bin/up", "/bin/down")
    assert o.float_ and o.max_clients == 1048576


def test_verify_client_cert_none_with_password_check() -> None:
    o = parse_config_text(
        SERVER + "verify-client-cert none\nscript-security 2\nauth-user-pass-verify /bin/ck via-file\n"
    )
    assert o.verify_client_cert == "none"


def test_crl_verify_inline_and_ccd_relative_to_config(etc: Path, tmp_path: Path) -> None:
    text = SERVER + f"<crl-verify>\n{CRL.decode()}</crl-verify>\nclient-config-dir ccd\n"
    o = parse_config_text(text, base_dir=str(etc), cwd=str(tmp_path))
    assert o.crl_verify == CRL
    assert o.client_config_dir == str(etc / "ccd")


# --------------------------------------------------------------------------------------------------
# Server errors
# --------------------------------------------------------------------------------------------------


def test_server_without_topology_is_net30_as_in_openvpn() -> None:
    """OpenVPN's default topology: the server is .1 with peer .2, /30 blocks from .4, a route to .1."""
    o = parse_config_text(BASE + "server 10.8.0.0 255.255.255.0\n")
    assert o.topology == "net30"
    assert o.ifconfig == ("10.8.0.1", "10.8.0.2")
    assert o.ifconfig_pool == ("10.8.0.4", "10.8.0.251", "")
    assert o.push == ("route 10.8.0.1",)
    c2c = parse_config_text(BASE + "topology net30\nclient-to-client\nserver 10.8.0.0 255.255.255.0\n")
    assert c2c.push == ("route 10.8.0.0 255.255.255.0",)  # every client reaches the others


def test_server_with_p2p_topology_is_refused() -> None:
    text = SERVER.replace("topology subnet", "topology p2p")
    err = server_error(text, source="s.conf")
    assert "`topology p2p` is not supported" in str(err) and "topology net30" in str(err)
    assert err.line == line_of(text, "topology")


def test_push_with_a_comma() -> None:
    text = SERVER + 'push "dhcp-option DNS 10.8.0.1,dhcp-option DNS 10.8.0.2"\n'
    err = server_error(text, source="s.conf")
    assert "comma" in str(err) and "push each option separately" in str(err)
    assert err.line == line_of(text, "push")


def test_push_without_quotes() -> None:
    err = server_error(SERVER + "push route 10.1.0.0 255.255.0.0\n")
    assert "exactly 1 argument" in str(err) and "quote" in str(err)


def test_push_of_compression_is_checked_and_kept() -> None:
    assert "compress lz4-v2" in parse_config_text(SERVER + 'push "compress lz4-v2"\n').push
    err = server_error(SERVER + 'push "compress migrate"\n')
    assert "compress migrate" in str(err) and "comp-lzo no" in str(err)


def test_missing_ccd_dir(tmp_path: Path) -> None:
    text = SERVER + "client-config-dir ccd\n"
    err = server_error(text, source="s.conf", base_dir=str(tmp_path), cwd=str(tmp_path))
    assert "client-config-dir" in str(err) and "not found" in str(err) and "mkdir ccd" in str(err)
    assert err.line == line_of(text, "client-config-dir")
    (tmp_path / "ccd").write_text("")
    err = server_error(text, cwd=str(tmp_path))
    assert "not a directory" in str(err)


@pytest.mark.parametrize(
    "lines",
    [
        "client-connect /bin/cc\n",
        "script-security 1\nlearn-address /bin/la\n",
        "up /bin/up\nscript-security 0\n",
        "auth-user-pass-verify /bin/ck via-file\n",
        "tls-verify /bin/tv\n",
    ],
)
def test_script_without_script_security_2(lines: str) -> None:
    text = SERVER + lines
    err = server_error(text, source="s.conf")
    assert "needs script-security 2" in str(err) and "add `script-security 2`" in str(err)
    script = next(ln.split()[0] for ln in lines.splitlines() if not ln.startswith("script-security"))
    assert err.line == line_of(text, script)


def test_via_env_needs_script_security_3() -> None:
    err = server_error(SERVER + "script-security 2\nauth-user-pass-verify /bin/ck via-env\n")
    assert "script-security 3" in str(err) and "via-file" in str(err)


@pytest.mark.parametrize("client_line", ["client", "tls-client", "pull"])
@pytest.mark.parametrize("server_line", ["server 10.8.0.0 255.255.255.0", "mode server\ntls-server"])
def test_client_and_server(client_line: str, server_line: str) -> None:
    text = BASE + f"topology subnet\nremote vpn.example.com\n{client_line}\n{server_line}\n"
    err = server_error(text, source="s.conf")
    assert "cannot also be a client" in str(err) and f"`{client_line}`" in str(err)
    assert err.line == line_of(text, client_line)


def test_mode_server_needs_tls_server() -> None:
    err = server_error(BASE + "mode server\ntopology subnet\n")
    assert "`mode server` requires `tls-server`" in str(err)


@pytest.mark.parametrize(
    ("lines", "needles"),
    [
        ("verify-client-cert none\n", ["no other authentication method", "auth-user-pass-verify"]),
        ("verify-client-cert optional\n", ["no other authentication method"]),
        ("username-as-common-name\n", ["username-as-common-name", "auth-user-pass-verify"]),
        ("ccd-exclusive\n", ["client-config-dir"]),
        ("remote 192.0.2.1\n", ["remote", "waits for clients"]),
        ("nobind\n", ["nobind"]),
        ("proto tcp-client\n", ["tcp-server"]),
        ("redirect-gateway def1\n", ['push "redirect-gateway def1"']),
        ("keepalive 10 50000\n", ["43200"]),
        ("ifconfig 10.8.0.1 255.255.255.0\n", ["remove `ifconfig`"]),
        ("ifconfig-pool 10.8.0.10 10.8.0.20\n", ["nopool"]),
        ("server-ipv6 fd00::/64\nifconfig-ipv6 fd00::1/64 fd00::2\n", ["remove `ifconfig-ipv6`"]),
        ("server-ipv6 fd00::/64\nifconfig-ipv6-pool fd00::100/64\n", ["remove `ifconfig-ipv6-pool`"]),
        ("<auth-user-pass>\nu\np\n</auth-user-pass>\n", ["auth-user-pass-verify"]),
        ("push-reset\n", ["only valid in a client-config-dir file"]),
        ("iroute 10.1.0.0 255.255.0.0\n", ["only valid in a client-config-dir file"]),
        ("max-clients 0\n", ["max-clients"]),
        ("max-clients 1048577\n", ["max-clients"]),
        ("verify-client-cert maybe\n", ["none, optional or require"]),
        ("script-security 4\n", ["script-security"]),
        ("auth-user-pass-verify /bin/ck via-pipe\n", ["via-file"]),
        ('push ""\n', ["empty"]),
        ("ifconfig-pool 10.8.0.20 10.8.0.10\n", ["swap"]),
        ("ifconfig-pool 10.0.0.1 10.2.0.1\n", ["65536"]),
        ("crl-verify no-such-crl-dir dir\n", ["crl-verify", "no-such-crl-dir"]),
        ("<crl-verify>\nnot a crl\n</crl-verify>\n", ["not a PEM CRL"]),
    ],
)
def test_server_errors(lines: str, needles: list[str]) -> None:
    text = SERVER + lines
    err = server_error(text, source="s.conf")
    for needle in needles:
        assert needle in str(err)
    assert err.source == "s.conf" and err.line is not None and err.line > line_of(text, "server")


_BAD_SERVER = [
    ("10.8.0.0 255.0.255.0", "not a valid netmask"),
    ("10.8.0.1 255.255.255.0", "10.8.0.0/24"),
    ("10.0.0.0 255.0.0.0", "too many addresses"),
    ("10.8.0.0 255.255.255.252", "no room for clients"),
    ("10.8.0.0 255.255.255.0 pool", "nopool"),
    ("0.0.0.0 255.255.0.0", "0.0.0.0"),
    ("vpn.example.com 255.255.255.0", "IPv4"),
]
_BAD_SERVER_IPV6 = [
    ("fd00::", "/prefix"),
    ("fd00::/48", "between 64 and 124"),
    ("fd00::1/64", "fd00::/64"),
    ("x/64", "IPv6"),
]


@pytest.mark.parametrize(
    ("config", "option", "needle"),
    [(BASE + f"topology subnet\nserver {v}\n", "server", n) for v, n in _BAD_SERVER]
    + [(SERVER + f"server-ipv6 {v}\n", "server-ipv6", n) for v, n in _BAD_SERVER_IPV6],
)
def test_bad_server_and_server_ipv6_arguments(config: str, option: str, needle: str) -> None:
    err = server_error(config)
    assert needle in str(err) and option in str(err)


def test_server_ipv6_with_nopool() -> None:
    err = server_error(
        BASE + "topology subnet\nserver 10.8.0.0 255.255.255.0 nopool\nserver-ipv6 fd00::/64\n"
    )
    assert "nopool" in str(err) and "server-ipv6" in str(err)


def test_pool_persist_needs_a_pool() -> None:
    text = BASE + "mode server\ntls-server\ntopology subnet\nifconfig 10.8.0.1 255.255.255.0\n"
    text += "ifconfig-pool-persist x\n"
    assert "needs an address pool" in str(server_error(text))


def test_ipv6_pool_needs_ifconfig_ipv6() -> None:
    err = server_error(SERVER + "ifconfig-ipv6-pool fd00::1000/64\n")
    assert "ifconfig-ipv6-pool" in str(err) and "ifconfig-ipv6 ADDRESS/BITS" in str(err)


@pytest.mark.parametrize(
    "line", ["client-to-client", 'push "route 10.0.0.0 255.0.0.0"', "duplicate-cn", "ifconfig-pool-persist x"]
)
def test_server_options_outside_server_mode(line: str) -> None:
    text = BASE + "tls-server\nifconfig 10.9.0.1 10.9.0.2\n" + line + "\n"
    err = server_error(text, source="p.conf")
    assert "needs P2MP server mode" in str(err)
    assert err.line == text.count("\n")


# --------------------------------------------------------------------------------------------------
# client-config-dir files
# --------------------------------------------------------------------------------------------------

CCD = """\
# ccd/alice
ifconfig-push 10.8.0.50 255.255.255.0
ifconfig-ipv6-push fd00:8::50/64
iroute 192.168.50.0 255.255.255.0
iroute 192.168.51.7
iroute-ipv6 2001:db8:50::/48
iroute-ipv6 2001:db8:51::1
push "route 192.168.60.0 255.255.255.0"
push "dhcp-option DOMAIN alice.example"
"""


def test_ccd_good() -> None:
    c = parse_ccd(CCD, source="ccd/alice")
    assert c == CcdOptions(
        ifconfig_push=("10.8.0.50", "255.255.255.0"),
        ifconfig_ipv6_push=("fd00:8::50/64", None),
        iroutes=(("192.168.50.0", "255.255.255.0"), ("192.168.51.7", "255.255.255.255")),
        iroutes_ipv6=("2001:db8:50::/48", "2001:db8:51::1/128"),
        push=("route 192.168.60.0 255.255.255.0", "dhcp-option DOMAIN alice.example"),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.disable = True  # type: ignore[misc]


def test_ccd_empty_and_disable() -> None:
    assert parse_ccd("", source="ccd/x") == CcdOptions()
    c = parse_ccd("# revoked\ndisable\n", source="ccd/x")
    assert c.disable and c.push == ()
    assert parse_ccd("ifconfig-ipv6-push fd00::5/64 fd00::1\n", source="x").ifconfig_ipv6_push == (
        "fd00::5/64",
        "fd00::1",
    )


def test_ccd_push_reset_and_push_remove_apply_in_order() -> None:
    c = parse_ccd(
        'push "route 10.1.0.0 255.255.0.0"\npush-reset\npush "route 10.2.0.0 255.255.0.0"\n', source="x"
    )
    assert c.push_reset and c.push == ("route 10.2.0.0 255.255.0.0",)
    c = parse_ccd(
        'push "route 10.1.0.0 255.255.0.0"\npush "dhcp-option DNS 10.8.0.1"\npush-remove route\n'
        'push "route 10.3.0.0 255.255.0.0"\npush-remove ifconfig\n',
        source="x",
    )
    assert not c.push_reset
    assert c.push_remove == ("route", "ifconfig")
    assert c.push == ("dhcp-option DNS 10.8.0.1", "route 10.3.0.0 255.255.0.0")


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ("frobnicate 1", ["option 'frobnicate' is not allowed in a client-config-dir file", "iroute"]),
        ("server 10.8.0.0 255.255.255.0", ["option 'server' is not allowed in a client-config-dir file"]),
        ("config other.conf", ["'config' is not allowed"]),
        ("client-to-client", ["not allowed in a client-config-dir file"]),
        ("ifconfig-push 10.8.0.5 10.8.0.6", ["netmask", "net30"]),
        ("ifconfig-push 10.8.0.5", ["exactly 2 arguments", "ifconfig-push CLIENT_IP NETMASK"]),
        ("ifconfig-push 10.8.0.5 0.0.0.0", ["0.0.0.0"]),
        ("ifconfig-push host 255.255.255.0", ["IPv4"]),
        ("ifconfig-ipv6-push fd00::5", ["/prefix"]),
        ("iroute 192.168.50.1 255.255.255.0", ["host bits", "192.168.50.0/24"]),
        ("iroute 192.168.50.0 255.0.255.0", ["netmask"]),
        ("iroute-ipv6 2001:db8::1/48", ["host bits"]),
        ('push "a,b"', ["comma"]),
        ("push a b", ["exactly 1 argument", "quote"]),
        ("push-reset now", ["no arguments"]),
        ("push-remove", ["exactly 1 argument"]),
        ("disable 1", ["no arguments"]),
        ('push "comp-lzo maybe"', ["comp-lzo", "bad argument"]),
    ],
)
def test_ccd_bad(line: str, needles: list[str]) -> None:
    text = "# ccd/bob\ndisable\n" + line + "\n"
    with pytest.raises(ConfigError) as info:
        parse_ccd(text, source="ccd/bob")
    err = info.value
    assert str(err).startswith("ccd/bob:3: ")
    assert (err.source, err.line) == ("ccd/bob", 3)
    for needle in needles:
        assert needle in str(err)


def test_ccd_inline_block_refused() -> None:
    with pytest.raises(ConfigError, match=r"^c:1: option 'ca' is not allowed"):
        parse_ccd("<ca>\nx\n</ca>\n", source="c")
    with pytest.raises(ConfigError, match=r"^c:1: option 'push' cannot be an inline"):
        parse_ccd("<push>\nx\n</push>\n", source="c")


# --------------------------------------------------------------------------------------------------
# Robustness: nothing but ConfigError escapes
# --------------------------------------------------------------------------------------------------

_WORDS = st.sampled_from(
    [
        "ifconfig-push", "ifconfig-ipv6-push", "iroute", "iroute-ipv6", "push", "push-reset", "push-remove",
        "disable", "server", "server-ipv6", "mode", "topology", "subnet", "net30", "keepalive", "nopool",
        "ifconfig-pool", "ifconfig-ipv6-pool", "client-config-dir", "script-security", "client-connect",
        "auth-user-pass-verify", "via-env", "via-file", "verify-client-cert", "none", "max-clients",
        "crl-verify", "<crl-verify>", "</crl-verify>", "10.8.0.0", "10.8.0.1", "255.255.255.0",
        "255.255.255.255", "0.0.0.0", "fd00::/64", "fd00::1/64", "fd00::", "/", "2", "0", "-1",
        '"', "'", "\\", "#", ",", "route", "ifconfig",
    ]
)  # fmt: skip
_ANY = st.one_of(_WORDS, st.text(max_size=12))
_LINES = st.lists(st.lists(_ANY, max_size=5).map(" ".join), max_size=12).map("\n".join)
_TEXTS = st.one_of(st.text(max_size=300), st.lists(_ANY, max_size=40).map(" ".join), _LINES)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXTS)
def test_parse_ccd_raises_only_config_error(text: str) -> None:
    try:
        result = parse_ccd(text, source="ccd/fuzz")
    except ConfigError as exc:
        assert str(exc).startswith("ccd/fuzz")
    else:
        assert isinstance(result, CcdOptions)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_LINES)
def test_server_config_raises_only_config_error(tail: str) -> None:
    try:
        parse_config_text(SERVER + tail, cwd=os.path.dirname(__file__))
    except ConfigError:
        pass
