"""Hypothesis fuzzing of every control-plane parser: only pyovpn's ProtocolError may escape."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyovpn.errors import ProtocolError
from pyovpn.proto import keymethod as km
from pyovpn.proto.packets import ReliabilityHeader, StreamFramer, peek_opcode
from pyovpn.proto.push import parse_pushed_options, split_push_message
from pyovpn.proto.tlswrap import NoWrap, TlsAuth, TlsCrypt

from .sessionpair import Pair, configs, load_pki

KEY2 = bytes(range(256))
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_protocol_errors(fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kwargs)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_unwrap_any_bytes(data: bytes) -> None:
    for wrap in (NoWrap(), TlsAuth(KEY2, 1), TlsCrypt(KEY2, is_server=True)):
        _only_protocol_errors(wrap.unwrap, data)
    _only_protocol_errors(peek_opcode, data)


@FUZZ
@given(st.binary(max_size=120), st.booleans())
def test_reliability_header_any_bytes(data: bytes, has_mid: bool) -> None:
    _only_protocol_errors(ReliabilityHeader.decode, data, has_message_id=has_mid)


@FUZZ
@given(st.binary(max_size=400), st.booleans())
def test_key_method_2_any_bytes(data: bytes, from_client: bool) -> None:
    _only_protocol_errors(km.KeyMethod2.decode, data, from_client=from_client)
    _only_protocol_errors(km.KeyMethod2.decode, b"\x00\x00\x00\x00\x02" + data, from_client=from_client)


@FUZZ
@given(st.text(max_size=300))
def test_push_reply_any_text(text: str) -> None:
    def parse(msg: str) -> None:
        opts, _ = split_push_message(msg)
        parse_pushed_options(opts)

    _only_protocol_errors(parse, "PUSH_REPLY," + text)
    _only_protocol_errors(parse, text)


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                "ifconfig",
                "route",
                "route-ipv6",
                "peer-id",
                "ping",
                "topology",
                "cipher",
                "ifconfig-ipv6",
                "tun-mtu",
                "protocol-flags",
                "1.2.3.4",
                "x",
                "-1",
                "99999999",
                "fd00::1/64",
                "255.255.255.0",
            ]
        ),
        max_size=6,
    )
)
def test_push_options_any_words(words: list[str]) -> None:
    _only_protocol_errors(parse_pushed_options, [" ".join(words)])


@FUZZ
@given(st.lists(st.binary(max_size=50), max_size=10))
def test_stream_framer_any_chunks(chunks: list[bytes]) -> None:
    f = StreamFramer()
    for c in chunks:
        try:
            f.feed(c)
        except ProtocolError:
            return


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return load_pki(Path(tmp_path_factory.mktemp("pki")))


@pytest.mark.parametrize("wrapped", [False, True])
def test_session_survives_garbage_at_every_stage(pki: dict[str, bytes], wrapped: bool) -> None:
    """Mutated copies of real packets, fed at each point of a handshake, never raise out of receive().

    With tls-crypt the garbage is rejected before it reaches TLS, so the real handshake still
    completes; without a wrap, a forged packet can poison TLS (as in OpenVPN), so only the
    absence of exceptions is checked there.
    """
    import random

    rnd = random.Random(7)
    p = Pair(*configs(pki, **({"tls_crypt_key": KEY2} if wrapped else {})))
    seen: list[bytes] = []
    for _ in range(60):
        for src, dst in ((p.client, p.server), (p.server, p.client)):
            for pkt in src.packets_to_send():
                seen.append(pkt)
                for _ in range(5):
                    m = bytearray(pkt)
                    for _ in range(rnd.randint(1, 4)):
                        m[rnd.randrange(len(m))] = rnd.randrange(256)
                    dst.receive(bytes(m[: rnd.randint(0, len(m))]), p.now)
                dst.receive(pkt, p.now)
        p.server_events += p.server.events()
        p.client_events += p.client.events()
        p.now += 0.1
        p.server.handle_timer(p.now)
        p.client.handle_timer(p.now)
    from pyovpn.proto.session import TunnelUp

    assert len(seen) >= 5  # both resets, the ClientHello and at least one ACK
    if wrapped:
        assert any(isinstance(e, TunnelUp) for e in p.client_events), "garbage must not stop a real handshake"
