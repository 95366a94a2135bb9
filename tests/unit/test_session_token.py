"""A pushed auth-token replaces the password in the client's later key exchanges (renegotiation),
and AUTH_FAILED is flagged as such for auth-retry."""

from __future__ import annotations

import pytest

from pyovpn.proto.session import ClientAuthRequest, Session, SessionClosed

from .sessionpair import load_pki
from .test_server_session import PUSH, ServerPair

TOKEN = "SESS_ID_AT_" + "A" * 80


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return load_pki(tmp_path_factory.mktemp("pki"))


def test_renegotiation_sends_the_token(pki: dict[str, bytes]) -> None:
    p = ServerPair(pki, username="alice", password="s3cret", reneg_sec=5)

    def accept(server: Session, ev: ClientAuthRequest, now: float) -> None:
        server.accept_client(now, peer_id=3, push=[*PUSH, f"auth-token {TOKEN}"])

    p.run(12, on_auth=accept)
    passwords = [e.password for e in p.server_events if isinstance(e, ClientAuthRequest)]
    assert passwords == ["s3cret"]  # the first login carries the password
    ks = p.client.primary
    assert ks is not None and ks.key_id > 0, "no renegotiation happened"
    assert ks.local_km2 is not None and ks.local_km2.password == TOKEN
    assert ks.local_km2.username == "alice"


def test_auth_failed_is_flagged(pki: dict[str, bytes]) -> None:
    p = ServerPair(pki)
    p.run(4, on_auth=lambda server, ev, now: server.reject_client(now, "bad password"))
    closed = [e for e in p.client_events if isinstance(e, SessionClosed)]
    assert closed and closed[0].auth_failed and not closed[0].restart


def test_mid_session_token_renewal_is_taken(pki: dict[str, bytes]) -> None:
    p = ServerPair(pki, username="alice", password="s3cret")

    def accept(server: Session, ev: ClientAuthRequest, now: float) -> None:
        server.accept_client(now, peer_id=3, push=[*PUSH, f"auth-token {TOKEN}"])

    p.run(4, on_auth=accept)
    assert p.client.auth_token == TOKEN
    renewed = "SESS_ID_AT_" + "B" * 80
    p.server.send_text(f"PUSH_REPLY,auth-token {renewed}")  # what OpenVPN sends when it renews
    p.server.handle_timer(p.now)  # send_text only queues: the next timer or packet flushes it
    p.run(2)
    assert p.client.auth_token == renewed
    assert not any(isinstance(e, SessionClosed) for e in p.client_events)
    # any other late PUSH_REPLY is still ignored
    p.server.send_text("PUSH_REPLY,route 10.9.0.0 255.255.0.0,auth-token X")
    p.server.handle_timer(p.now)
    p.run(2)
    assert p.client.auth_token == renewed
