"""The installers' default server configs (tests/netns/installer_servers/) as pyovpn reads them,
and the clear answers for the options those installers can add that pyovpn does not carry out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyovpn.config import parse_args, parse_config_text
from pyovpn.errors import ConfigError
from pyovpn.tools.pki import Pki, make_pki, write_crl

TEMPLATES = Path(__file__).parents[1] / "netns" / "installer_servers"


@pytest.fixture(scope="module")
def etc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("etc")
    pki: Pki = make_pki(d)
    shutil.copy(pki.tc_key, d / "tls-crypt.key")
    shutil.copy(TEMPLATES / "ffdhe2048.pem", d / "dh.pem")
    write_crl(pki, d / "crl.pem")
    (d / "ccd").mkdir()
    return d


def _load(etc: Path, installer: str) -> list[str]:
    conf = etc / f"{installer}.conf"
    conf.write_text((TEMPLATES / f"{installer}-server.conf").read_text().replace("SERVER_IP", "127.0.0.1"))
    return ["--config", str(conf)]


def test_nyr_default_server(etc: Path) -> None:
    o = parse_args(_load(etc, "nyr"), cwd=str(etc))
    assert o.user == "nobody" and o.group == "nogroup"
    assert o.ifconfig_pool_persist == ("ipp.txt", 600)
    assert o.crl_verify_source == (str(etc / "crl.pem"), False)
    assert o.auth == "SHA512"
    assert o.push[:4] == (
        "redirect-gateway def1 bypass-dhcp",
        "dhcp-option DNS 1.1.1.1",
        "dhcp-option DNS 1.0.0.1",
        "block-outside-dns",
    )
    assert o.ignored == ()


def test_angristan_default_server(etc: Path) -> None:
    o = parse_args(_load(etc, "angristan"), cwd=str(etc))
    assert o.data_ciphers == ("AES-128-GCM",)
    assert "block-ipv6" in o.push and "redirect-gateway def1 bypass-dhcp" in o.push
    # logged at start as having no effect: pyovpn's TLS uses OpenSSL's defaults for these
    assert o.ignored == ()  # tls-cipher and tls-ciphersuites are applied to the TLS context


def test_pivpn_default_server(etc: Path) -> None:
    o = parse_args(_load(etc, "pivpn"), cwd=str(etc))
    assert o.client_to_client
    assert "redirect-gateway def1" in o.push and "block-outside-dns" in o.push
    assert {name for name, _, _ in o.ignored} == {"ecdh-curve"}


def test_docker_openvpn_net30_default_server(etc: Path) -> None:
    # `server` without `topology subnet` is OpenVPN's net30: .1 with peer .2, clients' /30s from .4
    # (run live by tests/netns/test_net30_server.py)
    o = parse_args(_load(etc, "docker-openvpn"), cwd=str(etc))
    assert o.topology == "net30"
    assert o.ifconfig == ("192.168.255.1", "192.168.255.2")
    assert o.ifconfig_pool == ("192.168.255.4", "192.168.255.251", "")
    assert o.push[3:] == ("route 192.168.255.1", "ping 10", "ping-restart 60")  # the helpers' pushes
    assert o.compression == ("comp-lzo", "no")


SERVER = "dev tun\nca ca.crt\ncert server.crt\nkey server.key\ndh none\n"
SERVER += "topology subnet\nserver 10.8.0.0 255.255.255.0\n"


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        (
            "plugin /usr/lib/openvpn/plugins/openvpn-plugin-auth-pam.so openvpn",
            ["plugin", "auth-user-pass-verify"],
        ),
        ("port-share 127.0.0.1 443", ["port-share", "its own port"]),
        ("client-cert-not-required", ["removed", "verify-client-cert none"]),
    ],
)
def test_installer_extras_refused_with_what_to_do(etc: Path, line: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config_text(SERVER + line + "\n", cwd=str(etc))
    for needle in needles:
        assert needle in str(err.value)


def test_tun_mtu_extra_is_accepted_and_reported_as_without_effect(etc: Path) -> None:
    o = parse_config_text(SERVER + "tun-mtu-extra 32\n", cwd=str(etc))
    assert [name for name, _, _ in o.ignored] == ["tun-mtu-extra"]
