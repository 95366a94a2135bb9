"""management-query-passwords against stock OpenVPN 2.6: the `>PASSWORD` dialogue, and the command
line NetworkManager-openvpn starts the VPN with.

NetworkManager-openvpn (src/nm-openvpn-service.c, 1.10 as in Debian 12) runs openvpn with a unix
management socket, `--management-query-passwords --auth-retry interact`, `--route-noexec
--ifconfig-noexec` and an `up` helper that hands the connection's settings (from its environment)
to NetworkManager, which configures the device. Here the helper is a script that records its
arguments and environment and configures the device itself; a test client plays NetworkManager
on the socket: it answers `>PASSWORD:Need 'Auth' username/password` with `username`/`password`
quoted the way NetworkManager quotes them, first with a wrong password (the server says
AUTH_FAILED, the daemon reports `>PASSWORD:Verification Failed: 'Auth'` and asks again), then
with the right one; the server's auth-token is passed on as `>PASSWORD:Auth-Token:`, and once
up the process runs chrooted. Stock `openvpn` and pyovpn get the same command line, in turn,
against the same stock server; the transcripts on the socket and the helper's arguments and
environments are compared. Two more tests compare the dialogue's error replies (and a static
challenge's question) and an encrypted key's `>PASSWORD:Need 'Private Key' password`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness
from tests.netns.harness import Impl, Netns, Proc, inner_addrs
from tests.netns.test_management import Mgmt
from tests.unit.test_keymaterial import _encrypted_key

pytestmark = pytest.mark.netns

SPEC = harness.TunnelSpec(role="server", cipher="AES-256-GCM", wrap="none", proto="udp", family=4)
# space, quote and backslash: the characters NetworkManager escapes before sending a secret
PASSWORD = 'c0rrect "horse" b\\attery'
WRONG = "Tr0ub4dor&3"

# Records argv and environment as JSON, then configures the device from that environment: what
# NetworkManager does with what its helper reports (the daemon itself configures nothing here).
HELPER = """#!{python}
import ipaddress, json, os, subprocess, sys
with open({out!r} + ".tmp", "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, f)
os.rename({out!r} + ".tmp", {out!r})
e = os.environ
bits = ipaddress.IPv4Network("0.0.0.0/" + e["ifconfig_netmask"]).prefixlen
subprocess.run(["ip", "addr", "add", e["ifconfig_local"] + "/" + str(bits), "dev", e["dev"]], check=True)
subprocess.run(["ip", "link", "set", "dev", e["dev"], "mtu", e["tun_mtu"], "up"], check=True)
i = 1
while "route_network_%d" % i in e:
    net = ipaddress.IPv4Network(e["route_network_%d" % i] + "/" + e["route_netmask_%d" % i])
    subprocess.run(["ip", "route", "add", str(net), "via", e["route_gateway_%d" % i]], check=True)
    i += 1
"""

# Set by the shell, the test runner or the helper's interpreter, not by either VPN.
INHERITED = {"PWD", "SHLVL", "_", "OLDPWD", "LC_CTYPE"}
SAME_VALUE = (
    "dev",
    "dev_type",
    "script_type",
    "script_context",
    "tun_mtu",
    "ifconfig_local",
    "ifconfig_netmask",
    "ifconfig_ipv6_local",
    "ifconfig_ipv6_netbits",
    "route_vpn_gateway",
    "route_network_1",
    "route_netmask_1",
    "route_gateway_1",
    "route_ipv6_network_1",
    "foreign_option_1",
    "foreign_option_2",
    "remote_1",
    "remote_port_1",
    "proto_1",
    "common_name",
    "X509_0_CN",
    "redirect_gateway",
    "daemon",
    "daemon_log_redirect",
)


def nm_quote(text: str) -> str:
    """NetworkManager-openvpn's ovpn_quote_string: a backslash before space, backslash and quote."""
    return "".join("\\" + ch if ch in ' \\"' else ch for ch in text)


def nm_answer(username: str, password: str) -> bytes:
    """What NetworkManager writes (one write) to answer `>PASSWORD:Need 'Auth' username/password`."""
    return f'username "Auth" "{nm_quote(username)}"\npassword "Auth" "{nm_quote(password)}"\n'.encode()


def nm_argv(
    impl: Impl, net: Netns, pki: Pki, *, mgmt: Path, helper: Path, key: Path | None = None, auth: bool = True
) -> list[str]:
    """NetworkManager-openvpn's command line for a "password with certificates" connection (with
    ``auth=False``: a "certificates (TLS)" one) with default settings. Its `--user nm-openvpn
    --group nm-openvpn` become nobody/nogroup (no such user here); its `--chroot
    /var/lib/openvpn/chroot` (a directory with a `tmp` in it) is one in the test's directory."""
    binary = ["openvpn"] if impl == "openvpn" else [sys.executable, "-m", "pyovpn"]
    bus = "org.freedesktop.NetworkManager.openvpn.Connection_7"
    up = f"{helper} --debug 0 {os.getpid()} --bus-name {bus} --tun --"
    argv = [
        *binary,
        "--remote", net.outer("b", 4), str(SPEC.port), "udp",
        "--explicit-exit-notify",
        "--nobind",
        "--dev", "tun",
        "--auth-nocache",
        "--syslog", "nm-openvpn",
        "--script-security", "2",
        "--up", up,
        "--up-restart",
        "--persist-key",
        "--persist-tun",
        "--management", str(mgmt), "unix",
        "--management-client-user", "root",
        "--management-client-group", "root",
        "--management-query-passwords",
        "--auth-retry", "interact",
        "--route-noexec",
        "--ifconfig-noexec",
        "--client",
        "--ca", str(pki.ca_crt),
        "--cert", str(pki.client_crt),
        "--key", str(key or pki.client_key),
        *(["--auth-user-pass"] if auth else []),
        "--user", "nobody",
        "--group", "nogroup",
        "--chroot", str(chroot_dir(net)),
    ]  # fmt: skip
    # the harness's rule: stock openvpn never uses whatever kernel DCO module happens to be loaded
    return [*argv, "--disable-dco"] if impl == "openvpn" else argv


def chroot_dir(net: Netns) -> Path:
    """Where NetworkManager's command line chroots to: a directory with a `tmp` (what it checks for)."""
    path = net.workdir / "chroot"
    (path / "tmp").mkdir(parents=True, exist_ok=True)
    return path


def _read_json(path: Path, proc: Proc, timeout: float = 40.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.running(), f"{proc.name} exited before its up helper ran:\n{proc.tail()}"
        assert time.monotonic() < deadline, f"the up helper never ran:\n{proc.tail()}"
        time.sleep(0.2)
    data: dict[str, object] = json.loads(path.read_text())
    return data


def _reply(m: Mgmt, command: str) -> list[str]:
    """Send one command; the lines up to its SUCCESS/ERROR line (a notification may precede it)."""
    m.sock.sendall(command.encode() + b"\n")
    return m.until(r"^(SUCCESS|ERROR):")


DIALOGUE = [
    "needok x ok",
    "needstr",
    "auth-retry",
    "auth-retry bogus",
    "auth-retry interact",
    "username Wrong x",
    'password "Auth"',
    'username "Auth" "al\\ ice"',
    'password "Auth" "p\\"w"',
    'password "Auth" again',
    'username "Auth" z',
    "forget-passwords",
]


def test_password_commands_answer_like_stock_openvpn(net: Netns, pki: Pki) -> None:
    """The dialogue's replies, errors included, byte for byte as stock OpenVPN gives them (no server:
    the answers are never verified, only taken), with a static challenge in the question."""
    transcripts: dict[str, list[str]] = {}
    for impl in ("openvpn", "pyovpn"):
        sock = net.workdir / f"{impl}.sock"
        argv = [
            *nm_argv(impl, net, pki, mgmt=sock, helper=Path("/bin/true")),
            "--static-challenge",
            "PIN?",
            "1",
        ]
        proc = net.spawn("a", argv, f"dialogue-{impl}")
        m = Mgmt(str(sock))
        try:
            seen = [m.line(), m.line()]
            if impl == "pyovpn":  # OpenVPN serves one client at a time; pyovpn asks a late one too
                late = Mgmt(str(sock))
                assert [late.line(), late.line()] == seen
                late.close()
            for command in DIALOGUE:
                seen += [f"< {command}", *_reply(m, command)]
            transcripts[impl] = seen
        finally:
            m.close()
            proc.stop(timeout=15)
    assert transcripts["openvpn"][1] == ">PASSWORD:Need 'Auth' username/password SC:1,PIN?"
    assert transcripts["pyovpn"] == transcripts["openvpn"]


def _connect_as_networkmanager(
    net: Netns, impl: Impl, pki: Pki, verify_log: Path
) -> tuple[list[str], dict[str, object]]:
    """Start `impl` with NetworkManager's command line, answer wrong then right; the >PASSWORD
    transcript and what the up helper recorded (once the tunnel carries a ping)."""
    work = net.workdir
    dump = work / f"{impl}-up.json"
    helper = work / f"{impl}-helper"
    helper.write_text(HELPER.format(python=sys.executable, out=str(dump)))
    helper.chmod(0o755)
    # NetworkManager's socket name, in a short directory: a unix socket path has at most 107 bytes
    sock_dir = Path(tempfile.mkdtemp(prefix="nm-"))
    sock = sock_dir / f"nm-openvpn-{uuid.uuid4()}"
    client = net.spawn("a", nm_argv(impl, net, pki, mgmt=sock, helper=helper), f"client-{impl}")
    try:
        m = Mgmt(str(sock))
    except BaseException:
        client.stop(timeout=15)
        shutil.rmtree(sock_dir, ignore_errors=True)
        raise
    seen: list[str] = []
    try:
        seen += m.until(r"^>PASSWORD:Need 'Auth' username/password$")
        m.sock.sendall(nm_answer("alice", WRONG))
        seen += [m.line(), m.line()]
        seen += m.until(r"^>PASSWORD:Verification Failed")
        seen += m.until(r"^>PASSWORD:Need 'Auth' username/password$")
        m.sock.sendall(nm_answer("alice", PASSWORD))
        seen += [m.line(), m.line()]
        recorded = _read_json(dump, client)
        assert harness.ping(net.a, inner_addrs(SPEC).server4).ok, client.tail()
        seen += m.until(r"^>PASSWORD:Auth-Token:")  # the server's auth-token, passed on
        assert os.readlink(f"/proc/{client.pid}/root") == str(chroot_dir(net))  # chrooted once up
        # the server ran its check twice: the wrong password, then the right one (spaces and all)
        assert verify_log.read_text().splitlines()[-2:] == [f"alice {WRONG}", f"alice {PASSWORD}"]
        assert sock.stat().st_mode & 0o777 == 0o600 or impl == "openvpn"
    finally:
        m.close()
        client.stop(timeout=15)
        shutil.rmtree(sock_dir, ignore_errors=True)
    time.sleep(1)  # the server notices the exit before the next client takes the same address
    dialogue = [x for x in seen if x.startswith((">PASSWORD", "SUCCESS", "ERROR"))]
    token = re.compile(r"(>PASSWORD:Auth-Token:)\S{20,}$")  # the token itself differs per login
    return [token.sub(r"\1<token>", x) for x in dialogue], recorded


def _password_server(net: Netns, pki: Pki, extra: str = "") -> Path:
    """A stock OpenVPN server that takes alice with PASSWORD (its script logs every try); the log."""
    work = net.workdir
    verify_log = work / "verify.log"
    expected = work / "expected-password"
    expected.write_text(PASSWORD + "\n")
    verify = work / "verify.sh"
    verify.write_text(
        "#!/bin/sh\n"
        f'printf "%s %s\\n" "$(sed -n 1p "$1")" "$(sed -n 2p "$1")" >> {verify_log}\n'
        f'[ "$(sed -n 1p "$1")" = alice ] && [ "$(sed -n 2p "$1")" = "$(cat {expected})" ]\n'
    )
    verify.chmod(0o755)
    server_conf = work / "server.conf"
    server_conf.write_text(
        harness.server_config(SPEC, pki, impl="openvpn", local=net.outer("b", 4))
        + f"script-security 2\nauth-user-pass-verify {verify} via-file\n{extra}"
    )
    server = net.spawn("b", ["openvpn", "--config", str(server_conf)], "server-openvpn")
    harness.wait_listening(net.b, SPEC.proto, SPEC.port, proc=server)
    return verify_log


def test_networkmanager_command_line_and_password_dialogue(net: Netns, pki: Pki) -> None:
    verify_log = _password_server(
        net,
        pki,
        "auth-gen-token 3600\n"
        'push "route 10.99.0.0 255.255.0.0"\npush "dhcp-option DNS 10.77.0.1"\n'
        'push "dhcp-option DOMAIN example.test"\n',
    )

    transcripts: dict[str, list[str]] = {}
    recorded: dict[str, dict[str, object]] = {}
    for impl in ("openvpn", "pyovpn"):
        transcripts[impl], recorded[impl] = _connect_as_networkmanager(net, impl, pki, verify_log)

    assert transcripts["openvpn"] == [
        ">PASSWORD:Need 'Auth' username/password",
        "SUCCESS: 'Auth' username entered, but not yet verified",
        "SUCCESS: 'Auth' password entered, but not yet verified",
        ">PASSWORD:Verification Failed: 'Auth'",
        ">PASSWORD:Need 'Auth' username/password",
        "SUCCESS: 'Auth' username entered, but not yet verified",
        "SUCCESS: 'Auth' password entered, but not yet verified",
        ">PASSWORD:Auth-Token:<token>",
    ], transcripts["openvpn"]
    assert transcripts["pyovpn"] == transcripts["openvpn"]

    stock_env, ours_env = (recorded[i]["env"] for i in ("openvpn", "pyovpn"))
    assert isinstance(stock_env, dict) and isinstance(ours_env, dict)
    inherited = set(os.environ) | INHERITED
    stock = {n for n in stock_env if n not in inherited}
    ours = {n for n in ours_env if n not in inherited}
    print(f"stock-only: {sorted(stock - ours)}; pyovpn-only: {sorted(ours - stock)}")
    assert stock == ours
    for name in SAME_VALUE:
        assert ours_env.get(name) == stock_env.get(name), (name, stock_env.get(name), ours_env.get(name))
    assert ours_env["ifconfig_local"] == inner_addrs(SPEC).client4
    assert ours_env["route_network_1"] == "10.99.0.0"
    assert ours_env["foreign_option_1"] == "dhcp-option DNS 10.77.0.1"
    # the helper's own arguments, then dev, tun_mtu, 0, local address, netmask, init
    stock_argv, ours_argv = recorded["openvpn"]["argv"], recorded["pyovpn"]["argv"]
    assert isinstance(ours_argv, list) and ours_argv == stock_argv, (stock_argv, ours_argv)
    assert re.fullmatch(r"tun\d+", str(ours_argv[-6])) and ours_argv[-1] == "init"


def test_encrypted_key_passphrase_over_management(net: Netns, pki: Pki) -> None:
    """A "certificates (TLS)" connection whose key is encrypted: `>PASSWORD:Need 'Private Key'
    password`, a wrong passphrase is reported and asked again, the right one brings the tunnel up;
    the same transcript as stock OpenVPN's."""
    work = net.workdir
    key = work / "client-encrypted.key"
    passphrase = "open sesame"
    key.write_bytes(_encrypted_key(pki, passphrase.encode()))  # PKCS#8, AES-256: both read it
    server_conf = work / "server.conf"
    server_conf.write_text(harness.server_config(SPEC, pki, impl="openvpn", local=net.outer("b", 4)))
    server = net.spawn("b", ["openvpn", "--config", str(server_conf)], "server-openvpn")
    harness.wait_listening(net.b, SPEC.proto, SPEC.port, proc=server)
    transcripts: dict[str, list[str]] = {}
    for impl in ("openvpn", "pyovpn"):
        sock = work / f"{impl}-key.sock"
        dump = work / f"{impl}-key-up.json"
        helper = work / f"{impl}-key-helper"
        helper.write_text(HELPER.format(python=sys.executable, out=str(dump)))
        helper.chmod(0o755)
        argv = nm_argv(impl, net, pki, mgmt=sock, helper=helper, key=key, auth=False)
        client = net.spawn("a", argv, f"client-key-{impl}")
        m = Mgmt(str(sock))
        seen: list[str] = []
        try:
            need = r"^>PASSWORD:Need 'Private Key' password$"
            seen += m.until(need)
            m.sock.sendall(b'password "Private Key" "wrong\\ one"\n')
            seen += m.until(r"^>PASSWORD:Verification Failed")
            seen += m.until(need)
            m.sock.sendall(f'password "Private Key" "{nm_quote(passphrase)}"\n'.encode())
            seen.append(m.line())
            _read_json(dump, client)
            assert harness.ping(net.a, inner_addrs(SPEC).server4).ok, client.tail()
        finally:
            m.close()
            client.stop(timeout=15)
        time.sleep(1)
        transcripts[impl] = [x for x in seen if x.startswith((">PASSWORD", "SUCCESS", "ERROR"))]
    print(transcripts["openvpn"])
    assert transcripts["openvpn"][-1] == "SUCCESS: 'Private Key' password entered, but not yet verified"
    assert ">PASSWORD:Verification Failed: 'Private Key'" in transcripts["openvpn"]
    assert transcripts["pyovpn"] == transcripts["openvpn"]


def test_forget_disconnect_asks_again_after_the_client_left(net: Netns, pki: Pki) -> None:
    """`management-forget-disconnect`: once the management client that answered leaves, the
    credentials are forgotten, so a restart (SIGUSR1) asks the next client again, as with OpenVPN;
    without it the cached password would be used silently."""
    _password_server(net, pki)
    transcripts: dict[str, list[str]] = {}
    for impl in ("openvpn", "pyovpn"):
        sock = net.workdir / f"{impl}-forget.sock"
        conf = net.workdir / f"{impl}-forget.conf"
        conf.write_text(
            harness.client_config(SPEC, pki, impl=impl, remote=net.outer("b", 4))
            + f"auth-user-pass\nmanagement {sock} unix\nmanagement-query-passwords\n"
            + "management-forget-disconnect\n"
        )
        client = net.spawn("a", harness.vpn_argv(impl, conf), f"client-forget-{impl}")
        first = Mgmt(str(sock))
        try:
            first.until(r"^>PASSWORD:Need 'Auth'")
            first.sock.sendall(nm_answer("alice", PASSWORD))
            client.wait_for_line(harness.INIT_LINE, 40)
        finally:
            first.close()
        time.sleep(1)  # the daemon notices the client is gone
        mark = client.mark()
        os.kill(client.pid, signal.SIGUSR1)
        second = Mgmt(str(sock))
        try:
            seen = [second.line(), *second.until(r"^>PASSWORD:Need 'Auth'")]
            second.sock.sendall(nm_answer("alice", PASSWORD))
            client.wait_for_line(harness.INIT_LINE, 40, since=mark)
            assert harness.ping(net.a, inner_addrs(SPEC).server4).ok, client.tail()
        finally:
            second.close()
            client.stop(timeout=15)
        time.sleep(1)
        transcripts[impl] = seen
    assert transcripts["openvpn"][-1] == ">PASSWORD:Need 'Auth' username/password"
    assert transcripts["pyovpn"] == transcripts["openvpn"]
