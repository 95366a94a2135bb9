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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    Impl,
    Netns,
    Proc,
    TunnelSpec,
    spawn_tunnel,
    wait_for_lines,
)

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
    """What the management interface says to ``commands`` (each answered within a few seconds)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.settimeout(3)
        replies = []
        for cmd in commands:
            sock.sendall(cmd.encode() + b"\n")
            reply = b""
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not reply.rstrip().endswith((b"END", b"SUCCESS")):
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                reply += chunk
            replies.append(reply.decode("utf-8", "replace"))
        return "\n".join(replies)


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


def _verify_script(net: Netns, password: str) -> Path:
    script = net.workdir / "verify.sh"
    script.write_text(f'#!/bin/sh\n[ "$(sed -n 1p "$1")" = alice ] && [ "$(sed -n 2p "$1")" = {password} ]\n')
    script.chmod(0o755)
    return script


def _pyovpn_extra(net: Netns, mgmt_path: str) -> str:
    return (
        f"verb 11\nstatus {net.workdir / 'status.log'} 1\nstatus-version 2\n"
        f"pyovpn-events {net.workdir / 'events.jsonl'}\nmanagement {mgmt_path} unix\n"
    )


def _pyovpn_end_after_a_rekey(net: Netns, pki: Pki, pyovpn_side: str) -> tuple[dict[str, str], str]:
    """A pyovpn end (verb 11, status, events, management) and a stock one, with a password login
    (a fresh password for alice) and auth-tokens, connected and rekeyed once. Returns everything the
    pyovpn end said and the password."""
    password = "pw-" + secrets.token_hex(12)
    creds = net.workdir / "creds.txt"
    creds.write_text(f"alice\n{password}\n")
    script = _verify_script(net, password)
    verify = f"script-security 2\nauth-user-pass-verify {script} via-file\nauth-gen-token 0\n"
    login = f"auth-user-pass {creds}\n"
    mgmt_path = str(net.workdir / "mgmt.sock")
    ours = "reneg-sec 8\n" + _pyovpn_extra(net, mgmt_path)
    impls: tuple[Impl, Impl] = ("openvpn", "pyovpn") if pyovpn_side == "client" else ("pyovpn", "openvpn")
    server_extra, client_extra = (verify, login + ours) if pyovpn_side == "client" else (verify + ours, login)
    server, client = spawn_tunnel(
        net, pki, SPEC, *impls, server_extra=server_extra, client_extra=client_extra, init_timeout=30
    )
    py = client if pyovpn_side == "client" else server
    marks = {py: py.mark()}
    wait_for_lines([py], r"renegotiated data channel key_id", 40, since=marks)
    time.sleep(1)
    said = _everything_pyovpn_said(py, net.workdir, mgmt_path)
    assert said["management"].count("END") >= 3, said["management"]
    return said, password


def test_pyovpn_client_says_no_secret(net: Netns, pki: Pki) -> None:
    said, password = _pyovpn_end_after_a_rekey(net, pki, "client")
    assert "auth-token received" in said["log"], "the server's token must have arrived (to be kept secret)"
    assert _leaks(said, _secrets(pki, password, pki.client_key)) == []


def test_pyovpn_server_says_no_secret(net: Netns, pki: Pki) -> None:
    said, password = _pyovpn_end_after_a_rekey(net, pki, "server")
    assert "alice" in said["status.log"], "the client must be listed (with its username) in the status file"
    assert _leaks(said, _secrets(pki, password, pki.server_key)) == []
