"""ifconfig-pool-persist: OpenVPN 2.6's `CN,IPv4,IPv6` lines, the file held open from the start, N=0."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyovpn.config import parse_config_text
from pyovpn.errors import ConfigError, PyovpnError
from pyovpn.server import pool as pool_module
from pyovpn.server.ccd import place_client
from pyovpn.server.pool import AddressPool
from tests.unit.test_config_server import BASE


def _pool(path: Path, seconds: int = 600, v6: str | None = None) -> AddressPool:
    return AddressPool("10.8.0.2", "10.8.0.20", "255.255.255.0", v6, str(path), seconds)


def test_written_as_openvpn_writes_it(tmp_path: Path) -> None:
    f = tmp_path / "ipp.txt"
    p = _pool(f)
    p.acquire("bob", exclusive_cn=True)
    p.acquire("alice", exclusive_cn=True)
    assert f.read_text() == "alice,10.8.0.3,\nbob,10.8.0.2,\n"

    g = tmp_path / "ipp6.txt"
    q = _pool(g, v6="fd00:8::1000/64")
    assert q.acquire("carol", exclusive_cn=True) == ("10.8.0.2", "fd00:8::1000/64")
    assert g.read_text() == "carol,10.8.0.2,fd00:8::1000\n"


def test_read_back_after_a_restart_gives_the_same_address(tmp_path: Path) -> None:
    f = tmp_path / "ipp.txt"
    f.write_text("dave,10.8.0.9,\nerin,10.8.0.7,fd00::7\n")
    p = _pool(f)
    assert p.acquire("erin", exclusive_cn=True)[0] == "10.8.0.7"
    assert p.acquire("dave", exclusive_cn=True)[0] == "10.8.0.9"
    assert p.acquire("frank", exclusive_cn=True)[0] == "10.8.0.2"
    assert f.read_text().splitlines() == ["dave,10.8.0.9,", "erin,10.8.0.7,", "frank,10.8.0.2,"]


def test_rewrites_through_the_handle_opened_before_the_file_turned_unwritable(tmp_path: Path) -> None:
    # what a privilege drop does to a root-created file, shown without root: the path cannot be
    # opened for writing any more, the handle opened at start still writes
    f = tmp_path / "ipp.txt"
    p = _pool(f)
    os.chmod(f, 0o400)
    if os.access(f, os.W_OK):
        print("running as root: the path stays writable, only the handle reuse is checked")
    p.acquire("gina", exclusive_cn=True)
    assert f.read_text() == "gina,10.8.0.2,\n"
    again = _pool(f)  # a SIGHUP restart builds a new pool: it reuses the open handle
    again.acquire("hank", exclusive_cn=True)
    assert f.read_text() == "gina,10.8.0.2,\nhank,10.8.0.3,\n"
    assert again.acquire("gina", exclusive_cn=True)[0] == "10.8.0.2"


def test_zero_seconds_reads_but_never_writes(tmp_path: Path) -> None:
    f = tmp_path / "ipp.txt"
    f.write_text("ivy,10.8.0.5,\n")
    p = _pool(f, seconds=0)
    assert p.acquire("ivy", exclusive_cn=True)[0] == "10.8.0.5"
    p.acquire("jack", exclusive_cn=True)
    assert f.read_text() == "ivy,10.8.0.5,\n"


def test_unopenable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ifconfig-pool-persist"):
        _pool(tmp_path / "missing-dir" / "ipp.txt")


@pytest.fixture(autouse=True)
def _fresh_handles() -> None:
    pool_module._PERSIST_HANDLES.clear()


def test_remembered_addresses_are_kept_free_until_the_pool_runs_out(tmp_path: Path) -> None:
    f = tmp_path / "ipp.txt"
    f.write_text("kim,10.8.0.2,\n")
    p = AddressPool("10.8.0.2", "10.8.0.3", "255.255.255.0", None, str(f))
    assert p.acquire("lee", exclusive_cn=True)[0] == "10.8.0.3"  # 10.8.0.2 stays kim's
    assert p.acquire("max", exclusive_cn=True)[0] == "10.8.0.2"  # full: kim's address is given away
    assert f.read_text() == "lee,10.8.0.3,\nmax,10.8.0.2,\n"
    with pytest.raises(Exception, match="exhausted"):
        p.acquire("kim", exclusive_cn=True)


def test_net30_hands_out_the_third_address_of_each_block(tmp_path: Path) -> None:
    """`topology net30`: /30 blocks from .4 (client .6, peer .5) as in OpenVPN; the file has the client's."""
    f = tmp_path / "ipp.txt"
    p = AddressPool("10.8.0.4", "10.8.0.251", "", "fd00:8::1000/64", str(f), net30=True)
    assert p.acquire("bob", exclusive_cn=True) == ("10.8.0.6", "fd00:8::1000/64")
    assert p.acquire("alice", exclusive_cn=True) == ("10.8.0.10", "fd00:8::1001/64")
    assert f.read_text() == "alice,10.8.0.10,fd00:8::1001\nbob,10.8.0.6,fd00:8::1000\n"
    p.release("10.8.0.6")
    assert p.acquire("carol", exclusive_cn=True)[0] == "10.8.0.14"  # bob's block is kept for bob
    again = AddressPool("10.8.0.4", "10.8.0.251", "", None, str(f), net30=True)
    assert again.acquire("bob", exclusive_cn=True)[0] == "10.8.0.6"  # read back from the file
    tiny = AddressPool("10.8.0.5", "10.8.0.11", "", None, net30=True)  # only the block .8/30 is whole
    assert tiny.acquire("x", exclusive_cn=True)[0] == "10.8.0.10"
    with pytest.raises(PyovpnError, match="exhausted"):
        tiny.acquire("y", exclusive_cn=True)


def test_net30_placement_pushes_the_point_to_point_pair() -> None:
    opts = parse_config_text(BASE + "server 10.8.0.0 255.255.255.0\n")
    pool = AddressPool.from_options(opts)
    assert pool is not None and pool.net30
    placed = place_client(opts, None, pool, "bob", "10.8.0.1", None)
    assert placed.vpn_ip == "10.8.0.6"
    assert placed.push[:2] == ["topology net30", "ifconfig 10.8.0.6 10.8.0.5"]
    assert "route 10.8.0.1" in placed.push
    assert not [line for line in placed.push if line.startswith("route-gateway")]


def test_a_client_that_keeps_coming_back_does_not_grow_the_pool() -> None:
    # found by the P2MP soak: the free-address heap gained an entry each time a client got its
    # remembered address back, about 40 bytes per reconnect for the server's lifetime
    p = AddressPool("10.8.0.2", "10.8.0.20", "255.255.255.0", None)
    size = len(p._free)
    first, _ = p.acquire("alice", exclusive_cn=True)
    for _ in range(1000):
        p.release(first)
        again, _ = p.acquire("alice", exclusive_cn=True)
        assert again == first
    p.release(first)
    assert len(p._free) <= size
    # and every address is still handed out exactly once
    got = [p.acquire(f"c{i}", exclusive_cn=True)[0] for i in range(19)]
    assert len(set(got)) == 19
