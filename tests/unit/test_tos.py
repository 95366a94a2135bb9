"""passtos's byte: the IPv4 TOS or the IPv6 traffic class of the packet the TUN gave us."""

from __future__ import annotations

from pyovpn.datachannel.tos import inner_tos


def test_ipv4_tos_and_ipv6_traffic_class_at_any_offset() -> None:
    v4 = bytes([0x45, 0xB8]) + bytes(18)  # DSCP EF, ECN 0
    v6 = bytes([0x6B, 0x80]) + bytes(38)  # traffic class 0xB8 across the first two bytes
    assert inner_tos(v4) == 0xB8
    assert inner_tos(v6) == 0xB8
    assert inner_tos(b"\x00\x00" + v4, 2) == 0xB8
    assert inner_tos(memoryview(b"\xff" + v6), 1) == 0xB8


def test_not_an_ip_packet_or_too_short_is_unmarked() -> None:
    assert inner_tos(b"\x15\xff" + bytes(18)) == 0  # version 1
    assert inner_tos(b"\x45") == 0  # one byte: no TOS to read
    assert inner_tos(b"\x00\x45", 1) == 0
    assert inner_tos(b"") == 0
