"""kill -9 of a userspace-engine process during a bulk transfer: the tunnel recovers by itself.

The engine (``python -m pyovpn.datachannel.engine``, a controller with forked workers) is a
child of the pyovpn process. When any of its processes dies, the engine goes down, the proxy
reports the interface and the peer gone, the connection restarts, and the next command starts a
fresh engine. Before this was fixed the restart reused the dead engine and pyovpn exited with
"NewPeer: cannot reach the offload engine: Broken pipe".
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    INIT_LINE,
    HarnessError,
    Netns,
    TunnelSpec,
    engine_processes,
    iperf3_transfer,
    ping,
    start_tunnel,
)

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("victim", ["controller", "worker"])
def test_kill_engine_process_during_transfer_recovers(net: Netns, pki: Pki, victim: str) -> None:
    spec = TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4)
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="pyovpn")
    controller, workers = engine_processes(tunnel.client.pid)
    assert workers, "the engine has no worker processes"
    target = controller if victim == "controller" else workers[-1]

    result: dict[str, Any] = {}

    def transfer() -> None:
        try:
            result["run"] = iperf3_transfer(net.a, net.b, tunnel.addrs.server4, seconds=30, timeout=70)
        except HarnessError as e:
            result["error"] = e

    mark = tunnel.client.mark()
    bulk = threading.Thread(target=transfer, daemon=True)
    bulk.start()
    time.sleep(4)  # the transfer is under way
    os.kill(target, signal.SIGKILL)
    tunnel.client.wait_for_line("offload engine exited unexpectedly", 15, since=mark)
    tunnel.client.wait_for_line(INIT_LINE, 45, since=mark)
    bulk.join(80)

    assert tunnel.client.running(), f"pyovpn exited after the engine died:\n{tunnel.client.tail(40)}"
    assert "cannot reach the offload engine" not in tunnel.client.text()[mark:]
    new_controller, new_workers = engine_processes(tunnel.client.pid)
    assert new_controller != controller and target not in new_workers
    # the same TCP transfer survived the outage and moved data again after the reconnect
    assert "error" not in result, result.get("error")
    intervals = result["run"]["intervals"]
    assert sum(i["bytes"] for i in intervals[-5:]) > 0, intervals
    assert ping(net.a, tunnel.addrs.server4, count=3, timeout=20).ok
    assert tunnel.stop()["client"] == 0
