"""`cipher AES-256-CBC` and CBC names in data-ciphers: accepted as OpenVPN 2.6 reads them (the
fallback for peers that do not negotiate); peers that negotiate still get AEAD, and a peer that
would really need CBC is refused with a clear reason."""

from __future__ import annotations

import pytest

from pyovpn.config import parse_config_text
from pyovpn.datachannel.api import Cipher, NewKey
from pyovpn.proto.session import SessionClosed
from tests.unit.configtext import INLINE_CREDENTIALS

from .sessionpair import Pair, configs, load_pki

CLIENT = "tls-client\nremote vpn.example.com 1194\n" + INLINE_CREDENTIALS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return load_pki(tmp_path_factory.mktemp("pki"))


def test_cbc_cipher_options_are_accepted() -> None:
    opts = parse_config_text(CLIENT + "cipher AES-256-CBC\n")
    assert opts.cipher == "AES-256-CBC" and "AES-256-CBC" not in opts.data_ciphers
    opts = parse_config_text(
        CLIENT + "data-ciphers AES-256-GCM:AES-256-CBC:BF-CBC\ndata-ciphers-fallback bf-cbc\n"
    )
    assert opts.data_ciphers == ("AES-256-GCM",)
    assert opts.unoffered_ciphers == ("AES-256-CBC", "BF-CBC")
    assert opts.data_ciphers_fallback == "BF-CBC"


def test_a_negotiating_peer_still_gets_aead(pki: dict[str, bytes]) -> None:
    p = Pair(*configs(pki, data_ciphers_fallback="AES-256-CBC"))
    p.run(3)
    keys = [e for e in p.server_events + p.client_events if isinstance(e, NewKey)]
    assert len(keys) == 2 and all(k.cipher is Cipher.AES_256_GCM for k in keys)


def _closed(p: Pair) -> list[SessionClosed]:
    return [e for e in p.server_events + p.client_events if isinstance(e, SessionClosed)]


def test_no_common_aead_cipher_with_a_cbc_fallback_is_refused_clearly(pki: dict[str, bytes]) -> None:
    p = Pair(
        *configs(
            pki,
            data_ciphers_fallback="AES-256-CBC",
            server_data_ciphers=("AES-256-GCM",),
            client_data_ciphers=("CHACHA20-POLY1305",),
        )
    )
    p.run(3)
    closed = _closed(p)
    assert closed and not closed[0].restart
    assert "AES-256-CBC" in closed[0].reason and "CBC with HMAC is not implemented" in closed[0].reason
    assert not any(isinstance(e, NewKey) for e in p.server_events + p.client_events)


def test_a_peer_without_negotiation_needing_cbc_is_refused_clearly(pki: dict[str, bytes]) -> None:
    # a pulling client announces no P2P negotiation: the P2P server falls back to `cipher`
    p = Pair(*configs(pki, server_data_ciphers_fallback="AES-256-CBC", client_pull=True))
    p.run(3)
    reasons = [c.reason for c in _closed(p)]
    assert any("without cipher negotiation" in r and "AES-256-CBC" in r for r in reasons), reasons
