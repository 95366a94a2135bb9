"""up/down scripts: OpenVPN 2.6's argument list and environment, script-security, running them."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from pyovpn.config import parse_args
from pyovpn.edge.iface import tun_params
from pyovpn.proto.push import parse_pushed_options
from pyovpn.scripts import ScriptRefused, TunParams, refusal, run_script, up_down_args, up_down_env

SUBNET = TunParams(
    dev="tun0",
    tun_mtu=1500,
    topology="subnet",
    ifconfig=("10.8.0.1", "255.255.255.0"),
    ifconfig_ipv6="fd00:8::1/64",
)
P2P = TunParams(dev="tun3", tun_mtu=1400, topology="net30", ifconfig=("10.9.0.1", "10.9.0.2"))


def test_up_args_follow_openvpn_26() -> None:
    # cmd tun_dev tun_mtu 0 ifconfig_local ifconfig_remote_or_netmask init|restart
    assert up_down_args(SUBNET, "init") == ["tun0", "1500", "0", "10.8.0.1", "255.255.255.0", "init"]
    assert up_down_args(P2P, "restart") == ["tun3", "1400", "0", "10.9.0.1", "10.9.0.2", "restart"]
    v6_only = TunParams(dev="tun1", tun_mtu=1500, ifconfig_ipv6="fd00::2/64")
    assert up_down_args(v6_only, "init") == ["tun1", "1500", "0", "", "", "init"]


def test_env_subnet() -> None:
    assert up_down_env(SUBNET, "init") == {
        "dev": "tun0",
        "dev_type": "tun",
        "tun_mtu": "1500",
        "script_context": "init",
        "ifconfig_local": "10.8.0.1",
        "ifconfig_netmask": "255.255.255.0",
        "ifconfig_ipv6_local": "fd00:8::1",
        "ifconfig_ipv6_netbits": "64",
    }


def test_env_point_to_point_and_down_signal() -> None:
    env = up_down_env(
        TunParams(
            dev="tun3",
            tun_mtu=1400,
            topology="p2p",
            ifconfig=("10.9.0.1", "10.9.0.2"),
            ifconfig_ipv6="fd00:9::1/64",
            ifconfig_ipv6_remote="fd00:9::2",
        ),
        "init",
        signal="SIGTERM",
    )
    assert env["ifconfig_remote"] == "10.9.0.2"
    assert "ifconfig_netmask" not in env and "ifconfig_broadcast" not in env
    assert env["ifconfig_ipv6_remote"] == "fd00:9::2"
    assert env["signal"] == "SIGTERM"


def test_tun_params_from_config_and_push(tmp_path: Path) -> None:
    conf = tmp_path / "p2p.conf"
    conf.write_text(
        "dev tun\ntls-client\nremote 192.0.2.1\nifconfig 10.9.0.1 10.9.0.2\n"
        "ifconfig-ipv6 fd00:9::1/64 fd00:9::2\ntun-mtu 1400\n"
        "ca /dev/null\ncert /dev/null\nkey /dev/null\n"
    )
    opts = parse_args(["--config", str(conf)])
    p = tun_params("tun7", 1400, opts, None)
    assert up_down_args(p, "init") == ["tun7", "1400", "0", "10.9.0.1", "10.9.0.2", "init"]
    assert (p.ifconfig_ipv6, p.ifconfig_ipv6_remote) == ("fd00:9::1/64", "fd00:9::2")
    pushed = parse_pushed_options(
        ["topology subnet", "ifconfig 10.8.0.6 255.255.255.0", "ifconfig-ipv6 fd00:8::1000/64 fd00:8::1"]
    )
    q = tun_params("tun0", 1500, opts, pushed)
    assert up_down_args(q, "init") == ["tun0", "1500", "0", "10.8.0.6", "255.255.255.0", "init"]
    assert up_down_env(q, "init")["ifconfig_netmask"] == "255.255.255.0"
    assert q.ifconfig_ipv6 == "fd00:8::1000/64"


@pytest.mark.parametrize("level", [0, 1])
def test_script_security_below_2_refuses(level: int, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    why = refusal("up", level)
    assert why is not None and f"script-security {level}" in why and "script-security 2" in why
    with pytest.raises(ScriptRefused, match="refusing to run the up script"):
        asyncio.run(run_script(f"touch {marker}", "up", script_security=level))
    assert not marker.exists()
    assert refusal("up", 2) is None


def test_run_script_args_env_and_status(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = tmp_path / "rec.sh"
    script.write_text(
        '#!/bin/sh\nout="$1"; shift\necho "$*" > "$out"\n'
        'echo "$script_type $dev $ifconfig_netmask" >> "$out"\nexit "${EXIT:-0}"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = up_down_env(SUBNET, "init")
    status = asyncio.run(
        run_script(f"{script} {out}", "up", args=up_down_args(SUBNET, "init"), env=env, script_security=2)
    )
    assert status == 0
    assert out.read_text().splitlines() == [
        "tun0 1500 0 10.8.0.1 255.255.255.0 init",
        "up tun0 255.255.255.0",
    ]
    env["EXIT"] = "3"
    assert asyncio.run(run_script(f"{script} {out}", "down", env=env, script_security=2)) == 3
    assert asyncio.run(run_script(str(tmp_path / "missing"), "up", script_security=2)) == 1
    assert "script_type" not in os.environ


def test_run_script_timeout_kills(tmp_path: Path) -> None:
    assert asyncio.run(run_script("sleep 30", "down", script_security=2, timeout=0.2)) == 1
