"""The P2P/client device's routes over the daemon's life: planned from the options and the push,
applied through the host seam with a journal, kept across a restart that changes nothing, and
undone on reconfiguration and at exit (or, after a crash, at the next start).

``plan`` stays readable after configuration even with `route-noexec`, for whoever exports the
routes to scripts.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from pyovpn.config import Options
from pyovpn.edge.fulltunnel import FindsGateways, NetGateway, RoutePlan, inputs_for, plan_routes
from pyovpn.edge.host import HostNetwork
from pyovpn.edge.routejournal import RouteJournal, journal_path, replay_stale
from pyovpn.proto.push import PushedOptions

log = logging.getLogger("pyovpn")


def _plain_ip(address: str | None) -> str | None:
    """The remote's address as routes need it (an IPv4-mapped IPv6 address is IPv4)."""
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class ClientRoutes:
    """``journal_dir`` None: no journal on disk (a fake host in tests)."""

    def __init__(self, net: HostNetwork, journal_dir: Path | None) -> None:
        self.net = net
        self.journal_dir = journal_dir
        self.plan: RoutePlan | None = None
        self._journal: RouteJournal | None = None
        self._key: object = None

    def replay_stale(self, ifname: str) -> None:
        """Undo what a killed earlier run left in the journal for this device."""
        if self.journal_dir is not None:
            replay_stale(self.net, journal_path(self.journal_dir, ifname))

    def _lookup(self, address: str) -> NetGateway | None:
        return self.net.gateway_to(address) if isinstance(self.net, FindsGateways) else None

    def configure(
        self, opts: Options, pushed: PushedOptions | None, ifname: str, remote: str | None, *, force: bool
    ) -> None:
        """Make the host's routes those of this configuration; unchanged ones stay unless ``force``."""
        remote_host = _plain_ip(remote)
        key = (ifname, remote_host, pushed)
        if not force and key == self._key:
            return
        self.undo()  # before looking up the gateway: our own routes must not answer the lookup
        v4_target = remote_host if remote_host and ":" not in remote_host else "0.0.0.0"
        v6_target = remote_host if remote_host and ":" in remote_host else "::"
        inputs = inputs_for(
            opts,
            pushed,
            ifname,
            remote_host=remote_host,
            net_gateway=self._lookup(v4_target),
            net_gateway_v6=self._lookup(v6_target),
        )
        plan = plan_routes(inputs)
        self.plan, self._key = plan, key
        for note in plan.notes:
            log.warning("%s", note)
        if opts.route_noexec:
            log.info(
                "route-noexec: pyovpn leaves the routes to a script; they would be: %s",
                "; ".join(str(c) for c in plan.changes) or "none",
            )
            return
        path = journal_path(self.journal_dir, ifname) if self.journal_dir is not None else None
        self._journal = RouteJournal(self.net, path)
        self._journal.apply(plan.changes)

    def undo(self) -> None:
        if self._journal is not None:
            self._journal.undo()
            self._journal = None
        self._key = None
