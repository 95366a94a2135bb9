"""The ``ovpn`` driver's user API (``linux/ovpn.h``) as pyovpn speaks it.

Family name, version and multicast group, the command ids, the cipher algorithm ids and
the pyroute2 message classes that encode and decode the family's attributes (in the style
of pyroute2's WireGuard module), plus ``IFLA_INFO_DATA`` of an ``ovpn`` link, registered
with pyroute2 so that ``IPRoute.link("add", kind="ovpn", IFLA_OVPN_MODE=...)`` works.
Nothing here opens a socket.
"""

from __future__ import annotations

import struct
import sys

from pyroute2.netlink import NLA_F_NESTED, genlmsg, nla, nla_base_string
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from pyovpn.datachannel.api import Cipher

__all__ = [
    "CIPHER_ALG",
    "OVPN_FAMILY_NAME",
    "OVPN_FAMILY_VERSION",
    "OVPN_LINK_KIND",
    "OVPN_MCGRP_PEERS",
    "OvpnCipherAlg",
    "OvpnCmd",
    "ifla_ovpn_data",
    "ovpnmsg",
]

OVPN_FAMILY_NAME = "ovpn"
OVPN_FAMILY_VERSION = 1
OVPN_MCGRP_PEERS = "peers"
OVPN_LINK_KIND = "ovpn"


class OvpnCmd:
    """``OVPN_CMD_*`` values (names are used in error messages)."""

    PEER_NEW = 1
    PEER_SET = 2
    PEER_GET = 3
    PEER_DEL = 4
    PEER_DEL_NTF = 5
    KEY_NEW = 6
    KEY_GET = 7
    KEY_SWAP = 8
    KEY_SWAP_NTF = 9
    KEY_DEL = 10
    PEER_FLOAT_NTF = 11

    @classmethod
    def name(cls, value: int) -> str:
        for k, v in vars(cls).items():
            if k.isupper() and v == value:
                return k
        return f"command {value}"


class OvpnCipherAlg:
    NONE = 0
    AES_GCM = 1  # AES-128/192/256 chosen by the key length
    CHACHA20_POLY1305 = 2


CIPHER_ALG = {
    Cipher.AES_128_GCM: OvpnCipherAlg.AES_GCM,
    Cipher.AES_256_GCM: OvpnCipherAlg.AES_GCM,
    Cipher.CHACHA20_POLY1305: OvpnCipherAlg.CHACHA20_POLY1305,
}


# pyroute2 has no type information: its classes are Any to mypy, hence the ignores on
# the class lines below.


class _uint(nla_base_string):  # type: ignore[misc]
    """Netlink ``NLA_UINT``: a native-endian unsigned integer of 4 or 8 bytes (decided by
    nla_len). Also used for KEY_ID in KEY_SWAP_NTF, which the kernel sends as u16."""

    __slots__ = ()

    def encode(self) -> None:
        value = int(self.value)
        self["value"] = struct.pack("=I" if value <= 0xFFFFFFFF else "=Q", value)
        nla_base_string.encode(self)

    def decode(self) -> None:
        nla_base_string.decode(self)
        raw = self["value"]
        self.value = int.from_bytes(raw[:8], sys.byteorder) if raw else 0  # type: ignore[misc]  # a slot of pyroute2's base


def _attr_map(prefix: str, *attrs: str) -> tuple[tuple[str, str], ...]:
    """An ``nla_map`` from ``"NAME type"`` words in uapi order; the enum's UNSPEC (0) comes first."""
    words = (attr.split() for attr in attrs)
    return ((f"{prefix}UNSPEC", "none"), *((prefix + name, kind) for name, kind in words))


def _nest(prefix: str, *attrs: str, **nested: type) -> type:
    """The pyroute2 class of a nested attribute set; ``nested`` are the classes its
    attributes of those type names decode with. ``uint`` is the uapi's variable-width integer."""
    body = {"prefix": prefix, "nla_flags": NLA_F_NESTED, "nla_map": _attr_map(prefix, *attrs), "uint": _uint}
    return type(prefix.lower().rstrip("_"), (nla,), {**body, **nested})


_keydir = _nest("OVPN_A_KEYDIR_", "CIPHER_KEY cdata", "NONCE_TAIL cdata")
_keyconf = _nest(
    "OVPN_A_KEYCONF_",
    "PEER_ID uint32",
    "SLOT uint32",
    "KEY_ID uint",  # u32 in requests, u16 in KEY_SWAP_NTF
    "CIPHER_ALG uint32",
    "ENCRYPT_DIR keydir",
    "DECRYPT_DIR keydir",
    keydir=_keydir,
)
_peer = _nest(
    "OVPN_A_PEER_",
    "ID uint32",
    "REMOTE_IPV4 ip4addr",
    "REMOTE_IPV6 ip6addr",
    "REMOTE_IPV6_SCOPE_ID uint32",
    "REMOTE_PORT be16",
    "SOCKET uint32",
    "SOCKET_NETNSID int32",
    "VPN_IPV4 ip4addr",
    "VPN_IPV6 ip6addr",
    "LOCAL_IPV4 ip4addr",
    "LOCAL_IPV6 ip6addr",
    "LOCAL_PORT be16",
    "KEEPALIVE_INTERVAL uint32",
    "KEEPALIVE_TIMEOUT uint32",
    "DEL_REASON uint32",
    "VPN_RX_BYTES uint",
    "VPN_TX_BYTES uint",
    "VPN_RX_PACKETS uint",
    "VPN_TX_PACKETS uint",
    "LINK_RX_BYTES uint",
    "LINK_TX_BYTES uint",
    "LINK_RX_PACKETS uint",
    "LINK_TX_PACKETS uint",
    "TX_ID uint32",
)


class ovpnmsg(genlmsg):  # type: ignore[misc]
    """A message of the ``ovpn`` generic-netlink family."""

    prefix = "OVPN_A_"
    nla_map = _attr_map(prefix, "IFINDEX uint32", "PEER peer", "KEYCONF keyconf")
    peer = _peer
    keyconf = _keyconf


class ifla_ovpn_data(nla):  # type: ignore[misc]
    """``IFLA_INFO_DATA`` of an ``ovpn`` link (pyroute2 does not know the kind)."""

    prefix = "IFLA_OVPN_"
    nla_flags = NLA_F_NESTED
    nla_map = _attr_map(prefix, "MODE uint8")  # a u8: OpenVPN notes wider ints break on big-endian


ifinfmsg.ifinfo.register_link_kind(module={OVPN_LINK_KIND: ifla_ovpn_data})
