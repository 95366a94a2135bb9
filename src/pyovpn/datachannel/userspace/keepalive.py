"""Keepalive of the userspace backend: one timer for all peers, pings, expiry, keepalive-lane draining.

Keepalive runs on one timer for all peers, firing on multiples of ``KA_QUANTUM`` seconds: a
thousand clients pinging every 10 s cost four wakeups a second instead of a hundred. A ping or
an expiry is at most this late (OpenVPN's own timers have a 1 s granularity). Deadlines sit in
the heap of :mod:`pyovpn.datachannel.deadlines`, which the engine's workers use too. The same
timer drains the MP keepalive lanes (:mod:`.lane`) first, so no peer expires with its ping
still queued there.
"""

from __future__ import annotations

import logging
import math

from pyovpn.datachannel.api import PeerDelReason
from pyovpn.datachannel.datapath import KA_QUANTUM, LANE_MAX_DELAY, seal_ping
from pyovpn.datachannel.deadlines import fire_time
from pyovpn.datachannel.userspace.peers import Peer, PeerTable, SharedUdp

__all__ = ["KA_QUANTUM", "LANE_MAX_DELAY", "Keepalive"]

log = logging.getLogger(__name__)

_LANE_BATCH = 4096


class Keepalive(PeerTable):
    def _set_keepalive(self, peer: Peer, interval: int, timeout: int) -> None:
        assert self._loop is not None
        peer.ka_interval = interval
        peer.ka_timeout = timeout
        now = self._loop.time()
        peer.last_rx = peer.last_tx = now  # as the kernel: both timers restart when set
        peer.ka_due = None
        if interval and timeout:  # the kernel only runs keepalive with both set
            self._ka_schedule(peer, now + min(interval, timeout))

    def _ka_schedule(self, peer: Peer, due: float) -> None:
        self._ka_heap.schedule(peer, due)
        if self._ka_timer is None or due < self._ka_timer_at:
            self._ka_arm()

    def _ka_arm(self) -> None:
        """Point the keepalive timer at the end of the quantum holding the earliest live deadline."""
        assert self._loop is not None
        earliest = self._ka_heap.earliest()
        due = earliest if earliest is not None else math.inf
        if any(s.lane for s in self._shared.values()):
            due = min(due, self._loop.time() + LANE_MAX_DELAY)
        if due == math.inf:
            return
        fire = fire_time(due)
        if self._ka_timer is not None:
            if fire >= self._ka_timer_at:
                return
            self._ka_timer.cancel()
        self._ka_timer_at = fire
        self._ka_timer = self._loop.call_at(fire, self._ka_tick)

    def _ka_tick(self) -> None:
        """The keepalive timer: check every peer whose deadline falls in the quantum that ended."""
        assert self._loop is not None
        self._ka_timer = None
        until = self._ka_timer_at
        now = max(self._loop.time(), until)
        for shared in list(self._shared.values()):
            if shared.lane is not None:
                self._drain_lane(shared, now)  # first, so no peer expires with its ping still queued
        for peer in self._ka_heap.pop_due(until):
            try:
                self._keepalive(peer, now)
            except Exception:
                log.exception("userspace data channel: keepalive of peer %d failed", peer.peer_id)
        self._ka_arm()

    def _drain_lane(self, shared: SharedUdp, now: float) -> None:
        assert shared.lane is not None
        self._mp_udp_read(shared, shared.lane, now, _LANE_BATCH, lane=True)

    def _keepalive(self, peer: Peer, now: float) -> None:
        if self._peers.get(peer.peer_id) is not peer or not (peer.ka_interval and peer.ka_timeout):
            return
        rx_deadline = peer.last_rx + peer.ka_timeout
        if now >= rx_deadline:
            self._remove_peer(peer, PeerDelReason.EXPIRED)
            return
        if now >= peer.last_tx + peer.ka_interval:
            self._send_ping(peer, now)
            if self._peers.get(peer.peer_id) is not peer:
                return  # the send failed fatally (TCP)
            # a ping lost to a full socket must not make us spin: try again next interval
            peer.last_tx = max(peer.last_tx, now)
        tx_deadline = peer.last_tx + peer.ka_interval
        self._ka_schedule(peer, min(rx_deadline, tx_deadline))

    def _send_ping(self, peer: Peer, now: float) -> None:
        packet = seal_ping(peer, self._key_exhausted)
        if packet is not None:
            self._send_data(peer, [packet], now)
