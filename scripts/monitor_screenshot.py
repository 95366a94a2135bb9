#!/usr/bin/env python3
"""Screenshot of openvpn-monitor's page for a pyovpn server and two stock clients (docs/img).

Needs root (network namespaces), stock openvpn, openvpn-monitor with flask-wtf (scripts/setup.sh)
and Debian's `chromium` (`apt-get install chromium`; no test needs it, so setup.sh leaves it out).
It starts the same server and clients as tests/netns/test_openvpn_monitor_page.py, serves the
page on 127.0.0.1, checks over HTTP that it lists both clients, then has headless Chromium
(a fresh profile, no network services of its own) draw it::

    sudo python3 scripts/monitor_screenshot.py [OUT.png]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.netns.harness import Star  # noqa: E402
from tests.netns.monitor_web import MonitorPage, session_rows  # noqa: E402
from tests.netns.test_openvpn_monitor_page import NAMES, start_server_and_clients  # noqa: E402

from pyovpn.tools.pki import make_pki  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "openvpn-monitor.png"
    browser = shutil.which("chromium")
    if browser is None:
        print("monitor_screenshot: needs Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pov-shot-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        with Star(work, len(NAMES), base=244) as star:
            sock = start_server_and_clients(star, pki, "pyovpn")
            with MonitorPage(star.workdir, sock, "pyovpn server") as monitor:
                rows = session_rows(monitor.fetch())
                if sorted(r["name"] for r in rows) != sorted(NAMES):
                    print(f"monitor_screenshot: the page lists {rows}, not {NAMES}", file=sys.stderr)
                    return 1
                profile = work / "chromium-profile"
                profile.mkdir()
                out.parent.mkdir(parents=True, exist_ok=True)
                argv = [
                    browser,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    f"--screenshot={out}",
                    monitor.url,
                ]
                res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                if res.returncode != 0 or not out.exists():
                    print(f"monitor_screenshot: chromium failed:\n{res.stderr}", file=sys.stderr)
                    return 1
    print(f"monitor_screenshot: wrote {out} ({', '.join(r['name'] for r in rows)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
