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


class _nest(nla):  # type: ignore[misc]
    """A nested attribute set of the family; ``uint`` is the uapi's variable-width integer."""

    nla_flags = NLA_F_NESTED
    uint = _uint


class _keydir(_nest):
    prefix = "OVPN_A_KEYDIR_"
    nla_map = (
        ("OVPN_A_KEYDIR_UNSPEC", "none"),
        ("OVPN_A_KEYDIR_CIPHER_KEY", "cdata"),
        ("OVPN_A_KEYDIR_NONCE_TAIL", "cdata"),
    )


class _keyconf(_nest):
    prefix = "OVPN_A_KEYCONF_"
    keydir = _keydir
    nla_map = (
        ("OVPN_A_KEYCONF_UNSPEC", "none"),
        ("OVPN_A_KEYCONF_PEER_ID", "uint32"),
        ("OVPN_A_KEYCONF_SLOT", "uint32"),
        ("OVPN_A_KEYCONF_KEY_ID", "uint"),  # u32 in requests, u16 in KEY_SWAP_NTF
        ("OVPN_A_KEYCONF_CIPHER_ALG", "uint32"),
        ("OVPN_A_KEYCONF_ENCRYPT_DIR", "keydir"),
        ("OVPN_A_KEYCONF_DECRYPT_DIR", "keydir"),
    )


class _peer(_nest):
    prefix = "OVPN_A_PEER_"
    nla_map = (
        ("OVPN_A_PEER_UNSPEC", "none"),
        ("OVPN_A_PEER_ID", "uint32"),
        ("OVPN_A_PEER_REMOTE_IPV4", "ip4addr"),
        ("OVPN_A_PEER_REMOTE_IPV6", "ip6addr"),
        ("OVPN_A_PEER_REMOTE_IPV6_SCOPE_ID", "uint32"),
        ("OVPN_A_PEER_REMOTE_PORT", "be16"),
        ("OVPN_A_PEER_SOCKET", "uint32"),
        ("OVPN_A_PEER_SOCKET_NETNSID", "int32"),
        ("OVPN_A_PEER_VPN_IPV4", "ip4addr"),
        ("OVPN_A_PEER_VPN_IPV6", "ip6addr"),
        ("OVPN_A_PEER_LOCAL_IPV4", "ip4addr"),
        ("OVPN_A_PEER_LOCAL_IPV6", "ip6addr"),
        ("OVPN_A_PEER_LOCAL_PORT", "be16"),
        ("OVPN_A_PEER_KEEPALIVE_INTERVAL", "uint32"),
        ("OVPN_A_PEER_KEEPALIVE_TIMEOUT", "uint32"),
        ("OVPN_A_PEER_DEL_REASON", "uint32"),
        ("OVPN_A_PEER_VPN_RX_BYTES", "uint"),
        ("OVPN_A_PEER_VPN_TX_BYTES", "uint"),
        ("OVPN_A_PEER_VPN_RX_PACKETS", "uint"),
        ("OVPN_A_PEER_VPN_TX_PACKETS", "uint"),
        ("OVPN_A_PEER_LINK_RX_BYTES", "uint"),
        ("OVPN_A_PEER_LINK_TX_BYTES", "uint"),
        ("OVPN_A_PEER_LINK_RX_PACKETS", "uint"),
        ("OVPN_A_PEER_LINK_TX_PACKETS", "uint"),
        ("OVPN_A_PEER_TX_ID", "uint32"),
    )


class ovpnmsg(genlmsg):  # type: ignore[misc]
    """A message of the ``ovpn`` generic-netlink family."""

    prefix = "OVPN_A_"
    peer = _peer
    keyconf = _keyconf
    nla_map = (
        ("OVPN_A_UNSPEC", "none"),
        ("OVPN_A_IFINDEX", "uint32"),
        ("OVPN_A_PEER", "peer"),
        ("OVPN_A_KEYCONF", "keyconf"),
    )


class ifla_ovpn_data(nla):  # type: ignore[misc]
    """``IFLA_INFO_DATA`` of an ``ovpn`` link (pyroute2 does not know the kind)."""

    prefix = "IFLA_OVPN_"
    nla_flags = NLA_F_NESTED
    nla_map = (
        ("IFLA_OVPN_UNSPEC", "none"),
        ("IFLA_OVPN_MODE", "uint8"),  # must be a u8 (OpenVPN notes wider ints break on big-endian)
    )


ifinfmsg.ifinfo.register_link_kind(module={OVPN_LINK_KIND: ifla_ovpn_data})
