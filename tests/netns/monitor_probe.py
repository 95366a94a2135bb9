"""Run inside a server's namespace by test_monitoring_tools.py: ask the real PyPI tools what they see.

Prints one JSON object: what openvpn-monitor's data collector, openvpn-api and
openvpn-management-api report through the management interface at 127.0.0.1:PORT, and what
openvpn-status-reader and `jc --openvpn` read from the status file. Values that differ by nature
(times, ports, byte counts) are reduced to what the tools must agree on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any


def monitor(port: int) -> dict[str, Any]:
    import openvpn_monitor

    sys.path.insert(0, os.path.dirname(openvpn_monitor.__file__))  # it imports util/vpns top-level
    from vpns.openvpn.data_collector import VPNDataCollector

    vpn: dict[str, Any] = {"name": "test", "host": "127.0.0.1", "port": str(port)}
    VPNDataCollector({"test": vpn}, None)
    sessions = vpn.get("sessions") or {}
    return {
        "connected": bool(vpn.get("management_connection_successful")),
        "error": str(vpn.get("error", "")),
        "release_word": (vpn.get("release") or "").split(" ")[0],
        "state": (vpn.get("state") or {}).get("connected"),
        "mode": (vpn.get("state") or {}).get("mode"),
        "nclients": (vpn.get("stats") or {}).get("nclients"),
        "sessions": sorted(
            (
                s.get("username"),
                str(s.get("local_ip")),
                s.get("bytes_recv", 0) > 0,
                s.get("bytes_sent", 0) > 0,
            )
            for s in sessions.values()
        ),
    }


def openvpn_api_view(port: int) -> dict[str, Any]:
    import openvpn_api

    v = openvpn_api.VPN("127.0.0.1", port)
    v.connect()
    try:
        state = v.state
        stats = v.get_stats()
        return {
            "release_word": str(v.release).split(" ")[0],
            "state": str(state.state_name) if state is not None else None,
            "clients": getattr(stats, "client_count", None),
        }
    finally:
        v.disconnect()


def management_api_view(port: int) -> dict[str, Any]:
    import openvpn_management_api

    v = openvpn_management_api.VPN("127.0.0.1", port)
    v.connect()
    try:
        state = v.get_state()
        stats = v.get_stats()
        return {
            "release_word": str(v.release).split(" ")[0],
            "state": str(state.state_name) if state is not None else None,
            "clients": getattr(stats, "client_count", None),
        }
    finally:
        v.disconnect()


def status_reader_view(path: str) -> dict[str, Any]:
    import openvpn_status

    with open(path) as fh:
        st = openvpn_status.parse_status(fh.read())
    return {
        "clients": sorted(
            (c.common_name, int(c.bytes_received) > 0, int(c.bytes_sent) > 0) for c in st.client_list.values()
        ),
        "routes": sorted((str(r.virtual_address), r.common_name) for r in st.routing_table.values()),
    }


def jc_view(path: str) -> dict[str, Any]:
    with open(path) as fh:
        out = subprocess.run(["jc", "--openvpn"], stdin=fh, capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    return {
        "clients": sorted(c["common_name"] for c in data.get("clients", [])),
        "routes": sorted(r["virtual_address"] for r in data.get("routing_table", [])),
    }


def main() -> int:
    port, status_path = int(sys.argv[1]), sys.argv[2]
    out: dict[str, Any] = {}
    for name, fn, arg in (
        ("openvpn-monitor", monitor, port),
        ("openvpn-api", openvpn_api_view, port),
        ("openvpn-management-api", management_api_view, port),
        ("openvpn-status-reader", status_reader_view, status_path),
        ("jc", jc_view, status_path),
    ):
        time.sleep(1)  # stock OpenVPN serves one management client at a time: let the last one go
        try:
            out[name] = fn(arg)  # type: ignore[operator]
        except Exception as e:  # a tool that fails on a file is a result too (compared with stock)
            out[name] = {"failed": type(e).__name__}
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
