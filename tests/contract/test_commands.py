"""The command set in one namespace over loopback: interfaces, peers, keys, control and float.

Each scenario creates the backend's interface (``NewIface("tun")``: the backend picks a
free name) and hands it sockets on loopback; the far ends are plain sockets of the test.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from pyovpn.datachannel import api
from pyovpn.datachannel.crypto import PING_MAGIC, KeyState
from pyovpn.errors import BackendError
from tests.contract.rig import Rig
from tests.nslab import keydir, tcp_pair, udp_socket

pytestmark = pytest.mark.netns

P_CONTROL_V1 = 4 << 3  # any non-data opcode: the backend passes it up as a ControlPacket


def test_commands_before_an_interface_and_after_close(rig: Rig) -> None:
    one = rig.one(iface=False)
    sock = udp_socket(one)
    try:
        with pytest.raises(BackendError, match="NewPeer: no interface"):
            one.request(api.NewPeer(1, sock.fileno(), api.Transport.UDP, ("192.0.2.1", 1194)))
        with pytest.raises(BackendError, match="DelIface: no interface"):
            one.request(api.DelIface("tun9"))
        if not rig.caps.mp:
            with pytest.raises(BackendError, match="NewIface: multipoint"):
                one.request(api.NewIface("tun", api.IfaceMode.MP))
        one.run(one.backend.close())
        with pytest.raises(BackendError, match="closed"):
            one.request(api.GetPeer(1))
    finally:
        sock.close()


def test_peer_new_set_get_del(rig: Rig) -> None:
    one = rig.one()
    ifname = one.backend.ifname
    sock = udp_socket(one)
    one.request(
        api.NewPeer(5, sock.fileno(), api.Transport.UDP, ("127.0.0.2", 40001), None, None, None, 10, 60)
    )
    info = one.request(api.GetPeer(5))
    assert info.peer_id == 5 and info.remote == ("127.0.0.2", 40001)
    assert (info.keepalive_interval, info.keepalive_timeout) == (10, 60)
    assert info.vpn_rx_packets == info.link_tx_packets == 0

    one.request(api.SetPeer(5, remote=("127.0.0.3", 40002), keepalive_interval=2, keepalive_timeout=20))
    info = one.request(api.GetPeer(5))
    assert info.remote == ("127.0.0.3", 40002)
    assert (info.keepalive_interval, info.keepalive_timeout) == (2, 20)
    one.request(api.SetPeer(5, keepalive_interval=0, keepalive_timeout=0))
    assert one.request(api.GetPeer(5)).remote == ("127.0.0.3", 40002)
    with pytest.raises(BackendError, match="together"):
        one.request(api.SetPeer(5, keepalive_interval=1))

    one.request(api.DelPeer(5))
    # exactly one PeerDeleted(USERSPACE): the kernel's PEER_DEL_NTF or the userspace backend's own
    one.wait_note(lambda n: n == api.PeerDeleted(5, api.PeerDelReason.USERSPACE))
    assert one.notes.count(api.PeerDeleted(5, api.PeerDelReason.USERSPACE)) == 1
    with pytest.raises(BackendError, match=r"GetPeer: unknown peer id 5"):
        one.request(api.GetPeer(5))
    with pytest.raises(BackendError, match="DelPeer: unknown peer id 5"):
        one.request(api.DelPeer(5))

    # P2P: a new peer replaces the current one, which goes with TEARDOWN
    one.request(api.NewPeer(6, sock.fileno(), api.Transport.UDP, ("127.0.0.2", 40001)))
    one.request(api.NewPeer(7, sock.fileno(), api.Transport.UDP, ("127.0.0.2", 40001)))
    one.wait_note(lambda n: n == api.PeerDeleted(6, api.PeerDelReason.TEARDOWN))
    assert one.request(api.GetPeer(7)).peer_id == 7
    one.request(api.DelIface(ifname))
    one.wait_note(lambda n: n == api.PeerDeleted(7, api.PeerDelReason.TEARDOWN))
    sock.close()


def test_keys_new_get_swap_del(rig: Rig) -> None:
    one = rig.one()
    sock = udp_socket(one)
    one.request(api.NewPeer(9, sock.fileno(), api.Transport.UDP, ("127.0.0.2", 1194)))
    a128, chacha, a256 = api.Cipher.AES_128_GCM, api.Cipher.CHACHA20_POLY1305, api.Cipher.AES_256_GCM
    one.request(api.NewKey(9, api.KeySlot.PRIMARY, 0, a128, keydir(a128), keydir(a128)))
    one.request(api.NewKey(9, api.KeySlot.SECONDARY, 1, chacha, keydir(chacha), keydir(chacha)))
    k = one.request(api.GetKey(9, api.KeySlot.PRIMARY))
    assert (k.peer_id, k.slot, k.key_id, k.cipher) == (9, api.KeySlot.PRIMARY, 0, a128)
    k = one.request(api.GetKey(9, api.KeySlot.SECONDARY))
    assert (k.key_id, k.cipher) == (1, chacha)
    one.request(api.SwapKeys(9))
    assert one.request(api.GetKey(9, api.KeySlot.PRIMARY)).key_id == 1
    k = one.request(api.GetKey(9, api.KeySlot.SECONDARY))
    assert (k.key_id, k.cipher) == (0, a128)
    one.request(api.DelKey(9, api.KeySlot.SECONDARY))
    one.request(api.DelKey(9, api.KeySlot.SECONDARY))  # an empty slot is not an error
    with pytest.raises(BackendError, match="GetKey: peer 9 has no key in the secondary slot"):
        one.request(api.GetKey(9, api.KeySlot.SECONDARY))
    one.request(api.NewKey(9, api.KeySlot.PRIMARY, 7, a256, keydir(a256), keydir(a256)))
    k = one.request(api.GetKey(9, api.KeySlot.PRIMARY))
    assert (k.key_id, k.cipher) == (7, a256)
    with pytest.raises(BackendError, match="key length"):
        one.request(api.NewKey(9, api.KeySlot.PRIMARY, 1, a256, keydir(a128), keydir(a128)))
    with pytest.raises(BackendError, match="key id 8 out of range"):
        one.request(api.NewKey(9, api.KeySlot.PRIMARY, 8, a128, keydir(a128), keydir(a128)))
    with pytest.raises(BackendError, match=r"NewKey: unknown peer id 4"):
        one.request(api.NewKey(4, api.KeySlot.PRIMARY, 1, a128, keydir(a128), keydir(a128)))
    with pytest.raises(BackendError, match="SwapKeys: unknown peer id 4"):
        one.request(api.SwapKeys(4))
    sock.close()


def test_udp_control_float_and_counters(rig: Rig) -> None:
    one = rig.one()
    sock = udp_socket(one)
    port = sock.getsockname()[1]
    r1, r2 = udp_socket(one), udp_socket(one)
    one.request(api.NewPeer(5, sock.fileno(), api.Transport.UDP, r1.getsockname()))
    # control packets keep flowing through the handed-over socket, both ways
    r1.sendto(bytes([P_CONTROL_V1]) + b"ctl", ("127.0.0.1", port))
    one.wait_note(lambda n: n == api.ControlPacket(5, bytes([P_CONTROL_V1]) + b"ctl", r1.getsockname()))
    one.request(api.SendControl(5, b"\x28reply"))
    r1.settimeout(5)
    assert r1.recvfrom(100) == (b"\x28reply", ("127.0.0.1", port))

    # the peer sends an authenticated keepalive from another port: the backend floats it
    cipher = api.Cipher.CHACHA20_POLY1305
    enc, dec = keydir(cipher), keydir(cipher)
    one.request(api.NewKey(5, api.KeySlot.PRIMARY, 2, cipher, enc, dec))
    remote_side = KeyState.from_directions(2, cipher, dec, enc)
    r2.sendto(remote_side.encrypt(PING_MAGIC, 5), ("127.0.0.1", port))
    one.wait_note(lambda n: n == api.PeerFloated(5, r2.getsockname()))
    info = one.request(api.GetPeer(5))
    assert info.remote == r2.getsockname() and info.link_rx_packets == 1
    one.request(api.SendControl(5, b"\x28after-float"))  # control follows the float
    r2.settimeout(5)
    assert r2.recvfrom(100)[0] == b"\x28after-float"
    # a packet that fails authentication neither floats nor counts
    bad = bytearray(remote_side.encrypt(PING_MAGIC, 5))
    bad[-1] ^= 1
    r1.sendto(bytes(bad), ("127.0.0.1", port))
    time.sleep(0.5)
    assert one.request(api.GetPeer(5)).remote == r2.getsockname()
    for s in (sock, r1, r2):
        s.close()


def test_tcp_control_frames_and_disconnect(rig: Rig) -> None:
    one = rig.one()
    server, client = tcp_pair(one)
    one.request(api.NewPeer(4, client.fileno(), api.Transport.TCP))
    # frames from the far end arrive one by one, without their length prefix
    packets = [bytes([P_CONTROL_V1]) + os.urandom(n) for n in (3, 100, 1300, 3000)]
    server.sendall(b"".join(struct.pack(">H", len(p)) + p for p in packets))
    for p in packets:
        one.wait_note(api.ControlPacket(4, p, None).__eq__)
    # many control packets at once: one whole frame per send(), retried on EAGAIN, in order
    out = [bytes([P_CONTROL_V1]) + i.to_bytes(2, "big") + os.urandom(700) for i in range(200)]
    for p in out:
        one.request(api.SendControl(4, p))
    server.settimeout(10)
    want = b"".join(struct.pack(">H", len(p)) + p for p in out)
    got = b""
    while len(got) < len(want):
        chunk = server.recv(65536)
        assert chunk, "stream closed early"
        got += chunk
    assert got == want
    # the far end closes: the peer goes with TRANSPORT_DISCONNECT
    server.close()
    one.wait_note(lambda n: n == api.PeerDeleted(4, api.PeerDelReason.TRANSPORT_DISCONNECT))
    time.sleep(0.3)
    with pytest.raises(BackendError, match="unknown peer id 4"):
        one.request(api.GetPeer(4))
    assert one.notes.count(api.PeerDeleted(4, api.PeerDelReason.TRANSPORT_DISCONNECT)) == 1
    assert not any(
        isinstance(n, api.PeerDeleted) and n.reason is api.PeerDelReason.USERSPACE for n in one.notes
    )
    client.close()


def test_keepalive_expiry(rig: Rig) -> None:
    one = rig.one()
    sock, silent = udp_socket(one), udp_socket(one)
    one.request(
        api.NewPeer(8, sock.fileno(), api.Transport.UDP, silent.getsockname(), None, None, None, 1, 3)
    )
    cipher = api.Cipher.AES_256_GCM
    one.request(api.NewKey(8, api.KeySlot.PRIMARY, 0, cipher, keydir(cipher), keydir(cipher)))
    start = time.monotonic()
    # generous bounds: the guest is emulated (TCG) and its timers slip when the host is busy
    try:
        one.wait_note(lambda n: n == api.PeerDeleted(8, api.PeerDelReason.EXPIRED), timeout=45)
    except AssertionError:
        # tell a lost notification (our bug) from a peer the backend never expired
        try:
            info = one.request(api.GetPeer(8))
            state = f"the backend still has the peer: {info}"
        except BackendError as e:
            state = f"the backend dropped the peer but no PeerDeleted reached us ({e})"
        raise AssertionError(f"no EXPIRED notification within 45 s; {state}") from None
    elapsed = time.monotonic() - start
    print(f"keepalive 1/3: peer expired after {elapsed:.1f}s")
    assert 2.0 <= elapsed <= 40
    # the backend sent its keepalive pings to the silent side meanwhile
    silent.settimeout(1)
    assert len(silent.recv(100)) == 8 + 16 + 16  # DATA_V2 header, tag, 16-byte ping
    sock.close()
    silent.close()


def test_null_device_takes_the_peers_packets_and_pings_it(rig: Rig) -> None:
    """OpenVPN's `dev null`: no device; what the peer sends is decrypted and discarded, pings go out."""
    rig.require("null_dev", "`dev null`")
    one = rig.one(iface=False)
    with pytest.raises(BackendError, match="`dev null` has one peer"):
        one.request(api.NewIface("null", api.IfaceMode.MP, null=True))
    one.request(api.NewIface("null", api.IfaceMode.P2P, null=True))
    sock, far = udp_socket(one), udp_socket(one)
    port = sock.getsockname()[1]
    one.request(api.NewPeer(3, sock.fileno(), api.Transport.UDP, far.getsockname(), None, None, None, 1, 30))
    cipher = api.Cipher.AES_128_GCM
    enc, dec = keydir(cipher), keydir(cipher)
    one.request(api.NewKey(3, api.KeySlot.PRIMARY, 1, cipher, enc, dec))
    far_side = KeyState.from_directions(1, cipher, dec, enc)
    # an IPv4/UDP packet for the device that is not there
    inner = bytes.fromhex("4500001c00004000401100000a0000020a000001") + struct.pack(">HHHH", 1, 2, 8, 0)
    for _ in range(3):
        far.sendto(far_side.encrypt(inner, 3), ("127.0.0.1", port))
    deadline = time.monotonic() + 10
    while (info := one.request(api.GetPeer(3))).vpn_rx_packets < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert info.vpn_rx_packets == 3 and info.link_rx_packets == 3
    far.settimeout(5 * rig.patience)
    assert far_side.decrypt(far.recv(200)) == PING_MAGIC  # keepalive still runs
    one.request(api.DelIface("null"))
    for s in (sock, far):
        s.close()
