"""tls-crypt-v2: key files and WKc checked against stock OpenVPN, the wrap, the session, config."""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyovpn.config import Options, parse_config_text
from pyovpn.datachannel.api import NewKey
from pyovpn.edge.tlscryptv2check import metadata_check
from pyovpn.errors import AuthenticationError, ConfigError, ProtocolError
from pyovpn.proto import tlscryptv2 as v2
from pyovpn.proto.cookie import CookieJar
from pyovpn.proto.packets import Opcode, ReliabilityHeader
from pyovpn.proto.session import Session, TunnelUp
from pyovpn.tools import genkey
from tests.unit.configtext import INLINE_CREDENTIALS, static_key_text
from tests.unit.sessionpair import Pair, configs, load_pki

OPENVPN = shutil.which("openvpn") or "/usr/sbin/openvpn"
needs_openvpn = pytest.mark.skipif(not os.path.exists(OPENVPN), reason="stock openvpn not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return load_pki(tmp_path_factory.mktemp("pki"))


def _stock(*args: str | Path) -> None:
    subprocess.run([OPENVPN, *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def stock_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not os.path.exists(OPENVPN):
        pytest.skip("stock openvpn not installed")
    d = tmp_path_factory.mktemp("v2")
    keys = {n: d / f"{n}.key" for n in ("server", "client", "meta", "other_server", "other_client")}
    _stock("--genkey", "tls-crypt-v2-server", keys["server"])
    _stock("--tls-crypt-v2", keys["server"], "--genkey", "tls-crypt-v2-client", keys["client"])
    meta = base64.b64encode(b"user=alice").decode()
    _stock("--tls-crypt-v2", keys["server"], "--genkey", "tls-crypt-v2-client", keys["meta"], meta)
    _stock("--genkey", "tls-crypt-v2-server", keys["other_server"])
    _stock("--tls-crypt-v2", keys["other_server"], "--genkey", "tls-crypt-v2-client", keys["other_client"])
    return keys


def test_stock_keys_load_and_reencode_byte_for_byte(stock_keys: dict[str, Path]) -> None:
    server_text = stock_keys["server"].read_text()
    client_text = stock_keys["client"].read_text()
    assert v2.parse_server_key(server_text).to_pem() == server_text
    assert v2.parse_client_key(client_text).to_pem() == client_text
    assert v2.key_kind(server_text) == "server" and v2.key_kind(client_text) == "client"


def test_stock_wkc_unwraps_to_the_files_kc_and_timestamp(stock_keys: dict[str, Path]) -> None:
    server = v2.parse_server_key(stock_keys["server"].read_text())
    client = v2.parse_client_key(stock_keys["client"].read_text())
    kc, metadata = v2.unwrap_client_key(server, client.wkc)
    assert kc == client.kc
    assert metadata[0] == v2.METADATA_TYPE_TIMESTAMP and len(metadata) == 9
    assert abs(int.from_bytes(metadata[1:], "big") - time.time()) < 600
    # and our wrap of the same Kc and metadata is the same bytes stock openvpn wrote
    assert v2.wrap_client_key(server, kc, metadata) == client.wkc


def test_stock_user_metadata(stock_keys: dict[str, Path]) -> None:
    server = v2.parse_server_key(stock_keys["server"].read_text())
    client = v2.parse_client_key(stock_keys["meta"].read_text())
    kc, metadata = v2.unwrap_client_key(server, client.wkc)
    assert kc == client.kc and metadata == b"\x00user=alice"


def test_client_key_of_another_server_is_refused(stock_keys: dict[str, Path]) -> None:
    server = v2.parse_server_key(stock_keys["server"].read_text())
    foreign = v2.parse_client_key(stock_keys["other_client"].read_text())
    with pytest.raises(AuthenticationError, match="not made with this server"):
        v2.unwrap_client_key(server, foreign.wkc)


@needs_openvpn
def test_pyovpn_genkey_keys_load_in_stock_openvpn(tmp_path: Path) -> None:
    server_file, client_file = tmp_path / "s.key", tmp_path / "c.key"
    assert genkey.main(["tls-crypt-v2-server", str(server_file)]) == 0
    meta = base64.b64encode(b"cn=bob").decode()
    assert (
        genkey.main(["tls-crypt-v2-client", str(client_file), "--key", str(server_file), "--metadata", meta])
        == 0
    )
    assert oct(server_file.stat().st_mode & 0o777) == "0o600"
    # stock openvpn reads our server key and wraps a client key with it (it unwraps it as a check)
    _stock("--tls-crypt-v2", server_file, "--genkey", "tls-crypt-v2-client", tmp_path / "stock_c.key")
    server = v2.parse_server_key(server_file.read_text())
    stock_client = v2.parse_client_key((tmp_path / "stock_c.key").read_text())
    assert v2.unwrap_client_key(server, stock_client.wkc)[0] == stock_client.kc
    ours = v2.parse_client_key(client_file.read_text())
    assert v2.unwrap_client_key(server, ours.wkc) == (ours.kc, b"\x00cn=bob")


def test_genkey_client_without_server_key_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert genkey.main(["tls-crypt-v2-client", str(tmp_path / "c.key")]) == 1
    assert "--key SERVERKEY" in capsys.readouterr().err


def test_bad_key_files_say_what_is_wrong() -> None:
    with pytest.raises(v2.KeyFileError, match="tls-crypt-v2-server"):
        v2.key_kind("-----BEGIN OpenVPN Static key V1-----\nab\n-----END OpenVPN Static key V1-----\n")
    with pytest.raises(v2.KeyFileError, match="128 bytes"):
        v2.parse_server_key(v2.pem_encode(v2.SERVER_PEM_NAME, b"x" * 100))
    with pytest.raises(v2.KeyFileError, match="length"):
        v2.parse_client_key(v2.pem_encode(v2.CLIENT_PEM_NAME, b"x" * 600))


def _server() -> v2.ServerKey:
    return v2.ServerKey(bytes(range(128)))


def _client(metadata: bytes = b"\x01" + (1_700_000_000).to_bytes(8, "big")) -> v2.ClientKey:
    kc = bytes((i * 7) & 0xFF for i in range(256))
    return v2.ClientKey(kc, v2.wrap_client_key(_server(), kc, metadata))


def test_wrap_pair_carries_wkc_only_on_the_first_packet() -> None:
    client = v2.TlsCryptV2Client(_client())
    seen: list[bytes] = []
    server = v2.TlsCryptV2Server(_server(), check=seen.append)
    sid = b"\x11" * 8
    reset = client.wrap(Opcode.CONTROL_HARD_RESET_CLIENT_V3, 0, sid, ReliabilityHeader((), None, 0, b""), 5)
    assert reset.endswith(_client().wkc)
    pkt = server.unwrap(reset)
    assert pkt.opcode is Opcode.CONTROL_HARD_RESET_CLIENT_V3 and pkt.session_id == sid
    assert seen == [b"\x01" + (1_700_000_000).to_bytes(8, "big")]
    nxt = client.wrap(Opcode.CONTROL_V1, 0, sid, ReliabilityHeader((), None, 1, b"hello"), 5)
    assert len(nxt) == len(reset) - len(_client().wkc) + 5
    assert server.unwrap(nxt).rh.payload == b"hello"
    reply = server.wrap(Opcode.CONTROL_V1, 0, b"\x22" * 8, ReliabilityHeader((), None, 1, b"back"), 5)
    assert client.unwrap(reply).rh.payload == b"back"


def test_wrap_server_refuses_through_the_metadata_check() -> None:
    def refuse(metadata: bytes) -> None:
        raise AuthenticationError("no")

    server = v2.TlsCryptV2Server(_server(), check=refuse)
    reset = v2.TlsCryptV2Client(_client()).wrap(
        Opcode.CONTROL_HARD_RESET_CLIENT_V3, 0, b"\x11" * 8, ReliabilityHeader((), None, 0, b""), 5
    )
    with pytest.raises(AuthenticationError):
        server.unwrap(reset)
    with pytest.raises(ProtocolError, match="no client key"):
        server.wrap(Opcode.CONTROL_V1, 0, b"\x22" * 8, ReliabilityHeader((), None, 1, b""), 5)


def test_max_age() -> None:
    stamp = b"\x01" + (1_000_000).to_bytes(8, "big")
    v2.check_key_age(stamp, 2, 1_000_000 + 86400)
    with pytest.raises(AuthenticationError, match="older than"):
        v2.check_key_age(stamp, 2, 1_000_000 + 3 * 86400)
    with pytest.raises(AuthenticationError, match="no timestamp"):
        v2.check_key_age(b"\x00" + b"x" * 8, 2, 0)


def test_verify_script_gets_metadata_file_and_type(tmp_path: Path) -> None:
    script = tmp_path / "verify.sh"
    out = tmp_path / "seen"
    script.write_text(
        f'#!/bin/sh\necho "$script_type $metadata_type $(cat "$metadata_file")" > {out}\n'
        '[ "$(cat "$metadata_file")" = alice ]\n'
    )
    script.chmod(0o755)
    check = metadata_check(Options(tls_crypt_v2_verify=str(script), script_security=2))
    assert check is not None
    check(b"\x00alice")
    assert out.read_text() == "tls-crypt-v2-verify 0 alice\n"
    with pytest.raises(AuthenticationError, match="exit status 1"):
        check(b"\x00mallory")
    assert metadata_check(Options()) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1400))
def test_fuzz_unwrap_only_protocol_errors(data: bytes) -> None:
    try:
        v2.unwrap_client_key(_server(), data)
    except ProtocolError:
        pass
    try:
        v2.TlsCryptV2Server(_server()).unwrap(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1300), st.integers(0, 255))
def test_fuzz_flipped_wkc_never_authenticates(pos: int, flip: int) -> None:
    wkc = bytearray(_client().wkc)
    pos %= len(wkc)
    wkc[pos] ^= flip or 1
    with pytest.raises(ProtocolError):
        v2.unwrap_client_key(_server(), bytes(wkc))


def test_sessions_handshake_over_tls_crypt_v2(pki: dict[str, bytes]) -> None:
    p = Pair(*configs(pki, server_tls_crypt_v2_server=_server(), client_tls_crypt_v2_client=_client()))
    p.run(3)
    assert any(isinstance(e, TunnelUp) for e in p.server_events)
    assert any(isinstance(e, TunnelUp) for e in p.client_events)


def test_session_with_foreign_client_key_never_comes_up(pki: dict[str, bytes]) -> None:
    other = v2.ServerKey(bytes(128))
    kc = bytes(256)
    foreign = v2.ClientKey(kc, v2.wrap_client_key(other, kc, b"\x00"))
    p = Pair(*configs(pki, server_tls_crypt_v2_server=_server(), client_tls_crypt_v2_client=foreign))
    p.run(3)
    assert not any(isinstance(e, TunnelUp) for e in p.server_events)
    assert p.server.peer_session_id is None


CLIENT_CONF = "tls-client\nremote vpn.example.com 1194\n" + INLINE_CREDENTIALS


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text)
    return info.value


def test_config_inline_client_key_and_role_checks() -> None:
    client_pem = _client().to_pem()
    opts = parse_config_text(CLIENT_CONF + f"<tls-crypt-v2>\n{client_pem}</tls-crypt-v2>\n")
    assert opts.tls_crypt_v2_client is not None and opts.tls_crypt_v2_client.wkc == _client().wkc
    err = config_error(CLIENT_CONF + f"<tls-crypt-v2>\n{_server().to_pem()}</tls-crypt-v2>\n")
    assert "needs a client key" in str(err) and "--genkey tls-crypt-v2-client" in str(err)
    err = config_error(
        CLIENT_CONF + f"<tls-crypt-v2>\n{client_pem}</tls-crypt-v2>\ntls-crypt-v2-verify /bin/true\n"
    )
    assert "script-security 2" in str(err)


def test_stateless_cookie_start_with_wkc_resend(pki: dict[str, bytes]) -> None:
    """2.6 early negotiation: the server answers the V3 reset keeping no state and asks for WKc
    again; the client's first CONTROL packet is a WKC_V1 that both proves the cookie and
    carries the key, and the session built from it completes the handshake."""
    s_cfg, c_cfg = configs(pki, server_tls_crypt_v2_server=_server(), client_tls_crypt_v2_client=_client())
    now = 1_700_000_000.0
    rng = random.Random(7).randbytes
    client = Session(c_cfg, rng=rng, now=now)
    client.handle_timer(now)
    (reset,) = client.packets_to_send()
    assert reset[0] >> 3 == Opcode.CONTROL_HARD_RESET_CLIENT_V3 and v2.offers_early_negotiation(reset)
    addr = ("198.51.100.7", 40000)
    jar = CookieJar(b"c" * 32)
    reply = jar.reply_to_reset(reset, addr, now, v2.TlsCryptV2Server(_server()), v2.RESEND_WKC_TLV)
    client.receive(reply, now)
    first, *rest = client.packets_to_send()
    assert first[0] >> 3 == Opcode.CONTROL_WKC_V1 and first.endswith(_client().wkc)
    assert all(p[0] >> 3 == Opcode.CONTROL_V1 for p in rest)
    proof = jar.check_proof(first, addr, now, v2.TlsCryptV2Server(_server()))
    checked: list[bytes] = []
    wrap = v2.TlsCryptV2Server(_server(), check=checked.append)
    wrap.accept_client_key(first)
    server = Session.after_cookie(s_cfg, proof, rng=rng, now=now, wrap=wrap)
    for pkt in (first, *rest):
        server.receive(pkt, now)
    events: list[object] = []
    for _ in range(200):
        moved = False
        for src, dst in ((client, server), (server, client)):
            for pkt in src.packets_to_send():
                moved = True
                dst.receive(pkt, now)
        events += server.events() + client.events()
        if not moved:
            now += 0.05
            for s in (server, client):
                t = s.next_timer()
                if t is not None and t <= now:
                    s.handle_timer(now)
    assert sum(isinstance(e, TunnelUp) for e in events) == 2
    assert checked == [_client_metadata()]


def _client_metadata() -> bytes:
    return b"\x01" + (1_700_000_000).to_bytes(8, "big")


def test_server_reset_tlv_parsing() -> None:
    assert v2.asks_to_resend_wkc(v2.RESEND_WKC_TLV)
    assert not v2.asks_to_resend_wkc(b"\x00\x09\x00\x01x")  # unknown types are skipped
    with pytest.raises(ProtocolError):
        v2.asks_to_resend_wkc(b"\x00\x01\x00\x02\x00")


SERVER_CONF = INLINE_CREDENTIALS + "dh none\ntopology subnet\nserver 10.8.0.0 255.255.255.0\n"


def test_config_server_key_verify_and_max_age(tmp_path: Path) -> None:
    key_file = tmp_path / "v2s.key"
    key_file.write_text(_server().to_pem())
    opts = parse_config_text(
        SERVER_CONF + f"tls-crypt-v2 {key_file}\ntls-crypt-v2-max-age 30\n"
        "script-security 2\ntls-crypt-v2-verify /bin/true --flag\n"
    )
    assert opts.tls_crypt_v2_server == _server() and opts.tls_crypt_v2_client is None
    assert opts.tls_crypt_v2_max_age == 30 and opts.tls_crypt_v2_verify == "/bin/true --flag"
    err = config_error(SERVER_CONF + f"<tls-crypt-v2>\n{_client().to_pem()}</tls-crypt-v2>\n")
    assert "needs the server key" in str(err)
    assert ">= 1, not 0" in str(config_error(SERVER_CONF + "tls-crypt-v2-max-age 0\n"))
    err = config_error(SERVER_CONF + f"tls-crypt-v2 {key_file} force-cookie\n")
    assert "force-cookie" in str(err) and "drop the flag" in str(err)
    err = config_error(
        SERVER_CONF + f"tls-crypt-v2 {key_file}\n<tls-crypt>\n{static_key_text()}</tls-crypt>\n"
    )
    assert "cannot be used together" in str(err)


def test_cli_genkey_dispatch(tmp_path: Path) -> None:
    from pyovpn import cli

    assert cli.main(["genkey", "tls-crypt-v2-server", str(tmp_path / "s.key")]) == 0
    assert v2.key_kind((tmp_path / "s.key").read_text()) == "server"


def test_renegotiation_runs_over_the_client_key(pki: dict[str, bytes]) -> None:
    p = Pair(
        *configs(
            pki, server_tls_crypt_v2_server=_server(), client_tls_crypt_v2_client=_client(), reneg_sec=10
        )
    )
    p.run(25)
    for events in (p.server_events, p.client_events):
        assert len({e.key_id for e in events if isinstance(e, NewKey)}) >= 2
