"""The edge's seam to its host: what it changes on the machine, and what a connection needs from the daemon.

:class:`HostNetwork` is every change the edge makes to the host's network (addresses, routes,
forwarding, a free device name); :class:`SystemNetwork` is the real one over
:mod:`pyovpn.net.tun`, ``/proc`` and ``/sys``. A test hands the daemon a recording fake instead.
:class:`ServerHost` and :class:`PeerHost` are what the P2MP server and the one-peer connection
use of the daemon that runs them, so neither imports the daemon.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pyovpn.edge.fulltunnel import NetGateway
from pyovpn.net import gateway, routefirst, tun

if TYPE_CHECKING:
    from pyovpn.config import Options
    from pyovpn.datachannel.api import DataChannel
    from pyovpn.proto.session import SessionConfig, TunnelUp
    from pyovpn.scripts import TunParams

SYS_CLASS_NET = "/sys/class/net"


@dataclass(frozen=True)
class ExternalAuth:
    """A management client's answer to `>CLIENT:CONNECT`: accept (with config lines) or deny."""

    accept: bool
    config: tuple[str, ...] = ()  # client-auth's lines: like a client-config-dir file
    reason: str = ""  # client-deny's log reason
    client_reason: str = ""  # what the client is told (AUTH_FAILED,reason)


class HostNetwork(Protocol):
    """What the edge changes on the host; failures raise :class:`pyovpn.errors.BackendError`."""

    def add_address(self, ifname: str, address: str, prefixlen: int, peer: str | None = None) -> None: ...

    def flush_addresses(self, ifname: str) -> None: ...

    def add_route(
        self, ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
    ) -> None: ...

    def del_route(
        self, ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
    ) -> None: ...

    def enable_forwarding(self, ifname: str) -> None: ...

    def free_tun_name(self) -> str: ...


class SystemNetwork:
    """The host's real network: rtnetlink through :mod:`pyovpn.net.tun`, sysctls under ``/proc``."""

    def add_address(self, ifname: str, address: str, prefixlen: int, peer: str | None = None) -> None:
        tun.add_address(ifname, address, prefixlen, peer=peer)

    def flush_addresses(self, ifname: str) -> None:
        tun.flush_addresses(ifname)

    def add_route(
        self, ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
    ) -> None:
        tun.add_route(ifname, network, prefixlen, gateway, metric)

    def del_route(
        self, ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
    ) -> None:
        tun.del_route(ifname, network, prefixlen, gateway, metric)

    def enable_forwarding(self, ifname: str) -> None:
        """Let the kernel forward between clients on the device (client-to-client), IPv4 and IPv6."""
        for path in (
            f"/proc/sys/net/ipv4/conf/{ifname}/forwarding",
            f"/proc/sys/net/ipv6/conf/{ifname}/forwarding",
        ):
            with contextlib.suppress(OSError):
                Path(path).write_text("1\n")

    def add_route_first(
        self, ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
    ) -> None:
        """Add a route as OpenVPN does: in front of an existing one to the same destination."""
        routefirst.add_route_first(ifname, network, prefixlen, gateway, metric)

    def del_route_exact(
        self, ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
    ) -> None:
        """Remove a route added with :meth:`add_route_first` (``ifname`` may be "")."""
        routefirst.del_route_exact(ifname, network, prefixlen, gateway, metric)

    def gateway_to(self, address: str) -> NetGateway | None:
        """How the host reaches ``address`` now: the "net_gateway" of routes and redirect-gateway."""
        found = gateway.route_to(address)
        if found is None:
            return None
        return NetGateway(found.ifname, found.gateway, found.networks, found.default_metric)

    def free_tun_name(self) -> str:
        existing = set(os.listdir(SYS_CLASS_NET)) if os.path.isdir(SYS_CLASS_NET) else set()
        return next(f"tun{i}" for i in range(1024) if f"tun{i}" not in existing)


class _Host(Protocol):
    """What every instance the daemon runs uses of it."""

    @property
    def opts(self) -> Options: ...

    @property
    def session_cfg(self) -> SessionConfig: ...

    @property
    def dc(self) -> DataChannel: ...

    def after_init(self) -> None:
        """The first tunnel is up: drop privileges if configured."""
        ...


class PeerHost(_Host, Protocol):
    """What the one-peer :class:`pyovpn.p2p.Connection` uses of the daemon running it."""

    async def ensure_iface(self, up: TunnelUp, peer: tuple[str, int] | None) -> None:
        """Open the device once, then (re)configure it for these pulled options, running `up`.

        The scripts also learn the server: its address ``peer``, and the certificate details in ``up``.
        """
        ...

    def auth_token_pushed(self, token: str) -> None:
        """The server pushed an auth-token (or renewed it): later logins send it."""
        ...


class ServerHost(_Host, Protocol):
    """What the P2MP :class:`pyovpn.server.multi.MultiServer` uses of the daemon running it."""

    iface: str | None  # the server sets it once the device exists, so the daemon closes it at exit

    @property
    def net(self) -> HostNetwork: ...

    async def run_up(self, params: TunParams, context: str) -> None:
        """The `up` script for the device just opened; failing is fatal."""
        ...

    async def clean_stale_link(self, name: str) -> None:
        """Remove a leftover device of this name from a killed earlier run, if the backend can."""
        ...

    async def external_auth(self, cid: int, kid: int, env: dict[str, str]) -> ExternalAuth:
        """`management-client-auth`: the management client's verdict on a connecting client."""
        ...

    def client_event(self, event: str, cid: int, env: dict[str, str] | None = None) -> None:
        """`>CLIENT:ESTABLISHED|DISCONNECT` for management clients (nothing without management)."""
        ...
