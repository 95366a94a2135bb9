"""Fuzz targets: every parser that reads bytes or text from outside, one function each.

A target takes the fuzzer's bytes and feeds them to one parser (or a small chain that a real
packet takes). pyovpn's own errors are the expected answer to bad input: ``ProtocolError``
for anything from the network or the engine socket, ``ConfigError`` for configuration text,
``KeyFileError`` for key files. Any other exception escaping a target is a finding. Some
targets also check a property that must hold for every input (the GRO planner keeps every
packet; a flipped wrapped client key never authenticates).

The targets import pyovpn lazily in ``setup()`` so that ``fuzz.one`` can instrument the
imports for coverage before they happen.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Target = Callable[[bytes], None]

KEY2 = bytes(range(256))
ADDR = ("198.51.100.7", 40000)
NOW = 1_700_000_000.0

_state: dict[str, Any] = {}


def setup() -> None:
    """Import what the targets use (after ``fuzz.one`` has set up coverage instrumentation)."""
    if _state:
        return
    from pyovpn import config
    from pyovpn.datachannel import fragment, framing
    from pyovpn.datachannel.api import Cipher, Framing
    from pyovpn.datachannel.crypto import DataKey, KeyState
    from pyovpn.datachannel.engine import gso, wire
    from pyovpn.errors import ConfigError, ProtocolError
    from pyovpn.mgmt.protocol import LineSplitter
    from pyovpn.proto import cookie, dnsopts, keymethod, packets, push, tlscryptv2, tlswrap

    server_key = tlscryptv2.ServerKey(bytes(range(128)))
    kc = bytes((i * 7) & 0xFF for i in range(256))
    wkc = tlscryptv2.wrap_client_key(server_key, kc, b"\x01" + (1_700_000_000).to_bytes(8, "big"))
    _state.update(
        config=config,
        framing=framing,
        fragment=fragment,
        Framing=Framing,
        gso=gso,
        wire=wire,
        ConfigError=ConfigError,
        ProtocolError=ProtocolError,
        LineSplitter=LineSplitter,
        cookie=cookie,
        dnsopts=dnsopts,
        keymethod=keymethod,
        packets=packets,
        push=push,
        tlscryptv2=tlscryptv2,
        tlswrap=tlswrap,
        server_key=server_key,
        wkc=wkc,
        keys={cipher: DataKey(cipher, bytes(range(cipher.key_len)), b"\xa0" * 8) for cipher in Cipher},
        KeyState=KeyState,
        workdir=tempfile.mkdtemp(prefix="pyovpn-fuzz-"),
    )


def _expected(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    return (_state["ProtocolError"], *extra)


def control_unwrap(data: bytes) -> None:
    """A control packet as the socket gives it: each wrapping, then the reliability header."""
    s = _state
    for wrap in (
        s["tlswrap"].NoWrap(),
        s["tlswrap"].TlsAuth(KEY2, 1),
        s["tlswrap"].TlsCrypt(KEY2, is_server=True),
    ):
        try:
            wrap.unwrap(data)
        except _expected():
            pass
    try:
        s["packets"].peek_opcode(data)
    except _expected():
        pass
    for has_mid in (False, True):
        try:
            s["packets"].ReliabilityHeader.decode(data, has_message_id=has_mid)
        except _expected():
            pass


def stream_framer(data: bytes) -> None:
    """TCP transport: the 16-bit length framing, fed in pieces of sizes the input chooses."""
    framer = _state["packets"].StreamFramer()
    pos = 0
    while pos < len(data):
        step = data[pos] % 64 + 1
        try:
            framer.feed(data[pos + 1 : pos + 1 + step])
        except _expected():
            return
        pos += 1 + step


def key_method_2(data: bytes) -> None:
    km = _state["keymethod"].KeyMethod2
    for from_client in (False, True):
        for blob in (data, b"\x00\x00\x00\x00\x02" + data):
            try:
                km.decode(blob, from_client=from_client)
            except _expected():
                pass


def push_reply(data: bytes) -> None:
    """A PUSH_REPLY as the server sends it, split and interpreted."""
    push = _state["push"]
    text = data.decode("utf-8", "replace")
    for message in (text, "PUSH_REPLY," + text):
        try:
            options, _more = push.split_push_message(message)
            push.parse_pushed_options(options)
        except _expected():
            pass


def dns_options(data: bytes) -> None:
    lines = data.decode("utf-8", "replace").splitlines()
    try:
        _state["dnsopts"].parse_dns_lines(lines)
    except _expected():
        pass


def cookie_paths(data: bytes) -> None:
    """The server's stateless first packets: a reset and the client's proof of the cookie."""
    s = _state
    jar = s["cookie"].CookieJar(b"k" * 32)
    for fn in (jar.reply_to_reset, jar.check_proof):
        try:
            fn(data, ADDR, NOW, s["tlswrap"].TlsCrypt(KEY2, is_server=True))
        except _expected():
            pass


def tls_crypt_v2(data: bytes) -> None:
    """A client's wrapped key and a V2 packet; a flipped real key must never authenticate."""
    s = _state
    v2 = s["tlscryptv2"]
    for fn in (
        lambda: v2.unwrap_client_key(s["server_key"], data),
        lambda: v2.TlsCryptV2Server(s["server_key"]).unwrap(data),
    ):
        try:
            fn()
        except _expected():
            pass
    if len(data) >= 3:
        wkc = bytearray(s["wkc"])
        pos = int.from_bytes(data[:2], "big") % len(wkc)
        wkc[pos] ^= data[2] or 1
        try:
            v2.unwrap_client_key(s["server_key"], bytes(wkc))
        except _expected():
            return
        raise AssertionError(f"a wrapped client key with byte {pos} changed was accepted")


def key_files(data: bytes) -> None:
    """Key files as users paste them: static keys, tls-crypt-v2 server and client keys."""
    s = _state
    text = data.decode("utf-8", "replace")
    v2 = s["tlscryptv2"]
    for fn in (v2.parse_server_key, v2.parse_client_key, v2.key_kind):
        try:
            fn(text)
        except (v2.KeyFileError, *_expected()):
            pass
    try:
        s["config"].load_static_key(text, source="fuzz")
    except (s["ConfigError"], *_expected()):
        pass


def data_packet(data: bytes) -> None:
    """A data packet for a known key with each cipher, whole and in a batch buffer."""
    s = _state
    for key in s["keys"].values():
        ks = s["KeyState"](data[0] & 7 if data else 0, key, key)
        try:
            ks.decrypt(data)
        except _expected():
            pass
        buf = memoryview(bytearray(b"\x00" * 3 + data))
        try:
            ks.decrypt_into(buf, 3, len(data), memoryview(bytearray(2048)))
        except _expected():
            pass


def compression_framing(data: bytes) -> None:
    """A decrypted payload under each compression framing a peer may use."""
    s = _state
    for mode in s["Framing"]:
        try:
            s["framing"].unframe_bytes(mode, data)
        except _expected():
            pass


def fragment_reassembly(data: bytes) -> None:
    """`fragment`: a peer's decrypted payloads, each a fragment header and a piece, put together.

    However the fragments come, the reassembler keeps a bounded number of partial packets.
    """
    fragment = _state["fragment"]
    reasm = fragment.Reassembler()
    pos, now = 0, 0.0
    while pos + 2 <= len(data):
        n = data[pos] % 64
        now += data[pos + 1] / 16
        try:
            reasm.add(data[pos + 2 : pos + 2 + n], now)
        except fragment.FragmentError:
            pass
        pos += 2 + n
    if len(reasm._partial) > 64:
        raise AssertionError(f"{len(reasm._partial)} partial packets kept")


def engine_wire(data: bytes) -> None:
    """A frame on the engine's IPC socket, read as one message and as a batch."""
    try:
        _state["wire"].unpack(data)
    except _expected():
        pass
    try:
        _state["wire"].unpack_batch(data, data[-1] % 4 if data else 0)
    except _expected():
        pass


def management_lines(data: bytes) -> None:
    """Bytes from a management client, split into command lines in pieces the input chooses."""
    splitter = _state["LineSplitter"](limit=256)
    pos = 0
    while pos < len(data):
        step = data[pos] % 97 + 1
        splitter.feed(data[pos + 1 : pos + 1 + step])
        pos += 1 + step


def config_text(data: bytes) -> None:
    """A configuration file. Path separators are removed so that every file the text names
    is looked up (and not found) in an empty scratch directory, never elsewhere on the host."""
    s = _state
    text = data.decode("utf-8", "replace").replace("/", "_").replace("\\", "_")
    try:
        s["config"].parse_config_text(text, source="fuzz.conf", cwd=s["workdir"], base_dir=s["workdir"])
    except (s["ConfigError"], *_expected()):
        pass
    try:
        s["config"].parse_ccd(text, source="fuzz-ccd")
    except (s["ConfigError"], *_expected()):
        pass


def gro_planner(data: bytes) -> None:
    """What a peer sends decrypts to arbitrary "IP packets": the GRO planner must plan them all.

    (tests/unit/test_offload_gso.py checks, for well-formed flows, that every packet comes back.)
    """
    import numpy as np

    gso = _state["gso"]
    packets: list[bytes] = []
    pos = 0
    while pos + 2 <= len(data) and len(packets) < 64:
        n = struct.unpack_from("!H", data, pos)[0] % 1500 + 1
        packets.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    packets = [p for p in packets if p]
    if not packets:
        return
    buf = bytearray()
    slots = []
    for p in packets:
        if len(buf) % 2:
            buf += b"\x00"
        slots.append((len(buf), len(p)))
        buf += p + b"\x00"  # the planner's spare byte after each packet
    bnp = np.frombuffer(buf, np.uint8)
    for planner in (gso.coalesce, gso.coalesce_checked):
        writes = planner(bytearray(buf), bnp, slots)
        if not writes or len(writes) > len(packets):
            raise AssertionError(f"{len(packets)} packets planned as {len(writes)} writes")
        for iov in writes:
            if sum(len(x) for x in iov) - gso.VNET_HDR_LEN > 65535:
                raise AssertionError("a planned write is larger than an IP packet can be")


TARGETS: dict[str, Target] = {
    "control_unwrap": control_unwrap,
    "stream_framer": stream_framer,
    "key_method_2": key_method_2,
    "push_reply": push_reply,
    "dns_options": dns_options,
    "cookie_paths": cookie_paths,
    "tls_crypt_v2": tls_crypt_v2,
    "key_files": key_files,
    "data_packet": data_packet,
    "compression_framing": compression_framing,
    "fragment_reassembly": fragment_reassembly,
    "engine_wire": engine_wire,
    "management_lines": management_lines,
    "config_text": config_text,
    "gro_planner": gro_planner,
}


def _harness_self_test(data: bytes) -> None:
    """Fails on almost any input: shows that a finding is reported, not hidden."""
    if len(data) > 2:
        raise RuntimeError("harness self test: this exception must be reported as a finding")


#: Not fuzz targets of pyovpn: checks of the harness itself (``fuzz.run`` does not run them).
HARNESS_CHECKS: dict[str, Target] = {"harness_self_test": _harness_self_test}


def seeds(name: str) -> list[bytes]:
    """Real inputs to start a target from (the fuzzer mutates them into the interesting cases)."""
    root = Path(__file__).resolve().parents[1] / "tests" / "corpus" / "configs"
    if name == "config_text" and root.is_dir():
        return [f.read_bytes() for f in sorted(root.iterdir())]
    if name in ("push_reply", "dns_options"):
        return [
            b"PUSH_REPLY,redirect-gateway def1 bypass-dhcp,dhcp-option DNS 10.8.0.1,route-gateway 10.8.0.1,"
            b"topology subnet,ping 10,ping-restart 120,ifconfig 10.8.0.2 255.255.255.0,peer-id 0,"
            b"cipher AES-256-GCM,protocol-flags cc-exit tls-ekm dyn-tls-crypt,tun-mtu 1500",
            b"dns server 1 address 10.8.0.1 fd00::1\ndns search-domains example.org\n"
            b"dhcp-option DOMAIN example.org\ndhcp-option DNS6 fd00::53",
            b"route 192.168.7.0 255.255.255.0 vpn_gateway 5,route-ipv6 fd01::/64,"
            b"ifconfig-ipv6 fd00::2/64 fd00::1",
        ]
    if name == "management_lines":
        return [b"version\r\nstate on all\r\nstatus 3\r\nclient-auth 1 2\r\npush route 1\r\nEND\r\n"]
    return []


def run_one(name: str, data: bytes) -> None:
    """Run one target on one input (for replaying a crash file by hand)."""
    setup()
    TARGETS[name](data)


if __name__ == "__main__":  # replay: python3 -m fuzz.targets TARGET FILE
    import sys

    run_one(sys.argv[1], Path(sys.argv[2]).read_bytes())
    print("no finding")
    os._exit(0)
