"""The backends the contract suite runs on, and the rig a scenario drives one of them in.

A :class:`Rig` holds one backend kind and a private namespace laboratory (tests/nslab.py):
:meth:`Rig.pair` starts the backend on both sides of a veth pair with a P2P interface each,
:meth:`Rig.one` gives a single namespace with a backend (and its interface). Anything
beyond the command set goes through the declared capabilities (:meth:`Rig.has`).
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from pyovpn.datachannel.api import Capabilities, IfaceMode, NewIface, Stats
from tests.nslab import TUN6_A, TUN6_B, TUN_A, TUN_B, Lab, Site, open_lab, require_root, start_side

MTU = 1400


def in_guest() -> bool:
    """True inside the scripts/guest/run.sh guest (its init sets PYOVPN_GUEST=1)."""
    return os.environ.get("PYOVPN_GUEST") == "1"


@dataclass(frozen=True)
class BackendKind:
    """A backend class (``module:Class``, imported when used) and the options it is built with."""

    name: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    kernel: bool = False  # runs only inside the guest, where the ovpn driver is

    @property
    def cls(self) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def capabilities(self) -> Capabilities:
        caps: Capabilities = self.cls.capabilities
        return caps

    def make(self) -> Any:
        return self.cls(**self.options)

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (None: it can); fails in a guest without the driver."""
        if not self.kernel:
            if in_guest():
                return "the userspace backends run on the host; the guest runs the kernel backend"
            return None
        if not in_guest():
            return "the kernel backend runs in the guest (scripts/guest/run.sh -- python3 -m pytest ...)"
        from pyovpn.datachannel.choice import kernel_ovpn_status

        ok, why = kernel_ovpn_status()
        if not ok:
            pytest.fail(f"the guest has no usable ovpn driver: {why}")
        return None


BACKENDS = (
    BackendKind("inprocess", "pyovpn.datachannel.userspace:UserspaceDataChannel"),
    BackendKind("engine-2workers", "pyovpn.datachannel.engine.proxy:EngineDataChannel", {"workers": 2}),
    BackendKind("engine-1worker", "pyovpn.datachannel.engine.proxy:EngineDataChannel", {"workers": 1}),
    BackendKind("kernel", "pyovpn.datachannel.kernel:KernelDataChannel", kernel=True),
)


class Rig:
    """One backend kind in a laboratory of private namespaces.

    ``patience`` scales the waits a scenario chooses itself: the guest is emulated (TCG) and
    slow when the host is busy.
    """

    def __init__(self, kind: BackendKind, lab: Lab) -> None:
        self.kind = kind
        self.lab = lab
        self.caps = kind.capabilities
        self.patience = 3.0 if kind.kernel else 1.0

    def has(self, capability: str, what: str) -> bool:
        """Whether the backend declares ``capability``; if not, say which part is skipped and why."""
        if getattr(self.caps, capability):
            return True
        print(f"{self.kind.name}: skipping {what}: the backend does not declare '{capability}'")
        return False

    def require(self, capability: str, what: str) -> None:
        if not self.has(capability, what):
            pytest.skip(f"{self.kind.name} lacks '{capability}' ({what})")

    def side(self, ns: str, tun_addr: str, tun_peer: str, tun6: str) -> Site:
        """A site in ``ns`` whose backend drives a P2P interface with these addresses."""
        site = self.lab.site(ns)
        start_side(site, self.kind.make(), tun_addr, tun_peer, tun6, MTU)
        return site

    def pair(self) -> tuple[Site, Site]:
        """Sites A and B joined by a veth, each with a started backend (no peers yet)."""
        self.lab.pair()
        return self.side(self.lab.ns_a, TUN_A, TUN_B, TUN6_A), self.side(self.lab.ns_b, TUN_B, TUN_A, TUN6_B)

    def one(self, *, iface: bool = True) -> Site:
        """A single namespace whose backend reports to ``site.notes``; with its P2P interface if ``iface``.

        The backend picks a free name for the interface (``NewIface("tun")``): ``site.backend.ifname``.
        """
        self.lab.add_ns(self.lab.ns_a)
        site = self.lab.site(self.lab.ns_a)
        site.backend = self.kind.make()
        site.backend.subscribe(site.notes.append)
        if iface:
            site.request(NewIface("tun", IfaceMode.P2P, MTU))
            name = site.backend.ifname
            assert name in [n for _, n in site.call(socket.if_nameindex)]
        return site

    def stats(self, site: Site, peer_id: int) -> Stats:
        """All counters of a peer (``peer_stats``: plain on one backend, a coroutine on another)."""
        assert self.caps.stats

        async def get() -> Stats:
            st = site.backend.peer_stats(peer_id)
            return await st if hasattr(st, "__await__") else st  # type: ignore[no-any-return]

        return site.run(get())

    def hook(self, site: Site, peer_id: int, what: str, **kw: Any) -> Any:
        """A test hook on the peer's primary key (``Capabilities.hooks``)."""
        assert self.caps.hooks
        return site.run(site.backend.debug(peer_id, what, **kw))


@contextmanager
def open_rig(kind: BackendKind) -> Iterator[Rig]:
    require_root()
    why = kind.unavailable()
    if why is not None:
        print(f"skipping {kind.name}: {why}")
        pytest.skip(why)
    lab = Lab("c", "pc", timeout=60, note_timeout=15) if kind.kernel else Lab("c", "pc")
    with open_lab(lab):
        yield Rig(kind, lab)
