"""`pyovpn-metrics HOST:PORT` (a Prometheus endpoint) and `pyovpn-events FILE` (JSON lines).

The metrics are read at scrape time from the same snapshot `pyovpn show` prints (the daemon's
``info()``), so there is one source of truth. The HTTP server runs in prometheus-client's own
thread; a scrape asks the event loop for the snapshot and waits for it. The event stream is
for consumers that should not have to take over authentication (management-client-auth) only
to see who connects: one JSON object per line for connect, disconnect and rekey.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

log = logging.getLogger("pyovpn")

InfoSource = Callable[[], Coroutine[Any, Any, dict[str, Any]]]
PEER_LABELS = ("common_name", "real_address", "vpn_address", "cipher", "iv_ver", "iv_plat")


def _peer_labels(peer: dict[str, Any]) -> list[str]:
    vpn = peer.get("vpn_ipv4") or peer.get("vpn_ipv6") or ""
    return [
        str(peer.get("common_name") or ""),
        str(peer.get("real_address") or ""),
        str(vpn),
        str(peer.get("cipher") or ""),
        str(peer.get("iv_ver") or ""),
        str(peer.get("iv_plat") or ""),
    ]


class _Collector:
    """A prometheus-client collector over the daemon's snapshot."""

    def __init__(self, source: InfoSource, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info: dict[str, Any] = asyncio.run_coroutine_threadsafe(self.source(), self.loop).result(timeout=10)
        up = GaugeMetricFamily(
            "pyovpn_info", "This pyovpn instance (value 1)", labels=["role", "interface", "backend"]
        )
        up.add_metric([str(info.get("role")), str(info.get("interface") or ""), str(info.get("backend"))], 1)
        yield up
        peers = info.get("peers", [])
        count = GaugeMetricFamily("pyovpn_peers", "Connected peers")
        count.add_metric([], len(peers))
        yield count
        failures = CounterMetricFamily("pyovpn_auth_failures", "Clients refused at authentication")
        failures.add_metric([], float(info.get("auth_failures", 0)))
        yield failures
        rx = CounterMetricFamily(
            "pyovpn_peer_rx_bytes", "Bytes received from the peer (link)", labels=PEER_LABELS
        )
        tx = CounterMetricFamily("pyovpn_peer_tx_bytes", "Bytes sent to the peer (link)", labels=PEER_LABELS)
        since = GaugeMetricFamily(
            "pyovpn_peer_connected_since_seconds", "When the peer connected (Unix time)", labels=PEER_LABELS
        )
        rekeys = CounterMetricFamily(
            "pyovpn_peer_rekeys", "Data-channel key renegotiations", labels=PEER_LABELS
        )
        for peer in peers:
            labels = _peer_labels(peer)
            rx.add_metric(labels, float(peer.get("rx_bytes") or 0))
            tx.add_metric(labels, float(peer.get("tx_bytes") or 0))
            since.add_metric(labels, float(peer.get("connected_since") or 0))
            rekeys.add_metric(labels, float(peer.get("rekeys") or 0))
        yield from (rx, tx, since, rekeys)


def start_metrics(address: tuple[str, int], source: InfoSource, loop: asyncio.AbstractEventLoop) -> Any:
    """Serve /metrics on ``address``; the server object (``shutdown()`` stops it)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise RuntimeError(
            "pyovpn-metrics needs the prometheus-client package: pip install prometheus-client "
            "(or pip install 'pyovpn[metrics]')"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(source, loop))
    server, _thread = start_http_server(address[1], addr=address[0], registry=registry)
    log.info("metrics: Prometheus endpoint on http://%s:%d/metrics", *address)
    return server


class EventStream:
    """`pyovpn-events FILE`: one JSON object per line, appended, flushed at once (mode 0600)."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", buffering=1)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "event": event, **fields}
        try:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("pyovpn-events: cannot write: %s", exc)

    def close(self) -> None:
        self._file.close()
