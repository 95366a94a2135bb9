"""Tests for pyovpn.config: tokenizing, applying and validating OpenVPN configuration."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyovpn.config import (
    AEAD_CIPHERS,
    Options,
    Remote,
    Route,
    RouteV6,
    load_static_key,
    parse_args,
    parse_config_text,
    tokenize,
)
from pyovpn.errors import ConfigError
from tests.unit.configtext import INLINE_CREDENTIALS, KEY_BYTES, static_key_text

# A minimal valid P2P TLS client; tests append or prepend lines to it.
CLIENT = "tls-client\nremote vpn.example.com 1194\n" + INLINE_CREDENTIALS


def words(line: str) -> list[str]:
    """The words OpenVPN's tokenizer produces for one line."""
    (d,) = tokenize(line)
    return [d.name, *d.args]


def config_error(text: str, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, **kw)  # type: ignore[arg-type]
    return info.value


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("remote  vpn.example.com\t1194", ["remote", "vpn.example.com", "1194"]),
        ('verify-x509-name "CN=my server" subject', ["verify-x509-name", "CN=my server", "subject"]),
        ("setenv x 'a \\ b \"c\"'", ["setenv", "x", 'a \\ b "c"']),
        (r'setenv x "a \"q\" b\\c"', ["setenv", "x", 'a "q" b\\c']),
        (r"setenv x a\ b", ["setenv", "x", "a b"]),
        (r"setenv x C:\\dir\\f", ["setenv", "x", "C:\\dir\\f"]),
        (r"setenv x \"quoted", ["setenv", "x", '"quoted']),
        ('setenv x ""', ["setenv", "x", ""]),
        ('setenv x "ab"cd', ["setenv", "x", "ab", "cd"]),
        ('setenv x ab"cd', ["setenv", "x", 'ab"cd']),
        ("verb 3 # trailing comment", ["verb", "3"]),
        ("verb 3 ;trailing comment", ["verb", "3"]),
        ("setenv x a#b", ["setenv", "x", "a#b"]),
        ("--verb 3", ["verb", "3"]),
        ("  verb 3\r", ["verb", "3"]),
    ],
)
def test_tokenizer_words(line: str, expected: list[str]) -> None:
    assert words(line) == expected


def test_tokenizer_comments_blank_lines_bom_and_line_numbers() -> None:
    text = "\ufeff# comment\n; other comment\n   # indented comment\n\nverb 3\r\n\n  mute 10\n"
    ds = tokenize(text, source="a.conf")
    assert [(d.source, d.line, d.name, d.args) for d in ds] == [
        ("a.conf", 5, "verb", ("3",)),
        ("a.conf", 7, "mute", ("10",)),
    ]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('setenv x "open', "closing double quote"),
        ("setenv x 'open", "closing single quote"),
        (r"setenv x ab\q", "backslash"),
        ("setenv x ab\\", "backslash"),
    ],
)
def test_tokenizer_errors_carry_line(line: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        tokenize(f"verb 1\n{line}\n", source="t.conf")
    assert info.value.source == "t.conf"
    assert info.value.line == 2
    assert needle in str(info.value)
    assert str(info.value).startswith("t.conf:2: ")


def test_inline_block_body_is_verbatim() -> None:
    ds = tokenize("verb 1\n<ca>\n  line one\nline two\r\n  </ca>\nverb 2\n", source="i.conf")
    assert [(d.line, d.name, d.inline) for d in ds] == [
        (1, "verb", False),
        (2, "ca", True),
        (6, "verb", False),
    ]
    assert ds[1].args == ("  line one\nline two\r\n",)


def test_unterminated_inline_block() -> None:
    err = config_error("verb 1\n<ca>\nstuff\n", source="u.conf")
    assert (err.source, err.line) == ("u.conf", 2)
    assert "</ca>" in str(err)


def test_mismatched_inline_block() -> None:
    err = config_error("<ca>\nstuff\n</cert>\n", source="m.conf")
    assert (err.source, err.line) == ("m.conf", 3)
    assert "<ca>" in str(err) and "</cert>" in str(err) and "</ca>" in str(err)


@pytest.mark.parametrize(
    ("text", "line", "named"),
    [
        pytest.param("<ca>\nstuff\n<cert>\nx\n</cert>\n", 3, "<ca>", id="forgotten-close-before-next-block"),
        pytest.param("verb 1\n</ca>\n", 2, "</ca>", id="stray-closing-tag"),
        pytest.param("<verb>\n3\n</verb>\n", 1, "verb", id="inline-block-for-an-option-that-takes-none"),
    ],
)
def test_misplaced_tag_names_its_line_and_tag(text: str, line: int, named: str) -> None:
    err = config_error(text, source="m.conf")
    assert err.line == line
    assert named in str(err)


def test_nul_byte_is_rejected() -> None:
    err = config_error("verb 1\nve\0rb 2\n", source="n.conf")
    assert err.line == 2


# --------------------------------------------------------------------------------------------------
# Includes and file arguments
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    (d / "keys").mkdir(parents=True)
    (d / "keys" / "ca.crt").write_bytes(b"CA FROM FILE\n")
    (d / "keys" / "c.crt").write_bytes(b"CERT FROM FILE\n")
    (d / "keys" / "c.key").write_bytes(b"KEY FROM FILE\n")
    (d / "keys" / "ta.key").write_text(static_key_text())
    (d / "keys" / "up.txt").write_text("alice\nse cret\n")
    return d


def test_include_with_relative_paths(confdir: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (confdir / "inc").mkdir()
    (confdir / "inc" / "tls.conf").write_text(
        "ca ../keys/ca.crt\ncert ../keys/c.crt\nkey ../keys/c.key\nverb 5\n"
    )
    main = confdir / "main.conf"
    main.write_text("tls-client\nremote 192.0.2.1\nverb 2\nconfig inc/tls.conf\nmute-replay-warnings\n")
    o = parse_args(["--config", str(main)], cwd=str(other))
    assert o.ca == b"CA FROM FILE\n"
    assert o.cert == b"CERT FROM FILE\n"
    assert o.key == b"KEY FROM FILE\n"
    assert o.verb == 5  # the include takes effect at its position, after `verb 2`
    assert o.mute_replay_warnings
    assert o.config_sources == (str(main), str(confdir / "inc" / "tls.conf"))


def test_relative_file_prefers_cwd_over_config_dir(confdir: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    (cwd / "keys").mkdir(parents=True)
    (cwd / "keys" / "ca.crt").write_bytes(b"CA FROM CWD\n")
    main = confdir / "main.conf"
    main.write_text("tls-client\nremote 192.0.2.1\nca keys/ca.crt\ncert keys/c.crt\nkey keys/c.key\n")
    o = parse_args([str(main)], cwd=str(cwd))
    assert o.ca == b"CA FROM CWD\n"
    assert o.cert == b"CERT FROM FILE\n"


def test_parse_config_text_uses_base_dir(confdir: Path, tmp_path: Path) -> None:
    text = (
        "tls-client\nremote 192.0.2.1\nca keys/ca.crt\ncert keys/c.crt\nkey keys/c.key\n"
        "tls-auth keys/ta.key 1\n"
    )
    o = parse_config_text(text, source="x.conf", base_dir=str(confdir), cwd=str(tmp_path))
    assert o.ca == b"CA FROM FILE\n"
    assert o.tls_auth == KEY_BYTES
    assert o.key_direction == 1


def test_missing_file_names_option_path_and_line(tmp_path: Path) -> None:
    err = config_error(
        CLIENT + "tls-crypt nothere.key\n", source="c.conf", base_dir=str(tmp_path), cwd=str(tmp_path)
    )
    assert (err.source, err.line) == ("c.conf", CLIENT.count("\n") + 1)
    assert "tls-crypt" in str(err) and "nothere.key" in str(err)


def test_unreadable_file_is_config_error(tmp_path: Path) -> None:
    err = config_error(f"ca {tmp_path}\n", source="c.conf")
    assert "ca" in str(err) and str(tmp_path) in str(err)


def test_include_depth_limit(tmp_path: Path) -> None:
    loop = tmp_path / "loop.conf"
    loop.write_text(f"config {loop}\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(loop)])
    assert "include" in str(info.value)
    assert info.value.source == str(loop)


def test_missing_included_config(tmp_path: Path) -> None:
    err = config_error("verb 1\nconfig missing.conf\n", source="c.conf", cwd=str(tmp_path))
    assert (err.line, "missing.conf" in str(err), "config" in str(err)) == (2, True, True)


def test_auth_user_pass_file(confdir: Path) -> None:
    text = "client\nremote 192.0.2.1\nca keys/ca.crt\nauth-user-pass keys/up.txt\n"
    o = parse_config_text(text, base_dir=str(confdir))
    assert o.auth_user_pass == ("alice", "se cret")
    assert o.cert is None and o.pull and o.tls_role == "client"


# --------------------------------------------------------------------------------------------------
# A realistic client profile
# --------------------------------------------------------------------------------------------------

REALISTIC = f"""\
##############################################
# Sample client-side OpenVPN 2.6 config file #
##############################################
client
dev tun
proto udp
remote vpn1.example.com 1194
remote vpn2.example.com 443 tcp
resolv-retry infinite
nobind
persist-key
persist-tun
remote-cert-tls server
verify-x509-name vpn.example.com name
data-ciphers AES-256-GCM:chacha20-poly1305
cipher AES-256-GCM
auth SHA256
verb 3
mute 20
explicit-exit-notify
setenv opt block-outside-dns
ignore-unknown-option some-future-option
some-future-option 1 2
key-direction 1
<ca>
-----BEGIN CERTIFICATE-----
MIIB...
-----END CERTIFICATE-----
</ca>
<cert>
-----BEGIN CERTIFICATE-----
MIIC...
-----END CERTIFICATE-----
</cert>
<key>
-----BEGIN PRIVATE KEY-----
MIIE...
-----END PRIVATE KEY-----
</key>
<tls-crypt>
{static_key_text()}</tls-crypt>
"""


def test_realistic_client_profile() -> None:
    o = parse_config_text(REALISTIC, source="client.ovpn")
    assert o.mode == "p2p"
    assert o.tls_role == "client" and o.pull
    assert o.dev == "tun" and o.dev_type == "tun" and o.proto == "udp"
    assert o.remotes == (
        Remote("vpn1.example.com", 1194, None),
        Remote("vpn2.example.com", 443, "tcp-client"),
    )
    assert o.nobind and o.persist_key and o.persist_tun
    assert o.remote_cert_tls == "server"
    assert o.verify_x509_name == ("vpn.example.com", "name")
    assert o.data_ciphers == ("AES-256-GCM", "CHACHA20-POLY1305")
    assert o.cipher == "AES-256-GCM"
    assert o.auth == "SHA256"
    assert o.verb == 3
    assert o.explicit_exit_notify == 1
    assert o.key_direction == 1
    assert o.ca is not None and o.ca.startswith(b"-----BEGIN CERTIFICATE-----\nMIIB")
    assert o.cert is not None and b"MIIC" in o.cert
    assert o.key is not None and b"MIIE" in o.key
    assert o.tls_crypt == KEY_BYTES
    assert o.tls_auth is None
    assert o.config_sources == ("client.ovpn",)
    ignored = {name: line for name, _source, line in o.ignored}
    assert set(ignored) == {"block-outside-dns", "some-future-option"}
    assert o.mute == 20  # carried out by the log handler, no longer ignored
    assert o.resolv_retry is None  # `resolv-retry infinite` is carried out now, not ignored
    assert all(src == "client.ovpn" for _name, src, _line in o.ignored)


def test_options_is_frozen_and_repr_hides_secrets() -> None:
    o = parse_config_text(REALISTIC)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.verb = 4  # type: ignore[misc]
    assert "MIIE" not in repr(o)
    assert "tls_crypt" not in repr(o)


def test_defaults_match_openvpn() -> None:
    o = parse_config_text(CLIENT)
    defaults = {f.name: f.default for f in dataclasses.fields(Options) if f.name not in ("ca", "cert", "key")}
    defaults.update(tls_role="client", remotes=(Remote("vpn.example.com", 1194),))
    for name, value in defaults.items():
        if name in ("config_sources",):
            continue
        assert getattr(o, name) == value, name
    assert o.port == 1194 and o.reneg_sec == 3600 and o.hand_window == 60 and o.replay_window == (64, 15)
    assert o.data_ciphers == AEAD_CIPHERS


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def client_conf(tmp_path: Path) -> Path:
    f = tmp_path / "client.conf"
    f.write_text(CLIENT + "verb 2\n")
    return f


def test_command_line_order(client_conf: Path) -> None:
    assert parse_args(["--config", str(client_conf), "--verb", "4"]).verb == 4
    assert parse_args(["--verb", "4", "--config", str(client_conf)]).verb == 2


def test_positional_config(client_conf: Path) -> None:
    o = parse_args([str(client_conf)])
    assert o.verb == 2
    assert o.config_sources == (str(client_conf),)


def test_relative_config_on_command_line_uses_cwd(client_conf: Path) -> None:
    o = parse_args(["--config", "client.conf", "--port", "1195"], cwd=str(client_conf.parent))
    assert o.port == 1195
    assert o.remote_port_for(o.remotes[0]) == 1194


def test_command_line_only(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "c.pem").write_bytes(b"C")
    (tmp_path / "k.pem").write_bytes(b"K")
    argv = (
        "--tls-server --ca ca.pem --cert c.pem --key k.pem --dev tun7 "
        "--ifconfig 10.9.0.1 10.9.0.2 --lport 5000"
    )
    o = parse_args(argv.split(), cwd=str(tmp_path))
    assert o.tls_role == "server" and not o.pull
    assert o.dev == "tun7"
    assert o.ifconfig == ("10.9.0.1", "10.9.0.2")
    assert o.local_port == 5000
    assert o.config_sources == ()


def test_unknown_command_line_option(client_conf: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(client_conf), "--frobnicate", "1"])
    assert info.value.source == "command line"
    assert "unknown option 'frobnicate'" in str(info.value)


def test_command_line_word_without_dashes(client_conf: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args([str(client_conf), "--verb", "3"])
    assert "--option" in str(info.value) and str(client_conf) in str(info.value)


def test_empty_command_line() -> None:
    with pytest.raises(ConfigError, match="no configuration"):
        parse_args([])


# --------------------------------------------------------------------------------------------------
# Option semantics
# --------------------------------------------------------------------------------------------------


def test_unknown_option_in_file() -> None:
    err = config_error(CLIENT + "frobnicate yes\n", source="my.conf")
    assert (err.source, err.line) == ("my.conf", CLIENT.count("\n") + 1)
    assert "unknown option 'frobnicate'" in str(err)
    assert "ignore-unknown-option" in str(err)


def test_setenv_opt_with_known_option_applies_it() -> None:
    assert parse_config_text(CLIENT + "setenv opt verb 5\n").verb == 5


def test_setenv_plain_goes_to_the_scripts() -> None:
    o = parse_config_text(CLIENT + "setenv FOO bar\n")
    assert o.ignored == ()
    assert o.setenv == (("FOO", "bar"),)


def test_ignore_unknown_option_accepts_dashes_and_only_later_lines() -> None:
    o = parse_config_text(CLIENT + "ignore-unknown-option --foo bar\nfoo 1\nbar\n")
    assert [n for n, _s, _l in o.ignored] == ["foo", "bar"]
    err = config_error(CLIENT + "foo 1\nignore-unknown-option foo\n")
    assert "unknown option 'foo'" in str(err)


def test_ports() -> None:
    o = parse_config_text(CLIENT + "remote other.example.com\nlport 4000\nport 5000\nrport 6000\n")
    assert (o.port, o.lport, o.rport) == (5000, None, 6000)
    assert o.local_port == 5000
    assert o.remote_port_for(o.remotes[0]) == 1194
    assert o.remote_port_for(o.remotes[1]) == 6000


@pytest.mark.parametrize(
    ("proto", "expected", "family"),
    [
        ("udp", "udp", None),
        ("udp6", "udp", 6),
        ("tcp", "tcp-client", None),
        ("tcp4", "tcp-client", 4),
        ("tcp4-client", "tcp-client", 4),
        ("tcp6-server", "tcp-server", 6),
    ],
)
def test_proto(proto: str, expected: str, family: int | None) -> None:
    o = parse_config_text(CLIENT + f"proto {proto}\n")
    assert (o.proto, o.family) == (expected, family)


def test_routes_and_addresses() -> None:
    o = parse_config_text(
        CLIENT
        + "topology subnet\nifconfig 10.8.0.2 255.255.255.0\nifconfig-ipv6 fd00::2/64 fd00::1\n"
        + "route 192.168.1.0 255.255.255.0\nroute 10.0.0.0 255.0.0.0 vpn_gateway 5\nroute 172.16.0.1\n"
        + "route-ipv6 2001:db8::/32\nroute-ipv6 2001:db8:1::1 fd00::1 7\n"
    )
    assert o.topology == "subnet"
    assert o.ifconfig == ("10.8.0.2", "255.255.255.0")
    assert o.ifconfig_ipv6 == ("fd00::2/64", "fd00::1")
    assert o.routes == (
        Route("192.168.1.0", "255.255.255.0"),
        Route("10.0.0.0", "255.0.0.0", "vpn_gateway", 5),
        Route("172.16.0.1"),
    )
    assert o.routes_ipv6 == (RouteV6("2001:db8::/32"), RouteV6("2001:db8:1::1/128", "fd00::1", 7))


def test_misc_values() -> None:
    o = parse_config_text(
        CLIENT
        + "keepalive 10 60\nmssfix\ntun-mtu 1400\nreplay-window 128\nauth sha512\ndisable-dco\n"
        + "tls-version-min 1.2 or-highest\ntls-cert-profile preferred\nuser nobody\ngroup nogroup\n"
        + "tls-groups X25519:prime256v1:\n"
        + "log /tmp/x.log\nwritepid /run/x.pid\nreneg-sec 0\ndh none\ndata-ciphers-fallback aes-128-gcm\n"
        + "data-ciphers ?AES-256-CBC:AES-128-GCM\nkey-method 2\nfloat\n"
    )
    assert (o.keepalive, o.ping, o.ping_restart) == ((10, 60), 10, 60)
    assert o.mssfix == 1492
    assert o.tun_mtu == 1400
    assert o.replay_window == (128, 15)
    assert o.auth == "SHA512"
    assert o.dco == "userspace"
    assert o.tls_version_min == "1.2" and o.tls_cert_profile == "preferred"
    assert o.tls_groups == "X25519:prime256v1"
    assert (o.user, o.group, o.log, o.writepid) == ("nobody", "nogroup", "/tmp/x.log", "/run/x.pid")
    assert o.reneg_sec == 0 and o.dh == "none"
    assert o.data_ciphers_fallback == "AES-128-GCM"
    assert o.data_ciphers == ("AES-128-GCM",)
    assert o.float_
    assert [n for n, _s, _l in o.ignored] == ["key-method"]


def test_later_options_override_earlier() -> None:
    o = parse_config_text(CLIENT + "verb 4\nmssfix 0\nverb 6\ndco kernel\n")
    assert (o.verb, o.mssfix, o.dco) == (6, 0, "kernel")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("verb", "verb"),
        ("verb 1 2", "verb"),
        ("verb three", "verb"),
        ("port 0", "port"),
        ("port 65536", "port"),
        ("remote host 70000", "remote"),
        ("remote host 1194 sctp", "remote"),
        ("proto icmp", "proto"),
        ("ifconfig 10.0.0.300 10.0.0.2", "ifconfig"),
        ("ifconfig-ipv6 fd00::2 fd00::1", "ifconfig-ipv6"),
        ("ifconfig-ipv6 fd00::2/48 fd00::1", "ifconfig-ipv6"),
        ("route example.com", "route"),
        ("route 10.0.0.0 255.0.0.x", "route"),
        ("route-ipv6 nothex::/64", "route-ipv6"),
        ("topology star", "topology"),
        ("keepalive 10 15", "keepalive"),
        ("mssfix 100", "mssfix"),
        ("key-direction 2", "key-direction"),
        ("auth MD5", "auth"),
        ("remote-cert-tls peer", "remote-cert-tls"),
        ("verify-x509-name x dn", "verify-x509-name"),
        ("tls-version-min 2.0", "tls-version-min"),
        ("tls-groups :", "tls-groups"),
        ("dco maybe", "dco"),
        ("mode bridge", "mode"),
        ("replay-window 70000", "replay-window"),
        ("key-method 1", "key-method"),
        ("config", "config"),
    ],
)
def test_bad_arguments_name_the_option(line: str, needle: str) -> None:
    n = CLIENT.count("\n") + 1
    err = config_error(CLIENT + line + "\n", source="bad.conf")
    assert (err.source, err.line) == ("bad.conf", n)
    assert needle in str(err)


# --------------------------------------------------------------------------------------------------
# Refusals: what an offloaded AEAD-only L3 data channel cannot do
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ("compress migrate", ["compress migrate", "comp-lzo no"]),
        ("comp-lzo maybe", ["comp-lzo", "bad argument", "adaptive"]),
        ("compress snappy", ["compress", "bad argument", "lz4-v2"]),
        ("allow-compression sometimes", ["allow-compression", "asym"]),
        ("fragment 1300 bytes", ["fragment", "mtu"]),
        ("dev-type tap", ["dev-type tap", "dev tun"]),
        ("cipher none", ["none", "AEAD"]),
        ("cipher AES-256-CFB", ["AES-256-CFB", "AEAD"]),
        ("cipher AES-192-GCM", ["AES-192-GCM", "AEAD"]),
        ("data-ciphers AES-256-CFB:AES-128-CBC", ["AES-256-CFB", "data-ciphers"]),
        ("data-ciphers-fallback none", ["none", "data-ciphers-fallback"]),
        ("secret static.key", ["secret", "tls-crypt"]),
        ("http-proxy proxy.example.com 8080", ["http-proxy"]),
        ("socks-proxy 127.0.0.1 1080", ["socks-proxy"]),
        ("shaper 99", ["shaper", "between 100 and 100000000"]),
        ("shaper fast", ["shaper", "not an integer"]),
        ("ncp-disable", ["ncp-disable", "data-ciphers"]),
        ("crl-verify crl.pem later", ["crl-verify", "unknown flag", "DIR dir"]),
    ],
)
def test_refusals_say_why_and_where(line: str, needles: list[str]) -> None:
    n = CLIENT.count("\n") + 1
    err = config_error(CLIENT + line + "\n", source="r.conf")
    assert (err.source, err.line) == ("r.conf", n)
    assert str(err).startswith(f"r.conf:{n}: ")
    for needle in needles:
        assert needle in str(err)


def test_shaper_is_carried_out_for_one_peer() -> None:
    """`shaper N` (OpenVPN's bounds, 100..100000000 bytes/s) sends the connection to the engine;
    a P2MP server or the in-process plane refuses it at the line that asks."""
    assert parse_config_text(CLIENT + "shaper 100000\n").shaper == 100000
    assert parse_config_text(CLIENT).shaper == 0
    server = "mode server\ntls-server\ndev tun\ntopology subnet\nifconfig 10.8.0.1 255.255.255.0\n"
    err = config_error(server + INLINE_CREDENTIALS + "shaper 100000\n", source="s.conf")
    assert "P2MP server" in str(err) and err.line == server.count("\n") + INLINE_CREDENTIALS.count("\n") + 1
    err = config_error(CLIENT + "userspace-engine inprocess\nshaper 100000\n", source="c.conf")
    assert "userspace-engine inprocess" in str(err) and "shaper" in str(err)


def test_refusal_of_inline_secret() -> None:
    err = config_error(CLIENT + f"<secret>\n{static_key_text()}</secret>\n", source="r.conf")
    assert "secret" in str(err) and err.line == CLIENT.count("\n") + 1


def test_allow_compression_no_is_fine() -> None:
    assert parse_config_text(CLIENT + "allow-compression no\n").ignored == ()


@pytest.mark.parametrize("dev", ["tap", "tap0"])
def test_dev_tap_refused_at_its_line(dev: str) -> None:
    err = config_error(f"dev {dev}\n" + CLIENT, source="d.conf")
    assert err.line == 1
    assert f"dev {dev}" in str(err) and "tun" in str(err)


def test_dev_named_tap_but_typed_tun_is_fine() -> None:
    o = parse_config_text("dev tap9\ndev-type tun\n" + CLIENT)
    assert (o.dev, o.dev_type) == ("tap9", "tun")


@pytest.mark.parametrize("lines", ["dev null\n", "dev nothing\ndev-type null\n"])
def test_dev_null_is_a_null_device(lines: str) -> None:
    """OpenVPN's null device (the loopback samples): accepted, run on the userspace data plane."""
    o = parse_config_text(lines + CLIENT)
    assert o.dev_type == "null"
    assert not o.ignored


# --------------------------------------------------------------------------------------------------
# validate(): cross-option checks
# --------------------------------------------------------------------------------------------------


def test_no_tls_role() -> None:
    err = config_error(CLIENT.replace("tls-client\n", ""), source="n.conf")
    assert "pyovpn supports TLS modes only" in str(err)
    assert "`client`" in str(err) and "`tls-server`" in str(err)
    assert err.source == "n.conf"


@pytest.mark.parametrize("line", ["mode server", "server 10.8.0.0 255.255.255.0"])
def test_server_mode_in_a_client_config(line: str) -> None:
    # Server mode itself is covered in test_config_server.py; a client role cannot be added to it.
    err = config_error(CLIENT + "topology subnet\n" + line + "\n", source="s.conf")
    assert "cannot also be a client" in str(err) and "tls-client" in str(err)
    assert err.line == 1  # the `tls-client` line


def test_tls_auth_and_tls_crypt_together() -> None:
    key = static_key_text()
    err = config_error(CLIENT + f"<tls-auth>\n{key}</tls-auth>\n<tls-crypt>\n{key}</tls-crypt>\n")
    assert "tls-auth" in str(err) and "tls-crypt" in str(err)


def test_client_needs_remote() -> None:
    err = config_error(CLIENT.replace("remote vpn.example.com 1194\n", ""))
    assert "remote" in str(err)


def test_tls_server_needs_no_remote_but_cert_and_key() -> None:
    o = parse_config_text(CLIENT.replace("tls-client\nremote vpn.example.com 1194\n", "tls-server\n"))
    assert o.tls_role == "server" and o.remotes == ()
    err = config_error(CLIENT.replace("tls-client", "tls-server").replace("<key>\nKEY\n</key>\n", ""))
    assert "key" in str(err)


def test_both_roles() -> None:
    err = config_error(CLIENT + "tls-server\n")
    assert "tls-server" in str(err) and "only one" in str(err)


def test_pull_requires_client_role() -> None:
    err = config_error(CLIENT.replace("tls-client", "tls-server") + "pull\n")
    assert "pull" in str(err)


def test_missing_ca() -> None:
    err = config_error(CLIENT.replace("<ca>", "<extra-certs>").replace("</ca>", "</extra-certs>"))
    assert "`ca`" in str(err)


def test_tls_client_without_pull_needs_cert() -> None:
    err = config_error(CLIENT.replace("<cert>\nCERT\n</cert>\n", ""))
    assert "cert" in str(err)


def test_pull_client_with_only_password() -> None:
    text = CLIENT.replace("tls-client", "client").replace("<cert>\nCERT\n</cert>\n<key>\nKEY\n</key>\n", "")
    assert "authenticate" in str(config_error(text))
    o = parse_config_text(text + "<auth-user-pass>\nbob\npw\n</auth-user-pass>\n")
    assert o.auth_user_pass == ("bob", "pw") and o.cert is None


def test_pull_client_with_cert_but_no_key() -> None:
    text = CLIENT.replace("tls-client", "client").replace("<key>\nKEY\n</key>\n", "")
    assert "both" in str(config_error(text))


def test_bare_auth_user_pass_asks_for_both() -> None:
    o = parse_config_text(CLIENT.replace("tls-client", "client") + "auth-user-pass\n")
    assert o.auth_user_pass == (None, None)


def test_auth_user_pass_username_only_refused() -> None:
    err = config_error(
        CLIENT.replace("tls-client", "client") + "auth-user-pass username-only\n", source="a.conf"
    )
    assert "username-only is not supported" in str(err)
    assert err.line == CLIENT.count("\n") + 1


def test_auth_user_pass_requires_pull() -> None:
    err = config_error(CLIENT + "<auth-user-pass>\nbob\npw\n</auth-user-pass>\n")
    assert "auth-user-pass requires `pull`" in str(err)


def test_auth_user_pass_username_alone_asks_for_the_password() -> None:
    o = parse_config_text(
        CLIENT.replace("tls-client", "client") + "<auth-user-pass>\nbob\n</auth-user-pass>\n"
    )
    assert o.auth_user_pass == ("bob", None)


def test_auth_user_pass_empty_username_refused() -> None:
    err = config_error(CLIENT.replace("tls-client", "client") + "<auth-user-pass>\n\npw\n</auth-user-pass>\n")
    assert "username (first line) is empty" in str(err)


def test_keepalive_conflicts_with_ping() -> None:
    err = config_error(CLIENT + "ping 5\nkeepalive 10 60\n")
    assert "keepalive" in str(err) and "ping" in str(err)


def test_ping_alone() -> None:
    o = parse_config_text(CLIENT + "ping 5\nping-restart 30\n")
    assert (o.ping, o.ping_restart, o.keepalive) == (5, 30, None)


# --------------------------------------------------------------------------------------------------
# Static keys
# --------------------------------------------------------------------------------------------------


def test_load_static_key_good() -> None:
    assert load_static_key(static_key_text(), source="ta.key") == KEY_BYTES
    assert load_static_key(static_key_text(per_line=7).replace("\n", "\r\n"), source="ta.key") == KEY_BYTES
    upper = static_key_text().replace("-----\n", "-----\n", 1)
    assert (
        load_static_key(
            upper.upper().replace("STATIC KEY", "Static key").replace("OPENVPN", "OpenVPN"), source="k"
        )
        == KEY_BYTES
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "BEGIN"),
        ("-----BEGIN CERTIFICATE-----\nabcd\n-----END CERTIFICATE-----\n", "BEGIN OpenVPN Static key"),
        (static_key_text(KEY_BYTES[:128]), "256 bytes"),
        (static_key_text(KEY_BYTES + b"\0"), "256 bytes"),
        (static_key_text().replace("00010203", "0001020g"), "invalid character"),
        (static_key_text().replace("-----END OpenVPN Static key V1-----\n", ""), "END"),
        (static_key_text().replace("-----END OpenVPN Static key V1-----", "-----END KEY-----"), "END"),
        (static_key_text().replace("000102", "00010", 1), "hex digits"),
    ],
)
def test_load_static_key_bad(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_static_key(text, source="ta.key")
    assert info.value.source == "ta.key"
    assert needle in str(info.value)
    assert "genkey" in str(info.value) or "right file" in str(info.value)


def test_bad_inline_tls_auth_points_at_block() -> None:
    err = config_error(CLIENT + "<tls-auth>\nnot a key\n</tls-auth>\n", source="t.conf")
    assert (err.source, err.line) == ("t.conf", CLIENT.count("\n") + 1)
    assert "tls-auth" in str(err)


# --------------------------------------------------------------------------------------------------
# Robustness: nothing but ConfigError escapes
# --------------------------------------------------------------------------------------------------

_OPTION_WORDS = st.sampled_from(
    [
        "client", "tls-client", "tls-server", "remote", "port", "proto", "dev", "ifconfig", "route",
        "route-ipv6", "verb", "keepalive", "mssfix", "cipher", "data-ciphers", "auth", "<ca>", "</ca>",
        "<tls-crypt>", "</tls-crypt>", "<tls-auth>", "comp-lzo", "setenv", "opt", "ignore-unknown-option",
        "auth-user-pass", "replay-window", "tls-version-min", "explicit-exit-notify", "topology", "1194",
        "10.8.0.1", "fd00::1/64", '"', "'", "\\", "#", "-----BEGIN OpenVPN Static key V1-----", "0", "1",
    ]
)  # fmt: skip
_ANY_WORD = st.one_of(_OPTION_WORDS, st.text(max_size=12))
_LINES = st.lists(st.lists(_ANY_WORD, max_size=5).map(" ".join), max_size=15).map("\n".join)
_TEXTS = st.one_of(
    st.text(max_size=300),
    st.lists(_ANY_WORD, max_size=40).map(" ".join),
    _LINES,
    _LINES.map(lambda tail: CLIENT + tail),  # gets past the role checks into validate()
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXTS)
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        parse_config_text(text, cwd=os.path.dirname(__file__))
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_OPTION_WORDS.map(lambda w: "--" + w), _ANY_WORD), max_size=20))
def test_arbitrary_argv_raises_only_config_error(argv: list[str]) -> None:
    try:
        parse_args(argv, cwd=os.path.dirname(__file__))
    except ConfigError:
        pass
