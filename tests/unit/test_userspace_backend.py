"""Tests of the in-process userspace data channel (``UserspaceDataChannel``) that need no root.

Its scenarios in network namespaces (UDP and TCP tunnels, rekey, float, keepalive, key
exhaustion) are the backend contract suite every backend runs: tests/contract; multipoint
mode: test_userspace_mp.py.
"""

from __future__ import annotations

import asyncio

import pytest

from pyovpn.datachannel.api import (
    DelIface,
    GetPeer,
    IfaceMode,
    NewIface,
    NewPeer,
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.userspace import UserspaceDataChannel
from pyovpn.errors import BackendError
from pyovpn.net import tun

# ---------------------------------------------------------------------------- tests without root


def test_commands_fail_cleanly_without_interface() -> None:
    async def body() -> None:
        b = UserspaceDataChannel()
        with pytest.raises(BackendError, match="GetPeer: unknown peer id 3"):
            await b.request(GetPeer(3))
        with pytest.raises(BackendError, match="NewPeer: no interface"):
            await b.request(NewPeer(1, 0, Transport.UDP, ("192.0.2.1", 1194)))
        with pytest.raises(BackendError, match="NewIface: MTU 10 out of range"):
            await b.request(NewIface("tun", IfaceMode.MP, 10))
        with pytest.raises(BackendError, match="DelIface: no interface"):
            await b.request(DelIface("tun9"))
        with pytest.raises(BackendError, match="SwapKeys: unknown peer"):
            await b.request(SwapKeys(1))
        await b.close()
        with pytest.raises(BackendError, match="closed"):
            await b.request(GetPeer(1))

    asyncio.run(body())


def test_tun_helpers_validate_input() -> None:
    with pytest.raises(BackendError, match="too long"):
        tun.open_tun("a-very-long-interface-name")
    with pytest.raises(BackendError, match="not an IP address"):
        tun.add_address("lo", "not-an-ip", 24)
    with pytest.raises(BackendError, match="families differ"):
        tun.add_route("lo", "10.0.0.0", 8, gateway="fd00::1")
    with pytest.raises(BackendError, match="MTU"):
        tun.configure_link("lo", 10)
