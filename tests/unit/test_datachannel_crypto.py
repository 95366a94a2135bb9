"""Tests for the data-packet format: known answers, replay window edges, robustness."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import poly1305
from cryptography.hazmat.primitives.ciphers import Cipher as LowCipher
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from pyovpn.datachannel.api import Cipher, KeyDirection
from pyovpn.datachannel.crypto import (
    MAX_PACKET_ID,
    OCC_MAGIC,
    PING_MAGIC,
    DataKey,
    KeyState,
    PacketIdExhaustedError,
    ReplayWindow,
)
from pyovpn.errors import AuthenticationError, ProtocolError, ReplayError
from pyovpn.proto.keys import split_key2

ALL_CIPHERS = list(Cipher)


# ---------------------------------------------------------------------------- independent reference


def _chacha20(key: bytes, nonce: bytes, counter: int, data: bytes) -> bytes:
    # cryptography's raw ChaCha20 takes a 16-byte "nonce": 32-bit LE counter || 96-bit nonce
    full = counter.to_bytes(4, "little") + nonce
    return LowCipher(algorithms.ChaCha20(key, full), mode=None).encryptor().update(data)


def _pad16(b: bytes) -> bytes:
    return b"\0" * (-len(b) % 16)


def reference_seal(
    cipher: Cipher, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes
) -> tuple[bytes, bytes]:
    """(tag, ciphertext) built from low-level primitives: AES-GCM mode, or RFC 8439 by hand."""
    if cipher is Cipher.CHACHA20_POLY1305:
        one_time_key = _chacha20(key, nonce, 0, b"\0" * 64)[:32]
        ct = _chacha20(key, nonce, 1, plaintext)
        mac_data = (
            aad
            + _pad16(aad)
            + ct
            + _pad16(ct)
            + len(aad).to_bytes(8, "little")
            + len(ct).to_bytes(8, "little")
        )
        return poly1305.Poly1305.generate_tag(one_time_key, mac_data), ct
    enc = LowCipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(aad)
    ct = enc.update(plaintext) + enc.finalize()
    return enc.tag, ct


def reference_v2(
    cipher: Cipher, key: bytes, tail: bytes, key_id: int, peer_id: int, pid: int, pt: bytes
) -> bytes:
    header = bytes([(9 << 3) | key_id]) + peer_id.to_bytes(3, "big") + pid.to_bytes(4, "big")
    tag, ct = reference_seal(cipher, key, pid.to_bytes(4, "big") + tail, pt, header)
    return header + tag + ct


def reference_v1(cipher: Cipher, key: bytes, tail: bytes, key_id: int, pid: int, pt: bytes) -> bytes:
    pid_bytes = pid.to_bytes(4, "big")
    tag, ct = reference_seal(cipher, key, pid_bytes + tail, pt, pid_bytes)  # AAD: pid only
    return bytes([(6 << 3) | key_id]) + pid_bytes + tag + ct


def _pair(cipher: Cipher, key_id: int = 0, **kw: int) -> tuple[KeyState, KeyState]:
    key2 = os.urandom(256)
    ce, cd = split_key2(key2, cipher, tls_client=True)
    se, sd = split_key2(key2, cipher, tls_client=False)
    return (
        KeyState.from_directions(key_id, cipher, ce, cd, **kw),
        KeyState.from_directions(key_id, cipher, se, sd, **kw),
    )


# ---------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
@pytest.mark.parametrize("pt_len", [0, 1, 15, 16, 17, 1400])
def test_encrypt_matches_independent_construction(cipher: Cipher, pt_len: int) -> None:
    key = os.urandom(cipher.key_len)
    tail = os.urandom(8)
    other = DataKey(cipher, os.urandom(cipher.key_len), os.urandom(8))
    ks = KeyState(5, DataKey(cipher, key, tail), other)
    pt = os.urandom(pt_len)
    for pid in (1, 2, 3):
        assert ks.encrypt(pt, 0x123456) == reference_v2(cipher, key, tail, 5, 0x123456, pid, pt)
    ks.tx_packet_id = 0xDEADBEEE
    assert ks.encrypt(pt, 7) == reference_v2(cipher, key, tail, 5, 7, 0xDEADBEEF, pt)


def _receiving_key_state(cipher: Cipher) -> tuple[KeyState, bytes, bytes]:
    """Key id 3 with random keys; returns it and the receive key and implicit-IV tail it decrypts with."""
    key = os.urandom(cipher.key_len)
    tail = os.urandom(8)
    ks = KeyState(3, DataKey(cipher, os.urandom(cipher.key_len), os.urandom(8)), DataKey(cipher, key, tail))
    return ks, key, tail


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_decrypt_independent_v2_and_v1(cipher: Cipher) -> None:
    ks, key, tail = _receiving_key_state(cipher)
    pt = b"\x45" + os.urandom(99)
    assert ks.decrypt(reference_v2(cipher, key, tail, 3, 77, 10, pt)) == pt
    assert ks.decrypt(reference_v1(cipher, key, tail, 3, 11, pt)) == pt
    # memoryview input (the backend passes views of its receive buffer)
    assert ks.decrypt(memoryview(reference_v2(cipher, key, tail, 3, 77, 12, pt))) == pt


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_decrypt_into_a_batch_buffer_v2_and_v1(cipher: Cipher) -> None:
    # the engine decrypts packets where they lie in its receive buffer, at any offset
    ks, key, tail = _receiving_key_state(cipher)
    pt = b"\x45" + os.urandom(99)
    v2 = reference_v2(cipher, key, tail, 3, 77, 10, pt)
    v1 = reference_v1(cipher, key, tail, 3, 11, pt)
    buf = memoryview(bytearray(b"\xee" * 5 + v2 + v1))
    out = memoryview(bytearray(2048))
    assert ks.decrypt_into(buf, 5, len(v2), out) == len(pt) and bytes(out[: len(pt)]) == pt
    out[:] = bytes(len(out))
    assert ks.decrypt_into(buf, 5 + len(v2), len(v1), out) == len(pt) and bytes(out[: len(pt)]) == pt
    with pytest.raises(ReplayError):
        ks.decrypt(v1)


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_encrypt_v1_flag(cipher: Cipher) -> None:
    key = os.urandom(cipher.key_len)
    tail = os.urandom(8)
    ks = KeyState(1, DataKey(cipher, key, tail), DataKey(cipher, key, tail))
    pkt = ks.encrypt(b"hello", 0, data_v1=True)
    assert pkt == reference_v1(cipher, key, tail, 1, 1, b"hello")
    assert pkt[0] == 0x31


# Computed once with reference_v2 above and cross-checked against KeyState.encrypt.
FIXED_TAIL = bytes.fromhex("a0a1a2a3a4a5a6a7")
FIXED_PT = b"pyovpn fixed vector: an IP packet would go here"
FIXED_VECTORS = {
    Cipher.AES_128_GCM: (
        bytes(range(16)),
        "4a0abcde01020304b114329beaeec99179a67f9789c7b964ead0e89ed4cbd794652cc1922dd9d97d58165e4b"
        "84aef5661b4b4c89d16a2e840548dbeb3d14dab3c0cb3f326a87a6",
    ),
    Cipher.AES_256_GCM: (
        bytes(range(32)),
        "4a0abcde01020304c6627fc51acb3aca54229e3e0a7becf9f6318fef264ef544ac8b01fca858fac33a3a9dc2"
        "96f2e0a28a401cbe338e114982a3ba96862234f1e8dbab2b69363e",
    ),
    Cipher.CHACHA20_POLY1305: (
        bytes(range(32)),
        "4a0abcde01020304fca2047a3a955f89a045de05e971693666dd3b7a6e37bf86fa612c06782aeca42292eb3c"
        "8d52e7f59cc82da5d6e0320b46f4605d491a67c5486166848f1a2d",
    ),
}


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_fixed_vector(cipher: Cipher) -> None:
    key, expected_hex = FIXED_VECTORS[cipher]
    expected = bytes.fromhex(expected_hex)
    assert reference_v2(cipher, key, FIXED_TAIL, 2, 0x0ABCDE, 0x01020304, FIXED_PT) == expected
    ks = KeyState(2, DataKey(cipher, key, FIXED_TAIL), DataKey(cipher, key, FIXED_TAIL))
    ks.tx_packet_id = 0x01020303
    assert ks.encrypt(FIXED_PT, 0x0ABCDE) == expected
    assert ks.decrypt(expected) == FIXED_PT


def test_magic_constants() -> None:
    assert PING_MAGIC.hex() == "2a187bf3641eb4cb07ed2d0a981fc748"
    assert OCC_MAGIC.hex() == "287f346bd4ef7a812d56b8d3afc5459c"


# ---------------------------------------------------------------------------- failures


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_wrong_key_and_tampering_fail_authentication(cipher: Cipher) -> None:
    client, server = _pair(cipher)
    _, stranger = _pair(cipher)
    pkt = client.encrypt(b"\x45payload", 9)
    with pytest.raises(AuthenticationError):
        stranger.decrypt(pkt)
    # every header byte is authenticated in V2 (AAD = the first 8 bytes), and so are tag and body
    for i in (1, 2, 3, 4, 7, 8, 23, 24, len(pkt) - 1):
        bad = bytearray(pkt)
        bad[i] ^= 0x01
        with pytest.raises(AuthenticationError):
            server.decrypt(bytes(bad))
    assert server.decrypt(pkt) == b"\x45payload"


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_forgery_does_not_move_replay_window(cipher: Cipher) -> None:
    client, server = _pair(cipher)
    good = [client.encrypt(bytes([i]), 1) for i in range(3)]
    forged = bytearray(good[2])
    forged[-1] ^= 0xFF
    with pytest.raises(AuthenticationError):
        server.decrypt(bytes(forged))
    assert server.replay.highest == 0
    assert [server.decrypt(p) for p in good] == [b"\0", b"\1", b"\2"]
    with pytest.raises(ReplayError):
        server.decrypt(good[1])


def test_malformed_packets() -> None:
    client, server = _pair(Cipher.AES_128_GCM, key_id=1)
    with pytest.raises(ProtocolError):
        server.decrypt(b"")
    with pytest.raises(ProtocolError):
        server.decrypt(bytes([0x49]) + b"\0" * 22)  # DATA_V2, one byte too short
    with pytest.raises(ProtocolError):
        server.decrypt(bytes([0x31]) + b"\0" * 19)  # DATA_V1, one byte too short
    with pytest.raises(ProtocolError):
        server.decrypt(bytes([0x21]) + b"\0" * 40)  # P_CONTROL_V1
    pkt = client.encrypt(b"x", 1)
    with pytest.raises(ProtocolError, match="key id"):
        server.decrypt(bytes([0x48]) + pkt[1:])  # key id 0 given to key 1


def test_tx_packet_id_exhaustion() -> None:
    client, server = _pair(Cipher.AES_256_GCM)
    assert client.encrypt(b"a", 1)[4:8] == b"\0\0\0\1"  # the first packet id is 1
    client.tx_packet_id = MAX_PACKET_ID - 1
    last = client.encrypt(b"b", 1)
    assert last[4:8] == b"\xff\xff\xff\xff"  # 2**32-1 is still sent, as by the kernel
    assert client.exhausted
    with pytest.raises(PacketIdExhaustedError):
        client.encrypt(b"c", 1)
    with pytest.raises(PacketIdExhaustedError):
        client.encrypt(b"c", 1)
    assert server.decrypt(last) == b"b"


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_a_one_direction_copy_works_like_the_whole_key_in_its_direction(cipher: Cipher) -> None:
    # the engine's sending worker holds only the encrypt half, its receiving worker the decrypt half
    key2 = os.urandom(256)
    ce, cd = split_key2(key2, cipher, tls_client=True)
    se, sd = split_key2(key2, cipher, tls_client=False)
    whole = KeyState.from_directions(1, cipher, ce, cd)
    sender = KeyState.from_directions(1, cipher, ce, None)
    receiver = KeyState.from_directions(1, cipher, None, sd)
    assert sender.cipher is receiver.cipher is cipher
    assert sender.encrypt(b"hello", 7) == whole.encrypt(b"hello", 7)  # same key, same packet id
    assert receiver.decrypt(sender.encrypt(b"again", 7)) == b"again"
    with pytest.raises(ValueError, match="no such direction"):
        sender.decrypt(KeyState.from_directions(1, cipher, se, sd).encrypt(b"x", 7))
    with pytest.raises(ValueError, match="no such direction"):
        receiver.encrypt(b"x", 7)
    with pytest.raises(ValueError, match="encrypt or a decrypt"):
        KeyState(1, None, None)


def test_bad_key_material() -> None:
    with pytest.raises(ValueError, match="16-byte key"):
        DataKey(Cipher.AES_128_GCM, b"\0" * 32, b"\0" * 8)
    with pytest.raises(ValueError, match="nonce tail"):
        DataKey(Cipher.AES_256_GCM, b"\0" * 32, b"\0" * 12)
    k = DataKey(Cipher.AES_256_GCM, b"\0" * 32, b"\0" * 8)
    with pytest.raises(ValueError):
        KeyState(8, k, k)
    assert "\\x00" not in repr(k) and "AES-256-GCM" in repr(k)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    _, server = _pair(Cipher.AES_128_GCM)
    try:
        server.decrypt(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0x48, 0x30]), st.binary(max_size=100), st.sampled_from(ALL_CIPHERS))
def test_data_shaped_garbage_raises_only_protocol_errors(first: int, rest: bytes, cipher: Cipher) -> None:
    _, server = _pair(cipher)
    with pytest.raises(ProtocolError):
        server.decrypt(bytes([first]) + rest)


# ---------------------------------------------------------------------------- split_key2


@pytest.mark.parametrize("cipher", ALL_CIPHERS)
def test_split_key2_directions(cipher: Cipher) -> None:
    key2 = bytes(range(256))
    c_enc, c_dec = split_key2(key2, cipher, tls_client=True)
    s_enc, s_dec = split_key2(key2, cipher, tls_client=False)
    klen = cipher.key_len
    assert c_enc == KeyDirection(key2[0:klen], key2[64:72])
    assert c_dec == KeyDirection(key2[128 : 128 + klen], key2[192:200])
    assert c_enc == s_dec and c_dec == s_enc
    client = KeyState.from_directions(0, cipher, c_enc, c_dec)
    server = KeyState.from_directions(0, cipher, s_enc, s_dec)
    assert server.decrypt(client.encrypt(b"up", 1)) == b"up"
    assert client.decrypt(server.encrypt(b"down", 1)) == b"down"
    with pytest.raises(AuthenticationError):
        client.decrypt(client.encrypt(b"to myself", 1))


def test_split_key2_length() -> None:
    with pytest.raises(ValueError):
        split_key2(b"\0" * 255, Cipher.AES_128_GCM, tls_client=True)


# ---------------------------------------------------------------------------- replay window


def _accepts(w: ReplayWindow, pid: int) -> bool:
    try:
        w.accept(pid)
    except ReplayError:
        return False
    return True


def test_replay_zero_first_and_duplicates() -> None:
    w = ReplayWindow()
    assert not _accepts(w, 0)
    assert _accepts(w, 1)
    assert not _accepts(w, 1)
    assert not _accepts(w, 0)
    assert _accepts(w, 2)
    assert not _accepts(w, 2)


def test_replay_first_packet_not_one() -> None:
    w = ReplayWindow()
    assert _accepts(w, 5)
    assert [_accepts(w, p) for p in (3, 1, 4, 2)] == [True] * 4
    assert not any(_accepts(w, p) for p in range(1, 6))


@pytest.mark.parametrize("size", [64, 2048])
def test_replay_window_edges(size: int) -> None:
    w = ReplayWindow(size)
    top = 10 * size
    assert _accepts(w, top)  # a big jump from nothing: everything below is inside or outside
    assert w.would_accept(top - (size - 1))
    assert not w.would_accept(top - size)
    assert _accepts(w, top - (size - 1))  # exactly window-1 behind
    assert not _accepts(w, top - (size - 1))
    assert not _accepts(w, top - size)  # window behind
    assert not _accepts(w, 1)


def test_replay_reordering_inside_window() -> None:
    w = ReplayWindow(64)
    assert _accepts(w, 10)
    for pid in (8, 9, 7, 11, 3, 12):
        assert _accepts(w, pid), pid
    for pid in (3, 7, 8, 9, 10, 11, 12):
        assert not _accepts(w, pid), pid
    assert _accepts(w, 4)


def test_replay_big_jumps_forward() -> None:
    w = ReplayWindow(64)
    assert _accepts(w, 1)
    assert _accepts(w, 1 + 64)  # delta == window: history reset
    assert not _accepts(w, 1)
    assert _accepts(w, 10)  # inside the new window, never seen
    assert _accepts(w, 1_000_000)
    assert _accepts(w, 1_000_000 - 63)
    assert not _accepts(w, 1_000_000 - 64)
    assert _accepts(w, MAX_PACKET_ID)
    assert not _accepts(w, MAX_PACKET_ID)


def test_replay_expiry_sets_floor() -> None:
    now = [100.0]
    w = ReplayWindow(64, expire=30.0, clock=lambda: now[0])
    assert _accepts(w, 10)
    assert _accepts(w, 5)
    now[0] += 29.9
    assert _accepts(w, 6)  # still within the backtrack expiry
    now[0] += 30.0
    assert not w.would_accept(7)
    assert not _accepts(w, 7)  # silence for 30 s: backtracking below the highest stops
    assert _accepts(w, 11)
    assert _accepts(w, 12)
    assert not _accepts(w, 9)  # still below the floor (10)


def test_replay_window_size_bounds() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(0)
    with pytest.raises(ValueError):
        ReplayWindow(65537)
    w = ReplayWindow(1)
    assert _accepts(w, 1) and _accepts(w, 3)
    assert not _accepts(w, 2)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 8, 64]), st.lists(st.integers(min_value=0, max_value=300), max_size=120))
def test_replay_window_matches_model(size: int, pids: list[int]) -> None:
    """Without expiry the kernel window is: accept unseen pid > 0 with pid > highest - size."""
    w = ReplayWindow(size, expire=None)
    seen: set[int] = set()
    highest = 0
    for pid in pids:
        expected = pid > 0 and pid not in seen and pid > highest - size
        assert w.would_accept(pid) == expected
        assert _accepts(w, pid) == expected, (pid, highest)
        if expected:
            seen.add(pid)
            highest = max(highest, pid)
