"""TUN offloads done in userspace: virtio_net_hdr, Internet checksums, TSO/USO segmentation, TCP GRO.

A TUN opened with ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD(TUN_F_CSUM|TSO4|TSO6|USO4|USO6)`` hands
us super-packets of up to 64 KiB, each preceded by a ``virtio_net_hdr``, and accepts the same
on write. Every packet we put on the wire must still be a normal OpenVPN data packet of at most
the tunnel MTU (the peer may be stock OpenVPN), so the transmit side cuts super-packets into
segments exactly as the kernel's ``tcp_gso_segment``/``__udp_gso_segment`` would (sequence
numbers, IP ids, per-segment lengths, FIN/PSH only on the last segment, CWR only on the first,
full checksums). The receive side does the reverse, like the kernel's ``tcp_gro_receive``:
in-order, same-flow TCP segments whose checksums verify are merged into one GSO write.

The per-segment work is vectorised with numpy: the segments of one super-packet are laid out
as the rows of a 2-D array (one row = one wire slot: ``reserve`` bytes for the OpenVPN header
and tag, then the IP packet), so header fields and checksums of all rows are computed with a
handful of array operations instead of a Python loop per segment.

Checksums are summed in "little-endian word space": the 16-bit one's-complement sum does not
depend on byte order (RFC 1071 section 2(B)), so summing native little-endian words and
writing the folded result back as little-endian bytes gives the correct big-endian field.
Numeric values that enter the sum (lengths, protocol numbers) are byte-swapped first.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

#: a packet buffer as numpy sees it (``np.frombuffer(buf, np.uint8)``) and views of it
U8s = NDArray[np.uint8]
#: per-packet integers (offsets, lengths, sums), widened to int64 before any arithmetic
I64s = NDArray[np.int64]
#: per-packet verdicts
Bools = NDArray[np.bool_]
#: offsets, lengths, header lengths: a Python list or the same as an array
IntSeq = Sequence[int] | NDArray[np.integer[Any]]

__all__ = [
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "VNET_F_DATA_VALID",
    "VNET_F_NEEDS_CSUM",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "ZERO_VNET",
    "Segmenter",
    "checksum",
    "coalesce",
    "coalesce_checked",
    "coalesce_vec",
    "finish_partial",
    "may_be_tcp_syn",
    "ones_sum",
    "verify_l4_checksums",
]

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size  # 10: no num_buffers field (TUNSETVNETHDRSZ left at its default)
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # legacy UFO: never enabled, so never seen
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
ZERO_VNET = bytes(VNET_HDR_LEN)

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80
PROTO_TCP = 6
PROTO_UDP = 17

MAX_GRO_SEGMENTS = 64
MAX_IP_PACKET = 65535

_U16 = struct.Struct("!H")
_V4 = struct.Struct("!BBHHHBBH")  # ver/ihl, tos, tot_len, id, frag, ttl, proto, csum
_TCP = struct.Struct("!HHIIBBH")  # sport, dport, seq, ack, doff, flags, window
# IPv4 (no options) + TCP up to the flags: tos, tot_len, id, frag, ttl, proto, addresses+ports,
# seq, ack, doff, flags
_V4_TCP = struct.Struct("!xBHHHBB2x12sIIBB")
# IPv6 + TCP up to the flags: version/class/flow, payload length, next header, hop limit,
# addresses+ports, seq, ack, doff, flags
_V6_TCP = struct.Struct("!IHBB36sIIBB")


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded 16-bit one's-complement sum of big-endian words (odd length: zero padded).

    Uses ``2**16 ≡ 1 (mod 0xFFFF)``: the sum of the words is the whole buffer read as one
    integer, modulo 0xFFFF (0xFFFF for a non-zero multiple, "negative zero").
    """
    v = int.from_bytes(data, "big")
    if len(data) & 1:
        v <<= 8
    r = v % 0xFFFF
    return r if r or not v else 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data`` plus an already folded ``initial`` sum."""
    s = ones_sum(data) + initial
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo_sum(pkt: bytes | bytearray | memoryview, proto: int, l4_len: int) -> int:
    """Folded sum of the IPv4/IPv6 pseudo header of ``pkt`` (big-endian word space)."""
    addrs = pkt[12:20] if pkt[0] >> 4 == 4 else pkt[8:40]
    s = ones_sum(addrs) + proto + (l4_len >> 16) + (l4_len & 0xFFFF)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _swap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def finish_partial(
    buf: bytearray | memoryview, start: int, end: int, csum_start: int, csum_offset: int
) -> None:
    """Complete a CHECKSUM_PARTIAL packet in ``buf[start:end]`` (``VIRTIO_NET_HDR_F_NEEDS_CSUM``).

    The field at ``csum_start + csum_offset`` holds the pseudo-header sum; the checksum over
    ``csum_start..end`` including it goes into the field (a UDP result of 0 is sent as 0xFFFF).
    """
    cs = start + csum_start
    field = cs + csum_offset
    if cs >= end or field + 2 > end:
        raise ValueError("checksum offsets outside the packet")
    c = ~ones_sum(buf[cs:end]) & 0xFFFF
    if c == 0 and csum_offset == 6:
        c = 0xFFFF
    buf[field] = c >> 8
    buf[field + 1] = c & 0xFF


def _fold(s: I64s) -> I64s:
    """One's-complement fold of positive sums: ``s mod 0xFFFF``, with 0xFFFF for multiples."""
    r = s % 0xFFFF
    r[r == 0] = 0xFFFF
    return r


def _be16(values: I64s, n: int) -> U8s:
    return values.astype(">u2").view(np.uint8).reshape(n, 2)


def _le16(values: I64s, n: int) -> U8s:
    return values.astype("<u2").view(np.uint8).reshape(n, 2)


class _Shape:
    """Per-row values that depend only on how a super-packet is cut (cached per shape)."""

    __slots__ = ("idx", "l4_len_field", "l4_len_sum", "len_field", "lens", "seq_steps")

    def __init__(self, n: int, hl: int, mss: int, rem: int, l4: int, version: int) -> None:
        lens = np.full(n, hl + mss, dtype=np.int64)
        if rem:
            lens[-1] = hl + rem
        self.lens = lens
        self.idx = np.arange(n, dtype=np.int64)
        self.seq_steps = self.idx * mss
        l4_lens = lens - l4
        # IPv4 total length, or IPv6 payload length, as big-endian bytes
        self.len_field = _be16(lens if version == 4 else lens - 40, n)
        self.l4_len_field = _be16(l4_lens, n)
        # the L4 length in the checksum, in little-endian word space
        self.l4_len_sum = ((l4_lens & 0xFF) << 8) + (l4_lens >> 8)


class Segmenter:
    """Cuts TSO/USO super-packets into wire slots inside one output buffer.

    Slot ``i`` of a super-packet starts at ``base + i * stride`` with
    ``stride = reserve + seg_len``: ``reserve`` bytes the caller fills later (OpenVPN header
    and tag), then one complete IP packet. Slots are contiguous, so after in-place
    encryption the whole run is one UDP GSO buffer. The buffer needs 16 spare bytes after
    the last slot (in-place AEAD writes its tag there before it is moved).
    """

    def __init__(self, out: bytearray) -> None:
        self.out = out
        self.onp = np.frombuffer(out, np.uint8)
        self._shapes: dict[tuple[int, int, int, int, int, int, bool], _Shape] = {}

    def segment(
        self,
        src: U8s,
        gso_type: int,
        gso_size: int,
        csum_start: int,
        base: int,
        reserve: int,
    ) -> tuple[int, int, int]:
        """Segment the IP packet ``src`` (a uint8 array); return ``(n, full_len, last_len)``.

        ``full_len`` is the IP length of every slot but the last, ``last_len`` that of the last
        one. Raises ``ValueError`` for a malformed super-packet and ``BufferError`` if it
        does not fit the output buffer.
        """
        gtype = gso_type & ~GSO_ECN
        if gtype in (GSO_TCPV4, GSO_TCPV6):
            tcp = True
        elif gtype == GSO_UDP_L4:
            tcp = False
        else:
            raise ValueError(f"unsupported gso_type {gso_type}")
        total = len(src)
        if total < 28:
            raise ValueError("super-packet too short")
        version = int(src[0]) >> 4
        if version == 4:
            l4 = (int(src[0]) & 0x0F) * 4
            if l4 < 20:
                raise ValueError("bad IPv4 header length")
        elif version == 6:
            l4 = csum_start if csum_start >= 40 else 40
        else:
            raise ValueError(f"IP version {version}")
        if csum_start and csum_start != l4:
            # the kernel's csum_start always points at the L4 header
            l4 = csum_start
        if tcp:
            if l4 + 20 > total:
                raise ValueError("truncated TCP header")
            thl = (int(src[l4 + 12]) >> 4) * 4
            if thl < 20:
                raise ValueError("bad TCP header length")
            check_off = 16
            proto = PROTO_TCP
        else:
            thl = 8
            check_off = 6
            proto = PROTO_UDP
        hl = l4 + thl
        mss = gso_size
        plen = total - hl
        if mss <= 0 or plen <= 0:
            raise ValueError("nothing to segment")
        nfull, rem = divmod(plen, mss)
        n = nfull + (1 if rem else 0)
        stride = reserve + hl + mss
        end = base + n * stride
        if end + 16 > len(self.onp):
            raise BufferError("segment output buffer full")
        rows = self.onp[base:end].reshape(n, stride)
        hdr = bytearray(src[:hl].tobytes())
        if version == 4:
            hdr[10:12] = b"\0\0"
            ip_id = (hdr[4] << 8) | hdr[5]
        hdr[l4 + check_off : l4 + check_off + 2] = b"\0\0"
        pseudo = pseudo_sum(hdr, proto, 0)  # addresses and protocol; lengths added per row
        rows[:, reserve : reserve + hl] = np.frombuffer(hdr, np.uint8)
        pay = src[hl:]
        if nfull:
            rows[:nfull, reserve + hl :] = pay[: nfull * mss].reshape(nfull, mss)
        if rem:
            last = rows[nfull]
            last[reserve + hl : reserve + hl + rem] = pay[nfull * mss :]
            last[reserve + hl + rem :] = 0  # zero padding for the row checksum sums
        r = reserve
        shape = self._shape(n, hl, mss, rem, l4, version, tcp)
        lens = shape.lens
        if version == 4:
            rows[:, r + 2 : r + 4] = shape.len_field
            # ids in sequence from the super-packet's
            rows[:, r + 4 : r + 6] = ((shape.idx + ip_id) & 0xFFFF).astype(">u2").view(np.uint8).reshape(n, 2)
        else:
            rows[:, r + 4 : r + 6] = shape.len_field
        if tcp:
            seq0 = int.from_bytes(hdr[l4 + 4 : l4 + 8], "big")
            seqs = (shape.seq_steps + seq0) & 0xFFFFFFFF
            rows[:, r + l4 + 4 : r + l4 + 8] = seqs.astype(">u4").view(np.uint8).reshape(n, 4)
            flags = hdr[l4 + 13]
            if n > 1:
                col = rows[:, r + l4 + 13]
                col[:] = flags & ~(TCP_FIN | TCP_PSH | TCP_CWR) & 0xFF
                col[0] = flags & ~(TCP_FIN | TCP_PSH) & 0xFF
                col[-1] = flags & ~TCP_CWR & 0xFF
        else:
            rows[:, r + l4 + 4 : r + l4 + 6] = shape.l4_len_field
        # L4 checksums of all rows
        sums = self._row_sums(rows, base, stride, r + l4)
        if sums is None:
            self._slow_checksums(rows, n, lens, r, l4, check_off, proto, version)
            return n, int(lens[0]), int(lens[-1])
        # + pseudo header (addresses, protocol, per-row L4 length), folded and complemented:
        # for s > 0, ~fold(s) & 0xFFFF == 0xFFFE - (s - 1) % 0xFFFF (fold: 0xFFFF for multiples)
        sums += shape.l4_len_sum + (_swap16(pseudo) - 1)
        c = 0xFFFE - sums % 0xFFFF
        if not tcp:
            c[c == 0] = 0xFFFF
        rows[:, r + l4 + check_off : r + l4 + check_off + 2] = c.astype("<u2").view(np.uint8).reshape(n, 2)
        if version == 4:
            # the IPv4 header checksum: only the length and id words differ between rows
            ip16 = rows[:, r + 2 : r + 6].view("<u2")
            hs = ip16[:, 0].astype(np.int64) + ip16[:, 1]
            hs += _swap16(ones_sum(hdr[:2] + bytes(4) + hdr[6:l4])) - 1
            ipc = 0xFFFE - hs % 0xFFFF
            rows[:, r + 10 : r + 12] = ipc.astype("<u2").view(np.uint8).reshape(n, 2)
        return n, int(lens[0]), int(lens[-1])

    def _shape(self, n: int, hl: int, mss: int, rem: int, l4: int, version: int, tcp: bool) -> _Shape:
        key = (n, hl, mss, rem, l4, version, tcp)
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= 256:
                self._shapes.clear()
            shape = self._shapes[key] = _Shape(n, hl, mss, rem, l4, version)
        return shape

    def _row_sums(self, rows: U8s, base: int, stride: int, start: int) -> I64s | None:
        sums: I64s
        if stride % 4 == 0 and base % 4 == 0 and start % 4 == 0:
            sums = rows.view("<u4")[:, start // 4 :].sum(axis=1, dtype=np.int64)
            return sums
        if stride % 2 == 0 and base % 2 == 0 and start % 2 == 0:
            sums = rows.view("<u2")[:, start // 2 :].sum(axis=1, dtype=np.int64)
            return sums
        return None

    @staticmethod
    def _slow_checksums(
        rows: U8s, n: int, lens: I64s, r: int, l4: int, check_off: int, proto: int, version: int
    ) -> None:
        """Per-row checksums in Python, for odd strides numpy cannot view as 16-bit words."""
        for i in range(n):
            ln = int(lens[i])
            row = rows[i]
            pkt = bytearray(row[r : r + ln].tobytes())
            c = checksum(pkt[l4:], pseudo_sum(pkt, proto, ln - l4))
            if c == 0 and proto == PROTO_UDP:
                c = 0xFFFF
            row[r + l4 + check_off] = c >> 8
            row[r + l4 + check_off + 1] = c & 0xFF
            if version == 4:
                ipc = checksum(pkt[:l4])
                row[r + 10] = ipc >> 8
                row[r + 11] = ipc & 0xFF


# ---------------------------------------------------------------------------- receive: GRO


def verify_l4_checksums(
    bnp: U8s,
    offs: IntSeq,
    lens: IntSeq,
    l4s: IntSeq,
    protos: Sequence[int] | int,
) -> Bools:
    """Which packets ``bnp[off:off+len]`` carry a correct TCP/UDP checksum (vectorised).

    Offsets must be even and each packet must be followed by at least one byte the caller
    allows us to zero (odd lengths are padded). Returns a boolean array.
    """
    k = len(offs)
    if not k:
        return np.zeros(0, dtype=bool)
    o = np.asarray(offs, dtype=np.int64)
    ln = np.asarray(lens, dtype=np.int64)
    l4 = np.asarray(l4s, dtype=np.int64)
    ends = o + ln
    if int(ends.max()) + 1 > len(bnp):
        raise ValueError("packets must leave a spare byte before the end of the buffer")
    bnp[ends] = 0  # the spare byte: pads an odd length with zero (unused after an even one)
    v6 = l4 >= 40
    if not ((l4 == 20) | (l4 == 40)).all():
        return _verify_split(bnp, o, ln, l4, ends, v6, protos)
    # IPv4 addresses (12..20) and IPv6 addresses (8..40) run straight into the L4 header,
    # so one range per packet covers the pseudo-header addresses and the whole segment
    idx = np.empty(2 * k, dtype=np.int64)
    idx[0::2] = (o + np.where(v6, 8, 12)) >> 1
    idx[1::2] = (ends + 1) >> 1
    first = int(idx.min())
    last = int(idx.max())
    # widening the words once and summing int64 is about twice as fast as casting per range
    words = bnp[2 * first : 2 * last + 2].view("<u2").astype(np.int64)
    sums = np.add.reduceat(words, idx - first)[0::2]
    l4_len = ln - l4
    pr = np.asarray(protos, dtype=np.int64)
    total = sums + ((l4_len & 0xFF) << 8) + (l4_len >> 8) + (pr << 8)
    ok: Bools = (total % 0xFFFF == 0) & (total != 0)
    return ok


def _verify_split(
    bnp: U8s,
    o: I64s,
    ln: I64s,
    l4: I64s,
    ends: I64s,
    v6: Bools,
    protos: Sequence[int] | int,
) -> Bools:
    """:func:`verify_l4_checksums` for IPv4 headers with options: addresses and L4 summed apart."""
    k = len(o)
    idx = np.empty(4 * k, dtype=np.int64)
    idx[0::4] = np.where(v6, o + 8, o + 12) // 2
    idx[1::4] = np.where(v6, o + 40, o + 20) // 2
    idx[2::4] = (o + l4) // 2
    idx[3::4] = (ends + 1) // 2
    last = int(idx.max())
    words = bnp[: 2 * last + 2].view("<u2")
    sums = np.add.reduceat(words, idx, dtype=np.int64)
    l4_len = ln - l4
    pr = np.asarray(protos, dtype=np.int64)
    total = sums[0::4] + sums[2::4] + ((l4_len & 0xFF) << 8) + (l4_len >> 8) + (pr << 8)
    ok: Bools = (total % 0xFFFF == 0) & (total != 0)
    return ok


class _Run:
    __slots__ = (
        "ack",
        "attrs",
        "count",
        "head_len",
        "head_off",
        "hl",
        "l4",
        "mss",
        "next_id",
        "next_seq",
        "offs",
        "open",
        "opts",
        "payload",
        "pieces",
        "psh",
        "v6",
    )

    # a run of TCP segments of one flow being merged: the first segment's header, what the
    # next segment must look like to join, and the payloads so far
    head_off: int
    head_len: int
    l4: int  # IP header length
    hl: int  # IP + TCP header length
    mss: int
    next_seq: int
    next_id: int
    ack: int
    attrs: int
    opts: bytes | bytearray
    count: int
    payload: int
    psh: bool
    open: bool
    v6: bool
    offs: list[int]
    pieces: list[memoryview]

    def __init__(self) -> None:
        self.pieces = []


def coalesce(
    buf: bytearray, bnp: U8s, slots: Sequence[tuple[int, int]], *, verify: bool = True
) -> list[list[bytes | memoryview]]:
    """Plan TUN writes for decrypted IP packets at ``buf[off:off+len]``: userspace TCP GRO.

    Returns one iovec list per ``writev``, each starting with a ``virtio_net_hdr``. Runs of
    in-order TCP segments of one flow (same addresses, ports, ack, options, TTL/TOS, IP ids
    in sequence or DF set, every segment but the last exactly the first one's size, only
    ACK/PSH flags, checksums correct) become one GSO_TCPV4/V6 super-packet with
    NEEDS_CSUM; everything else is written as it came. Packet order within a flow is kept.
    ``buf`` must have a spare byte after every packet and even slot offsets.

    One pass with a single header unpack per packet plans the merges as if every checksum
    were correct; the segments that were merged are then verified in one vectorised sum, and
    only if one of them is wrong is the batch planned again by :func:`coalesce_checked`,
    which leaves the bad segments unmerged (so the kernel drops them).
    """
    mv = memoryview(buf)
    if len(slots) < 2:  # nothing to merge (a lone ACK, say): written as it came
        return [[ZERO_VNET, mv[off : off + ln]] for off, ln in slots]
    if len(slots) >= VEC_GRO_MIN:
        return coalesce_vec(buf, bnp, slots, verify=verify)
    out: list[list[bytes | memoryview]] = []
    runs: dict[bytes, _Run] = {}
    m_offs: list[int] = []
    m_lens: list[int] = []
    m_l4s: list[int] = []
    v4_tcp = _V4_TCP.unpack_from
    v6_tcp = _V6_TCP.unpack_from

    def flush(run: _Run) -> None:
        if run.count == 1:
            out.append([ZERO_VNET, mv[run.head_off : run.head_off + run.head_len]])
            return
        off, l4, hl = run.head_off, run.l4, run.hl
        m_offs.extend(run.offs)
        m_lens.extend([hl + len(p) for p in run.pieces])
        m_l4s.extend([l4] * run.count)
        h = bytearray(buf[off : off + hl])
        total = hl + run.payload
        if run.v6:
            h[4:6] = _U16.pack(total - 40)
        else:
            h[2:4] = _U16.pack(total)
            h[10:12] = b"\0\0"
            h[10:12] = _U16.pack(checksum(h[:l4]))
        if run.psh:
            h[l4 + 13] |= TCP_PSH
        h[l4 + 16 : l4 + 18] = _U16.pack(pseudo_sum(h, PROTO_TCP, total - l4))
        vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_TCPV6 if run.v6 else GSO_TCPV4, hl, run.mss, l4, 16)
        out.append([vnet + h, *run.pieces])

    for off, ln in slots:
        b0 = buf[off] if ln else 0
        if b0 == 0x45 and ln >= 40:
            tos, tot, ipid, frag, ttl, proto, key, seq, ack, doff, flags = v4_tcp(buf, off)
            if proto != PROTO_TCP or tot != ln or frag & 0x3FFF:
                out.append([ZERO_VNET, mv[off : off + ln]])
                continue
            l4 = 20
            ipattr = (tos << 24) | (ttl << 16) | frag
            df = frag & 0x4000
        elif b0 >> 4 == 6 and ln >= 60:
            vtcfl, plen, nh, hlim, key, seq, ack, doff, flags = v6_tcp(buf, off)
            if nh != PROTO_TCP or plen != ln - 40:
                out.append([ZERO_VNET, mv[off : off + ln]])
                continue
            l4 = 40
            ipattr = (vtcfl << 8) | hlim
            ipid = 0
            df = 1
        else:
            out.append([ZERO_VNET, mv[off : off + ln]])
            continue
        thl = (doff >> 4) * 4
        pl = ln - l4 - thl
        if thl < 20 or pl <= 0 or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
            run = runs.pop(key, None)
            if run is not None:
                flush(run)
            out.append([ZERO_VNET, mv[off : off + ln]])
            continue
        hl = l4 + thl
        opts = buf[off + l4 + 20 : off + hl]
        run = runs.get(key)
        if run is not None:
            if (
                run.open
                and seq == run.next_seq
                and ack == run.ack
                and ipattr == run.attrs
                and pl <= run.mss
                and hl == run.hl
                and opts == run.opts
                and (df or ipid == run.next_id)
                and hl + run.payload + pl <= MAX_IP_PACKET
                and run.count < MAX_GRO_SEGMENTS
            ):
                run.pieces.append(mv[off + hl : off + ln])
                run.offs.append(off)
                run.count += 1
                run.payload += pl
                run.next_seq = (seq + pl) & 0xFFFFFFFF
                run.next_id = (ipid + 1) & 0xFFFF
                if pl < run.mss or flags & TCP_PSH:
                    run.open = False
                    run.psh = bool(flags & TCP_PSH)
                continue
            flush(run)
        run = _Run()
        run.head_off = off
        run.head_len = ln
        run.l4 = l4
        run.hl = hl
        run.mss = pl
        run.next_seq = (seq + pl) & 0xFFFFFFFF
        run.next_id = (ipid + 1) & 0xFFFF
        run.ack = ack
        run.attrs = ipattr
        run.opts = opts
        run.count = 1
        run.payload = pl
        run.psh = bool(flags & TCP_PSH)
        run.open = not run.psh
        run.v6 = l4 == 40
        run.pieces.append(mv[off + hl : off + ln])
        run.offs = [off]
        runs[key] = run
    for run in runs.values():
        flush(run)
    if verify and m_offs and not verify_l4_checksums(bnp, m_offs, m_lens, m_l4s, PROTO_TCP).all():
        return coalesce_checked(buf, bnp, slots, verify=True)
    return out


VEC_GRO_MIN = 128  # from about this many packets the vectorised planner is cheaper per packet
_GRO_COLS = 100  # an IPv6 header and the longest TCP header: every byte a merge compares
_GRO_COL = np.arange(_GRO_COLS, dtype=np.int64)


def _gro_masks() -> U8s:
    """``[v6][header length]``: 0xFF for header bytes that must match between merged segments.

    Zero for the fields that differ from segment to segment (IPv4 total length, id and
    checksum, IPv6 payload length; TCP sequence number, flags, window, checksum, urgent
    pointer) and for everything after the TCP header.
    """
    varying = (
        [2, 3, 4, 5, 10, 11, 24, 25, 26, 27, 33, 34, 35, 36, 37, 38, 39],
        [4, 5, 44, 45, 46, 47, 53, 54, 55, 56, 57, 58, 59],
    )
    masks = np.zeros((2, _GRO_COLS + 1, _GRO_COLS), dtype=np.uint8)
    for v6 in (0, 1):
        for hl in range(_GRO_COLS + 1):
            row = np.full(_GRO_COLS, 0xFF, dtype=np.uint8)
            row[hl:] = 0
            row[varying[v6]] = 0
            masks[v6, hl] = row
    return masks


_GRO_MASKS = _gro_masks()
_window_cache: list[U8s] = []  # [buffer, its sliding-window view]: the worker reuses one buffer


def _windows(bnp: U8s) -> U8s:
    """``sliding_window_view(bnp, _GRO_COLS)``, built once per buffer (it costs more than the gather)."""
    if not _window_cache or _window_cache[0] is not bnp:
        _window_cache[:] = [bnp, sliding_window_view(bnp, _GRO_COLS)]
    return _window_cache[1]


def coalesce_vec(
    buf: bytearray, bnp: U8s, slots: Sequence[tuple[int, int]], *, verify: bool = True
) -> list[list[bytes | memoryview]]:
    """:func:`coalesce` for large batches: the headers of all packets are parsed and compared
    with numpy (one row per packet), so the Python work per packet is one iovec slice.

    Merges runs of *consecutive* segments (a flow whose segments are interleaved with another
    flow's is merged piecewise); the rules are those of :func:`coalesce`, and the output
    keeps the order of ``slots``.
    """
    k = len(slots)
    mv = memoryview(buf)
    if k < 2:
        return [[ZERO_VNET, mv[off : off + ln]] for off, ln in slots]
    sl = np.fromiter(chain.from_iterable(slots), dtype=np.int64, count=2 * k).reshape(k, 2)
    o = sl[:, 0]
    ln = sl[:, 1]
    if int(o.max()) + _GRO_COLS <= len(bnp):  # rows of a sliding-window view: no index arrays
        H = _windows(bnp)[o]
    else:
        H = bnp[np.minimum(o[:, None] + _GRO_COL, len(bnp) - 1)]
    Hi = H[:, :14].astype(np.int64)
    b0 = Hi[:, 0]
    v6 = ((b0 >> 4) == 6) & (Hi[:, 6] == PROTO_TCP) & (ln >= 60) & (((Hi[:, 4] << 8) | Hi[:, 5]) == ln - 40)
    v4 = (b0 == 0x45) & (Hi[:, 9] == PROTO_TCP) & (ln >= 40) & (((Hi[:, 2] << 8) | Hi[:, 3]) == ln)
    v4 &= ((Hi[:, 6] & 0x3F) | Hi[:, 7]) == 0  # not a fragment
    T = np.where(v6[:, None], H[:, 40:54], H[:, 20:34]).astype(np.int64)
    seq = (T[:, 4] << 24) | (T[:, 5] << 16) | (T[:, 6] << 8) | T[:, 7]
    thl = (T[:, 12] >> 4) << 2
    flags = T[:, 13]
    l4 = np.where(v6, 40, 20)
    hl = l4 + thl
    pl = ln - hl
    # TCP with payload, a sane header and only ACK or ACK|PSH
    cand = (v4 | v6) & (thl >= 20) & (pl > 0) & ((flags | TCP_PSH) == (TCP_ACK | TCP_PSH))
    K = H & _GRO_MASKS[v6.astype(np.intp), hl]
    ipid = (Hi[:, 4] << 8) | Hi[:, 5]
    join = (  # join[i]: packet i+1 continues packet i's run
        cand[1:]
        & cand[:-1]
        & (K[1:] == K[:-1]).all(axis=1)
        & (seq[1:] == ((seq[:-1] + pl[:-1]) & 0xFFFFFFFF))
        & (pl[1:] <= pl[:-1])
        & ((flags[:-1] & TCP_PSH) == 0)
        & (v6[1:] | ((Hi[1:, 6] & 0x40) != 0) | (ipid[1:] == ((ipid[:-1] + 1) & 0xFFFF)))
    )
    # a shorter segment is the last of its run: nothing joins behind it
    join[1:] &= ~(join[:-1] & (pl[1:-1] < pl[:-2]))
    if not join.any():
        return [[ZERO_VNET, mv[a : a + b]] for a, b in slots]
    if verify:
        member = np.zeros(k, dtype=bool)
        member[1:] = join
        member[:-1] |= join
        if not verify_l4_checksums(bnp, o[member], ln[member], l4[member], PROTO_TCP).all():
            return coalesce_checked(buf, bnp, slots, verify=True)
    starts = np.flatnonzero(np.concatenate(([True], ~join))).tolist()
    starts.append(k)
    offs = o.tolist()
    lens = ln.tolist()
    hls = hl.tolist()
    pls = pl.tolist()
    v6s = v6.tolist()
    out: list[list[bytes | memoryview]] = []
    for r in range(len(starts) - 1):
        s, e = starts[r], starts[r + 1]
        if e - s == 1:
            out.append([ZERO_VNET, mv[offs[s] : offs[s] + lens[s]]])
            continue
        h_len = hls[s]
        mss = pls[s]
        step = min(MAX_GRO_SEGMENTS, (MAX_IP_PACKET - h_len) // mss)
        for c in range(s, e, step):
            ce = min(c + step, e)
            if ce - c == 1:
                out.append([ZERO_VNET, mv[offs[c] : offs[c] + lens[c]]])
            else:
                out.append(_merged(buf, mv, offs, lens, h_len, c, ce, v6s[c], mss))
    return out


def _merged(
    buf: bytearray,
    mv: memoryview,
    offs: list[int],
    lens: list[int],
    hl: int,
    c: int,
    ce: int,
    v6: bool,
    mss: int,
) -> list[bytes | memoryview]:
    """One GSO write of packets ``c..ce-1`` of a run: the first one's header, everyone's payload."""
    off = offs[c]
    l4 = 40 if v6 else 20
    total = hl + sum(lens[c:ce]) - (ce - c) * hl
    h = bytearray(buf[off : off + hl])
    if v6:
        h[4:6] = _U16.pack(total - 40)
    else:
        h[2:4] = _U16.pack(total)
        h[10:12] = b"\0\0"
        h[10:12] = _U16.pack(checksum(h[:l4]))
    h[l4 + 13] |= buf[offs[ce - 1] + l4 + 13] & TCP_PSH
    h[l4 + 16 : l4 + 18] = _U16.pack(pseudo_sum(h, PROTO_TCP, total - l4))
    vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hl, mss, l4, 16)
    return [vnet + h, *[mv[offs[i] + hl : offs[i] + lens[i]] for i in range(c, ce)]]


def coalesce_checked(
    buf: bytearray, bnp: U8s, slots: Sequence[tuple[int, int]], *, verify: bool = True
) -> list[list[bytes | memoryview]]:
    """Plan TUN writes for decrypted IP packets at ``buf[off:off+len]``: userspace TCP GRO.

    Returns one iovec list per ``writev``, each starting with a ``virtio_net_hdr``. Runs of
    in-order TCP segments of one flow (same addresses, ports, ack, options, TTL/TOS, IP ids
    in sequence or DF set, every segment but the last exactly the first one's size, only
    ACK/PSH flags, checksums correct) become one GSO_TCPV4/V6 super-packet with
    NEEDS_CSUM; everything else is written as it came. Packet order within a flow is kept.
    ``buf`` must have a spare byte after every packet and even slot offsets.

    Checks every checksum before planning; :func:`coalesce` falls back to this when a merged
    segment turns out to be bad.
    """
    mv = memoryview(buf)
    out: list[list[bytes | memoryview]] = []
    parsed: list[tuple[int, int, tuple[bytes, tuple[Any, ...] | None] | None]] = []
    c_offs: list[int] = []
    c_lens: list[int] = []
    c_l4s: list[int] = []
    for off, ln in slots:
        info: tuple[int, object, int, bool, bool] | None = None
        b0 = buf[off] if ln else 0
        if b0 == 0x45 and ln >= 40:
            _vi, tos, tot, ipid, frag, ttl, proto, _c = _V4.unpack_from(buf, off)
            if proto == PROTO_TCP and tot == ln and not frag & 0x3FFF:
                info = (20, (tos, ttl, frag), ipid, bool(frag & 0x4000), False)
        elif (
            b0 >> 4 == 6
            and ln >= 60
            and buf[off + 6] == PROTO_TCP
            and _U16.unpack_from(buf, off + 4)[0] == ln - 40
        ):
            info = (40, bytes(buf[off : off + 4]) + bytes(buf[off + 7 : off + 8]), 0, True, True)
        if info is None:
            parsed.append((off, ln, None))
            continue
        l4, ipattrs, ipid, df, v6 = info
        _sp, _dp, seq, ack, doff, flags, _win = _TCP.unpack_from(buf, off + l4)
        thl = (doff >> 4) * 4
        pl = ln - l4 - thl
        if thl < 20 or pl <= 0 or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
            key = bytes(buf[off + 8 : off + 44]) if v6 else bytes(buf[off + 12 : off + 24])
            parsed.append((off, ln, (key, None)))
            continue
        key = bytes(buf[off + 8 : off + 44]) if v6 else bytes(buf[off + 12 : off + 24])
        attrs = (ipattrs, ack, bytes(buf[off + l4 + 20 : off + l4 + thl]))
        parsed.append((off, ln, (key, (l4, thl, pl, seq, ipid, df, v6, flags, attrs, len(c_offs)))))
        c_offs.append(off)
        c_lens.append(ln)
        c_l4s.append(l4)
    if c_offs:
        if verify and len(c_offs) > 1:  # a lone candidate is written as it came: the kernel checks it
            ok = verify_l4_checksums(bnp, c_offs, c_lens, c_l4s, [PROTO_TCP] * len(c_offs)).tolist()
        else:
            ok = [True] * len(c_offs)
    runs: dict[bytes, _Run] = {}

    def flush(run: _Run) -> None:
        if run.count == 1:
            out.append([ZERO_VNET, mv[run.head_off : run.head_off + run.head_len]])
            return
        off, l4, hl = run.head_off, run.l4, run.hl
        h = bytearray(buf[off : off + hl])
        total = hl + run.payload
        if run.v6:
            h[4:6] = _U16.pack(total - 40)
        else:
            h[2:4] = _U16.pack(total)
            h[10:12] = b"\0\0"
            h[10:12] = _U16.pack(checksum(h[:l4]))
        if run.psh:
            h[l4 + 13] |= TCP_PSH
        h[l4 + 16 : l4 + 18] = _U16.pack(pseudo_sum(h, PROTO_TCP, total - l4))
        gso = 4 if run.v6 else 1
        vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso, hl, run.mss, l4, 16)
        out.append([vnet + h, *run.pieces])

    for off, ln, entry in parsed:
        if entry is None:
            out.append([ZERO_VNET, mv[off : off + ln]])
            continue
        key, seg = entry
        run = runs.get(key)
        if seg is None or not ok[seg[9]]:
            if run is not None:
                flush(run)
                del runs[key]
            out.append([ZERO_VNET, mv[off : off + ln]])
            continue
        l4, thl, pl, seq, ipid, df, v6, flags, attrs, _ci = seg
        if run is not None:
            if (
                run.open
                and seq == run.next_seq
                and attrs == run.attrs
                and pl <= run.mss
                and thl + l4 == run.hl
                and (df or ipid == run.next_id)
                and run.hl + run.payload + pl <= MAX_IP_PACKET
                and run.count < MAX_GRO_SEGMENTS
            ):
                run.pieces.append(mv[off + l4 + thl : off + ln])
                run.count += 1
                run.payload += pl
                run.next_seq = (seq + pl) & 0xFFFFFFFF
                run.next_id = (ipid + 1) & 0xFFFF
                if pl < run.mss or flags & TCP_PSH:
                    run.open = False
                    run.psh = bool(flags & TCP_PSH)
                continue
            flush(run)
        run = _Run()
        run.head_off = off
        run.head_len = ln
        run.l4 = l4
        run.hl = l4 + thl
        run.mss = pl
        run.next_seq = (seq + pl) & 0xFFFFFFFF
        run.next_id = (ipid + 1) & 0xFFFF
        run.attrs = attrs
        run.count = 1
        run.payload = pl
        run.psh = bool(flags & TCP_PSH)
        run.open = not run.psh
        run.v6 = v6
        run.pieces.append(mv[off + l4 + thl : off + ln])
        runs[key] = run
    for run in runs.values():
        flush(run)
    return out


# ---------------------------------------------------------------------------- MSS clamping


def may_be_tcp_syn(buf: bytearray, off: int) -> bool:
    """A cheap pre-check for :func:`clamp_mss`: False only for packets it would leave alone.

    Looks at the protocol and the TCP SYN flag where they are for IPv4 without options and
    IPv6 (other IPv4 header lengths: True). May read up to 54 bytes past ``off`` whatever
    the packet's length, so the buffer must extend that far.
    """
    b0 = buf[off]
    if b0 == 0x45:
        return buf[off + 9] == PROTO_TCP and bool(buf[off + 33] & TCP_SYN)
    if b0 >> 4 == 6:
        return buf[off + 6] == PROTO_TCP and bool(buf[off + 53] & TCP_SYN)
    return b0 >> 4 == 4


def clamp_mss(buf: bytearray, off: int, ln: int, mss4: int, mss6: int) -> bool:
    """Lower the MSS option of a TCP SYN in ``buf[off:off+ln]`` to ``mss4``/``mss6`` (0: leave).

    OpenVPN's ``mssfix``: both ends of a TCP connection through the tunnel then size their
    segments so the encrypted packet fits the outer path without IP fragmentation. The TCP
    checksum is updated incrementally (RFC 1624), so a packet that arrived with a wrong
    checksum keeps a wrong one. Returns True if the packet was changed.
    """
    if ln < 40:
        return False
    b0 = buf[off]
    if b0 >> 4 == 4:
        l4 = (b0 & 0x0F) * 4
        if buf[off + 9] != PROTO_TCP or l4 < 20 or (buf[off + 6] & 0x3F) or buf[off + 7]:
            return False  # not TCP, or a fragment
        limit = mss4
    elif b0 >> 4 == 6:
        if buf[off + 6] != PROTO_TCP:
            return False
        l4 = 40
        limit = mss6
    else:
        return False
    t = off + l4
    if not limit or ln < l4 + 20 or not buf[t + 13] & TCP_SYN:
        return False
    thl = (buf[t + 12] >> 4) * 4
    if thl <= 20 or l4 + thl > ln:
        return False
    i = t + 20
    end = t + thl
    while i < end:
        kind = buf[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        olen = buf[i + 1]
        if olen < 2 or i + olen > end:
            break
        if kind == 2 and olen == 4:
            old = (buf[i + 2] << 8) | buf[i + 3]
            if old <= limit:
                return False
            buf[i + 2] = limit >> 8
            buf[i + 3] = limit & 0xFF
            m_old, m_new = old, limit
            if (i + 2 - t) & 1:  # the value straddles two 16-bit words of the checksum
                m_old, m_new = _swap16(m_old), _swap16(m_new)
            hc = (buf[t + 16] << 8) | buf[t + 17]
            s = (~hc & 0xFFFF) + (~m_old & 0xFFFF) + m_new
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            hc = ~s & 0xFFFF
            buf[t + 16] = hc >> 8
            buf[t + 17] = hc & 0xFF
            return True
        i += olen
    return False
