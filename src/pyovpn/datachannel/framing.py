"""OpenVPN's compression framing of data-channel payloads, for both userspace data planes.

Owns the byte layouts of ``comp-lzo`` and ``compress`` (stub, stub-v2, lz4, lz4-v2, lzo) on the
plaintext inside the encryption, as OpenVPN 2.6 writes and reads them with its default
``allow-compression``: outgoing payloads are never compressed (only framed), incoming
compressed payloads are decompressed. LZ4 comes from the ``lz4`` package; LZO decompression
is not available (no maintained wheel), so an LZO-compressed packet is refused with a
:class:`FramingError` that says so. The kernel ``ovpn`` driver knows none of this, which is
why a connection that needs framing runs on a userspace data plane.
"""

from __future__ import annotations

import logging
from typing import Final

from pyovpn.datachannel.api import Framing, Stats
from pyovpn.errors import ProtocolError

__all__ = [
    "MAX_DECOMPRESSED",
    "FramingError",
    "frame_payload",
    "frame_slots",
    "note_framing_error",
    "unframe",
    "unframe_bytes",
]

# comp.h: the framing bytes
NO_COMPRESS_BYTE: Final = 0xFA
NO_COMPRESS_BYTE_SWAP: Final = 0xFB
LZO_COMPRESS_BYTE: Final = 0x66
LZ4_COMPRESS_BYTE: Final = 0x69
V2_INDICATOR: Final = 0x50
V2_UNCOMPRESSED: Final = 0
V2_LZ4: Final = 1
V2_LZO: Final = 2

MAX_DECOMPRESSED: Final = 65535  # one IP packet at most
TAG_ROOM: Final = 16  # encrypt_slots writes the AEAD tag past the last slot


class FramingError(ProtocolError):
    """An incoming payload whose framing is bad or whose compression cannot be undone.

    ``counter`` names the ``Stats.extra`` counter the drop is counted under.
    """

    def __init__(self, message: str, counter: str) -> None:
        super().__init__(message)
        self.counter = counter


_LZO_REFUSED = (
    "the peer sent an LZO-compressed data packet, which pyovpn cannot decompress (no LZO "
    "library is available); it is dropped. Stop compression on the peer: remove `comp-lzo yes`/"
    "`compress lzo` there or set `allow-compression asym` (or `no`) on it"
)


def _lz4_decompress(data: bytes | bytearray) -> bytes:
    import lz4.block  # type: ignore[import-untyped]  # imported on the first compressed packet only

    try:
        out: bytes = lz4.block.decompress(bytes(data), uncompressed_size=MAX_DECOMPRESSED)
    except Exception as e:  # LZ4BlockError is not importable by a stable name
        raise FramingError(f"LZ4 decompression failed: {e}", "rx_bad_compression") from None
    return out


def _put(buf: bytearray, off: int, data: bytes | bytearray, grow: bool) -> int:
    if grow and off + len(data) > len(buf):
        buf.extend(bytes(off + len(data) - len(buf)))
    if off + len(data) > len(buf):
        raise FramingError("decompressed packet does not fit the receive buffer", "rx_bad_compression")
    buf[off : off + len(data)] = data
    return len(data)


def unframe(mode: Framing, buf: bytearray, off: int, n: int, *, grow: bool = False) -> int:
    """Undo the framing of the payload ``buf[off:off+n]`` in place; return its new length.

    ``grow``: a decompressed payload may extend ``buf`` (which must then have no exports).
    Raises :class:`FramingError` (and nothing else) for a bad header or a compressed payload
    that cannot be decompressed; the caller drops the packet.
    """
    if n <= 0 or mode is Framing.NONE:
        return n
    c = buf[off]
    if mode is Framing.LZO_PREFIX:
        if c == NO_COMPRESS_BYTE:
            buf[off : off + n - 1] = buf[off + 1 : off + n]
            return n - 1
        if c == LZO_COMPRESS_BYTE:
            raise FramingError(_LZO_REFUSED, "rx_lzo_unsupported")
        raise FramingError(f"bad comp-lzo framing byte 0x{c:02x}", "rx_bad_framing")
    if mode is Framing.SWAP:
        if c not in (NO_COMPRESS_BYTE_SWAP, LZ4_COMPRESS_BYTE):
            raise FramingError(f"bad compress framing byte 0x{c:02x}", "rx_bad_framing")
        n -= 1
        if n:
            buf[off] = buf[off + n]  # the first payload byte was moved to the end
        if c == LZ4_COMPRESS_BYTE:
            return _put(buf, off, _lz4_decompress(buf[off : off + n]), grow)
        return n
    # Framing.V2: only a payload that starts with the indicator byte carries a header
    if c != V2_INDICATOR:
        return n
    if n < 2:
        raise FramingError("compress v2 header without an algorithm byte", "rx_bad_framing")
    alg = buf[off + 1]
    if alg == V2_UNCOMPRESSED:
        buf[off : off + n - 2] = buf[off + 2 : off + n]
        return n - 2
    if alg == V2_LZ4:
        return _put(buf, off, _lz4_decompress(buf[off + 2 : off + n]), grow)
    if alg == V2_LZO:
        raise FramingError(_LZO_REFUSED, "rx_lzo_unsupported")
    raise FramingError(f"bad compress v2 algorithm byte 0x{alg:02x}", "rx_bad_framing")


def unframe_bytes(mode: Framing, data: bytes | bytearray) -> bytes:
    """The payload of one framed packet (see :func:`unframe`)."""
    if mode is Framing.NONE:
        return bytes(data)
    buf = bytearray(data)
    n = unframe(mode, buf, 0, len(data), grow=True)
    return bytes(buf[:n])


def frame_payload(mode: Framing, payload: bytes | bytearray | memoryview) -> bytes:
    """``payload`` as OpenVPN frames it without compressing."""
    data = bytes(payload)
    if mode is Framing.NONE or not data:
        return data
    if mode is Framing.LZO_PREFIX:
        return bytes((NO_COMPRESS_BYTE,)) + data
    if mode is Framing.SWAP:
        return bytes((NO_COMPRESS_BYTE_SWAP,)) + data[1:] + data[:1]
    if data[0] == V2_INDICATOR:  # escape a payload that would look like a header
        return bytes((V2_INDICATOR, V2_UNCOMPRESSED)) + data
    return data


def frame_slots(mode: Framing, buf: memoryview, offsets: list[int], lengths: list[int], reserve: int) -> None:
    """Frame the payloads laid out for ``KeyState.encrypt_slots`` in place, moving slots apart.

    Slot ``i`` is ``reserve`` bytes then ``lengths[i]`` bytes of payload at ``offsets[i]``;
    framing adds up to two bytes per payload, so every slot moves right by what the slots
    before it grew (last slot first, so nothing is overwritten before it is moved).
    ``offsets`` and ``lengths`` are updated. ValueError if the buffer is too small.
    """
    framed = [
        frame_payload(mode, buf[o + reserve : o + reserve + n]) for o, n in zip(offsets, lengths, strict=True)
    ]
    shifts = []
    shift = 0
    for payload, n in zip(framed, lengths, strict=True):
        shifts.append(shift)
        shift += len(payload) - n
    if offsets and offsets[-1] + shift + reserve + len(framed[-1]) + TAG_ROOM > len(buf):
        raise ValueError("no room to frame the payloads")
    for i in range(len(offsets) - 1, -1, -1):
        start = offsets[i] + shifts[i] + reserve
        buf[start : start + len(framed[i])] = framed[i]
        offsets[i] += shifts[i]
        lengths[i] = len(framed[i])


def note_framing_error(stats: Stats, err: FramingError, log: logging.Logger, who: str, peer_id: int) -> None:
    """Count a dropped packet under its reason; the first of each reason for a peer is logged."""
    stats.dropped_other += 1
    stats.extra[err.counter] = stats.extra.get(err.counter, 0) + 1
    if stats.extra[err.counter] == 1:
        log.warning(
            "%s: peer %d: %s (further such drops are only counted as %s)", who, peer_id, err, err.counter
        )
