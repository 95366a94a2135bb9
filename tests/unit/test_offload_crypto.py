"""The offload engine's AEAD fast paths (``encrypt_slots``, ``open_v2_into``) against the plain API."""

from __future__ import annotations

import os
import struct

import pytest

from pyovpn.datachannel.api import Cipher, KeyDirection
from pyovpn.datachannel.crypto import MAX_PACKET_ID, KeyState
from pyovpn.errors import AuthenticationError, ReplayError


def _pair(cipher: Cipher) -> tuple[KeyState, KeyState]:
    k1, k2 = os.urandom(cipher.key_len), os.urandom(cipher.key_len)
    t1, t2 = os.urandom(8), os.urandom(8)
    a = KeyState.from_directions(3, cipher, KeyDirection(k1, t1), KeyDirection(k2, t2))
    b = KeyState.from_directions(3, cipher, KeyDirection(k2, t2), KeyDirection(k1, t1))
    return a, b


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305])
@pytest.mark.parametrize("frame", [False, True])
def test_encrypt_slots_matches_encrypt(cipher: Cipher, frame: bool) -> None:
    a, b = _pair(cipher)
    payloads = [os.urandom(n) for n in (1, 40, 1400, 1400, 17)]
    reserve = 26 if frame else 24
    buf = bytearray(sum(reserve + len(p) for p in payloads) + 16)
    offs, lens, pos = [], [], 0
    for p in payloads:
        buf[pos + reserve : pos + reserve + len(p)] = p
        offs.append(pos)
        lens.append(len(p))
        pos += reserve + len(p)
    assert a.encrypt_slots(memoryview(buf), offs, lens, 0x123456, frame=frame) == len(payloads)
    for off, n, p in zip(offs, lens, payloads, strict=True):
        start = off + (2 if frame else 0)
        if frame:
            assert struct.unpack_from(">H", buf, off)[0] == n + 24
        wire = bytes(buf[start : start + 24 + n])
        assert wire[:4] == bytes([(9 << 3) | 3, 0x12, 0x34, 0x56])
        assert b.decrypt(wire) == p
    assert a.tx_packet_id == len(payloads)


def test_encrypt_slots_stops_at_the_last_packet_id() -> None:
    a, _ = _pair(Cipher.AES_256_GCM)
    a.tx_packet_id = MAX_PACKET_ID - 2
    buf = bytearray(3 * 34 + 16)
    assert a.encrypt_slots(memoryview(buf), [0, 34, 68], [10, 10, 10], 1) == 2
    assert a.exhausted


def test_open_v2_into() -> None:
    a, b = _pair(Cipher.AES_256_GCM)
    plains = [os.urandom(n) for n in (100, 1400, 0)]
    pkts = [a.encrypt(x, 5) for x in plains]
    out = bytearray(4096)
    omv = memoryview(out)
    rx = bytearray(b"".join(pkts))
    rmv = memoryview(rx)
    before = bytes(rx)
    off = 0
    for i, p in enumerate(pkts):
        pid = struct.unpack_from(">I", p, 4)[0]
        clen = b.open_v2_into(rmv, off, len(p), pid, omv, 8)
        assert clen == len(p) - 24
        assert bytes(out[8 : 8 + clen]) == plains[i]
        off += len(p)
    assert bytes(rx) == before  # the received packets are left as they were
    with pytest.raises(ReplayError):
        b.open_v2_into(rmv, 0, len(pkts[0]), 1, omv, 0)
    bad = bytearray(pkts[1])
    bad[-1] ^= 1
    with pytest.raises(AuthenticationError):
        b.open_v2_into(memoryview(bad), 0, len(bad), 2, omv, 0)
    p = a.encrypt(b"hello world", 5)
    n = b.open_v2_into(memoryview(bytearray(p)), 0, len(p), 4, omv, 100)
    assert bytes(out[100 : 100 + n]) == b"hello world"
