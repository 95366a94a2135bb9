"""OpenVPN's compression framing: exact bytes per mode, LZ4 samples, LZO refusal, fuzzed decoders,
the in-place slot framing the engine uses before sealing, and the control-plane markers."""

from __future__ import annotations

import logging
import os

import lz4.block  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyovpn.datachannel.api import Cipher, Framing, KeyDirection, Stats
from pyovpn.datachannel.crypto import KeyState
from pyovpn.datachannel.framing import (
    FramingError,
    frame_payload,
    frame_slots,
    note_framing_error,
    unframe,
    unframe_bytes,
)
from pyovpn.errors import ProtocolError
from pyovpn.proto import keymethod as km
from pyovpn.proto.push import parse_pushed_options

MODES = [Framing.LZO_PREFIX, Framing.SWAP, Framing.V2]
IP = bytes.fromhex("4500001c00010000400100000a0000010a000002") + bytes(8)


@pytest.mark.parametrize(
    ("mode", "payload", "wire"),
    [
        (Framing.LZO_PREFIX, IP, b"\xfa" + IP),
        (Framing.SWAP, IP, b"\xfb" + IP[1:] + IP[:1]),
        (Framing.V2, IP, IP),  # an IP packet never starts with 0x50: no header at all
        (Framing.V2, b"\x50abc", b"\x50\x00\x50abc"),  # ... anything else that does is escaped
        (Framing.SWAP, b"\x45", b"\xfb\x45"),
        (Framing.NONE, IP, IP),
    ],
)
def test_outgoing_bytes(mode: Framing, payload: bytes, wire: bytes) -> None:
    assert frame_payload(mode, payload) == wire
    assert unframe_bytes(mode, wire) == payload


def test_empty_payload_stays_empty() -> None:
    for mode in MODES:
        assert frame_payload(mode, b"") == b""
        assert unframe_bytes(mode, b"") == b""


@pytest.mark.parametrize("mode", [Framing.SWAP, Framing.V2])
def test_lz4_compressed_incoming_is_inflated(mode: Framing) -> None:
    original = IP + bytes(1200) + os.urandom(64)
    block = lz4.block.compress(original, store_size=False)
    wire = b"\x69" + block[1:] + block[:1] if mode is Framing.SWAP else b"\x50\x01" + block
    assert len(wire) < len(original) // 2
    assert unframe_bytes(mode, wire) == original
    buf = bytearray(wire) + bytearray(70000)
    n = unframe(mode, buf, 0, len(wire))
    assert bytes(buf[:n]) == original


@pytest.mark.parametrize(("mode", "wire"), [(Framing.LZO_PREFIX, b"\x66xyz"), (Framing.V2, b"\x50\x02xyz")])
def test_lzo_compressed_incoming_is_refused_clearly(mode: Framing, wire: bytes) -> None:
    with pytest.raises(FramingError, match="LZO") as info:
        unframe_bytes(mode, wire)
    assert info.value.counter == "rx_lzo_unsupported"
    assert "allow-compression" in str(info.value)


@pytest.mark.parametrize(
    ("mode", "wire", "counter"),
    [
        (Framing.LZO_PREFIX, b"\x45abc", "rx_bad_framing"),
        (Framing.SWAP, b"\xfaabc", "rx_bad_framing"),
        (Framing.V2, b"\x50\x07abc", "rx_bad_framing"),
        (Framing.V2, b"\x50", "rx_bad_framing"),
        (Framing.V2, b"\x50\x01\xff\xff\xff", "rx_bad_compression"),
        (Framing.SWAP, b"\x69\xff\xff\xff", "rx_bad_compression"),
    ],
)
def test_bad_incoming_is_a_framing_error(mode: Framing, wire: bytes, counter: str) -> None:
    with pytest.raises(FramingError) as info:
        unframe_bytes(mode, wire)
    assert info.value.counter == counter


def test_a_drop_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    stats = Stats()
    log = logging.getLogger("test.framing")
    for _ in range(3):
        try:
            unframe_bytes(Framing.LZO_PREFIX, b"\x66x")
        except FramingError as e:
            with caplog.at_level(logging.WARNING, "test.framing"):
                note_framing_error(stats, e, log, "here", 5)
    assert stats.extra["rx_lzo_unsupported"] == 3 and stats.dropped_other == 3
    assert len([r for r in caplog.records if "LZO" in r.getMessage()]) == 1


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MODES), st.binary(max_size=300), st.integers(0, 16))
def test_decoders_raise_only_protocol_errors(mode: Framing, data: bytes, room: int) -> None:
    try:
        unframe_bytes(mode, data)
    except ProtocolError:
        pass
    buf = bytearray(data) + bytearray(room)
    try:
        n = unframe(mode, buf, 0, len(data))
    except ProtocolError:
        return
    assert 0 <= n <= len(buf)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MODES), st.binary(max_size=200))
def test_round_trip(mode: Framing, payload: bytes) -> None:
    assert unframe_bytes(mode, frame_payload(mode, payload)) == payload


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(MODES),
    st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=8),
    st.booleans(),
)
def test_slots_are_framed_before_sealing(mode: Framing, payloads: list[bytes], tcp: bool) -> None:
    """frame_slots + encrypt_slots give the packets frame_payload + encrypt give, in order."""
    reserve = 26 if tcp else 24
    buf = bytearray(4096)
    mv = memoryview(buf)
    offsets: list[int] = []
    lengths: list[int] = []
    pos = 0
    for p in payloads:
        buf[pos + reserve : pos + reserve + len(p)] = p
        offsets.append(pos)
        lengths.append(len(p))
        pos += reserve + len(p)
    key = KeyDirection(bytes(range(32)), bytes(8))
    sender = KeyState.from_directions(1, Cipher.AES_256_GCM, key, key)
    receiver = KeyState.from_directions(1, Cipher.AES_256_GCM, key, key)
    frame_slots(mode, mv, offsets, lengths, reserve)
    assert sender.encrypt_slots(mv, offsets, lengths, 3, frame=tcp) == len(payloads)
    for off, n, p in zip(offsets, lengths, payloads, strict=True):
        start = off + (2 if tcp else 0)
        packet = bytes(buf[start : start + 24 + n])
        assert receiver.decrypt(packet) == frame_payload(mode, p)


def test_frame_slots_refuses_a_full_buffer() -> None:
    buf = bytearray(24 + 10 + 16)
    with pytest.raises(ValueError, match="room"):
        frame_slots(Framing.LZO_PREFIX, memoryview(buf), [0], [10], 24)


@pytest.mark.parametrize(
    ("option", "framing"),
    [
        (("comp-lzo", ""), Framing.LZO_PREFIX),
        (("comp-lzo", "no"), Framing.LZO_PREFIX),
        (("comp-lzo", "adaptive"), Framing.LZO_PREFIX),
        (("compress", "lzo"), Framing.LZO_PREFIX),
        (("compress", ""), Framing.SWAP),
        (("compress", "stub"), Framing.SWAP),
        (("compress", "lz4"), Framing.SWAP),
        (("compress", "stub-v2"), Framing.V2),
        (("compress", "lz4-v2"), Framing.V2),
        (None, Framing.NONE),
    ],
)
def test_framing_of_each_option(option: tuple[str, str] | None, framing: Framing) -> None:
    assert Framing.from_option(option) is framing


def test_pushed_compression() -> None:
    assert parse_pushed_options(["comp-lzo no"]).compression == ("comp-lzo", "no")
    assert parse_pushed_options(["compress"]).compression == ("compress", "")
    assert parse_pushed_options(["route 10.0.0.0 255.0.0.0"]).compression is None
    with pytest.raises(ProtocolError, match="compress migrate"):
        parse_pushed_options(["compress migrate"])


def test_peer_info_and_occ_markers() -> None:
    def info(c: tuple[str, str] | None) -> dict[str, str]:
        text = km.build_peer_info(
            version="2.6.14", ciphers=["AES-256-GCM"], iv_proto=2, pull=True, tun_mtu=1500, compression=c
        )
        return km.parse_peer_info(text)

    assert not [k for k in info(None) if "LZ" in k or "COMP" in k]
    stub = info(("comp-lzo", "no"))
    assert stub["IV_LZO_STUB"] == stub["IV_COMP_STUB"] == stub["IV_COMP_STUBv2"] == "1"
    assert "IV_LZ4" not in stub and "IV_LZO" not in stub
    real = info(("compress", "lz4-v2"))
    assert real["IV_LZ4"] == real["IV_LZ4v2"] == real["IV_LZO_STUB"] == "1"
    assert "IV_LZO" not in real  # pyovpn cannot inflate LZO, so it does not offer it
    common = {"tls_server": False, "proto": "udp", "cipher": None, "tun_mtu": 1500}
    assert ",comp-lzo," in km.occ_options_string(
        **common, tls_auth=False, key_direction=None, compression=True
    )
    assert "comp-lzo" not in km.occ_options_string(**common, tls_auth=False, key_direction=None)
