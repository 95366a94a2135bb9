"""The installers' default server configs (tests/netns/installer_servers/) run unchanged by pyovpn,
each with a stock OpenVPN 2.6 client using that installer's client template.

Also: a CRL replaced while the server runs (under `user nobody`) refuses the revoked client at once
and still admits valid ones, and ifconfig-pool-persist is written after the privilege drop.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki, write_crl
from tests.netns.harness import INIT_LINE, Proc, Star, ping, wait_for_lines, wait_listening
from tests.netns.installers import TEMPLATES, issue, lay_out

pytestmark = pytest.mark.netns

SERVER_VPN_IP = "10.8.0.1"


@pytest.fixture
def star() -> Iterator[Star]:
    # like the installers' /etc/openvpn/server (chmod o+x): `user nobody` must reach crl.pem
    workdir = Path(tempfile.mkdtemp(prefix="pyovpn-installers-"))
    workdir.chmod(0o711)
    try:
        with Star(workdir, 3, base=246) as s:
            yield s
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _client(pki: Pki, workdir: Path, installer: str, cn: str, server_ip: str) -> Path:
    crt, key = workdir / f"{cn}.crt", workdir / f"{cn}.key"
    if not crt.exists():
        issue(pki, workdir, cn)
    control = {
        "nyr": f"tls-crypt {pki.tc_key}",
        "angristan": f"tls-crypt {pki.tc_key}",
        "pivpn": f"tls-auth {pki.ta_key}",
    }[installer]
    text = (TEMPLATES / f"{installer}-client.conf").read_text().replace("SERVER_IP", server_ip)
    # the installers inline these; files are the same to OpenVPN. disable-dco: the host may lack ovpn.
    text += f"ca {pki.ca_crt}\ncert {crt}\nkey {key}\n{control}\ndisable-dco\n"
    conf = workdir / f"{installer}-{cn}.conf"
    conf.write_text(text)
    return conf


def _start_server(star: Star, conf: Path) -> Proc:
    server = star.spawn(star.server, [sys.executable, "-m", "pyovpn", "--config", str(conf)], "server-pyovpn")
    wait_listening(star.server, "udp", 1194, proc=server, timeout=30)
    return server


def _connect(star: Star, pki: Pki, installer: str, cn: str, i: int) -> Proc:
    conf = _client(pki, star.workdir, installer, cn, star.server_addr(i))
    return star.spawn(star.peers[i], ["openvpn", "--config", str(conf)], f"client-{cn}")


@pytest.mark.parametrize("installer", ["nyr", "angristan", "pivpn"])
def test_installer_default_server_with_its_stock_client(star: Star, pki: Pki, installer: str) -> None:
    conf = lay_out(pki, star.workdir, installer, star.server_addr(0))
    server = _start_server(star, conf)
    client = _connect(star, pki, installer, f"{installer}-user", 0)
    wait_for_lines([client], INIT_LINE, 60)
    assert ping(star.peers[0], SERVER_VPN_IP).ok, client.tail() + server.tail()
    assert server.running(), server.tail()


def test_crl_replaced_while_running_refuses_the_revoked_client(star: Star, pki: Pki) -> None:
    # angristan's config: no `local`, so clients reach it on each of the star's links
    conf = lay_out(pki, star.workdir, "angristan", star.server_addr(0))
    server = _start_server(star, conf)
    alice = _connect(star, pki, "angristan", "alice", 0)
    wait_for_lines([alice], INIT_LINE, 60)

    # what `easyrsa revoke bob && easyrsa gen-crl && cp crl.pem ...` does, with no server restart
    bob_crt = issue(pki, star.workdir, "bob")
    mark = server.mark()
    write_crl(pki, star.workdir / "crl.pem", revoked=[bob_crt])
    bob = _connect(star, pki, "angristan", "bob", 1)
    server.wait_for_line("is revoked", 60, since=mark)
    carol = _connect(star, pki, "angristan", "carol", 2)
    wait_for_lines([carol], INIT_LINE, 60)
    assert ping(star.peers[2], SERVER_VPN_IP).ok
    assert INIT_LINE not in bob.text(), bob.tail()
    assert ping(star.peers[0], SERVER_VPN_IP).ok  # alice, admitted before the change, is unaffected


def test_pool_persist_written_under_user_nobody_and_kept_across_restart(star: Star, pki: Pki) -> None:
    # angristan's config: no `local`, so clients reach it on each of the star's links
    conf = lay_out(pki, star.workdir, "angristan", star.server_addr(0))
    ipp = star.workdir / "ipp.txt"
    server = _start_server(star, conf)
    erin = _connect(star, pki, "angristan", "erin", 0)
    wait_for_lines([erin], INIT_LINE, 60)
    frank = _connect(star, pki, "angristan", "frank", 1)
    wait_for_lines([frank], INIT_LINE, 60)
    deadline = time.monotonic() + 20
    while ipp.read_text().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = sorted(ipp.read_text().splitlines())
    assert [line.split(",")[0] for line in lines] == ["erin", "frank"], ipp.read_text()
    assert all(line.split(",")[1].startswith("10.8.0.") for line in lines)
    assert os.stat(ipp).st_uid == 0  # opened by root before the drop, as OpenVPN does
    remembered = {line.split(",")[0]: line.split(",")[1] for line in lines}

    for p in (erin, frank, server):
        p.stop()
    server = _start_server(star, conf)
    # frank alone first: he must get his remembered address, not the lowest free one
    frank = _connect(star, pki, "angristan", "frank", 1)
    wait_for_lines([frank], INIT_LINE, 60)
    assert f"ifconfig {remembered['frank']} " in frank.text(), frank.tail()
