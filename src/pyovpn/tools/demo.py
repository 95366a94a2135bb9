"""``pyovpn demo``: two network namespaces, a pyovpn tunnel between them, and a ping through it.

Everything it creates (namespaces, veth pair, certificates in a temporary directory,
processes) is removed on exit, also on failure or Ctrl-C. Needs root.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyovpn.tools.pki import make_pki

OUTER_A, OUTER_B = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, only ever inside the demo namespaces
INNER_A, INNER_B = "10.200.0.1", "10.200.0.2"
INNER6_A, INNER6_B = "fd00:200::1", "fd00:200::2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *args], check=check, capture_output=True, text=True)


def _config(role: str, pki: Path, cipher: str, proto: str) -> str:
    server = role == "server"
    lines = [
        "dev tun0",
        f"proto {proto}-server"
        if proto == "tcp" and server
        else f"proto {proto}-client"
        if proto == "tcp"
        else "proto udp",
        "tls-server" if server else "tls-client",
        f"ca {pki / 'ca.crt'}",
        f"cert {pki / ('server.crt' if server else 'client.crt')}",
        f"key {pki / ('server.key' if server else 'client.key')}",
        "dh none",
        f"tls-crypt {pki / 'tc.key'}",
        f"remote-cert-tls {'client' if server else 'server'}",
        f"data-ciphers {cipher}",
        f"ifconfig {INNER_A} {INNER_B}" if server else f"ifconfig {INNER_B} {INNER_A}",
        f"ifconfig-ipv6 {INNER6_A}/64 {INNER6_B}" if server else f"ifconfig-ipv6 {INNER6_B}/64 {INNER6_A}",
        "keepalive 10 60",
        "port 1194",
        "verb 3",
        "dco userspace",
    ]
    if not server:
        lines.append(f"remote {OUTER_A} 1194")
        lines.append("nobind")
    return "\n".join(lines) + "\n"


def _wait_for(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and needle in path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyovpn demo", description=__doc__)
    ap.add_argument(
        "--cipher", default="AES-256-GCM", choices=["AES-128-GCM", "AES-256-GCM", "CHACHA20-POLY1305"]
    )
    ap.add_argument("--proto", default="udp", choices=["udp", "tcp"])
    ap.add_argument("--keep-logs", action="store_true", help="print both daemons' logs at the end")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "pyovpn demo needs root (it creates network namespaces and TUN devices); run it with sudo",
            file=sys.stderr,
        )
        return 1
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            print(
                f"pyovpn demo needs `{tool}`: run scripts/setup.sh "
                "(or apt-get install iproute2 iputils-ping)",
                file=sys.stderr,
            )
            return 1
    tag = secrets.token_hex(3)
    ns_a, ns_b = f"pov-demo-a-{tag}", f"pov-demo-b-{tag}"
    tmp = Path(tempfile.mkdtemp(prefix="pyovpn-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    ok = False
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _ip("link", "set", f"va{tag}", "netns", ns_a)
        _ip("link", "set", f"vb{tag}", "netns", ns_b)
        for ns, dev, addr in ((ns_a, f"va{tag}", OUTER_A), (ns_b, f"vb{tag}", OUTER_B)):
            _ns(ns, "ip", "link", "set", "lo", "up")
            _ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            _ns(ns, "ip", "link", "set", dev, "up")
        pki = make_pki(tmp / "pki").dir
        print(f"namespaces {ns_a} ({OUTER_A}) and {ns_b} ({OUTER_B}) joined by a veth pair")
        logs = {}
        for ns, role in ((ns_a, "server"), (ns_b, "client")):
            conf = tmp / f"{role}.conf"
            conf.write_text(_config(role, pki, args.cipher, args.proto))
            logs[role] = tmp / f"{role}.log"
            with open(logs[role], "wb") as out:
                procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, sys.executable, "-m", "pyovpn", "--config", str(conf)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        for role, proc in zip(("server", "client"), procs, strict=True):
            if not _wait_for(logs[role], "Initialization Sequence Completed", proc, 30):
                print(f"pyovpn {role} did not come up; its log:\n{logs[role].read_text(errors='replace')}")
                return 1
        print(f"tunnel up ({args.cipher} over {args.proto.upper()}, tls-crypt, userspace data channel)")
        for target in (INNER_A, INNER6_A):
            res = _ns(ns_b, "ping", "-c", "3", "-i", "0.2", "-W", "2", target, check=False)
            summary = [line for line in res.stdout.splitlines() if "packets transmitted" in line]
            print(f"ping {target} from {ns_b}: {summary[0] if summary else res.stdout.strip()}")
            if res.returncode != 0:
                print("ping through the tunnel failed")
                return 1
        ok = True
        print("demo OK: traffic flows through the pyovpn tunnel")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep_logs or not ok:
            for log in sorted(tmp.glob("*.log")):
                print(f"----- {log.name}\n{log.read_text(errors='replace')}")
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
