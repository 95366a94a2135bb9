"""Two in-memory Session peers wired back to back, with a fake clock and seeded randomness."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from pyovpn.proto.session import Session, SessionConfig
from pyovpn.proto.tls import PeerCheck, build_context
from pyovpn.tools.pki import make_pki


def load_pki(tmp: Path) -> dict[str, bytes]:
    pki = make_pki(tmp)
    return {
        "ca": pki.ca_crt.read_bytes(),
        "server_crt": pki.server_crt.read_bytes(),
        "server_key": pki.server_key.read_bytes(),
        "client_crt": pki.client_crt.read_bytes(),
        "client_key": pki.client_key.read_bytes(),
    }


def configs(pki: dict[str, bytes], **common: object) -> tuple[SessionConfig, SessionConfig]:
    server_ctx = build_context(ca=pki["ca"], cert=pki["server_crt"], key=pki["server_key"], is_server=True)
    client_ctx = build_context(ca=pki["ca"], cert=pki["client_crt"], key=pki["client_key"], is_server=False)
    server = SessionConfig(
        is_tls_server=True, pull=False, tls_context=server_ctx, peer_check=PeerCheck(remote_cert_tls="client")
    )
    client = SessionConfig(
        is_tls_server=False,
        pull=False,
        tls_context=client_ctx,
        peer_check=PeerCheck(remote_cert_tls="server"),
    )
    server_over = {k[7:]: v for k, v in common.items() if k.startswith("server_")}
    client_over = {k[7:]: v for k, v in common.items() if k.startswith("client_")}
    both = {k: v for k, v in common.items() if not k.startswith(("server_", "client_"))}
    return replace(server, **both, **server_over), replace(client, **both, **client_over)


class Pair:
    def __init__(
        self, server_cfg: SessionConfig, client_cfg: SessionConfig, *, seed: int = 1, loss: float = 0.0
    ) -> None:
        self.now = 1_700_000_000.0
        rnd = random.Random(seed)
        self.rnd = rnd
        self.loss = loss
        self.server = Session(server_cfg, rng=rnd.randbytes, now=self.now)
        self.client = Session(client_cfg, rng=rnd.randbytes, now=self.now)
        self.server_events: list[object] = []
        self.client_events: list[object] = []
        self.wire_count = 0
        self.client.handle_timer(self.now)

    def step(self) -> bool:
        moved = False
        for src, dst in ((self.client, self.server), (self.server, self.client)):
            for pkt in src.packets_to_send():
                moved = True
                self.wire_count += 1
                if self.loss and self.rnd.random() < self.loss:
                    continue
                dst.receive(pkt, self.now)
        self.server_events += self.server.events()
        self.client_events += self.client.events()
        return moved

    def run(self, seconds: float, tick: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            while self.step():
                pass
            self.now += tick
            for s in (self.server, self.client):
                t = s.next_timer()
                if t is not None and t <= self.now:
                    s.handle_timer(self.now)
