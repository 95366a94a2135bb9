"""`management-client-auth`: a program on the management socket decides who connects (stock clients).

The way OAuth2/Duo/Azure AD helpers work with OpenVPN: the server announces each client with
`>CLIENT:CONNECT,CID,KID` and its environment; the helper answers `client-auth` (with config
lines), `client-deny`, or `client-pending-auth` and decides later.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import INIT_LINE, Star, ping, wait_for_lines, wait_listening
from tests.netns.mgmt import Mgmt
from tests.netns.test_server import SERVER4, client_conf, server_conf

pytestmark = pytest.mark.netns


@pytest.fixture
def star(tmp_path: Path) -> Iterator[Star]:
    with Star(tmp_path, 3, base=220) as s:
        yield s


class Decider(threading.Thread):
    """Accepts alice (pushing a route), denies bob, makes carol wait 2 s, then accepts her."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.m = Mgmt(path)
        self.m.sock.settimeout(60)
        self.seen: dict[str, str] = {}
        self.replies: list[str] = []

    def run(self) -> None:
        m = self.m
        try:
            while True:
                text = m.line()
                if text.startswith(">CLIENT:CONNECT,"):
                    cid, kid = text.split(",")[1:3]
                    env = {}
                    while (line := m.line()) != ">CLIENT:ENV,END":
                        k, _, v = line.removeprefix(">CLIENT:ENV,").partition("=")
                        env[k] = v
                    cn = env.get("common_name", "")
                    self.seen[cn] = cid
                    if cn == "alice":
                        m.sock.sendall(
                            f'client-auth {cid} {kid}\npush "route 10.67.0.0 255.255.255.0"\nEND\n'.encode()
                        )
                    elif cn == "bob":
                        m.sock.sendall(f'client-deny {cid} {kid} "not today" "ask the admin"\n'.encode())
                    else:
                        m.sock.sendall(
                            f"client-pending-auth {cid} {kid} WEB_AUTH::https://auth.invalid 30\n".encode()
                        )
                        time.sleep(2)
                        m.sock.sendall(f"client-auth-nt {cid} {kid}\n".encode())
                elif text.startswith(("SUCCESS:", "ERROR:")):
                    self.replies.append(text)
        except (OSError, EOFError):
            return


def test_external_program_accepts_denies_and_defers(star: Star, pki: Pki) -> None:
    sock = str(star.workdir / "mgmt.sock")
    conf = server_conf(
        pki, star.workdir, client_to_client=False, extra=f"management {sock} unix\nmanagement-client-auth"
    )
    server = star.spawn(star.server, [sys.executable, "-m", "pyovpn", "--config", str(conf)], "server-pyovpn")
    wait_listening(star.server, "udp", 1194, proc=server)
    decider = Decider(sock)
    assert decider.m.line().startswith(">INFO:")
    decider.start()
    clients = {}
    for i, cn in enumerate(("alice", "bob", "carol")):
        cconf = client_conf(pki, star.workdir, cn, star.server_addr(i), "AES-256-GCM")
        clients[cn] = star.spawn(star.peers[i], ["openvpn", "--config", str(cconf)], f"client-{cn}")
    wait_for_lines([clients["alice"], clients["carol"]], INIT_LINE, 60)
    clients["bob"].wait_for_line("AUTH_FAILED", 30)
    assert "ask the admin" in clients["bob"].text()
    assert INIT_LINE not in clients["bob"].text()
    assert "route 10.67.0.0 255.255.255.0" in clients["alice"].text()  # client-auth's config line
    assert ping(star.peers[0], SERVER4).ok and ping(star.peers[2], SERVER4).ok
    assert set(decider.seen) == {"alice", "bob", "carol"}
    assert "SUCCESS: client-auth command succeeded" in decider.replies
    assert "SUCCESS: client-deny command succeeded" in decider.replies
    assert "SUCCESS: client-pending-auth command succeeded" in decider.replies
    server_log = server.text()
    assert "client denied by the management interface: not today" in server_log
    decider.m.close()
