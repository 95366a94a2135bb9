"""No secret in anything pyovpn writes or says, at the highest verbosity, client and server.

A real tunnel against stock OpenVPN 2.6 with everything that carries secrets switched on:
username/password authentication, an auth-token (`auth-gen-token`), tls-crypt, a private key,
a status file, the events file, the management interface and `pyovpn show`. pyovpn runs at
`verb 11` and renegotiates once. Then every byte it produced is searched for each secret: its
log, the status and events files, every file it left in /run/pyovpn, the management
interface's `log all`/`status 3`/`state all` replies and `pyovpn show --json`.

The secrets: the password, each line of the private key's base64 body, each hex line of the
tls-crypt key, and any auth-token (OpenVPN's and pyovpn's tokens all start "SESS_ID_AT_").
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import INIT_LINE, Netns, Proc, TunnelSpec, spawn_tunnel, wait_for_lines
from tests.netns.mgmt import Mgmt

pytestmark = pytest.mark.netns

SPEC = TunnelSpec(role="server", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4, verb=4)
TOKEN_PREFIX = "SESS_ID_AT_"


def _secrets(pki: Pki, password: str, key: Path) -> dict[str, str]:
    found = {"password": password}
    for i, line in enumerate(key.read_text().splitlines()):
        if line and not line.startswith("-----"):
            found[f"private key line {i}"] = line
    for i, line in enumerate(pki.tc_key.read_text().splitlines()):
        if re.fullmatch(r"[0-9a-f]{32}", line):
            found[f"tls-crypt key line {i}"] = line
    return found


def _management(path: str, commands: list[str]) -> str:
    """Everything the management interface says to ``commands``, notifications included."""
    m = Mgmt(path)
    try:
        said: list[str] = []
        for cmd in commands:
            said += m.command(cmd, multi=True, notifications=said)
        return "\n".join(said)
    finally:
        m.close()


def _everything_pyovpn_said(py: Proc, workdir: Path, mgmt_path: str) -> dict[str, str]:
    said = {"log": py.text()}
    for name in ("status.log", "events.jsonl"):
        path = workdir / name
        said[name] = path.read_text() if path.exists() else ""
    said["management"] = _management(mgmt_path, ["log all", "state all", "status 3", "echo all"])
    show = subprocess.run(
        [sys.executable, "-m", "pyovpn", "show", "--json"], capture_output=True, text=True, timeout=30
    )
    said["pyovpn show --json"] = show.stdout + show.stderr
    run_dir = Path("/run/pyovpn")
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if entry.is_file():
                said[str(entry)] = entry.read_text("utf-8", "replace")
    return said


def _leaks(said: dict[str, str], secret_values: dict[str, str]) -> list[str]:
    leaks = [
        f"{what} appears in {where}"
        for where, text in said.items()
        for what, value in secret_values.items()
        if value in text
    ]
    leaks += [f"an auth-token appears in {where}" for where, text in said.items() if TOKEN_PREFIX in text]
    return leaks


@pytest.mark.parametrize("pyovpn_side", ["client", "server"])
def test_pyovpn_says_no_secret(net: Netns, pki: Pki, pyovpn_side: str) -> None:
    password = "pw-" + secrets.token_hex(12)
    creds = net.workdir / "creds.txt"
    creds.write_text(f"alice\n{password}\n")
    verify = net.workdir / "verify.sh"
    verify.write_text(f'#!/bin/sh\n[ "$(sed -n 1p "$1")" = alice ] && [ "$(sed -n 2p "$1")" = {password} ]\n')
    verify.chmod(0o755)
    mgmt_path = str(net.workdir / "mgmt.sock")
    # everything that carries a secret, at the highest verbosity; the pyovpn side rekeys
    watched = (
        f"verb 11\nreneg-sec 8\nstatus {net.workdir / 'status.log'} 1\nstatus-version 2\n"
        f"pyovpn-events {net.workdir / 'events.jsonl'}\nmanagement {mgmt_path} unix\n"
    )
    server_extra = f"script-security 2\nauth-user-pass-verify {verify} via-file\nauth-gen-token 0\n"
    client_extra = f"auth-user-pass {creds}\n"
    if pyovpn_side == "client":
        client_extra += watched
    else:
        server_extra += watched
    impls = ("openvpn", "pyovpn") if pyovpn_side == "client" else ("pyovpn", "openvpn")
    server, client = spawn_tunnel(
        net, pki, SPEC, *impls, server_extra=server_extra, client_extra=client_extra
    )
    wait_for_lines([server, client], INIT_LINE, 30)
    py = client if pyovpn_side == "client" else server
    wait_for_lines([py], r"renegotiated data channel key_id", 40, since={py: py.mark()})
    time.sleep(1)
    said = _everything_pyovpn_said(py, net.workdir, mgmt_path)
    assert said["management"].count("END") >= 3, said["management"]
    if pyovpn_side == "client":
        assert "auth-token received" in said["log"], (
            "the server's token must have arrived (to be kept secret)"
        )
    else:
        assert "alice" in said["status.log"], (
            "the client must be listed (with its username) in the status file"
        )
    key = pki.client_key if pyovpn_side == "client" else pki.server_key
    assert _leaks(said, _secrets(pki, password, key)) == []
