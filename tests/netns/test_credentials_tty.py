"""A bare `auth-user-pass` typed at a real terminal (tmux), against a stock OpenVPN 2.6 server that
checks the password with a script and hands out an auth-token; the reconnect uses the token."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness as h

pytestmark = pytest.mark.netns

PASSWORD = "Tr0ub4dor-zebra"


class Tmux:
    """A private tmux server (own socket) with one window."""

    def __init__(self, socket: Path) -> None:
        self.base = ["tmux", "-S", str(socket)]

    def start(self, command: str) -> None:
        subprocess.run([*self.base, "new-session", "-d", "-x", "200", "-y", "50", command], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "0", *keys], check=True)

    def screen(self) -> str:
        done = subprocess.run(
            [*self.base, "capture-pane", "-p", "-J", "-S", "-", "-t", "0"], stdout=subprocess.PIPE, text=True
        )
        return done.stdout

    def wait_for(self, text: str, timeout: float, *, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} (x{count}) not on the terminal after {timeout} s:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], stderr=subprocess.DEVNULL, check=False)


@pytest.fixture
def tmux(net: h.Netns) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/setup.sh installs it)")
    t = Tmux(net.workdir / "tmux.sock")
    try:
        yield t
    finally:
        t.kill()


def _wait_file_count(path: Path, text: str, count: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = path.read_text(errors="replace") if path.exists() else ""
        if body.count(text) >= count:
            return body
        time.sleep(0.2)
    raise AssertionError(f"{text!r} (x{count}) not in {path} after {timeout} s:\n{body[-3000:]}")


SPEC = h.TunnelSpec(role="server", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4)


def _start_server(net: h.Netns, pki: Pki, impl: h.Impl, extra: str, *, calls: Path | None = None) -> h.Proc:
    """A server whose script accepts only alice with PASSWORD (recording each call's username and
    password in ``calls`` if given); ``extra`` follows its auth-user-pass-verify line."""
    record = f'echo "$(sed -n 1p "$1") $(sed -n 2p "$1")" >> {calls}\n' if calls is not None else ""
    check = f'[ "$(sed -n 1p "$1")" = alice ] && [ "$(sed -n 2p "$1")" = {PASSWORD} ]\n'
    script = h.write_script(net.workdir / "verify.sh", "#!/bin/sh\n" + record + check)
    server_conf = net.workdir / "s.conf"
    server_conf.write_text(
        h.server_config(SPEC, pki, impl=impl, local=net.outer("b", 4))
        + f"script-security 2\nauth-user-pass-verify {script} via-file\n"
        + extra
    )
    return net.start_server(impl, server_conf, proto=SPEC.proto, port=SPEC.port)


def _client_conf(net: h.Netns, pki: Pki, impl: h.Impl, extra: str) -> Path:
    client_conf = net.workdir / "c.conf"
    client_conf.write_text(h.client_config(SPEC, pki, impl=impl, remote=net.outer("b", 4)) + extra)
    return client_conf


def _pyovpn_on_the_terminal(net: h.Netns, tmux: Tmux, client_conf: Path) -> Path:
    """Start a pyovpn client in namespace a inside the tmux window; returns its log (tee'd)."""
    log = net.workdir / "client.log"
    env = f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}"
    run = f"ip netns exec {net.a} env {env} {sys.executable} -m pyovpn --config {client_conf}"
    tmux.start(f"{run} 2>&1 | tee {log}; sleep 600")  # the pane outlives the client for capture-pane
    return log


def _type_login(tmux: Tmux, password: str, *, count: int = 1) -> None:
    """Answer the ``count``-th username and password prompts."""
    tmux.wait_for("Enter Auth Username:", 30, count=count)
    tmux.send("alice", "Enter")
    tmux.wait_for("Enter Auth Password:", 10, count=count)
    tmux.send(password, "Enter")


def test_prompted_password_then_token_reconnect(net: h.Netns, pki: Pki, tmux: Tmux) -> None:
    calls = net.workdir / "verify-calls.txt"
    # records every call (username and password) and accepts only alice with the right password
    _start_server(net, pki, "openvpn", "auth-gen-token 3600\n", calls=calls)
    pidfile = net.workdir / "client.pid"
    client_conf = _client_conf(net, pki, "pyovpn", f"auth-user-pass\nauth-nocache\nwritepid {pidfile}\n")
    log = _pyovpn_on_the_terminal(net, tmux, client_conf)
    _type_login(tmux, PASSWORD)
    _wait_file_count(log, h.INIT_LINE, 1, 40)
    assert h.ping(net.a, h.inner_addrs(SPEC).server4).ok
    assert calls.read_text().splitlines() == [f"alice {PASSWORD}"]

    # SIGUSR1: reconnect with the server's token, no prompt although the password was not cached
    os.kill(int(pidfile.read_text().strip()), signal.SIGUSR1)
    _wait_file_count(log, h.INIT_LINE, 2, 40)
    assert h.ping(net.a, h.inner_addrs(SPEC).server4).ok
    screen = tmux.screen()
    assert screen.count("Enter Auth Password:") == 1, screen
    assert "auth-token received" in log.read_text()
    # a valid token is checked by OpenVPN itself: the script never saw a second login
    assert calls.read_text().splitlines() == [f"alice {PASSWORD}"]
    assert PASSWORD not in screen
    assert PASSWORD not in log.read_text()


def test_pyovpn_server_token_accepted_on_stock_client_reconnect(net: h.Netns, pki: Pki) -> None:
    """pyovpn server with auth-gen-token: a stock client reconnecting after SIGUSR1 sends the token,
    and the server takes it without running the password script again."""
    calls = net.workdir / "verify-calls.txt"
    creds = net.workdir / "up.txt"
    creds.write_text(f"alice\n{PASSWORD}\n")
    server = _start_server(net, pki, "pyovpn", "auth-gen-token 3600\n", calls=calls)
    pidfile = net.workdir / "client.pid"
    client_conf = _client_conf(
        net, pki, "openvpn", f"auth-user-pass {creds}\nauth-nocache\nwritepid {pidfile}\nverb 4\n"
    )
    client = net.spawn("a", h.vpn_argv("openvpn", client_conf), "client-openvpn")
    client.wait_for_line(h.INIT_LINE, 40)
    assert h.ping(net.a, h.inner_addrs(SPEC).server4).ok
    assert calls.read_text().splitlines() == [f"alice {PASSWORD}"]

    mark = client.mark()
    os.kill(int(pidfile.read_text().strip()), signal.SIGUSR1)
    client.wait_for_line(h.INIT_LINE, 40, since=mark)
    assert h.ping(net.a, h.inner_addrs(SPEC).server4).ok
    # the second login was the token: the script ran once in all
    assert calls.read_text().splitlines() == [f"alice {PASSWORD}"], server.tail()
    assert "auth-token" in client.text()


def test_auth_retry_interact_asks_again_after_auth_failed(net: h.Netns, pki: Pki, tmux: Tmux) -> None:
    """A mistyped password: AUTH_FAILED from the stock server, then (auth-retry interact) new prompts."""
    _start_server(net, pki, "openvpn", "")
    client_conf = _client_conf(net, pki, "pyovpn", "auth-user-pass\nauth-retry interact\n")
    log = _pyovpn_on_the_terminal(net, tmux, client_conf)
    _type_login(tmux, "wrong-password")
    _wait_file_count(log, "AUTH_FAILED", 1, 40)
    _type_login(tmux, PASSWORD, count=2)
    _wait_file_count(log, h.INIT_LINE, 1, 40)
    assert h.ping(net.a, h.inner_addrs(SPEC).server4).ok
    screen = tmux.screen()
    assert PASSWORD not in screen and "wrong-password" not in screen
