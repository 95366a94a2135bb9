"""``pyovpn show [NAME] [--json]``: every running pyovpn, its peers and their traffic, like ``wg show``.

Each pyovpn daemon answers on a control socket in ``/run/pyovpn/`` (a management interface
that only root can open; see ``mgmt.protocol.CONTROL_DIR``) with the ``pyovpn-info`` command, one JSON
object. This command asks each of them twice, half a second apart, to give current rates, and
prints them; ``NAME`` keeps one interface, ``--json`` prints the objects (schema 1, documented in
the README) with ``rx_rate_bps``/``tx_rate_bps`` added per peer.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import time
from typing import Any

from pyovpn.mgmt.protocol import CONTROL_DIR

USAGE = "usage: pyovpn show [INTERFACE] [--json]"


def query(path: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """One daemon's `pyovpn-info`, or None if it does not answer (gone, or not ours)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            buf = b""
            s.sendall(b"pyovpn-info\n")
            while not buf.endswith(b"END\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
    except OSError:
        return None
    for line in buf.decode("utf-8", "replace").split("\r\n"):
        if line.startswith("{"):
            info: dict[str, Any] = json.loads(line)
            return info
    return None


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    s = int(now - t)
    parts = [(s // 86400, "day"), (s % 86400 // 3600, "hour"), (s % 3600 // 60, "minute"), (s % 60, "second")]
    words = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n][:2]
    return (", ".join(words) or "0 seconds") + " ago"


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n = n / 1024  # type: ignore[assignment]
    return f"{n} B"


def _rate(bps: float | None) -> str:
    if bps is None:
        return "?"
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bps < 1000 or unit == "Gbit/s":
            return f"{bps:.1f} {unit}"
        bps /= 1000
    return f"{bps:.1f} Gbit/s"


def add_rates(first: dict[str, Any], second: dict[str, Any]) -> None:
    """Per peer, bits per second between two samples of the same daemon."""
    dt = float(second["time"]) - float(first["time"])
    before = {(p.get("real_address"), p.get("common_name")): p for p in first.get("peers", [])}
    for peer in second.get("peers", []):
        old = before.get((peer.get("real_address"), peer.get("common_name")))
        for key in ("rx", "tx"):
            now_b, old_b = peer.get(f"{key}_bytes"), old.get(f"{key}_bytes") if old else None
            peer[f"{key}_rate_bps"] = (
                (now_b - old_b) * 8 / dt if dt > 0 and now_b is not None and old_b is not None else None
            )


def render(info: dict[str, Any]) -> str:
    now = float(info["time"])
    out = [
        f"interface: {info.get('interface') or '(not up yet)'}",
        f"  role: {info['role']}",
        f"  pid: {info['pid']}, config: {', '.join(info.get('config') or []) or '(command line)'}",
        f"  data channel: {info.get('backend')} ({info.get('backend_reason') or 'no reason recorded'})",
    ]
    for peer in info.get("peers", []):
        name = peer.get("common_name") or "(no common name)"
        out += ["", f"peer: {name} ({peer.get('real_address') or '?'})"]
        if peer.get("username"):
            out.append(f"  username: {peer['username']}")
        vpn = [a for a in (peer.get("vpn_ipv4"), peer.get("vpn_ipv6")) if a]
        if vpn:
            out.append(f"  vpn address: {', '.join(vpn)}")
        out.append(f"  cipher: {peer.get('cipher') or '?'}")
        out.append(f"  connected: {_ago(peer.get('connected_since'), now)}")
        age = peer.get("key_age_s")
        out.append(
            f"  latest handshake: {_ago(peer.get('last_handshake'), now)}"
            + (f" (key age {age:.0f} s)" if age is not None else "")
        )
        out.append(
            f"  transfer: {_bytes(peer.get('rx_bytes'))} received, {_bytes(peer.get('tx_bytes'))} sent"
        )
        out.append(f"  rate: {_rate(peer.get('rx_rate_bps'))} in, {_rate(peer.get('tx_rate_bps'))} out")
        ka = peer.get("keepalive") or {}
        out.append(f"  keepalive: every {ka.get('interval', '?')} s, timeout {ka.get('timeout', '?')} s")
    if not info.get("peers"):
        out += ["", "(no peer connected)"]
    return "\n".join(out)


def main(args: list[str]) -> int:
    as_json = "--json" in args
    names = [a for a in args if a != "--json"]
    if len(names) > 1 or any(a.startswith("-") for a in names):
        print(USAGE, file=sys.stderr)
        return 2
    paths = sorted(glob.glob(os.path.join(CONTROL_DIR, "*.sock")))
    first = {p: query(p) for p in paths}
    time.sleep(0.5)
    found = []
    for path in paths:
        second = query(path)
        if second is None:
            continue
        if first.get(path) is not None:
            add_rates(first[path], second)  # type: ignore[arg-type]
        if names and second.get("interface") != names[0]:
            continue
        found.append(second)
    if as_json:
        print(json.dumps(found, indent=2, sort_keys=True))
        return 0
    if not found:
        where = f"with interface {names[0]} " if names else ""
        print(
            f"no running pyovpn {where}found (looked in {CONTROL_DIR}; reading it needs root)",
            file=sys.stderr,
        )
        return 1
    print("\n\n".join(render(i) for i in found))
    return 0
