"""Operations without root: status-file layouts, atomic writes, sd_notify, service options, unit files."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyovpn.config import ConfigError, Options, parse_args, parse_config_text
from pyovpn.edge import status
from pyovpn.edge.sdnotify import SystemdNotifier
from tests.unit.configtext import INLINE_CREDENTIALS

ROOT = Path(__file__).resolve().parents[2]
NOW = 1796395819.0


def _row(**kw: object) -> status.ClientRow:
    base: dict[str, object] = dict(
        common_name="client1",
        real_address="127.0.0.1:40799",
        virtual_address="10.99.0.2",
        virtual_ipv6="fd99::1000",
        bytes_received=2188,
        bytes_sent=2139,
        connected_since=NOW - 16,
        username="UNDEF",
        client_id=0,
        peer_id=0,
        cipher="AES-256-GCM",
        last_ref=NOW - 15,
    )
    base.update(kw)
    return status.ClientRow(**base)  # type: ignore[arg-type]


def _local(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def test_client_statistics_block() -> None:
    text = status.render_client(status.LinkCounters(192, 96, 2317, 2314, 128), NOW)
    assert text.splitlines() == [
        "OpenVPN STATISTICS",
        f"Updated,{_local(NOW)}",
        "TUN/TAP read bytes,192",
        "TUN/TAP write bytes,96",
        "TCP/UDP read bytes,2317",
        "TCP/UDP write bytes,2314",
        "Auth read bytes,128",
        "END",
    ]


def test_server_v1_layout() -> None:
    lines = status.render_server([_row(iroutes=("10.55.0.0/24",))], NOW, 1).splitlines()
    assert lines[:3] == [
        "OpenVPN CLIENT LIST",
        f"Updated,{_local(NOW)}",
        "Common Name,Real Address,Bytes Received,Bytes Sent,Connected Since",
    ]
    assert lines[3] == f"client1,127.0.0.1:40799,2188,2139,{_local(NOW - 16)}"
    assert lines[4:6] == ["ROUTING TABLE", "Virtual Address,Common Name,Real Address,Last Ref"]
    assert lines[6] == f"10.99.0.2,client1,127.0.0.1:40799,{_local(NOW - 15)}"
    assert lines[7] == f"fd99::1000,client1,127.0.0.1:40799,{_local(NOW - 15)}"
    assert lines[8] == f"10.55.0.0/24,client1,127.0.0.1:40799,{_local(NOW - 15)}"
    assert lines[9:] == ["GLOBAL STATS", "Max bcast/mcast queue length,0", "END"]


@pytest.mark.parametrize("version, sep", [(2, ","), (3, "\t")])
def test_server_v2_v3_layout(version: int, sep: str) -> None:
    lines = status.render_server([_row()], NOW, version, dco=True).splitlines()
    rows = [line.split(sep) for line in lines]
    assert rows[0][0] == "TITLE" and rows[0][1].startswith("OpenVPN 2.6.") and "[pyovpn " in rows[0][1]
    assert len(rows[0][1].split()) >= 3  # exporters read "OpenVPN" and three words
    assert rows[1] == ["TIME", _local(NOW), str(int(NOW))]
    header = rows[2]
    assert header[:2] == ["HEADER", "CLIENT_LIST"]
    assert header[-3:] == ["Client ID", "Peer ID", "Data Channel Cipher"]
    client = rows[3]
    assert client[0] == "CLIENT_LIST" and len(client) == len(header) - 1
    assert dict(zip(header[2:], client[1:], strict=True))["Virtual IPv6 Address"] == "fd99::1000"
    assert client[-1] == "AES-256-GCM"
    assert rows[4] == [
        "HEADER",
        "ROUTING_TABLE",
        "Virtual Address",
        "Common Name",
        "Real Address",
        "Last Ref",
        "Last Ref (time_t)",
    ]
    assert rows[5][:2] == ["ROUTING_TABLE", "10.99.0.2"] and rows[5][-1] == str(int(NOW - 15))
    assert rows[-3:] == [
        ["GLOBAL_STATS", "Max bcast/mcast queue length", "0"],
        ["GLOBAL_STATS", "dco_enabled", "1"],
        ["END"],
    ]
    if version == 3:
        assert "," not in lines[2]


def test_server_without_clients_has_headers_only() -> None:
    lines = status.render_server([], NOW, 2).splitlines()
    kinds = ["TITLE", "TIME", "HEADER", "HEADER", "GLOBAL_STATS", "GLOBAL_STATS", "END"]
    assert [line.split(",")[0] for line in lines] == kinds
    with pytest.raises(ValueError, match="status-version 4"):
        status.render_server([], NOW, 4)


def test_write_atomic_is_private_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "status.log"
    target.write_text("old\n")
    os.chmod(target, 0o644)
    status.write_atomic(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["status.log"]
    with pytest.raises(OSError):
        status.write_atomic(str(tmp_path / "missing-dir" / "s.log"), "x")
    assert [p.name for p in tmp_path.iterdir()] == ["status.log"]


CLIENT = "client\ndev tun\nremote 127.0.0.1 1194\n" + INLINE_CREDENTIALS


def _conf(extra: str) -> Options:
    return parse_config_text(CLIENT + extra)


def test_status_and_service_options_parse(tmp_path: Path) -> None:
    o = _conf("status /run/s.log 5\nstatus-version 3\nsuppress-timestamps\nup-restart\n")
    assert (o.status_file, o.status_interval, o.status_version) == ("/run/s.log", 5, 3)
    assert o.suppress_timestamps and o.up_restart
    assert _conf("status s.log\n").status_interval == 60
    assert _conf("syslog\n").syslog == "pyovpn"
    d = _conf("daemon myvpn\n")
    assert d.daemon and d.syslog == "myvpn"
    with pytest.raises(ConfigError, match="status-version"):
        _conf("status-version 4\n")
    with pytest.raises(ConfigError, match="status"):
        _conf("status s.log soon\n")
    # `--cd DIR`: files named after it are found there, as after OpenVPN's chdir
    conf = tmp_path / "c.conf"
    conf.write_text(CLIENT + "verb 3\n")
    o = parse_args(["--cd", str(tmp_path), "--config", "c.conf"], cwd="/")
    assert o.cd == str(tmp_path) and o.verb == 3
    with pytest.raises(ConfigError, match="not a directory"):
        parse_args(["--cd", str(tmp_path / "nope"), "--config", "c.conf"], cwd="/")


def _listener(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(2)
    return s


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_reaches_a_listener(tmp_path: Path, abstract: bool) -> None:
    name = f"pyovpn-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with _listener("\0" + name if abstract else name) as sock:
        n = SystemdNotifier("@" + name if abstract else name)
        assert n.enabled
        n.ready("Initialization Sequence Completed")
        assert sock.recv(4096) == b"READY=1\nSTATUS=Initialization Sequence Completed"
        n.ready("Initialization Sequence Completed")  # a reconnect: READY was said already
        assert sock.recv(4096) == b"STATUS=Initialization Sequence Completed"
        n.reloading()
        assert sock.recv(4096) == b"RELOADING=1\nSTATUS=restarting"
        n.ready("up again")  # after a reload systemd waits for READY=1 again
        assert sock.recv(4096) == b"READY=1\nSTATUS=up again"
        n.stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=exiting"


def test_sd_notify_without_a_service_manager_sends_nothing(tmp_path: Path) -> None:
    assert not SystemdNotifier("").enabled
    assert SystemdNotifier("").send(READY="1") is False
    # a socket that went away is a warning, not an error
    assert SystemdNotifier(str(tmp_path / "gone")).send(READY="1") is False


@pytest.mark.parametrize("unit", ["pyovpn-client@.service", "pyovpn-server@.service"])
def test_systemd_units_verify(tmp_path: Path, unit: str) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd); cannot verify the unit")
    text = (ROOT / "contrib" / "systemd" / unit).read_text()
    assert "ExecStart=/usr/local/bin/pyovpn " in text
    assert "Type=notify" in text and "CAP_NET_ADMIN" in text
    # verify checks that ExecStart's binary exists: point it at this interpreter running pyovpn
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/pyovpn", f"{sys.executable} -m pyovpn"))
    instance = unit.replace("@.", "@test.")
    res = subprocess.run([tool, "verify", instance], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
