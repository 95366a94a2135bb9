"""The journal of route changes pyovpn made on the host, so they can always be undone.

Each change is written (and flushed to disk) before it is made, and confirmed once it succeeded;
undoing replays the confirmed changes in reverse. A journal left by a process that died (kill -9)
is replayed by the next start for the same device, so a crash never leaves the host's traffic
pointing into a tunnel that no longer exists. One journal per network namespace and device.

File format: JSON lines; the first is ``{"pid": N}``, then ``{"change": [...]}`` before a change
and ``{"done": index}`` after it succeeded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from pyovpn.edge.fulltunnel import HostRoute, RouteChange
from pyovpn.edge.host import HostNetwork
from pyovpn.errors import BackendError
from pyovpn.rundir import netns_inode, pid_alive

log = logging.getLogger("pyovpn")

def journal_path(directory: Path, ifname: str) -> Path:
    """The journal of ``ifname`` in this network namespace (devices of the same name elsewhere differ)."""
    return directory / f"routes-{netns_inode()}-{ifname}.journal"


def _encode(change: RouteChange) -> list[object]:
    r = change.route
    return [change.action, r.network, r.prefixlen, r.ifname, r.gateway, r.metric]


def _decode(item: list[object]) -> RouteChange:
    action, network, prefixlen, ifname, gateway, metric = item
    if action not in ("add", "del"):
        raise ValueError(f"bad action {action!r}")
    return RouteChange(
        "add" if action == "add" else "del",
        HostRoute(
            str(network),
            int(str(prefixlen)),
            str(ifname),
            None if gateway is None else str(gateway),
            None if metric is None else int(str(metric)),
        ),
    )


@runtime_checkable
class AddsRoutesFirst(Protocol):
    """A host that can add a route in front of an existing one to the same place, as OpenVPN does."""

    def add_route_first(
        self, ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
    ) -> None: ...

    def del_route_exact(
        self, ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
    ) -> None: ...


def _apply(net: HostNetwork, change: RouteChange) -> None:
    r = change.route
    if change.action == "add" and isinstance(net, AddsRoutesFirst):
        net.add_route_first(r.ifname, r.network, r.prefixlen, r.gateway, r.metric)
    elif change.action == "add":
        net.add_route(r.ifname, r.network, r.prefixlen, r.gateway, r.metric)
    elif isinstance(net, AddsRoutesFirst):
        net.del_route_exact(r.ifname, r.network, r.prefixlen, r.gateway, r.metric)
    else:
        net.del_route(r.ifname, r.network, r.prefixlen, r.gateway, r.metric)


class RouteJournal:
    """The route changes one device's configuration made, on disk until they are undone.

    ``path`` None keeps the journal in memory only (tests with a fake host, or no writable /run).
    """

    def __init__(self, net: HostNetwork, path: Path | None) -> None:
        self.net = net
        self.path = path
        self.applied: list[RouteChange] = []
        self._entries = 0

    def _write(self, record: dict[str, object]) -> None:
        if self.path is None:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # e.g. after dropping privileges: the routes are still undone at exit
            log.warning(
                "cannot write the route journal %s (%s): a crash from now on leaves routes to "
                "undo by hand; keep %s writable for pyovpn's user",
                self.path,
                exc.strerror or exc,
                self.path.parent,
            )
            self.path = None

    def _open(self) -> None:
        if self.path is None or self._entries:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"pid": os.getpid()}) + "\n", encoding="utf-8")
        except OSError as exc:
            log.warning(
                "cannot write the route journal %s (%s): routes are still undone at exit, but not "
                "after a crash; make %s writable for pyovpn",
                self.path,
                exc.strerror or exc,
                self.path.parent,
            )
            self.path = None

    def apply(self, changes: Sequence[RouteChange]) -> list[str]:
        """Make the changes in order, journaled; failures are logged (as OpenVPN does) and returned."""
        failures: list[str] = []
        if not changes:
            return failures  # no journal file: a crash would leave one with nothing to undo behind
        self._open()
        for change in changes:
            index = self._entries
            self._entries += 1
            self._write({"change": _encode(change)})
            try:
                _apply(self.net, change)
            except BackendError as exc:
                log.error("ERROR: route %s failed: %s", change, exc)
                failures.append(f"{change}: {exc}")
                continue
            log.info("route %s", change)
            self.applied.append(change)
            self._write({"done": index})
        return failures

    def undo(self) -> None:
        """Undo what :meth:`apply` did, newest first, and forget the journal."""
        _undo(self.net, self.applied)
        self.applied = []
        self._entries = 0
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


def _undo(net: HostNetwork, changes: Sequence[RouteChange]) -> None:
    for change in reversed(changes):
        back = change.undone()
        try:
            _apply(net, back)
            log.info("route %s (undo)", back)
        except BackendError as exc:
            # gone with the device, or changed by someone else: nothing of ours is left to undo
            log.info("route %s (undo) not needed: %s", back, exc)


def replay_stale(net: HostNetwork, path: Path) -> int:
    """Undo the changes in a journal whose process is gone; how many were undone."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cannot read the route journal %s: %s", path, exc.strerror or exc)
        return 0
    changes: list[RouteChange] = []
    confirmed: set[int] = set()
    pending: RouteChange | None = None
    try:
        header = json.loads(lines[0]) if lines else {}
        if pid_alive(int(header.get("pid", 0))):
            log.warning("route journal %s belongs to running process %s; left alone", path, header.get("pid"))
            return 0
        for line in lines[1:]:
            record = json.loads(line)
            if "change" in record:
                changes.append(_decode(record["change"]))
            elif "done" in record:
                confirmed.add(int(record["done"]))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("route journal %s is damaged (%s); undo what it lists by hand, then delete it", path, exc)
        return 0
    undo = [c for i, c in enumerate(changes) if i in confirmed]
    # a crash between making a change and confirming it: an added route of ours is safe to remove
    if changes and len(changes) - 1 not in confirmed and changes[-1].action == "add":
        pending = changes[-1]
        undo.append(pending)
    if undo:
        log.warning(
            "undoing %d route change(s) left by a pyovpn process that did not exit cleanly", len(undo)
        )
    _undo(net, undo)
    with contextlib.suppress(OSError):
        path.unlink()
    return len(undo)
