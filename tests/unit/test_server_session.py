"""P2MP server sessions in memory: stateless cookie start, client auth, NCP per client, push."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from pyovpn.datachannel.api import Cipher, NewKey
from pyovpn.proto.cookie import CookieJar
from pyovpn.proto.session import ClientAuthRequest, Session, SessionClosed, TunnelUp
from pyovpn.proto.tlswrap import TlsCrypt

from .sessionpair import configs, load_pki

KEY2 = bytes(range(256))
ADDR = ("198.51.100.7", 40000)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return load_pki(tmp_path_factory.mktemp("pki"))


class ServerPair:
    """A pull client and a P2MP server session created only after the cookie round trip."""

    def __init__(
        self,
        pki: dict[str, bytes],
        *,
        client_ciphers: tuple[str, ...] | None = None,
        server_ciphers: tuple[str, ...] = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"),
        **client_settings: object,
    ) -> None:
        s_cfg, c_cfg = configs(pki, tls_crypt_key=KEY2)
        self.s_cfg = replace(s_cfg, mode_server=True, data_ciphers=server_ciphers)
        self.c_cfg = replace(c_cfg, pull=True, data_ciphers=client_ciphers or c_cfg.data_ciphers)
        self.c_cfg = replace(self.c_cfg, **client_settings)  # type: ignore[arg-type]
        self.now = 1_700_000_000.0
        rnd = random.Random(3)
        self.rng = rnd.randbytes
        self.client = Session(self.c_cfg, rng=self.rng, now=self.now)
        self.client.handle_timer(self.now)
        jar = CookieJar(b"c" * 32)
        (reset,) = self.client.packets_to_send()
        self.client.receive(
            jar.reply_to_reset(reset, ADDR, self.now, TlsCrypt(KEY2, is_server=True)), self.now
        )
        proof_pkt = self.client.packets_to_send()
        proof = jar.check_proof(proof_pkt[0], ADDR, self.now, TlsCrypt(KEY2, is_server=True))
        self.server = Session.after_cookie(self.s_cfg, proof, rng=self.rng, now=self.now)
        for pkt in proof_pkt:
            self.server.receive(pkt, self.now)
        self.server_events: list[object] = []
        self.client_events: list[object] = []

    def run(self, seconds: float, on_auth=None) -> None:  # type: ignore[no-untyped-def]
        end = self.now + seconds
        while self.now < end:
            moved = True
            while moved:
                moved = False
                for src, dst in ((self.client, self.server), (self.server, self.client)):
                    for pkt in src.packets_to_send():
                        moved = True
                        dst.receive(pkt, self.now)
                for ev in self.server.events():
                    self.server_events.append(ev)
                    if isinstance(ev, ClientAuthRequest) and on_auth is not None:
                        on_auth(self.server, ev, self.now)
                self.client_events += self.client.events()
            self.now += 0.05
            for s in (self.server, self.client):
                t = s.next_timer()
                if t is not None and t <= self.now:
                    s.handle_timer(self.now)


PUSH = [
    "topology subnet",
    "route-gateway 10.8.0.1",
    "ifconfig 10.8.0.2 255.255.255.0",
    "ping 10",
    "ping-restart 60",
    "route 192.168.77.0 255.255.255.0",
]


def accept(peer_id: int, push: list[str] = PUSH):  # type: ignore[no-untyped-def]
    def cb(server: Session, ev: ClientAuthRequest, now: float) -> None:
        assert ev.common_name == "client"
        server.accept_client(now, peer_id=peer_id, push=push)

    return cb


def test_client_pulls_its_config_from_a_cookie_started_server(pki: dict[str, bytes]) -> None:
    p = ServerPair(pki)
    p.run(4, on_auth=accept(7))
    auth = [e for e in p.server_events if isinstance(e, ClientAuthRequest)]
    assert len(auth) == 1 and auth[0].peer_info.get("IV_CIPHERS")
    c_up = next(e for e in p.client_events if isinstance(e, TunnelUp))
    s_up = next(e for e in p.server_events if isinstance(e, TunnelUp))
    assert c_up.peer_id == s_up.peer_id == 7
    assert c_up.pushed is not None and c_up.pushed.ifconfig == ("10.8.0.2", "255.255.255.0")
    assert c_up.pushed.routes == [("192.168.77.0", "255.255.255.0", None, None)]
    assert (c_up.keepalive_interval, c_up.keepalive_timeout) == (10, 60)
    assert c_up.key_derivation == s_up.key_derivation == "tls-ekm" and c_up.cc_exit
    (ck,) = [e for e in p.client_events if isinstance(e, NewKey)]
    (sk,) = [e for e in p.server_events if isinstance(e, NewKey)]
    assert ck.encrypt == sk.decrypt and ck.decrypt == sk.encrypt


@pytest.mark.parametrize(
    ("client_ciphers", "expect"),
    [
        (("CHACHA20-POLY1305",), Cipher.CHACHA20_POLY1305),
        (("AES-128-GCM", "CHACHA20-POLY1305"), Cipher.AES_128_GCM),
    ],
)
def test_each_client_gets_its_own_cipher(
    pki: dict[str, bytes], client_ciphers: tuple[str, ...], expect: Cipher
) -> None:
    p = ServerPair(pki, client_ciphers=client_ciphers)
    p.run(4, on_auth=accept(1))
    c_up = next(e for e in p.client_events if isinstance(e, TunnelUp))
    assert c_up.cipher is expect


def test_rejected_client_gets_auth_failed(pki: dict[str, bytes]) -> None:
    p = ServerPair(pki)
    p.run(4, on_auth=lambda server, ev, now: server.reject_client(now, "bad password"))
    closed = [e for e in p.client_events if isinstance(e, SessionClosed)]
    assert closed and not closed[0].restart and "AUTH_FAILED" in closed[0].reason
    assert not any(isinstance(e, TunnelUp) for e in p.client_events + p.server_events)


def test_no_shared_cipher_is_refused(pki: dict[str, bytes]) -> None:
    p = ServerPair(pki, client_ciphers=("CHACHA20-POLY1305",), server_ciphers=("AES-256-GCM",))
    p.run(4, on_auth=accept(1))
    closed = [e for e in p.client_events if isinstance(e, SessionClosed)]
    assert closed and "no shared cipher" in closed[0].reason


def test_long_push_is_split_with_continuations(pki: dict[str, bytes]) -> None:
    routes = [f"route 10.{i}.0.0 255.255.0.0" for i in range(120)]
    p = ServerPair(pki)
    p.run(5, on_auth=accept(3, PUSH + routes))
    c_up = next(e for e in p.client_events if isinstance(e, TunnelUp))
    assert c_up.pushed is not None and len(c_up.pushed.routes) == 121
