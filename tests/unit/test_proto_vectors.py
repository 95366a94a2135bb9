"""Known-answer and layout tests for the protocol codecs: PRF, wraps, key-method-2, reliability."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pyovpn.errors import AuthenticationError, ProtocolError, ReplayError
from pyovpn.proto import keymethod as km
from pyovpn.proto.keys import prf_key2, split_key2, tls1_prf
from pyovpn.proto.packets import Opcode, ReliabilityHeader, StreamFramer, frame, pack_byte0, peek_opcode
from pyovpn.proto.reliable import AckTracker, ReliableReceiver, ReliableSender
from pyovpn.proto.tlswrap import LongReplayWindow, NoWrap, TlsAuth, TlsCrypt

KEY2 = bytes(range(256))
SID = bytes.fromhex("0102030405060708")
PEER_SID = bytes.fromhex("a1a2a3a4a5a6a7a8")


def test_tls1_prf_matches_openssl_kdf() -> None:
    # Reference computed with: openssl kdf -keylen 48 -kdfopt digest:MD5-SHA1 -kdfopt hexsecret:00..2f
    #   -kdfopt hexseed:<"OpenVPN master secret" || bytes 64..127> TLS1-PRF
    expect = bytes.fromhex(
        "0520ED5BEF47CD2C1A5BC0E84254A42563FD7FD5CAF5CCAC49BE59E7A71461AE9C6876DF8467A4FA34CBE95FDC22977F"
    )
    assert tls1_prf(bytes(range(48)), b"OpenVPN master secret" + bytes(range(64, 128)), 48) == expect


def test_prf_key2_uses_both_randoms_and_session_ids() -> None:
    base = dict(
        pre_master=b"\x01" * 48,
        client_random1=b"\x02" * 32,
        server_random1=b"\x03" * 32,
        client_random2=b"\x04" * 32,
        server_random2=b"\x05" * 32,
        client_session_id=SID,
        server_session_id=PEER_SID,
    )
    k = prf_key2(**base)
    assert len(k) == 256
    for field in base:
        changed = dict(base, **{field: bytes(len(base[field]))})
        assert prf_key2(**changed) != k, field


def test_split_key2_directions() -> None:
    from pyovpn.datachannel.api import Cipher as DC

    enc_c, dec_c = split_key2(KEY2, DC.AES_128_GCM, tls_client=True)
    enc_s, dec_s = split_key2(KEY2, DC.AES_128_GCM, tls_client=False)
    assert enc_c.cipher_key == KEY2[0:16] and enc_c.nonce_tail == KEY2[64:72]
    assert dec_c.cipher_key == KEY2[128:144] and dec_c.nonce_tail == KEY2[192:200]
    assert enc_c == dec_s and dec_c == enc_s
    enc, _ = split_key2(KEY2, DC.CHACHA20_POLY1305, tls_client=True)
    assert len(enc.cipher_key) == 32


def test_byte0_and_reliability_header_layout() -> None:
    assert pack_byte0(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0) == 0x38
    assert pack_byte0(Opcode.DATA_V2, 3) == 0x4B
    rh = ReliabilityHeader((1, 2), PEER_SID, 7, b"xyz")
    raw = rh.encode()
    assert (
        raw
        == b"\x02"
        + (1).to_bytes(4, "big")
        + (2).to_bytes(4, "big")
        + PEER_SID
        + (7).to_bytes(4, "big")
        + b"xyz"
    )
    assert ReliabilityHeader.decode(raw, has_message_id=True) == rh
    ack_only = ReliabilityHeader((9,), PEER_SID, None)
    assert ReliabilityHeader.decode(ack_only.encode(), has_message_id=False) == ack_only
    assert ReliabilityHeader((), None, 0).encode() == b"\x00\x00\x00\x00\x00"


def test_unknown_opcode_and_truncation_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        peek_opcode(b"\xf8")
    with pytest.raises(ProtocolError):
        NoWrap().unwrap(b"\x38\x01\x02")
    with pytest.raises(ProtocolError):
        NoWrap().unwrap(b"\x38" + SID + b"\x09")  # claims 9 acks


def test_tls_auth_layout_and_hmac() -> None:
    sender = TlsAuth(KEY2, 0, "SHA1")
    receiver = TlsAuth(KEY2, 1, "SHA1")
    rh = ReliabilityHeader((), None, 0)
    pkt = sender.wrap(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, SID, rh, 1000)
    # byte0 || sid || hmac[20] || pid || time || RH
    assert pkt[0] == 0x38 and pkt[1:9] == SID
    pid_time = pkt[29:37]
    assert pid_time == (1).to_bytes(4, "big") + (1000).to_bytes(4, "big")
    # direction 0 sends with keys[0].hmac = file bytes 64..83
    expect = hmac.new(KEY2[64:84], pid_time + pkt[:9] + rh.encode(), hashlib.sha1).digest()
    assert pkt[9:29] == expect
    got = receiver.unwrap(pkt)
    assert got.session_id == SID and got.rh == rh
    with pytest.raises(ReplayError):
        receiver.unwrap(pkt)
    # a retransmission gets a fresh replay id and a fresh HMAC
    pkt2 = sender.wrap(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, SID, rh, 1001)
    assert pkt2[29:33] == (2).to_bytes(4, "big") and pkt2[9:29] != pkt[9:29]
    receiver.unwrap(pkt2)
    tampered = bytearray(sender.wrap(Opcode.CONTROL_V1, 0, SID, ReliabilityHeader((), None, 1, b"hi"), 1000))
    tampered[-1] ^= 1
    with pytest.raises(AuthenticationError):
        receiver.unwrap(bytes(tampered))
    # same direction on both sides does not verify (wrong key-direction)
    with pytest.raises(AuthenticationError):
        TlsAuth(KEY2, 0).unwrap(TlsAuth(KEY2, 0).wrap(Opcode.CONTROL_V1, 0, SID, rh, 1))


def test_tls_crypt_layout_matches_spec() -> None:
    client = TlsCrypt(KEY2, is_server=False)
    server = TlsCrypt(KEY2, is_server=True)
    rh = ReliabilityHeader((), None, 0)
    pkt = client.wrap(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, SID, rh, 5000)
    hdr = pkt[:17]
    assert hdr == bytes([0x38]) + SID + (1).to_bytes(4, "big") + (5000).to_bytes(4, "big")
    # client sends with keys[1]: AES key = bytes 128..159, HMAC key = bytes 192..223
    tag = hmac.new(KEY2[192:224], hdr + rh.encode(), hashlib.sha256).digest()
    assert pkt[17:49] == tag
    enc = Cipher(algorithms.AES(KEY2[128:160]), modes.CTR(tag[:16])).encryptor()
    assert pkt[49:] == enc.update(rh.encode()) + enc.finalize()
    assert server.unwrap(pkt).rh == rh
    reply = server.wrap(
        Opcode.CONTROL_HARD_RESET_SERVER_V2, 0, PEER_SID, ReliabilityHeader((0,), SID, 0), 5000
    )
    assert client.unwrap(reply).rh.acks == (0,)
    with pytest.raises(AuthenticationError):
        TlsCrypt(KEY2, is_server=True).unwrap(reply)  # server key cannot open server traffic


def test_long_replay_window_edges() -> None:
    w = LongReplayWindow(64)
    for pid in (1, 2, 5, 3):
        w.check(pid, 10)
        w.update(pid, 10)
    with pytest.raises(ReplayError):
        w.check(3, 10)
    with pytest.raises(ReplayError):
        w.check(0, 10)
    w.check(4, 10)
    w.update(100, 10)
    with pytest.raises(ReplayError):
        w.check(36, 10)  # 100 - 64
    w.check(37, 10)
    with pytest.raises(ReplayError):
        w.check(500, 9)  # time backwards
    w.check(1, 11)  # a newer time always passes


def test_key_method_2_encoding() -> None:
    assert km.encode_string("") == b"\x00\x00"
    assert km.encode_string("ab") == b"\x00\x03ab\x00"
    msg = km.KeyMethod2(b"r" * 32, b"s" * 32, "V4,dev-type tun", b"p" * 48, "user", "", "IV_PROTO=2\n")
    raw = msg.encode()
    assert raw[:5] == b"\x00\x00\x00\x00\x02" and raw[5:53] == b"p" * 48
    assert km.KeyMethod2.decode(raw, from_client=True) == msg
    srv = km.KeyMethod2(b"r" * 32, b"s" * 32, "V4", None)
    assert km.KeyMethod2.decode(srv.encode(), from_client=False) == srv
    with pytest.raises(ProtocolError):
        km.KeyMethod2.decode(raw[:-3], from_client=True)
    with pytest.raises(ProtocolError):
        km.KeyMethod2.decode(b"\x00\x00\x00\x00\x01" + raw[5:], from_client=True)


def test_peer_info_bits() -> None:
    text = km.build_peer_info(
        version="x", ciphers=["AES-256-GCM", "AES-128-GCM"], iv_proto=142, pull=True, tun_mtu=1500
    )
    info = km.parse_peer_info(text)
    assert (
        info["IV_NCP"] == "2"
        and info["IV_CIPHERS"] == "AES-256-GCM:AES-128-GCM"
        and km.peer_iv_proto(info) == 142
    )
    p2p = km.parse_peer_info(
        km.build_peer_info(version="x", ciphers=["CHACHA20-POLY1305"], iv_proto=170, pull=False, tun_mtu=1500)
    )
    assert "IV_VER" not in p2p and "IV_NCP" not in p2p


def test_reliable_window_retransmit_and_fast_retransmit() -> None:
    s = ReliableSender(initial_timeout=2.0)
    for i in range(8):
        s.enqueue(Opcode.CONTROL_V1, bytes([i]))
    first = s.due(0.0)
    assert [o.message_id for o in first] == [0, 1, 2, 3, 4, 5]  # send window of 6
    assert s.due(1.0) == []
    assert [o.message_id for o in s.due(2.0)] == [0, 1, 2, 3, 4, 5]  # timeout
    assert s.due(5.9) == []  # doubled to 4 s
    s.process_acks([1, 2, 3])  # three ACKs for later ids: 0 goes again at once
    again = s.due(6.0)
    assert [o.message_id for o in again][:1] == [0]
    assert 6 not in [o.message_id for o in again]  # id 0 still holds the window
    s.process_acks([0])
    assert {6, 7} <= {o.message_id for o in s.due(6.1)}  # window moved
    s.process_acks([4, 5, 6, 7])
    s.due(100.0)
    assert s.idle


def test_reliable_receiver_orders_and_bounds() -> None:
    r = ReliableReceiver()
    assert r.receive(1, Opcode.CONTROL_V1, b"b")
    assert r.pop_ready() == []
    assert r.receive(0, Opcode.CONTROL_V1, b"a")
    assert [p for _, p in r.pop_ready()] == [b"a", b"b"]
    assert r.receive(0, Opcode.CONTROL_V1, b"a")  # duplicate is ACKed again
    assert r.pop_ready() == []
    assert not r.receive(2 + 12, Opcode.CONTROL_V1, b"far")  # outside the window: no ACK


def test_ack_tracker_repeats_recent_acks() -> None:
    a = AckTracker()
    a.add(1)
    a.add(2)
    assert a.take(4) == [1, 2]
    a.add(3)
    again = a.take(4)
    assert again[0] == 3 and sorted(again) == [1, 2, 3]  # owed ACK first, then recent ones repeated
    assert a.take(1) == [3]


def test_stream_framer() -> None:
    f = StreamFramer()
    data = frame(b"abc") + frame(b"de")
    assert f.feed(data[:4]) == []
    assert f.feed(data[4:6]) == [b"abc"]
    assert f.feed(data[6:]) == [b"de"]
    f.feed(b"\x00\x05ab")
    assert f.take_backlog() == b"\x00\x05ab"
    with pytest.raises(ProtocolError):
        StreamFramer().feed(b"\x00\x00")


def test_stream_framer_wanted_never_reads_past_a_frame() -> None:
    stream = frame(b"hello") + frame(b"x" * 300)
    f = StreamFramer()
    out: list[bytes] = []
    pos = 0
    while pos < len(stream):
        n = f.wanted()
        out += f.feed(stream[pos : pos + n])
        pos += n
        if out and pos == len(frame(b"hello")):
            assert f.take_backlog() == b""  # exactly at the boundary after the first frame
    assert out == [b"hello", b"x" * 300]
