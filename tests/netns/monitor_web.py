"""openvpn-monitor's web page served for a test or a screenshot: start it, fetch it, read its table.

openvpn-monitor 2.0.4 is a Flask WSGI app that reads its configuration file (named by
OPENVPNMONITOR_CONFIG_FILE) and asks each VPN's management interface for `version`, `state`,
`load-stats` and `status 3` on every page load. Here it runs under wsgiref on 127.0.0.1 (a free
port) and talks to a unix management socket (its disconnect buttons shown); maps and GeoIP
stay off, so nothing leaves the host.
"""

from __future__ import annotations

import html
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SERVE = (
    "import sys, wsgiref.simple_server as w\n"
    "from openvpn_monitor.app import application\n"
    "w.make_server('127.0.0.1', int(sys.argv[1]), application).serve_forever()\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class MonitorPage:
    """A running openvpn-monitor for one management socket; a context manager."""

    def __init__(self, workdir: Path, mgmt_socket: str, name: str) -> None:
        self.conf = workdir / "openvpn-monitor.conf"
        self.conf.write_text(
            "[openvpn-monitor]\n"
            f"site = {name}\n"
            "enable_maps = False\n"
            "datetime_format = %Y-%m-%d %H:%M:%S\n\n"
            f"[{name}]\n"
            f"name = {name}\n"
            f"socket = {mgmt_socket}\n"
            "show_disconnect = True\n"  # the row's disconnect form carries the client's port
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(workdir / "openvpn-monitor.log", "wb")  # noqa: SIM115 - closed in __exit__
        env = dict(os.environ, OPENVPNMONITOR_CONFIG_FILE=str(self.conf))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )

    def __enter__(self) -> MonitorPage:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"openvpn-monitor did not start; see {self.log.name}") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def fetch(self) -> str:
        with urllib.request.urlopen(self.url, timeout=30) as resp:
            assert resp.status == 200
            return resp.read().decode()


def session_rows(page: str) -> list[dict[str, str]]:
    """The server's session table as the page shows it: name, VPN IP, remote IP and port, bytes."""
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page, re.S):
        cells = [
            html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        # a session row: name, VPN IP, remote IP, location, bytes in, bytes out, since, ping, online
        if len(cells) < 9 or not re.fullmatch(r"\d+ \(.*\)", cells[4]):
            continue
        port = re.search(r'name="port" value="(\d+)"', row)
        rows.append(
            {
                "name": cells[0],
                "vpn_ip": cells[1],
                "remote_ip": cells[2],
                "port": port.group(1) if port else "",
                "bytes_in": cells[4].split()[0],
                "bytes_out": cells[5].split()[0],
            }
        )
    return rows
