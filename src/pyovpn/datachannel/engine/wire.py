"""The engine's message format: tagged JSON over ``SOCK_SEQPACKET`` unix sockets, fds by SCM_RIGHTS.

One message is one datagram of UTF-8 JSON. The :mod:`pyovpn.datachannel.api` dataclasses and
enums travel as tagged objects, so both ends rebuild exactly the same values and nothing
but those known types can ever be constructed (no pickle):

* dataclass ``{"$d": "NewPeer", "f": {field: value, ...}}`` (only classes listed below)
* enum ``{"$e": "Cipher", "v": "AES-256-GCM"}``
* bytes ``{"$b": "<base64>"}``, tuple ``{"$t": [...]}``, dict ``{"$m": {str: value}}``

File descriptors (the transport socket in ``NewPeer``, the TUN) ride along as SCM_RIGHTS
ancillary data of the message that names them.
"""

from __future__ import annotations

import array
import base64
import dataclasses
import enum
import json
import socket
from typing import Any

from pyovpn.datachannel import api

__all__ = ["MAX_FDS", "MAX_MESSAGE", "decode", "encode", "recv_msg", "send_msg"]

MAX_MESSAGE = 1 << 20
MAX_FDS = 4

_DATACLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
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
}
_ENUMS: dict[str, type[enum.Enum]] = {
    cls.__name__: cls for cls in (api.Cipher, api.IfaceMode, api.KeySlot, api.PeerDelReason, api.Transport)
}


def encode(obj: Any) -> Any:
    """A JSON-ready form of ``obj`` (api dataclasses, enums, bytes, tuples, lists, dicts, scalars)."""
    if isinstance(obj, enum.Enum):
        name = type(obj).__name__
        if name not in _ENUMS:
            raise TypeError(f"cannot encode enum {name}")
        return {"$e": name, "v": obj.value}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, tuple):
        return {"$t": [encode(x) for x in obj]}
    if isinstance(obj, list):
        return [encode(x) for x in obj]
    if isinstance(obj, dict):
        return {"$m": {str(k): encode(v) for k, v in obj.items()}}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if _DATACLASSES.get(name) is not type(obj):
            raise TypeError(f"cannot encode {name}")
        return {"$d": name, "f": {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode(obj: Any) -> Any:
    """The inverse of :func:`encode`; raises ``ValueError`` for anything it does not know."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode(x) for x in obj]
    if isinstance(obj, dict):
        if "$b" in obj:
            return base64.b64decode(obj["$b"], validate=True)
        if "$t" in obj:
            return tuple(decode(x) for x in obj["$t"])
        if "$m" in obj:
            return {k: decode(v) for k, v in obj["$m"].items()}
        if "$e" in obj:
            cls = _ENUMS.get(obj["$e"])
            if cls is None:
                raise ValueError(f"unknown enum {obj['$e']!r}")
            return cls(obj["v"])
        if "$d" in obj:
            dcls = _DATACLASSES.get(obj["$d"])
            if dcls is None:
                raise ValueError(f"unknown type {obj['$d']!r}")
            return dcls(**{k: decode(v) for k, v in obj["f"].items()})
    raise ValueError(f"cannot decode {obj!r:.80}")


def send_msg(sock: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message (a dict whose values are already :func:`encode`-d) with optional fds."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is too large")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message; ``(None, [])`` at EOF. Raises ``BlockingIOError`` when none is queued."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    return json.loads(data), list(fds)
