"""`up` / `down` scripts on a pyovpn P2MP server and a pyovpn pull client, in namespaces.

Each script records its arguments, its environment and what the tunnel device looked like
when it ran: `up` must see the device open and configured, `down` must run at shutdown,
after the device is gone, with the same arguments.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness as h

pytestmark = pytest.mark.netns

RECORDER = """#!/bin/sh
out="$1"; shift
{
  echo "ARGS $*"
  env | grep -E '^(script_type|script_context|dev|dev_type|tun_mtu|ifconfig_[a-z0-9_]+|signal)=' | sort
  if ip -o -4 addr show dev "$dev" > "$out.addr" 2>/dev/null; then
    echo "DEVICE present $(awk '{print $4}' "$out.addr")"
  else
    echo "DEVICE absent"
  fi
} > "$out.tmp"
mv "$out.tmp" "$out"
"""


def _record(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith(("ARGS ", "DEVICE ")):
            key, _, value = line.partition(" ")
            out[key] = value
        else:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _wait_file(path: Path, timeout: float = 15.0) -> dict[str, str]:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} was never written (the script did not run)")
        time.sleep(0.1)
    return _record(path)


def test_up_and_down_scripts_server_and_client(net: h.Netns, pki: Pki) -> None:
    work = net.workdir
    script = h.write_script(work / "record.sh", RECORDER)
    spec = h.TunnelSpec(role="server", wrap="tls-crypt", verb=3)

    def scripts(side: str) -> str:
        up, down = work / f"{side}-up", work / f"{side}-down"
        return f"script-security 2\nup {script} {up}\ndown {script} {down}\n"

    server_cfg = work / "server.conf"
    client_cfg = work / "client.conf"
    server_cfg.write_text(
        h.server_config(spec, pki, impl="pyovpn", local=net.outer("b", 4)) + scripts("server")
    )
    client_cfg.write_text(
        h.client_config(spec, pki, impl="pyovpn", remote=net.outer("b", 4)) + scripts("client")
    )
    server = net.start_server("pyovpn", server_cfg, port=spec.port, name="server", timeout=20)
    # the server binds its port (so a port in use fails early) before it runs the up script:
    # the port can be seen before the record is written
    up = _wait_file(work / "server-up")
    assert up["ARGS"] == "tun0 1500 0 10.77.0.1 255.255.255.0 init"
    assert up["script_type"] == "up" and up["script_context"] == "init"
    assert (up["dev"], up["dev_type"], up["tun_mtu"]) == ("tun0", "tun", "1500")
    assert (up["ifconfig_local"], up["ifconfig_netmask"]) == ("10.77.0.1", "255.255.255.0")
    assert (up["ifconfig_ipv6_local"], up["ifconfig_ipv6_netbits"]) == ("fd00:77::1", "64")
    assert up["DEVICE"] == "present 10.77.0.1/24", "up must run after the device is configured"

    client = net.spawn("a", h.vpn_argv("pyovpn", client_cfg), "client")
    h.wait_for_lines([server, client], h.INIT_LINE, 30)
    cup = _wait_file(work / "client-up")
    assert cup["ARGS"] == "tun0 1500 0 10.77.0.2 255.255.255.0 init"
    assert cup["ifconfig_local"] == "10.77.0.2" and cup["ifconfig_ipv6_local"] == "fd00:77::1000"
    assert cup["DEVICE"] == "present 10.77.0.2/24"
    assert not (work / "client-down").exists() and not (work / "server-down").exists()

    assert client.stop(timeout=10) == 0
    cdown = _wait_file(work / "client-down")
    assert cdown["ARGS"] == cup["ARGS"]
    # the client config has explicit-exit-notify: stock OpenVPN 2.6 then names the signal like this
    assert cdown["script_type"] == "down" and cdown["signal"] == "exit-with-notification"
    assert cdown["DEVICE"] == "absent", "down runs after the device is closed"

    assert server.stop(timeout=10) == 0
    sdown = _wait_file(work / "server-down")
    assert sdown["ARGS"] == up["ARGS"] and sdown["script_type"] == "down"
    assert sdown["DEVICE"] == "absent"
    log = server.text()
    assert log.index("Closing TUN/TAP interface tun0") < log.index(f"{script} {work / 'server-down'} tun0")


def test_failing_up_script_is_fatal(net: h.Netns, pki: Pki) -> None:
    spec = h.TunnelSpec(role="server", wrap="tls-crypt", verb=3)
    cfg = net.workdir / "server.conf"
    text = h.server_config(spec, pki, impl="pyovpn", local=net.outer("b", 4))
    cfg.write_text(text + "script-security 2\nup /bin/false\n")
    server = net.spawn("b", h.vpn_argv("pyovpn", cfg), "server")
    assert server.wait(timeout=20) == 1
    assert "up script /bin/false failed (exit status 1)" in server.text()
