"""The stateless cookie handshake against a real client session."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyovpn.errors import ProtocolError
from pyovpn.proto.cookie import CookieJar
from pyovpn.proto.packets import Opcode, peek_opcode
from pyovpn.proto.session import Session
from pyovpn.proto.tlswrap import TlsCrypt

from .sessionpair import configs, load_pki

KEY2 = bytes(range(256))
ADDR = ("198.51.100.7", 40000)
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return load_pki(tmp_path_factory.mktemp("pki"))


def _server_wrap() -> TlsCrypt:
    return TlsCrypt(KEY2, is_server=True)


def test_client_completes_the_stateless_exchange(pki: dict[str, bytes]) -> None:
    import random

    _, client_cfg = configs(pki, tls_crypt_key=KEY2)
    client = Session(client_cfg, rng=random.Random(1).randbytes, now=NOW)
    client.handle_timer(NOW)
    (reset,) = client.packets_to_send()
    jar = CookieJar(b"k" * 32)
    reply = jar.reply_to_reset(reset, ADDR, NOW, _server_wrap())
    assert peek_opcode(reply)[0] is Opcode.CONTROL_HARD_RESET_SERVER_V2
    assert reply[9:13] == (1).to_bytes(4, "big")  # first replay id of a fresh counter
    client.receive(reply, NOW + 0.01)
    nxt = client.packets_to_send()
    assert nxt, "the client must answer (ACK or ClientHello)"
    proof = jar.check_proof(nxt[0], ADDR, NOW + 0.02, _server_wrap())
    assert proof.client_session_id == client.session_id
    assert proof.server_session_id == jar.cookie(NOW, ADDR, client.session_id)
    # the same packet from another address, or much later, proves nothing
    with pytest.raises(ProtocolError):
        jar.check_proof(nxt[0], ("198.51.100.8", 40000), NOW, _server_wrap())
    with pytest.raises(ProtocolError):
        jar.check_proof(nxt[0], ADDR, NOW + 4 * jar.slot_seconds, _server_wrap())
    with pytest.raises(ProtocolError):
        CookieJar(b"x" * 32).check_proof(nxt[0], ADDR, NOW, _server_wrap())


def test_cookie_validity_window() -> None:
    jar = CookieJar(b"k" * 32, hand_window=60)
    c = jar.cookie(NOW, ADDR, b"12345678")
    assert jar.verify(c, NOW + 2 * jar.slot_seconds, ADDR, b"12345678")
    assert not jar.verify(c, NOW + 3 * jar.slot_seconds + jar.slot_seconds, ADDR, b"12345678")
    assert not jar.verify(c, NOW, ADDR, b"12345679")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_stateless_paths_only_raise_protocol_errors(data: bytes) -> None:
    jar = CookieJar(b"k" * 32)
    for fn in (jar.reply_to_reset, jar.check_proof):
        try:
            fn(data, ADDR, NOW, _server_wrap())
        except ProtocolError:
            pass
