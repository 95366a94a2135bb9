"""The engine's userspace offloads against slow, obvious reference implementations.

* checksums: a word-by-word RFC 1071 loop;
* TSO/USO segmentation: a per-segment loop written from the kernel's rules
  (``tcp_gso_segment``/``__udp_gso_segment``): sequence numbers, IP ids and lengths per
  segment, FIN/PSH only on the last segment, CWR only on the first, full checksums;
* GRO: whatever ``coalesce`` writes, segmented again by the reference, must give back
  exactly the packets that went in, in order per flow, and no write may merge packets
  that the kernel's GRO would not (bad checksum, gap, other flags, other flow).
"""

from __future__ import annotations

import os
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyovpn.datachannel.api import Cipher
from pyovpn.datachannel.crypto import KeyState
from pyovpn.datachannel.engine import gso
from pyovpn.proto.keys import split_key2

# ---------------------------------------------------------------------------- references


def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for (w,) in struct.iter_unpack("!H", data):
        s += w
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_csum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def ref_l4_csum(pkt: bytes, l4: int, proto: int) -> int:
    """Checksum of the L4 part of ``pkt`` with its checksum field treated as zero."""
    v6 = pkt[0] >> 4 == 6
    off = 16 if proto == 6 else 6
    seg = bytearray(pkt[l4:])
    seg[off : off + 2] = b"\0\0"
    addrs = pkt[8:40] if v6 else pkt[12:20]
    pseudo = (
        addrs + struct.pack("!HH", proto, len(seg))
        if not v6
        else addrs + struct.pack("!IxxxB", len(seg), proto)
    )
    c = ref_csum(pseudo + bytes(seg))
    if proto == 17 and c == 0:
        c = 0xFFFF
    return c


def ref_segment(pkt: bytes, l4: int, proto: int, mss: int) -> list[bytes]:
    v6 = pkt[0] >> 4 == 6
    thl = (pkt[l4 + 12] >> 4) * 4 if proto == 6 else 8
    hl = l4 + thl
    payload = pkt[hl:]
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)]
    out = []
    for i, chunk in enumerate(chunks):
        h = bytearray(pkt[:hl])
        if v6:
            struct.pack_into("!H", h, 4, hl - 40 + len(chunk))
        else:
            struct.pack_into("!H", h, 2, hl + len(chunk))
            struct.pack_into("!H", h, 4, (struct.unpack_from("!H", pkt, 4)[0] + i) & 0xFFFF)
        if proto == 6:
            seq = struct.unpack_from("!I", pkt, l4 + 4)[0]
            struct.pack_into("!I", h, l4 + 4, (seq + i * mss) & 0xFFFFFFFF)
            flags = pkt[l4 + 13]
            if i > 0:
                flags &= ~0x80  # CWR only on the first
            if i < len(chunks) - 1:
                flags &= ~0x09  # FIN, PSH only on the last
            h[l4 + 13] = flags
        else:
            struct.pack_into("!H", h, l4 + 4, 8 + len(chunk))
        seg = bytes(h) + chunk
        c = ref_l4_csum(seg, l4, proto)
        seg = bytearray(seg)
        off = l4 + (16 if proto == 6 else 6)
        struct.pack_into("!H", seg, off, c)
        if not v6:
            seg[10:12] = b"\0\0"
            struct.pack_into("!H", seg, 10, ref_csum(bytes(seg[:l4])))
        out.append(bytes(seg))
    return out


def make_packet(
    *,
    v6: bool,
    proto: int,
    payload: bytes,
    flags: int = 0x10,
    seq: int = 1000,
    ack: int = 5,
    ip_id: int = 1,
    opts: bytes = b"",
    sport: int = 40000,
    dport: int = 5201,
    df: bool = True,
    good_csum: bool = True,
) -> bytes:
    if proto == 6:
        thl = 20 + len(opts)
        l4h = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, 512, 0, 0) + opts
    else:
        l4h = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, len(l4h) + len(payload), proto, 64)
        ip += bytes.fromhex("fd000000000000000000000000000001") + bytes.fromhex(
            "fd000000000000000000000000000002"
        )
        l4 = 40
    else:
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(l4h) + len(payload),
            ip_id,
            0x4000 if df else 0,
            64,
            proto,
            0,
            bytes([10, 0, 0, 1]),
            bytes([10, 0, 0, 2]),
        )
        ip = ip[:10] + struct.pack("!H", ref_csum(ip)) + ip[12:]
        l4 = 20
    pkt = bytearray(ip + l4h + payload)
    c = ref_l4_csum(bytes(pkt), l4, proto)
    if not good_csum:
        c ^= 0x0101
    struct.pack_into("!H", pkt, l4 + (16 if proto == 6 else 6), c)
    return bytes(pkt)


def to_partial(pkt: bytes, l4: int, proto: int) -> bytes:
    """What the TUN hands over for a GSO packet: L4 checksum field = pseudo-header sum."""
    v6 = pkt[0] >> 4 == 6
    p = bytearray(pkt)
    addrs = pkt[8:40] if v6 else pkt[12:20]
    s = (
        ref_sum(addrs + struct.pack("!HH", proto, len(pkt) - l4))
        if not v6
        else ref_sum(addrs + struct.pack("!IxxxB", len(pkt) - l4, proto))
    )
    struct.pack_into("!H", p, l4 + (16 if proto == 6 else 6), s)
    return bytes(p)


# ---------------------------------------------------------------------------- checksums


@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_checksum_matches_reference(data: bytes, initial: int) -> None:
    assert gso.ones_sum(data) == (ref_sum(data) if any(data) else 0) or ref_sum(data) == 0xFFFF
    s = ref_sum(data) + initial
    s = (s & 0xFFFF) + (s >> 16)
    assert gso.checksum(data, initial) == ~s & 0xFFFF or (~s & 0xFFFF) in (0, 0xFFFF)


@given(st.booleans(), st.sampled_from([6, 17]), st.binary(min_size=1, max_size=1500))
def test_finish_partial(v6: bool, proto: int, payload: bytes) -> None:
    pkt = make_packet(v6=v6, proto=proto, payload=payload)
    l4 = 40 if v6 else 20
    partial = bytearray(b"xx" + to_partial(pkt, l4, proto) + b"yy")
    gso.finish_partial(partial, 2, len(partial) - 2, l4, 16 if proto == 6 else 6)
    assert bytes(partial[2:-2]) == pkt


# ---------------------------------------------------------------------------- segmentation


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v6=st.booleans(),
    proto=st.sampled_from([6, 17]),
    plen=st.integers(1, 9000),
    mss=st.integers(1, 1500),
    flags=st.sampled_from([0x10, 0x18, 0x19, 0x90, 0xD8, 0x11]),
    seq=st.integers(0, 0xFFFFFFFF),
    ip_id=st.integers(0, 0xFFFF),
    opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8))]),
    reserve=st.sampled_from([24, 26]),
    base=st.integers(0, 7),
)
def test_segmentation_matches_reference(
    v6: bool,
    proto: int,
    plen: int,
    mss: int,
    flags: int,
    seq: int,
    ip_id: int,
    opts: bytes,
    reserve: int,
    base: int,
) -> None:
    assume(plen // mss < 200)
    payload = os.urandom(plen)
    pkt = make_packet(v6=v6, proto=proto, payload=payload, flags=flags, seq=seq, ip_id=ip_id, opts=opts)
    l4 = 40 if v6 else 20
    expected = ref_segment(pkt, l4, proto, mss)
    out = bytearray(1 << 20)
    seg = gso.Segmenter(out)
    gtype = (gso.GSO_TCPV6 if v6 else gso.GSO_TCPV4) if proto == 6 else gso.GSO_UDP_L4
    src = np.frombuffer(to_partial(pkt, l4, proto), np.uint8)
    n, full, last = seg.segment(src, gtype, mss, l4, base, reserve)
    assert n == len(expected)
    stride = reserve + full
    got = [
        bytes(out[base + i * stride + reserve : base + i * stride + reserve + (full if i < n - 1 else last)])
        for i in range(n)
    ]
    assert got == expected
    hl = len(pkt) - plen
    assert all(len(p) <= hl + mss for p in got), "no segment may exceed the MSS"


def test_segmentation_rejects_garbage() -> None:
    out = bytearray(1 << 16)
    seg = gso.Segmenter(out)
    for bad in (b"", b"\x45" + bytes(30), b"\x15" + bytes(60)):
        try:
            seg.segment(np.frombuffer(bad, np.uint8), gso.GSO_TCPV4, 100, 20, 0, 24)
        except ValueError:
            pass
        else:
            raise AssertionError("accepted garbage")
    big = make_packet(v6=False, proto=6, payload=bytes(60000))
    try:
        seg.segment(np.frombuffer(to_partial(big, 20, 6), np.uint8), gso.GSO_TCPV4, 100, 20, 0, 24)
    except BufferError:
        pass
    else:
        raise AssertionError("overflowed the output buffer")


@settings(max_examples=50, deadline=None)
@given(plen=st.integers(1, 60000), mss=st.integers(500, 1460), reserve=st.sampled_from([24, 26]))
def test_segments_encrypt_in_place_into_wire_packets(plen: int, mss: int, reserve: int) -> None:
    """Segment + in-place encrypt: every slot decrypts (reference path) to the reference segment."""
    pkt = make_packet(v6=False, proto=6, payload=os.urandom(plen), flags=0x18)
    expected = ref_segment(pkt, 20, 6, mss)
    key2 = os.urandom(256)
    tx = KeyState.from_directions(
        0, Cipher.AES_256_GCM, *split_key2(key2, Cipher.AES_256_GCM, tls_client=True)
    )
    rx = KeyState.from_directions(
        0, Cipher.AES_256_GCM, *split_key2(key2, Cipher.AES_256_GCM, tls_client=False)
    )
    out = bytearray(1 << 20)
    seg = gso.Segmenter(out)
    n, full, last = seg.segment(
        np.frombuffer(to_partial(pkt, 20, 6), np.uint8), gso.GSO_TCPV4, mss, 20, 0, reserve
    )
    stride = reserve + full
    offs = [i * stride for i in range(n)]
    lens = [full] * (n - 1) + [last]
    assert tx.encrypt_slots(memoryview(out), offs, lens, 77, frame=reserve == 26) == n
    skip = reserve - 24
    for i, (off, ln) in enumerate(zip(offs, lens, strict=True)):
        wire = bytes(out[off + skip : off + skip + 24 + ln])
        if skip:
            assert struct.unpack_from(">H", out, off)[0] == 24 + ln
        assert len(wire) <= 24 + hl_plus(mss)
        assert rx.decrypt(wire) == expected[i]


def hl_plus(mss: int) -> int:
    return 40 + mss


# ---------------------------------------------------------------------------- MSS clamping


@given(st.booleans(), st.integers(536, 9000), st.integers(500, 1500), st.booleans())
def test_clamp_mss(v6: bool, mss: int, limit: int, nop_first: bool) -> None:
    opts = (b"\x01" if nop_first else b"") + struct.pack("!BBH", 2, 4, mss)
    opts += b"\x01" * (-len(opts) % 4)
    pkt = bytearray(make_packet(v6=v6, proto=6, payload=b"", flags=0x02, opts=opts))
    l4 = 40 if v6 else 20
    padded = pkt + bytes(64)  # may_be_tcp_syn reads a fixed distance past the start
    assert gso.may_be_tcp_syn(padded, 0)
    changed = gso.clamp_mss(pkt, 0, len(pkt), limit, limit)
    assert changed == (mss > limit)
    i = pkt.index(b"\x02\x04", l4 + 20)
    assert struct.unpack_from("!H", pkt, i + 2)[0] == min(mss, limit)
    assert struct.unpack_from("!H", pkt, l4 + 16)[0] == ref_l4_csum(bytes(pkt), l4, 6) or ref_l4_csum(
        bytes(pkt), l4, 6
    ) in (0, 0xFFFF)


# ---------------------------------------------------------------------------- GRO


def _layout(packets: list[bytes]) -> tuple[bytearray, list[tuple[int, int]]]:
    buf = bytearray(sum(len(p) + 4 for p in packets) + 64)
    slots = []
    off = 0
    for p in packets:
        buf[off : off + len(p)] = p
        slots.append((off, len(p)))
        off = (off + len(p) + 2) & ~1
    return buf, slots


def _replay(writes: list[list]) -> list[bytes]:
    """What the kernel would make of our TUN writes: GSO writes segmented, others as is."""
    out = []
    for iov in writes:
        data = b"".join(bytes(x) for x in iov)
        flags, gtype, hdr_len, gsize, cstart, coff = gso.VNET_HDR.unpack_from(data)
        pkt = data[gso.VNET_HDR_LEN :]
        if gtype == gso.GSO_NONE:
            assert flags == 0
            out.append(pkt)
            continue
        assert flags == gso.VNET_F_NEEDS_CSUM and coff == 16
        v6 = gtype == gso.GSO_TCPV6
        assert cstart == (40 if v6 else 20)
        # the partial checksum must be the pseudo-header sum over the whole TCP length
        assert struct.unpack_from("!H", pkt, cstart + 16)[0] == ref_sum(
            (pkt[8:40] + struct.pack("!IxxxB", len(pkt) - 40, 6))
            if v6
            else (pkt[12:20] + struct.pack("!HH", 6, len(pkt) - 20))
        )
        if not v6:
            assert ref_csum(pkt[:20]) == 0, "IPv4 header checksum of a coalesced packet must be valid"
        thl = (pkt[cstart + 12] >> 4) * 4
        assert hdr_len == cstart + thl
        segs = ref_segment(pkt, cstart, 6, gsize)
        assert len(segs) >= 2
        out.extend(segs)
    return out


def _flow(rng: random.Random, *, v6: bool, n: int, mss: int, sport: int, seq: int, ip_id: int) -> list[bytes]:
    pkts = []
    for i in range(n):
        size = mss if i < n - 1 else rng.randint(1, mss)
        pkts.append(
            make_packet(
                v6=v6,
                proto=6,
                payload=os.urandom(size),
                seq=seq,
                ip_id=(ip_id + i) & 0xFFFF,
                sport=sport,
                flags=0x18 if i == n - 1 else 0x10,
                opts=b"\x01\x01\x08\x0a" + bytes(8),
            )
        )
        seq = (seq + size) & 0xFFFFFFFF
    return pkts


GRO_PLANNERS = ["coalesce", "coalesce_vec", "coalesce_checked"]


@pytest.mark.parametrize("planner", GRO_PLANNERS)
@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    v6=st.booleans(),
    n=st.integers(1, 70),
    mss=st.integers(200, 1400),
    interleave=st.booleans(),
    corrupt=st.booleans(),
)
def test_gro_round_trips(
    planner: str, seed: int, v6: bool, n: int, mss: int, interleave: bool, corrupt: bool
) -> None:
    rng = random.Random(seed)
    a = _flow(rng, v6=v6, n=n, mss=mss, sport=1111, seq=rng.randrange(2**32), ip_id=rng.randrange(65536))
    b = _flow(rng, v6=not v6, n=rng.randint(1, 5), mss=mss, sport=2222, seq=5, ip_id=9)
    udp = [make_packet(v6=v6, proto=17, payload=os.urandom(50))]
    packets = list(a)
    if corrupt and n > 2:
        k = rng.randrange(n)
        p = bytearray(packets[k])
        p[-1] ^= 0xFF  # payload corruption: checksum now wrong
        packets[k] = bytes(p)
    if interleave:
        for extra in b + udp:
            packets.insert(rng.randrange(len(packets) + 1), extra)
    buf, slots = _layout(packets)
    writes = getattr(gso, planner)(buf, np.frombuffer(buf, np.uint8), slots)
    back = _replay(writes)
    # same packets, and per flow in the same order
    for key in (1111, 2222):
        ins = [p for p in packets if p[9 if p[0] >> 4 == 4 else 6] == 6 and _sport(p) == key]
        outs = [p for p in back if p[9 if p[0] >> 4 == 4 else 6] == 6 and _sport(p) == key]
        assert outs == ins
    assert sorted(back) == sorted(packets)
    if not interleave and not corrupt and n >= 2:
        assert len(writes) < n, "an in-order flow must be coalesced"
    for iov in writes:
        data = b"".join(bytes(x) for x in iov)
        assert len(data) - gso.VNET_HDR_LEN <= 65535


def _sport(p: bytes) -> int:
    l4 = 40 if p[0] >> 4 == 6 else 20
    return struct.unpack_from("!H", p, l4)[0]


@pytest.mark.parametrize("planner", GRO_PLANNERS)
def test_gro_does_not_merge_gaps_or_flags(planner: str) -> None:
    plan = getattr(gso, planner)
    rng = random.Random(1)
    flow = _flow(rng, v6=False, n=6, mss=1000, sport=1, seq=100, ip_id=1)
    gap = flow[:2] + flow[3:]  # one segment lost
    buf, slots = _layout(gap)
    writes = plan(buf, np.frombuffer(buf, np.uint8), slots)
    assert _replay(writes) == gap
    assert len(writes) == 2  # [0,1] and [3,4,5]
    syn = make_packet(v6=False, proto=6, payload=b"x" * 1000, flags=0x12, seq=100 + 6 * 1000)
    fin = make_packet(v6=False, proto=6, payload=b"x" * 10, flags=0x11, seq=100)
    buf, slots = _layout([fin, syn])
    assert len(plan(buf, np.frombuffer(buf, np.uint8), slots)) == 2
    assert plan(buf, np.frombuffer(buf, np.uint8), []) == []


@pytest.mark.parametrize("planner", GRO_PLANNERS)
def test_gro_long_flow_is_cut_at_the_limits(planner: str) -> None:
    """200 in-order segments: GSO writes of at most 64 segments and 64 KiB, all in order."""
    rng = random.Random(7)
    flow = _flow(rng, v6=True, n=200, mss=1200, sport=3, seq=2**32 - 5000, ip_id=0)
    buf, slots = _layout(flow)
    writes = getattr(gso, planner)(buf, np.frombuffer(buf, np.uint8), slots)
    assert _replay(writes) == flow
    assert len(writes) <= 5


@given(st.booleans(), st.sampled_from([6, 17]), st.integers(0, 255), st.binary(max_size=80))
def test_syn_precheck_never_skips_a_clamp(v6: bool, proto: int, flags: int, payload: bytes) -> None:
    opts = struct.pack("!BBH", 2, 4, 9000)
    pkt = (
        make_packet(v6=v6, proto=proto, payload=payload, flags=flags, opts=opts)
        if proto == 6
        else (make_packet(v6=v6, proto=proto, payload=payload))
    )
    buf = bytearray(pkt) + bytes(64)
    if not gso.may_be_tcp_syn(buf, 0):
        assert not gso.clamp_mss(buf, 0, len(pkt), 500, 500)
    assert gso.may_be_tcp_syn(buf, 0) == (proto == 6 and bool(flags & 0x02))
