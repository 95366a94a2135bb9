"""The engine's message format: binary frames over ``SOCK_SEQPACKET`` unix sockets, fds by SCM_RIGHTS.

One message is one datagram: a 5-byte header (``kind`` u8, request id u32, little endian)
and a body. Most kinds carry one tagged value (see :func:`pack_value`): ``None``, bools,
64-bit ints, floats, UTF-8 strings, raw bytes, tuples, lists, string-keyed dicts, and the
:mod:`pyovpn.datachannel.api` enums and dataclasses listed below, so both ends rebuild
exactly the same values and nothing but those known types can ever be constructed.

The control-packet kinds have a fixed layout of their own, because they are the hot path
between a worker and the proxy: ``CONTROL`` (a received packet: peer id, source address,
the packet's bytes raw to the end of the datagram) and ``SEND_CONTROL`` (peer id, packet).

File descriptors (the transport socket in ``NewPeer``, the TUN, the workers' direct
sockets) ride along as SCM_RIGHTS ancillary data of the message that names them.

Messages that are ready in the same event-loop turn go out together as one ``BATCH``
datagram (:class:`Outbox`, read back by :func:`recv_all`): a server connecting dozens of
clients at once would otherwise pay a send, a wakeup and a receive per message in every
process on the path. A batch is a sequence of items, each a u32 length, a u8 count of the
datagram's fds that belong to it (in order) and one whole message as above.

Decoding never trusts its input: anything malformed raises :class:`pyovpn.errors.ProtocolError`.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import enum
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from pyovpn.datachannel import api
from pyovpn.errors import ProtocolError
from pyovpn.net import rxbuf

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE",
    "Kind",
    "Message",
    "Outbox",
    "pack",
    "pack_value",
    "recv",
    "recv_all",
    "send",
    "unpack",
    "unpack_batch",
    "unpack_value",
]

MAX_MESSAGE = 1 << 20
MAX_FDS = 253  # the kernel's own limit per message (SCM_MAX_FD); READY carries one per worker
_MAX_DEPTH = 16


class Kind(enum.IntEnum):
    """What a message is; the id pairs a reply with its request (0 where there is none)."""

    REQUEST = 1  # body: {"op": name, **arguments}
    OK = 2  # body: the result
    ERR = 3  # body: the error text
    EVENT = 4  # worker -> controller, body: {"ev": name, ...}
    NOTE = 5  # engine -> proxy, body: an api notification
    READY = 6  # controller -> proxy once the workers run, body: a dict; fds: the workers' direct sockets
    CONTROL = 7  # worker -> proxy: a received control packet (body: api.ControlPacket)
    SEND_CONTROL = 8  # proxy -> worker: send a control packet (body: api.SendControl)
    BATCH = 9  # several messages in one datagram (see Outbox); never nested


class Message(NamedTuple):
    kind: Kind
    rid: int
    body: Any


_HEADER = struct.Struct("<BI")
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_ITEM = struct.Struct("<IB")  # BATCH item: length of the message, how many of the fds are its own
_BATCH_BYTES = 32 << 10  # a batch datagram stays well below a unix socket's default send buffer
_CONTROL = struct.Struct("<IBH")  # peer id, length of the source address text (0: none), port
_PEER = struct.Struct("<I")

_T_NONE, _T_FALSE, _T_TRUE, _T_INT, _T_FLOAT, _T_STR, _T_BYTES = range(7)
_T_TUPLE, _T_LIST, _T_DICT, _T_ENUM, _T_DATACLASS = range(7, 12)

_DATACLASSES: tuple[type, ...] = (
    api.NewIface,
    api.DelIface,
    api.NewPeer,
    api.SetPeer,
    api.GetPeer,
    api.DelPeer,
    api.KeyDirection,
    api.NewKey,
    api.DelKey,
    api.SwapKeys,
    api.GetKey,
    api.SendControl,
    api.PeerInfo,
    api.KeyInfo,
    api.PeerDeleted,
    api.KeyExhausted,
    api.PeerFloated,
    api.ControlPacket,
    api.Stats,
)
_DATACLASS_INDEX = {cls: i for i, cls in enumerate(_DATACLASSES)}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _DATACLASSES}
_ENUMS: tuple[type[enum.Enum], ...] = (
    api.Cipher,
    api.IfaceMode,
    api.KeySlot,
    api.PeerDelReason,
    api.Transport,
    api.Framing,
)
_ENUM_INDEX = {cls: i for i, cls in enumerate(_ENUMS)}


# ---------------------------------------------------------------------------------- values


def pack_value(obj: object) -> bytes:
    """The tagged binary form of ``obj``; ``TypeError`` for anything not listed in the module doc."""
    out = bytearray()
    _pack(obj, out, 0)
    return bytes(out)


_TAG_INT = struct.Struct("<Bq")
_TAG_FLOAT = struct.Struct("<Bd")
_TAG_LEN = struct.Struct("<BI")
_STR_CACHE: dict[str, bytes] = {}  # the encoded form of short strings: dict keys and op names repeat
_STR_CACHE_MAX = 4096


def _pack(obj: object, out: bytearray, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(obj)
    # the exact types first: they are most of every message, and one identity test is cheaper
    # than the isinstance chain below (subclasses are packed as their base type's value)
    if kind is str:
        enc = _STR_CACHE.get(obj)  # type: ignore[call-overload]
        if enc is None:
            raw = obj.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
            enc = _TAG_LEN.pack(_T_STR, len(raw)) + raw
            if len(raw) <= 32 and len(_STR_CACHE) < _STR_CACHE_MAX:
                _STR_CACHE[obj] = enc  # type: ignore[index]
        out += enc
    elif kind is int:
        try:
            out += _TAG_INT.pack(_T_INT, obj)
        except struct.error:
            raise TypeError(f"integer {obj} does not fit 64 bits") from None
    elif kind is dict:
        out += _TAG_LEN.pack(_T_DICT, len(obj))  # type: ignore[arg-type]
        for key, value in obj.items():  # type: ignore[attr-defined]
            if not isinstance(key, str):
                raise TypeError(f"dict key {key!r} is not a string")
            _pack(key, out, depth + 1)
            _pack(value, out, depth + 1)
    elif obj is None:
        out.append(_T_NONE)
    elif obj is True:
        out.append(_T_TRUE)
    elif obj is False:
        out.append(_T_FALSE)
    elif isinstance(obj, enum.Enum):
        index = _ENUM_INDEX.get(type(obj))
        if index is None:
            raise TypeError(f"cannot encode enum {type(obj).__name__}")
        out += _U8.pack(_T_ENUM) + _U8.pack(index)
        _pack(obj.value, out, depth + 1)
    elif isinstance(obj, str):
        _pack(str.__str__(obj), out, depth)
    elif isinstance(obj, int):
        _pack(int.__int__(obj), out, depth)
    elif isinstance(obj, dict):
        _pack(dict(obj), out, depth)
    elif isinstance(obj, float):
        out += _TAG_FLOAT.pack(_T_FLOAT, obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        out += _TAG_LEN.pack(_T_BYTES, len(obj))
        out += obj
    elif isinstance(obj, (tuple, list)):
        out += _TAG_LEN.pack(_T_TUPLE if isinstance(obj, tuple) else _T_LIST, len(obj))
        for item in obj:
            _pack(item, out, depth + 1)
    else:
        index = _DATACLASS_INDEX.get(type(obj))
        if index is None:
            raise TypeError(f"cannot encode {type(obj).__name__}")
        names = _FIELDS[type(obj)]
        out += _U8.pack(_T_DATACLASS) + _U8.pack(index) + _U8.pack(len(names))
        for name in names:
            _pack(getattr(obj, name), out, depth + 1)


def unpack_value(data: bytes | bytearray | memoryview) -> Any:
    """The inverse of :func:`pack_value`; ``ProtocolError`` for anything malformed or left over."""
    mv = memoryview(data)
    value, end = _unpack(mv, 0, 0)
    if end != len(mv):
        raise ProtocolError(f"{len(mv) - end} bytes after the value")
    return value


def _take(mv: memoryview, pos: int, n: int) -> int:
    end = pos + n
    if end > len(mv):
        raise ProtocolError(f"value truncated at byte {pos} (need {n} more, have {len(mv) - pos})")
    return end


def _unpack(mv: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise ProtocolError("value nested too deeply")
    end = _take(mv, pos, 1)
    tag = mv[pos]
    pos = end
    # the common tags first, each with its bounds checked before it is read
    if tag in (_T_STR, _T_BYTES):
        end = _take(mv, pos, 4)
        end = _take(mv, end, _U32.unpack_from(mv, pos)[0])
        if tag == _T_BYTES:
            return bytes(mv[pos + 4 : end]), end
        return _text(mv, pos + 4, end), end
    if tag == _T_INT:
        end = _take(mv, pos, 8)
        return _I64.unpack_from(mv, pos)[0], end
    if tag == _T_NONE:
        return None, pos
    if tag in (_T_FALSE, _T_TRUE):
        return tag == _T_TRUE, pos
    if tag == _T_FLOAT:
        end = _take(mv, pos, 8)
        return _F64.unpack_from(mv, pos)[0], end
    if tag in (_T_TUPLE, _T_LIST, _T_DICT):
        end = _take(mv, pos, 4)
        (n,) = _U32.unpack_from(mv, pos)
        pos = end
        # each item takes at least one byte: a count beyond the rest is a lie, not an allocation
        _take(mv, pos, n)
        if tag == _T_DICT:
            return _unpack_dict(mv, pos, n, depth)
        seq = []
        for _ in range(n):
            item, pos = _unpack(mv, pos, depth + 1)
            seq.append(item)
        return (tuple(seq) if tag == _T_TUPLE else seq), pos
    if tag == _T_ENUM:
        end = _take(mv, pos, 1)
        index = mv[pos]
        if index >= len(_ENUMS):
            raise ProtocolError(f"unknown enum {index}")
        value, pos = _unpack(mv, end, depth + 1)
        try:
            return _ENUMS[index](value), pos
        except (ValueError, TypeError):
            raise ProtocolError(f"{value!r:.40} is not a {_ENUMS[index].__name__}") from None
    if tag == _T_DATACLASS:
        end = _take(mv, pos, 2)
        index, count = mv[pos], mv[pos + 1]
        if index >= len(_DATACLASSES):
            raise ProtocolError(f"unknown type {index}")
        cls = _DATACLASSES[index]
        if count != len(_FIELDS[cls]):
            raise ProtocolError(f"{cls.__name__} needs {len(_FIELDS[cls])} fields, not {count}")
        pos = end
        values = []
        for _ in range(count):
            value, pos = _unpack(mv, pos, depth + 1)
            values.append(value)
        try:
            return cls(*values), pos
        except Exception as e:  # a field check of the dataclass itself
            raise ProtocolError(f"bad {cls.__name__}: {e}") from None
    raise ProtocolError(f"unknown value tag {tag}")


def _text(mv: memoryview, start: int, end: int) -> str:
    try:
        return str(mv[start:end], "utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise ProtocolError("a string is not UTF-8") from None


def _unpack_dict(mv: memoryview, pos: int, n: int, depth: int) -> tuple[dict[str, Any], int]:
    """A dict's ``n`` items from ``pos``. Its keys, and the ints, strings, None and bools among
    its values, are read here rather than by a call each: they are most of a request's values
    (an ``add_peer`` has about 25 items), and a call costs more than the read itself."""
    items: dict[str, Any] = {}
    size = len(mv)
    for _ in range(n):
        if pos + 5 > size or mv[pos] != _T_STR:
            raise ProtocolError(f"a dict key at byte {pos} is not a whole string")
        start = pos + 5
        pos = start + _U32.unpack_from(mv, pos + 1)[0]
        if pos >= size:  # the key and at least its value's tag
            raise ProtocolError(f"dict item truncated at byte {start}")
        key = _text(mv, start, pos)
        tag = mv[pos]
        if tag == _T_INT and pos + 9 <= size:
            items[key] = _I64.unpack_from(mv, pos + 1)[0]
            pos += 9
        elif tag == _T_NONE:
            items[key] = None
            pos += 1
        elif tag in (_T_TRUE, _T_FALSE):
            items[key] = tag == _T_TRUE
            pos += 1
        elif tag == _T_STR and pos + 5 <= size:
            start = pos + 5
            pos = start + _U32.unpack_from(mv, pos + 1)[0]
            if pos > size:
                raise ProtocolError(f"a string at byte {start} is truncated")
            items[key] = _text(mv, start, pos)
        else:
            items[key], pos = _unpack(mv, pos, depth + 1)
    return items, pos


# ---------------------------------------------------------------------------------- messages


def pack(kind: Kind, rid: int, body: object) -> bytes:
    """One datagram; ``TypeError`` if the body does not suit the kind or cannot be encoded."""
    head = _HEADER.pack(kind, rid & 0xFFFFFFFF)
    if kind is Kind.CONTROL:
        if not isinstance(body, api.ControlPacket):
            raise TypeError("a CONTROL message carries an api.ControlPacket")
        ip, port = (body.remote[0].encode("ascii"), body.remote[1]) if body.remote else (b"", 0)
        return head + _CONTROL.pack(body.peer_id, len(ip), port) + ip + body.packet
    if kind is Kind.SEND_CONTROL:
        if not isinstance(body, api.SendControl):
            raise TypeError("a SEND_CONTROL message carries an api.SendControl")
        return head + _PEER.pack(body.peer_id) + body.packet
    return head + pack_value(body)


def unpack(data: bytes | bytearray | memoryview) -> Message:
    """The message in one datagram; ``ProtocolError`` for anything malformed."""
    mv = memoryview(data)
    if len(mv) < _HEADER.size:
        raise ProtocolError(f"message of {len(mv)} bytes is shorter than its header")
    raw_kind, rid = _HEADER.unpack_from(mv, 0)
    try:
        kind = Kind(raw_kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {raw_kind}") from None
    pos = _HEADER.size
    if kind is Kind.CONTROL:
        end = _take(mv, pos, _CONTROL.size)
        peer_id, ip_len, port = _CONTROL.unpack_from(mv, pos)
        pos, end = end, _take(mv, end, ip_len)
        remote: api.Address | None = None
        if ip_len:
            try:
                remote = (str(mv[pos:end], "ascii"), port)
            except UnicodeDecodeError:
                raise ProtocolError("a control packet's source address is not ASCII") from None
        return Message(kind, rid, api.ControlPacket(peer_id, bytes(mv[end:]), remote))
    if kind is Kind.SEND_CONTROL:
        end = _take(mv, pos, _PEER.size)
        (peer_id,) = _PEER.unpack_from(mv, pos)
        return Message(kind, rid, api.SendControl(peer_id, bytes(mv[end:])))
    if kind is Kind.BATCH:
        raise ProtocolError("a batch is read with unpack_batch")
    return Message(kind, rid, unpack_value(mv[pos:]))


def unpack_batch(data: bytes | bytearray | memoryview, nfds: int) -> list[tuple[Message, int]]:
    """The messages of one datagram and how many of its ``nfds`` fds each owns, in order.

    A plain message is a batch of one. ``ProtocolError`` for anything malformed, including
    fd counts that do not add up to ``nfds``.
    """
    mv = memoryview(data)
    if len(mv) < _HEADER.size:
        raise ProtocolError(f"message of {len(mv)} bytes is shorter than its header")
    if mv[0] != Kind.BATCH:
        return [(unpack(mv), nfds)]
    out: list[tuple[Message, int]] = []
    pos = _HEADER.size
    owned = 0
    while pos < len(mv):
        end = _take(mv, pos, _ITEM.size)
        size, count = _ITEM.unpack_from(mv, pos)
        pos, end = end, _take(mv, end, size)
        msg = unpack(mv[pos:end])  # a BATCH inside is refused there
        owned += count
        out.append((msg, count))
        pos = end
    if not out:
        raise ProtocolError("an empty batch")
    if owned != nfds:
        raise ProtocolError(f"a batch's messages own {owned} fds, {nfds} came with it")
    return out


def send(sock: socket.socket, kind: Kind, rid: int, body: object, fds: Sequence[int] = ()) -> None:
    """Send one message with optional fds (``BlockingIOError`` if a non-blocking socket is full)."""
    data = pack(kind, rid, body)
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is too large")
    _send_datagram(sock, data, fds)


def _send_datagram(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


class Outbox:
    """Messages waiting to go to one socket; :meth:`flush` sends them in as few datagrams as fit.

    Each message is packed when added, so a body that cannot be encoded fails at its sender,
    and its fds are duplicated, so the sender may close its own copies at once (the copies
    here are closed once sent or dropped). A flush that stops early (``BlockingIOError`` from
    a full non-blocking socket, or any other ``OSError``) keeps what is unsent, in order, and
    raises. ``wait``: block until the socket takes everything, then leave it non-blocking
    again (the engine's sockets are non-blocking for reading, but nothing sent is dropped).
    """

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[bytes, tuple[int, ...], int]] = []  # message, its fds, its id

    def __len__(self) -> int:
        return len(self.items)

    def add(self, kind: Kind, rid: int, body: object, fds: Sequence[int] = ()) -> None:
        if kind is Kind.BATCH:
            raise TypeError("a batch is made by the outbox")
        data = pack(kind, rid, body)
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"message of {len(data)} bytes is too large")
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} fds do not fit one message")
        own: list[int] = []
        try:
            for fd in fds:
                own.append(os.dup(fd))
        except OSError:
            for fd in own:
                os.close(fd)
            raise
        self.items.append((data, tuple(own), rid))

    def flush(self, sock: socket.socket, *, wait: bool = False) -> None:
        if not wait:
            self._send(sock)
            return
        try:
            sock.setblocking(True)
            self._send(sock)
        finally:
            with contextlib.suppress(OSError):
                sock.setblocking(False)

    def _send(self, sock: socket.socket) -> None:
        items = self.items
        while items:
            # the longest run from the head that fits one datagram (a big message goes alone)
            n, size, nfds = 1, _HEADER.size + _ITEM.size + len(items[0][0]), len(items[0][1])
            while n < len(items):
                data, fds, _rid = items[n]
                if size + _ITEM.size + len(data) > _BATCH_BYTES or nfds + len(fds) > MAX_FDS:
                    break
                size += _ITEM.size + len(data)
                nfds += len(fds)
                n += 1
            if n == 1:
                datagram, all_fds = items[0][0], items[0][1]
            else:
                parts = [_HEADER.pack(Kind.BATCH, 0)]
                fd_list: list[int] = []
                for data, fds, _rid in items[:n]:
                    parts.append(_ITEM.pack(len(data), len(fds)))
                    parts.append(data)
                    fd_list.extend(fds)
                datagram, all_fds = b"".join(parts), tuple(fd_list)
            _send_datagram(sock, datagram, all_fds)
            for fd in all_fds:
                os.close(fd)
            del items[:n]

    def take(self) -> list[int]:
        """Forget every queued message (its socket is gone); their request ids."""
        rids = []
        for _data, fds, rid in self.items:
            rids.append(rid)
            for fd in fds:
                os.close(fd)
        self.items.clear()
        return rids


def recv_all(sock: socket.socket) -> list[tuple[Message, list[int]]] | None:
    """Receive one datagram: its messages with their fds (a plain message is a list of one).

    ``None`` at EOF; ``BlockingIOError`` when nothing is queued; a malformed datagram raises
    ``ProtocolError`` after closing every fd that came with it.
    """
    return _receive(sock, _split_batch)


def _split_batch(data: bytes, fds: list[int]) -> list[tuple[Message, list[int]]]:
    out = []
    pos = 0
    for msg, count in unpack_batch(data, len(fds)):
        out.append((msg, fds[pos : pos + count]))
        pos += count
    return out


def recv(sock: socket.socket) -> tuple[Message | None, list[int]]:
    """Receive one message; ``(None, [])`` at EOF. Raises ``BlockingIOError`` when none is queued.

    A malformed message (a batch too) raises ``ProtocolError`` after closing any fds that came
    with it.
    """
    got = _receive(sock, lambda data, fds: (unpack(data), fds))
    return got if got is not None else (None, [])


_T = TypeVar("_T")


def _receive(sock: socket.socket, decode: Callable[[bytes, list[int]], _T]) -> _T | None:
    """One datagram, decoded with its fds; None at EOF. The fds are closed unless decoded."""
    data, fds, flags, _addr = rxbuf.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError(f"a message longer than {MAX_MESSAGE} bytes or with more than {MAX_FDS} fds")
        if data:
            return decode(data, fds)
    except ProtocolError:
        for fd in fds:
            socket.close(fd)
        raise
    for fd in fds:  # EOF
        socket.close(fd)
    return None
