"""Options the corpus of published configs uses that pyovpn now carries out (tests/corpus/README.md):
`mute`, `down-pre`, `reneg-bytes 0`/`reneg-pkts 0`, `passtos` and `dev null` (which rule the kernel
data channel out, with the reason; tests/netns/test_passtos_devnull.py runs them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from pyovpn import daemon as daemon_module
from pyovpn import logsinks, scripts
from pyovpn.config import parse_config_text
from pyovpn.datachannel import api, fragment, tos, validate
from pyovpn.edge import backendfit, iface
from pyovpn.errors import BackendError, ConfigError
from pyovpn.tools.pki import Pki, make_pki
from tests.unit.configtext import INLINE_CREDENTIALS
from tests.unit.edgefakes import RunningDaemon, free_port, wait_until
from tests.unit.test_edge_p2p import p2p_configs

BASE = "client\ndev tun\nremote 192.0.2.1\nca ca.crt\ncert c.crt\nkey c.key\n"


def parse(extra: str, tmp_path: Path) -> object:
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("placeholder\n")
    return parse_config_text(BASE + extra, source="t.conf", cwd=str(tmp_path))


def _opts(extra: str, tmp_path: Path) -> daemon_module.Options:
    opts = parse(extra, tmp_path)
    assert isinstance(opts, daemon_module.Options)
    return opts


def test_syslog_default_and_named(tmp_path: Path) -> None:
    assert _opts("", tmp_path).syslog is None
    assert _opts("syslog\n", tmp_path).syslog == "pyovpn"
    named = _opts("syslog vpn-home\n", tmp_path)
    assert named.syslog == "vpn-home"
    assert not [n for n, *_ in named.ignored if n == "syslog"]


def test_mute_value_and_bad_value(tmp_path: Path) -> None:
    assert _opts("mute 20\n", tmp_path).mute == 20
    with pytest.raises(ConfigError, match="mute"):
        parse("mute lots\n", tmp_path)


def test_disable_occ_and_ping_timer_rem_are_not_ignored(tmp_path: Path) -> None:
    assert not _opts("disable-occ\nping-timer-rem\n", tmp_path).ignored


def test_down_pre_flag(tmp_path: Path) -> None:
    assert _opts("down-pre\n", tmp_path).down_pre
    assert not _opts("", tmp_path).down_pre


@pytest.mark.parametrize("option", ["reneg-bytes", "reneg-pkts"])
def test_reneg_volume_zero_is_the_default_and_nonzero_is_refused(option: str, tmp_path: Path) -> None:
    opts = _opts(f"{option} 0\n", tmp_path)
    assert not opts.ignored  # carried out (volume renegotiation stays off), not ignored
    with pytest.raises(ConfigError, match=rf"`{option} 64000` is not supported.*reneg-sec"):
        parse(f"{option} 64000\n", tmp_path)


def test_passtos_runs_on_the_userspace_data_plane(tmp_path: Path) -> None:
    """Carried out (datachannel/tos.py), so the kernel is ruled out with the reason, and the engine kept."""
    opts = _opts("passtos\n", tmp_path)
    assert opts.passtos and not opts.ignored
    assert "`passtos`" in (backendfit.kernel_refusal(opts) or "")
    assert backendfit.userspace_engine(opts) == "multiprocess"
    plain = _opts("", tmp_path)
    assert not plain.passtos and backendfit.kernel_refusal(plain) is None


def test_shaper_runs_on_the_userspace_engine(tmp_path: Path) -> None:
    """Carried out (datachannel/shaper.py), so the kernel is ruled out with the reason."""
    opts = _opts("shaper 100000\n", tmp_path)
    assert opts.shaper == 100000 and not opts.ignored
    assert "`shaper`" in (backendfit.kernel_refusal(opts) or "")
    assert backendfit.userspace_engine(opts) == "multiprocess"


def test_dev_null_runs_on_the_userspace_engine(tmp_path: Path) -> None:
    opts = _opts("dev null\n", tmp_path)
    assert "`dev null`" in (backendfit.kernel_refusal(opts) or "")
    assert backendfit.userspace_engine(opts) == "multiprocess"  # its workers write to /dev/null
    # the up/down scripts are told dev_type=null, as OpenVPN does
    env = scripts.up_down_env(iface.tun_params("null", 1500, opts, None), "init")
    assert (env["dev"], env["dev_type"]) == ("null", "null")


def test_dev_null_on_a_p2mp_server_is_refused_with_a_reason(tmp_path: Path) -> None:
    for name in ("ca.crt", "s.crt", "s.key"):
        (tmp_path / name).write_text("placeholder\n")
    text = "dev null\nca ca.crt\ncert s.crt\nkey s.key\ndh none\n"
    text += "topology subnet\nserver 10.8.0.0 255.255.255.0\n"
    with pytest.raises(ConfigError, match=r"t\.conf:1: `dev null` on a P2MP server .*dev tun"):
        parse_config_text(text, source="t.conf", cwd=str(tmp_path))


def test_backends_without_passtos_or_null_devices_refuse_them() -> None:
    """What the kernel backend answers instead of ignoring the option."""
    peer = api.NewPeer(
        peer_id=1, socket_fd=0, transport=api.Transport.UDP, remote=("192.0.2.1", 1194), passtos=True
    )
    with pytest.raises(BackendError, match=r"kernel data channel cannot copy .*passtos.*--dco userspace"):
        validate.check_no_passtos(peer, "kernel")
    validate.check_no_passtos(api.NewPeer(peer_id=1, socket_fd=0, transport=api.Transport.UDP), "kernel")
    with pytest.raises(BackendError, match=r"needs a real device, not `dev null`"):
        validate.check_no_null_dev(api.NewIface("null", null=True), "kernel")
    validate.check_no_null_dev(api.NewIface("tun0"), "kernel")


def test_shaper_is_refused_where_it_cannot_be_kept() -> None:
    """The kernel and the in-process plane refuse `shaper`; the engine takes it for one peer only."""
    udp = {"peer_id": 1, "socket_fd": 0, "transport": api.Transport.UDP, "remote": ("192.0.2.1", 1194)}
    shaped = api.NewPeer(**udp, shaper=100000)  # type: ignore[arg-type]
    with pytest.raises(BackendError, match=r"kernel data channel cannot hold the sending rate.*remove shape"):
        validate.check_no_shaper(shaped, "kernel")
    validate.check_no_shaper(api.NewPeer(**udp), "kernel")  # type: ignore[arg-type]
    validate.check_shaper("NewPeer", shaped, multipoint=False)
    with pytest.raises(BackendError, match=r"`shaper` is for one peer"):
        validate.check_shaper("NewPeer", shaped, multipoint=True)
    with pytest.raises(BackendError, match=r"outside 100\.\.100000000"):
        validate.check_shaper("NewPeer", api.NewPeer(**udp, shaper=50), multipoint=False)  # type: ignore[arg-type]


def _ip4(tos: int) -> bytes:
    return bytes([0x45, tos]) + bytes(18)


def _ip6(tclass: int) -> bytes:
    return bytes([0x60 | tclass >> 4, (tclass & 0x0F) << 4]) + bytes(38)


@pytest.mark.parametrize("value", [0x00, 0x88, 0xB8, 0x03, 0xFF])
def test_inner_tos_reads_ipv4_tos_and_ipv6_traffic_class(value: int) -> None:
    assert tos.inner_tos(_ip4(value)) == value
    assert tos.inner_tos(_ip6(value)) == value
    assert tos.inner_tos(b"\x00\x00" + _ip6(value), 2) == value  # at an offset (a vnet header before)
    assert tos.inner_tos(bytes([0x10, value])) == 0  # not IP: unmarked


@pytest.mark.parametrize(("family", "addr"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_set_outer_tos_marks_the_socket(family: socket.AddressFamily, addr: str) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        tos.set_outer_tos(sock, 0x88)
        if family == socket.AF_INET:
            assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0x88
        else:
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS) == 0x88


# -- mute -----------------------------------------------------------------------------------------


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": msg, "args": args, "levelno": logging.INFO})


def test_mute_passes_n_of_a_kind_then_counts_the_rest() -> None:
    mute = logsinks.MuteFilter(2)
    passed = [mute.filter(_record("replay %d", i)) for i in range(5)]
    assert passed == [True, True, False, False, False]
    other = _record("peer %s", "x")
    assert mute.filter(other)
    assert other.getMessage() == "3 message(s) like the previous one suppressed by --mute\npeer x"
    # a new run of the old kind starts counting again
    assert mute.filter(_record("replay %d", 9))


@contextlib.contextmanager
def _daemon_logging(opts: daemon_module.Options) -> Iterator[None]:
    """The daemon's own logging set up from ``opts`` for the block, then flushed and closed, and the
    root logger's handlers and level put back (other tests share the root logger)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        daemon_module.setup_logging(opts)
        yield
        for h in root.handlers:
            h.flush()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], level = saved
        root.setLevel(level)


def test_daemon_logging_applies_mute_and_file(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    opts = _opts(f"mute 1\nlog {out}\nverb 3\n", tmp_path)
    with _daemon_logging(opts):
        log = logging.getLogger("pyovpn.test")
        for i in range(3):
            log.info("same kind %d", i)
        log.info("another kind")
    text = out.read_text()
    assert "same kind 0" in text and "same kind 1" not in text
    assert "2 message(s) like the previous one suppressed by --mute" in text and "another kind" in text


# -- down-pre -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _order_of_down_and_close(pki: Pki, tmp_path: Path, down_pre: bool) -> list[str]:
    """Runs a P2P pair; returns the client's `up`, `down` and device close in the order they happened."""
    trace = tmp_path / "trace"
    script = tmp_path / "updown.sh"
    script.write_text(f'#!/bin/sh\necho "$script_type" >> {trace}\n')
    script.chmod(0o755)
    server_text, client_text = p2p_configs(pki, free_port())
    client_text += f"script-security 2\nup {script}\ndown {script}\n" + ("down-pre\n" if down_pre else "")

    async def main() -> None:
        server = RunningDaemon(parse_config_text(server_text, source="server.conf"))
        client = RunningDaemon(parse_config_text(client_text, source="client.conf"))
        original = client.dc.request

        async def request(cmd: api.Command) -> object:
            if isinstance(cmd, api.DelIface):
                with trace.open("a") as fh:
                    fh.write("close\n")
            return await original(cmd)

        client.dc.request = request  # type: ignore[method-assign]
        try:
            await wait_until(lambda: server.up() and client.up(), 15, "both tunnels up")
            await wait_until(lambda: trace.exists(), 10, "the up script ran")
            await client.stop()
        finally:
            await server.stop()

    asyncio.run(main())
    return trace.read_text().split()


def test_down_runs_after_close_by_default(pki: Pki, tmp_path: Path) -> None:
    assert _order_of_down_and_close(pki, tmp_path, down_pre=False) == ["up", "close", "down"]


def test_down_pre_runs_down_before_close(pki: Pki, tmp_path: Path) -> None:
    assert _order_of_down_and_close(pki, tmp_path, down_pre=True) == ["up", "down", "close"]


# -- setenv ---------------------------------------------------------------------------------------


def test_setenv_variables_in_order_and_special_names(tmp_path: Path) -> None:
    opts = _opts(
        "setenv CLIENT_CERT 0\nsetenv UV_IPV6 no\nsetenv EMPTY\nsetenv opt block-outside-dns\n"
        "setenv PUSH_PEER_INFO\n",
        tmp_path,
    )
    assert opts.setenv == (("CLIENT_CERT", "0"), ("UV_IPV6", "no"), ("EMPTY", ""))
    names = [n for n, *_ in opts.ignored]
    assert "setenv" not in names
    assert "push-peer-info" in names  # PUSH_PEER_INFO is that option, handled as it is


def test_setenv_forward_compatible_turns_unknown_options_into_warnings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option 'future-thing'"):
        parse("future-thing 1\n", tmp_path)
    opts = _opts("setenv FORWARD_COMPATIBLE 1\nfuture-thing 1\n", tmp_path)
    assert ("future-thing", "t.conf", 8) in opts.ignored
    # only from that line on, as in OpenVPN
    with pytest.raises(ConfigError, match="unknown option 'future-thing'"):
        parse("future-thing 1\nsetenv FORWARD_COMPATIBLE 1\n", tmp_path)


def test_setenv_reaches_the_scripts(pki: Pki, tmp_path: Path) -> None:
    """A real `up` script sees the config's setenv variables (next to OpenVPN's own)."""
    seen = tmp_path / "seen"
    script = tmp_path / "up.sh"
    script.write_text(f'#!/bin/sh\necho "$script_type $CLIENT_CERT $SITE" >> {seen}\n')
    script.chmod(0o755)
    server_text, client_text = p2p_configs(pki, free_port())
    client_text += f"script-security 2\nup {script}\nsetenv CLIENT_CERT 0\nsetenv SITE 'home office'\n"

    async def main() -> None:
        server = RunningDaemon(parse_config_text(server_text, source="server.conf"))
        client = RunningDaemon(parse_config_text(client_text, source="client.conf"))
        try:
            await wait_until(lambda: seen.exists(), 15, "the up script ran")
        finally:
            await client.stop()
            await server.stop()

    try:
        asyncio.run(main())
    finally:
        scripts.set_config_env(())  # the variables are process-wide; leave none for other tests
    assert seen.read_text().split("\n")[0] == "up 0 home office"


# -- accepted without effect: the warning says why ------------------------------------------------


def test_no_effect_warning_names_the_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    opts = _opts("block-outside-dns\nroute-delay 2\n", tmp_path)

    def failing_daemon(_opts: object) -> object:
        raise ConfigError("stop here")  # run() logs the warnings first, then builds the daemon

    caplog.set_level(logging.WARNING)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(daemon_module, "Daemon", failing_daemon)
            mp.setattr(daemon_module, "setup_logging", lambda _o: None)
            assert daemon_module.run(opts) == 1
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [r.getMessage() for r in caplog.records]
    assert (
        "t.conf:7: option 'block-outside-dns' is accepted but has no effect in pyovpn: it is Windows-only"
        in (" ".join(lines))
    )
    assert any(
        line.endswith("option 'route-delay' is accepted but has no effect in pyovpn") for line in lines
    )


# -- sndbuf / rcvbuf ------------------------------------------------------------------------------


def test_socket_buffers_reach_the_transport_socket(tmp_path: Path) -> None:
    from pyovpn.edge import sockets

    server_conf = (
        "tls-server\ndev tun\nproto udp\nlocal 127.0.0.1\n"
        f"lport {free_port()}\nifconfig 10.77.0.1 10.77.0.2\nca ca.crt\ncert c.crt\nkey c.key\ndh none\n"
    )
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("placeholder\n")
    plain = parse_config_text(server_conf, cwd=str(tmp_path))
    sized = parse_config_text(server_conf + "sndbuf 131072\nrcvbuf 262144\n", cwd=str(tmp_path))
    assert (sized.sndbuf, sized.rcvbuf) == (131072, 262144) and not sized.ignored
    sock, _ = sockets.open_udp(plain)
    with sock:
        default_rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sock, _ = sockets.open_udp(sized)
    with sock:
        rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        snd = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    # Linux doubles the request and caps it at net.core.[rw]mem_max: what matters is that the
    # size follows the option, not the system default.
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    assert rcv == 2 * min(262144, rmem_max)
    assert snd == 2 * min(131072, wmem_max)
    if rmem_max >= 262144:
        assert rcv != default_rcv


# -- mark, bind-dev, tls-version-max, suppress-timestamps, nice --------------------------------------


def test_mark_bind_dev_tls_version_max_nice_parse(tmp_path: Path) -> None:
    o = _opts("mark 42\nbind-dev lo\ntls-version-max 1.2\nsuppress-timestamps\nnice 5\n", tmp_path)
    assert (o.mark, o.bind_dev, o.tls_version_max, o.suppress_timestamps, o.nice) == (
        42,
        "lo",
        "1.2",
        True,
        5,
    )
    assert not o.ignored
    with pytest.raises(ConfigError, match="nice: '30' is not a priority change"):
        parse("nice 30\n", tmp_path)
    with pytest.raises(ConfigError, match="tls-version-max: unknown version '2'"):
        parse("tls-version-max 2\n", tmp_path)


def test_mark_and_bind_dev_reach_the_socket(tmp_path: Path) -> None:
    import os

    from pyovpn.edge import sockets
    from pyovpn.edge.stop import Stop

    conf = (
        "tls-server\ndev tun\nproto udp\nlocal 127.0.0.1\n"
        f"lport {free_port()}\nifconfig 10.77.0.1 10.77.0.2\nca ca.crt\ncert c.crt\nkey c.key\ndh none\n"
        "mark 42\nbind-dev lo\n"
    )
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("placeholder\n")
    opts = parse_config_text(conf, cwd=str(tmp_path))
    if os.geteuid() != 0:
        with pytest.raises(Stop, match="needs CAP_NET_ADMIN"):
            sockets.open_udp(opts)
        return
    sock, _ = sockets.open_udp(opts)
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 42
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"


def test_tls_version_max_caps_the_handshake(tmp_path: Path) -> None:
    from pyovpn.proto.tls import build_context
    from pyovpn.tools.pki import make_pki
    from tests.unit.test_tls_ciphers import _handshake

    pki = make_pki(tmp_path / "pki")

    def side(is_server: bool, **kwargs: str) -> SSL.Context:
        crt, key = (pki.server_crt, pki.server_key) if is_server else (pki.client_crt, pki.client_key)
        return build_context(
            ca=pki.ca_crt.read_bytes(),
            cert=crt.read_bytes(),
            key=key.read_bytes(),
            is_server=is_server,
            **kwargs,  # type: ignore[arg-type]
        )

    assert _handshake(side(True), side(False))[0] == "TLSv1.3"
    assert _handshake(side(True), side(False, tls_version_max="1.2"))[0] == "TLSv1.2"
    assert _handshake(side(True, tls_version_max="1.2"), side(False))[0] == "TLSv1.2"
    with pytest.raises(ConfigError, match=r"tls-version-max 1\.2 is below tls-version-min 1\.3"):
        side(False, tls_version_min="1.3", tls_version_max="1.2")


def test_suppress_timestamps_drops_the_time(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    opts = _opts(f"suppress-timestamps\nlog {out}\nverb 3\n", tmp_path)
    with _daemon_logging(opts):
        logging.getLogger("pyovpn.test").info("plain line")
    assert out.read_text() == "plain line\n"


# -- cd -------------------------------------------------------------------------------------------


def test_cd_moves_where_later_files_are_found(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("ca.crt", "c.crt", "c.key"):
        (keys / name).write_text("placeholder\n")
    text = "client\ndev tun\nremote 192.0.2.1\ncd keys\nca ca.crt\ncert c.crt\nkey c.key\n"
    o = parse_config_text(text, cwd=str(tmp_path))
    assert o.cd == str(keys) and o.ca == b"placeholder\n"
    # before `cd`, the same names are looked up where we started (and are not there)
    with pytest.raises(ConfigError, match=r"ca: file 'ca\.crt' not found"):
        parse_config_text(text.replace("cd keys\n", "") + "cd keys\n", cwd=str(tmp_path))
    with pytest.raises(ConfigError, match="cd: 'nowhere' is not a directory"):
        parse_config_text("cd nowhere\n" + text, cwd=str(tmp_path))


def test_chroot_names_an_existing_directory_relative_to_cd(tmp_path: Path) -> None:
    (tmp_path / "jail").mkdir()
    client = "client\ndev tun\nremote 192.0.2.1\n" + INLINE_CREDENTIALS
    o = parse_config_text(f"{client}cd {tmp_path}\nchroot jail\n")
    assert o.chroot == str(tmp_path / "jail")
    with pytest.raises(ConfigError, match="chroot: 'nowhere' is not a directory"):
        parse_config_text(f"{client}chroot nowhere\n", cwd=str(tmp_path))


# -- fragment -------------------------------------------------------------------------------------


def test_fragment_runs_in_userspace_over_udp_only(tmp_path: Path) -> None:
    opts = _opts("fragment 1300\n", tmp_path)
    assert opts.fragment == 1300 and not opts.ignored
    assert "`fragment`" in (backendfit.kernel_refusal(opts) or "")
    assert backendfit.userspace_engine(opts) == "multiprocess"  # both userspace planes cut packets
    assert _opts("fragment 1300 mtu\n", tmp_path).fragment == 1300 - 48  # room for IPv6 + UDP headers
    with pytest.raises(ConfigError, match=r"`fragment` can only be used with `proto udp`"):
        parse("proto tcp-client\nfragment 1300\n", tmp_path)


def test_fragments_have_openvpns_header_and_come_back_whole() -> None:
    frag = fragment.Fragmenter(1000)
    assert frag.size == 972  # 1000 - 28 (DATA_V2 4, packet id 4, tag 16, fragment header 4), a multiple of 4
    small = bytes(range(200))
    assert frag.split(small) == [b"\x00\x00\x00\x00" + small]  # FRAG_WHOLE
    big = bytes(i % 251 for i in range(2500))
    pieces = frag.split(big)
    assert [len(p) for p in pieces] == [976, 976, 4 + 2500 - 2 * 972]
    words = [int.from_bytes(p[:4], "big") for p in pieces]
    assert [w & 3 for w in words] == [1, 1, 2]  # NOT_LAST, NOT_LAST, LAST
    assert [(w >> 10) & 0x1F for w in words] == [0, 1, 2]  # fragment index
    assert {(w >> 2) & 0xFF for w in words} == {0}  # one sequence id for the packet
    assert (words[2] >> 15) & 0x3FFF == 972 >> 2  # the last one carries the others' size / 4
    assert int.from_bytes(frag.split(big)[0][:4], "big") >> 2 & 0xFF == 1  # the next packet: seq id 1
    reasm = fragment.Reassembler()
    # out of order, with a duplicate: still the one packet once
    assert reasm.add(pieces[2], 0.0) is None
    assert reasm.add(pieces[0], 0.0) is None
    assert reasm.add(pieces[0], 0.1) is None
    assert reasm.add(pieces[1], 0.2) == big
    assert reasm.add(b"\x00\x00\x00\x00" + small, 0.3) == small
    # a packet whose fragments straggle past 10 s is started over, not glued to stale pieces
    assert reasm.add(pieces[0], 1.0) is None
    assert reasm.add(pieces[1], 20.0) is None
    assert reasm.add(pieces[2], 20.0) is None
    with pytest.raises(fragment.FragmentError):
        reasm.add(b"\x00\x00", 0.0)
    with pytest.raises(fragment.FragmentError):
        frag.split(bytes(33 * 972))  # more than 32 fragments
