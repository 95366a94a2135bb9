"""One engine worker process: an epoll loop that moves packets for the peers it is given.

A peer has a *transmit* side (read the TUN, segment super-packets, encrypt with the primary
key, send with UDP GSO, keepalive pings, control packets out) and a *receive* side (read
the transport socket with UDP GRO, decrypt, replay check, float, userspace GRO into the
TUN, keepalive expiry, control packets in). The controller gives each side to exactly one
worker, so a key's transmit packet ids come from a single counter and its replay window
lives in a single process, and a flow's packets are handled in order by one process.

Control packets take priority over bulk data on the transmit side: a full socket buffer
never drops one (it is retried and data waits), a UDP control packet never trails a data
burst (see ``_CTL_GAP``), a TCP control frame overtakes queued data frames, and the TUN
loop yields to a waiting request between chunks.

The worker talks to the controller over a ``SOCK_SEQPACKET`` channel (see ``wire.py``):
requests ``{"op", ...}`` answered by OK/ERR, and events ``{"ev", ...}`` (float, expiry, TCP
disconnect, key exhausted). Control packets skip the controller: a second, direct channel
to the proxy carries received ones up (with ``PeerFloated``, so the proxy sees a float and
the control packets around it in the order they happened) and ``SendControl`` down,
answered there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import select
import signal
import socket
import struct
import time
from typing import Any

import numpy as np

from pyovpn.datachannel.api import (
    Cipher,
    ControlPacket,
    Framing,
    KeyDirection,
    PeerDelReason,
    PeerFloated,
    SendControl,
    Stats,
    Transport,
)
from pyovpn.datachannel.api import normalize_address as _normalize
from pyovpn.datachannel.crypto import DATA_V2_OVERHEAD, PING_MAGIC, KeyState, PacketIdExhaustedError
from pyovpn.datachannel.datapath import FRAME_LEN as _FRAME_LEN
from pyovpn.datachannel.datapath import GRO_CMSG_SPACE as _GRO_CMSG_SPACE
from pyovpn.datachannel.datapath import GSO_MAX_BYTES as _GSO_MAX_BYTES
from pyovpn.datachannel.datapath import GSO_MAX_SEGMENTS as _GSO_MAX_SEGMENTS
from pyovpn.datachannel.datapath import GSO_SIZE as _GSO_SIZE
from pyovpn.datachannel.datapath import (
    LANE_MAX_DELAY,
    debug_hook,
    gro_segment_size,
    gso_train_refused,
    reassemble,
    seal_ping,
    take_frames,
    tcp_error_reason,
)
from pyovpn.datachannel.datapath import TCP_RX_CHUNK as _TCP_RX_CHUNK
from pyovpn.datachannel.datapath import TCP_TX_HIGH_WATER as _TCP_TX_HIGH_WATER
from pyovpn.datachannel.datapath import count as _count
from pyovpn.datachannel.deadlines import DeadlineHeap, fire_time
from pyovpn.datachannel.engine import gso, wire
from pyovpn.datachannel.engine.remote import RemoteArea, RemoteCell
from pyovpn.datachannel.engine.wire import Kind
from pyovpn.datachannel.fragment import Fragmenter, FragmentError, Reassembler
from pyovpn.datachannel.framing import FramingError, frame_slots, note_framing_error, unframe
from pyovpn.datachannel.lane import close_lane, open_lane
from pyovpn.datachannel.routing import PeerRouter, PrefixTable
from pyovpn.datachannel.shaper import Shaper
from pyovpn.datachannel.tos import inner_tos, set_outer_tos
from pyovpn.errors import AuthenticationError, ProtocolError, ReplayError
from pyovpn.net import mmsg
from pyovpn.net.sockets import RECV_ICMP_ERRNOS, SOL_UDP, UDP_SEGMENT
from pyovpn.net.sockets import TRANSIENT_SEND_ERRNOS as _TRANSIENT
from pyovpn.proto.packets import (
    MIN_FIRST_PACKET_LEN,
    OPCODE_DATA_V1,
    OPCODE_DATA_V2,
    STRANGER_FIRST_BYTES,
    UNDEF_PEER_ID,
)

log = logging.getLogger("pyovpn.engine")

_DATA_V2_HDR = struct.Struct(">II")  # opcode/key id/peer id, packet id
_TUN_BATCH = 64  # TUN reads per wakeup before other descriptors get a turn
# Receives per wakeup, and datagrams (a GRO receive holds many). Large batches matter for a
# stock peer, which sends one datagram per packet: the fixed costs of a wakeup (epoll, GRO
# planning, the checksum check, the TUN write) are shared by more packets.
_UDP_BATCH = 256
_UDP_BATCH_DGRAMS = 1024
# Control packets go out ahead of bulk data, never right behind a burst of it. Under a
# saturating transfer the peer's receive queue is full just after each burst (stock openvpn
# reads a 208 KiB socket buffer) and whatever lands then is dropped; control packets sent
# there were lost again and again, and a renegotiation stalled for tens of seconds. So a
# control packet waits until _CTL_GAP has passed since the last burst, the TUN is not read
# meanwhile (no new burst can overtake it), and then it leads the next burst.
_CTL_GAP = 0.004
_CTL_RETRY = 0.001  # a control packet the socket refused (EAGAIN/ENOBUFS) is retried this soon
_CTL_QUEUE_MAX = 4096  # a runaway control plane must not grow the queue without bound
_CTL_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS})
_CTL_RETRY_FOR = 1.0  # after this long a refused control packet is dropped (and counted)
_TX_BUF = 1 << 20
_TX_FLUSH_AT = _TX_BUF - 2 * 65536 - 4096  # room for one more 64 KiB super-packet's slots
_MMSG_COUNT = 32  # datagrams per recvmmsg call (each in a 64 KiB slot: 2 MiB per worker)
_RX_ONE = 65536  # room for one receive: a UDP GRO batch is at most 64 KiB
_RX_BUF = 4 * _RX_ONE + 4096  # several receives of one wakeup, decrypted as a batch
_PLAIN_BUF = 8 * 65536 + 8192  # decrypted packets of several GRO receives, coalesced at once
_NEVER = float("inf")
_LANE_BATCH = 4096  # receives per lane drain (each at most 32 datagrams)


class _Peer:
    # a server holds one per client in each worker: slots keep that small
    __slots__ = (
        "cell",
        "cell_gen",
        "ctl_q",
        "ctl_refused_since",
        "ctl_retry_at",
        "dead",
        "expired_sent",
        "fd",
        "frag",
        "framing",
        "gen",
        "gro",
        "gso_max",
        "ka_due",
        "ka_interval",
        "ka_timeout",
        "keys",
        "last_rx",
        "last_tx",
        "mmsg",
        "mss4",
        "mss6",
        "passtos",
        "peer_id",
        "raw_ip",
        "raw_port",
        "reasm",
        "rx",
        "send_addr",
        "serials",
        "shaper",
        "shared",
        "sock",
        "stats",
        "tcp_bound",
        "tcp_ctl_end",
        "tcp_rx",
        "tcp_tx",
        "tcp_writer",
        "tos",
        "transport",
        "tx",
        "tx_peer_id",
        "vpn4",
        "vpn6",
    )

    def __init__(self, m: dict[str, Any], sock: socket.socket, cell: RemoteCell | None) -> None:
        self.cell = cell
        self.cell_gen = -1
        self.peer_id: int = m["peer_id"]
        self.gen: int = m["gen"]
        self.tx_peer_id: int = m["tx_peer_id"]
        self.transport = Transport(m["transport"])
        self.tx: bool = m["tx"]
        self.rx: bool = m["rx"]
        self.sock = sock
        self.fd = sock.fileno()
        self.keys: list[KeyState | None] = [None, None]
        self.serials: list[int] = [0, 0]
        self.stats = Stats()
        self.send_addr: tuple[Any, ...] | None = None
        self.raw_ip: str | None = None
        self.raw_port = 0
        self.gso_max = 0x10000 if m["gso"] else 0
        self.gro: bool = m["gro"]
        self.mss4: int = m["mss4"]
        self.mss6: int = m["mss6"]
        self.framing = Framing(m.get("framing", Framing.NONE.value))
        self.passtos: bool = m.get("passtos", False)  # see datachannel/tos.py
        self.tos = -1  # the TOS last set on the socket for passtos
        # `fragment MAX`: payloads cut before sealing (the sending side), put together after
        # opening (the receiving side); pings carry the whole-packet header too
        frag_max = m.get("fragment") or 0
        self.frag: Fragmenter | None = Fragmenter(frag_max) if frag_max and self.tx else None
        self.reasm: Reassembler | None = Reassembler() if frag_max and self.rx else None
        rate = m.get("shaper") or 0  # `shaper`: P2P only (the controller checked)
        self.shaper: Shaper | None = Shaper(rate) if rate and self.tx else None
        self.ka_interval = 0
        self.ka_timeout = 0
        self.ka_due: float | None = None  # this peer's entry in the worker's DeadlineHeap
        self.last_rx = self.last_tx = time.monotonic()
        self.expired_sent = False
        self.tcp_rx = bytearray(m.get("backlog", b""))
        self.tcp_tx = bytearray()  # frames the socket has not taken yet
        self.tcp_bound = 0  # tcp_tx[:tcp_bound] is the rest of a frame the socket took in part
        self.tcp_ctl_end = 0  # tcp_tx[tcp_bound:tcp_ctl_end] are control frames put ahead of data
        self.tcp_writer = False
        # UDP control packets waiting to go out, in order: a list, not a deque (an empty deque
        # is 700 bytes more, for each client in a server), and flushes take from its head at once
        self.ctl_q: list[bytes] = []
        self.ctl_retry_at = 0.0  # the socket refused the head of ctl_q; try again from then
        self.ctl_refused_since = 0.0  # when the socket first refused the head of ctl_q
        self.mmsg: mmsg.BatchReceiver | None = None
        self.dead = False
        self.vpn4: str | None = m.get("vpn4")  # MP: the peer's VPN addresses
        self.vpn6: str | None = m.get("vpn6")
        self.shared: _SharedRx | None = None  # MP, UDP: the socket all UDP peers share
        self.set_send(m.get("send_addr"), m.get("raw_ip"), m.get("raw_port", 0))

    def set_send(self, send_addr: Any, raw_ip: str | None, raw_port: int) -> None:
        self.send_addr = tuple(send_addr) if send_addr is not None else None
        self.raw_ip = raw_ip
        self.raw_port = raw_port


class _SharedRx:
    """MP: the UDP socket the peers of a server share, and how its datagrams find their peer.

    DATA_V2 names its peer by id; DATA_V1, DATA_V2 with the undefined peer id and control
    packets are looked up by source address, as the kernel does. The socket here is the
    worker's one copy, whichever peer brought it: the peers' own descriptors are closed.
    """

    __slots__ = ("by_addr", "by_id", "fd", "key", "lane", "lane_mmsg", "mmsg", "sock", "tos")

    def __init__(self, key: tuple[int, int], sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.by_id: dict[int, _Peer] = {}
        self.by_addr: dict[tuple[str | None, int], _Peer] = {}
        self.mmsg: mmsg.BatchReceiver | None = None
        self.tos = -1  # passtos: the TOS last set on the socket, for whichever peer
        self.lane: socket.socket | None = None  # the keepalive lane (datachannel/lane.py), drained on a timer
        self.lane_mmsg: mmsg.BatchReceiver | None = None

    def attach(self, peer: _Peer) -> None:
        self.by_id[peer.peer_id] = peer
        self.by_addr[(peer.raw_ip, peer.raw_port)] = peer
        peer.shared = self

    def detach(self, peer: _Peer) -> None:
        if self.by_id.get(peer.peer_id) is peer:
            del self.by_id[peer.peer_id]
        self.unindex(peer, (peer.raw_ip, peer.raw_port))
        peer.shared = None

    def unindex(self, peer: _Peer, addr: tuple[str | None, int]) -> None:
        if self.by_addr.get(addr) is peer:
            del self.by_addr[addr]


class _RxBatch:
    """The plaintext of one receive wakeup, and the datagrams waiting to be decrypted into it.

    Datagrams of ``buf`` wait in ``pending`` while they come from one sender; they are
    decrypted (:meth:`Worker._rx_datagrams`) when the sender changes, when the caller is about
    to reuse their part of ``buf``, or before the plaintext buffer could overflow (a plaintext
    is never longer than its datagram, so ``ppos + pending_bytes`` bounds what they will fill).
    Then the TUN gets what was decrypted so far. :meth:`finish` writes the rest.

    MP: the plaintext of several peers shares one TUN write batch (``owners`` says which
    slots are whose), so clients whose datagrams interleave still get large GRO writes.
    """

    __slots__ = (
        "addr",
        "buf",
        "dgrams",
        "late",
        "limit",
        "owners",
        "peer",
        "pending",
        "pending_bytes",
        "ppos",
        "slots",
        "w",
    )

    def __init__(self, w: Worker, peer: _Peer, buf: memoryview, late: bool = False) -> None:
        self.w = w
        self.late = late  # from the keepalive lane: a ping that waited there may trail newer data
        self.peer = peer
        self.buf = buf
        self.limit = len(w.plain) - 8192
        self.slots: list[tuple[int, int]] = []
        self.owners: list[tuple[_Peer, int]] = []  # (peer, end): slots[previous end:end] are its
        self.ppos = 0
        self.pending: list[tuple[int, int]] = []
        self.pending_bytes = 0
        self.addr: Any = None
        self.dgrams = 0  # datagrams taken in this wakeup

    def add(self, off: int, n: int, seg: int, addr: Any) -> None:
        """The receive ``buf[off:off+n]`` from ``addr``; ``seg``: its GRO segment size (0: none)."""
        self._room(n, addr)
        pending = self.pending
        if seg and seg < n:
            _count(self.peer.stats, "gro_batches")
            before = len(pending)
            pending.extend((off + o, min(seg, n - o)) for o in range(0, n, seg))
            self.dgrams += len(pending) - before
        else:
            pending.append((off, n))
            self.dgrams += 1
        self.addr = addr
        self.pending_bytes += n

    def add_run(self, dgrams: list[tuple[int, int]], total: int, addr: Any) -> None:
        """Whole datagrams ``(offset, length)`` of ``total`` bytes (at most ``limit``) from ``addr``."""
        self._room(total, addr)
        self.pending.extend(dgrams)
        self.dgrams += len(dgrams)
        self.addr = addr
        self.pending_bytes += total

    def _room(self, n: int, addr: Any) -> None:
        full = self.ppos + self.pending_bytes + n > self.limit
        if self.pending and (full or addr != self.addr):
            self.decrypt()
        if full:
            self._write()

    def use(self, peer: _Peer) -> None:
        """MP: the datagrams added next are ``peer``'s (what the previous peer sent is decrypted)."""
        if peer is not self.peer:
            self.decrypt()
            self.peer = peer

    def decrypt(self) -> None:
        peer = self.peer
        if self.pending and not peer.dead:
            slots = self.slots
            self.ppos = self.w._rx_datagrams(
                peer, self.buf, self.pending, self.addr, slots, self.ppos, self.late
            )
            owners = self.owners
            if owners and owners[-1][0] is peer:
                owners[-1] = (peer, len(slots))
            elif not owners or owners[-1][1] < len(slots):
                owners.append((peer, len(slots)))
        self.pending = []
        self.pending_bytes = 0

    def _write(self) -> None:
        if self.slots:
            self.w._tun_write(self.slots, self.owners)
        self.slots = []
        self.owners = []
        self.ppos = 0

    def finish(self) -> None:
        self.decrypt()
        self._write()


class Worker:
    def __init__(
        self, index: int, chan: socket.socket, options: dict[str, Any], ctl: socket.socket | None = None
    ) -> None:
        self.index = index
        self.name = f"engine worker {index}"  # for log lines written on the data path
        self.chan = chan
        self.ctl = ctl  # the direct channel to the proxy (control packets)
        self.opts = options
        self.verify_rx_csum = bool(options.get("verify_rx_checksums", True))
        self.tun_gro = bool(options.get("tun_gro", True))
        self.ep = select.epoll()
        self.handlers: dict[int, Any] = {}
        self.peers: dict[int, _Peer] = {}
        self.tx_peer: _Peer | None = None  # P2P: the peer TUN packets go to
        self.rx_peer: _Peer | None = None
        # MP: TUN packets go to the peer their destination routes to (the controller mirrors
        # the system routes through the interface into the router); UDP peers share sockets
        self.router: PeerRouter[_Peer] | None = None
        self.area: RemoteArea | None = None  # MP: the peers' remote addresses (slots of one mapping)
        self.shared: dict[tuple[int, int], _SharedRx] = {}
        self.mp_stats = Stats()  # MP drops that belong to no peer (no route, unknown peer id...)
        # timers: the peers' keepalive deadlines (a pass pops only the peers that are due) and
        # when the next pass runs; peers with control packets waiting
        self.ka_heap: DeadlineHeap[_Peer] = DeadlineHeap()
        self.ka_fire_at = _NEVER
        self.ctl_waiting: set[_Peer] = set()
        self.tun_fd = -1
        self.tun_read = False
        self.tun_vnet = False
        self.tun_mtu = 1500
        self.running = True
        self.no_peer_drops = 0
        # transmit buffers
        self.tun_buf = bytearray(65536 + 64)
        self.tun_mv = memoryview(self.tun_buf)
        self.tun_np = np.frombuffer(self.tun_buf, np.uint8)
        self.tx_buf = bytearray(_TX_BUF)
        self.tx_mv = memoryview(self.tx_buf)
        self.seg = gso.Segmenter(self.tx_buf)
        self.tx_offs: list[int] = []
        self.tx_lens: list[int] = []
        self.tx_pos = 0
        self.last_burst = 0.0  # when the last data burst left (monotonic)
        self.tun_paused = False  # TUN reads stop while a control packet waits to go first
        self.tun_held_until = 0.0  # `shaper`: no TUN reads before then (monotonic; 0: not held)
        self.chan_out = wire.Outbox()  # answers and events for the controller, sent once per turn
        self.chan_poll = select.poll()
        self.chan_poll.register(chan.fileno(), select.POLLIN)
        if ctl is not None:
            self.chan_poll.register(ctl.fileno(), select.POLLIN)
        # receive buffers
        self.rx_buf = bytearray(_RX_BUF)
        self.rx_mv = memoryview(self.rx_buf)
        self.plain = bytearray(_PLAIN_BUF)
        self.plain_mv = memoryview(self.plain)
        self.plain_np = np.frombuffer(self.plain, np.uint8)
        # recvmmsg (net/mmsg.py) where the platform has it; the option turns it off (tests of
        # the one-recvmsg-per-datagram path, which stays as the fallback)
        self.mmsg_ok = bool(options.get("recvmmsg", True)) and mmsg.available()
        self.mmsg_buf: mmap.mmap | None = None  # allocated with the first UDP receive side
        self.mmsg_mv: memoryview | None = None

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self.chan.setblocking(False)
        self._register(self.chan.fileno(), select.EPOLLIN, self._on_chan)
        if self.ctl is not None:
            self.ctl.setblocking(False)
            self._register(self.ctl.fileno(), select.EPOLLIN, self._on_ctl)
        while self.running:
            timeout = self._next_timer()
            try:
                events = self.ep.poll(timeout)
            except InterruptedError:
                continue
            for fd, ev in events:
                handler = self.handlers.get(fd)
                if handler is not None:
                    try:
                        handler(ev)
                    except Exception:  # one bad packet or state must not kill the data plane
                        log.exception("engine worker %d: handler for fd %d failed", self.index, fd)
            try:
                self._run_timers()
            except Exception:
                log.exception("engine worker %d: timer failed", self.index)
            self._flush_chan()  # this turn's answers and events, in one datagram where they fit
        self._flush_chan()  # the answer to "exit"

    def _register(self, fd: int, mask: int, handler: Any) -> None:
        if fd in self.handlers:
            self.ep.modify(fd, mask)
        else:
            self.ep.register(fd, mask)
        self.handlers[fd] = handler

    def _unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(fd)

    def _event(self, ev: str, **kw: Any) -> None:
        """Report to the controller; a control packet (and a float) goes to the proxy directly.

        A float is told to the controller first, then to the proxy: the proxy may ask the
        controller about the peer as soon as it knows, and the controller reads worker
        events before proxy requests.
        """
        ctl = self.ctl
        if ctl is not None and ev == "control":
            addr = kw["addr"]
            note = ControlPacket(kw["peer_id"], kw["packet"], _normalize(addr) if addr else None)
            self._send(ctl, Kind.CONTROL, 0, note)
            return
        noted = ctl is not None and ev == "float"
        self._send(self.chan, Kind.EVENT, 0, {"ev": ev, "noted": noted, **kw})
        if ctl is not None and noted:
            self._send(ctl, Kind.NOTE, 0, PeerFloated(kw["peer_id"], _normalize(kw["addr"])))

    def _send(self, sock: socket.socket, kind: Kind, rid: int, body: object) -> None:
        """Queue for the controller (sent at the end of the turn), or send to the proxy now.

        Nothing is dropped: a full channel is waited out. What the controller was told goes
        out before anything to the proxy, so the controller always knows first. A broken
        controller channel ends the worker; a broken proxy channel only this path (the
        controller learns the rest and decides).
        """
        if sock is self.chan:
            self.chan_out.add(kind, rid, body)
            return
        self._flush_chan()
        try:
            sock.setblocking(True)
            wire.send(sock, kind, rid, body)
        except OSError:
            self._drop_ctl()
        finally:
            with contextlib.suppress(OSError):
                sock.setblocking(False)

    def _flush_chan(self) -> None:
        out = self.chan_out
        if not out.items:  # every turn of the data path comes here: keep the empty case cheap
            return
        try:
            out.flush(self.chan, wait=True)
        except OSError:
            out.take()
            self.running = False

    def _drop_ctl(self) -> None:
        ctl = self.ctl
        if ctl is None:
            return
        self.ctl = None
        if ctl.fileno() >= 0:
            self._unregister(ctl.fileno())
            with contextlib.suppress(KeyError, ValueError):
                self.chan_poll.unregister(ctl.fileno())
            ctl.close()

    def _on_ctl(self, _ev: int) -> None:
        """``SendControl`` from the proxy, answered on the same channel."""
        while self.running and self.ctl is not None:
            ctl = self.ctl
            try:
                msg, fds = wire.recv(ctl)
            except BlockingIOError:
                return
            except ProtocolError as e:
                log.error("engine worker %d: dropped a malformed proxy message: %s", self.index, e)
                continue
            except OSError:
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                self._drop_ctl()  # the proxy went away; the controller decides
                return
            cmd = msg.body
            if msg.kind is not Kind.SEND_CONTROL or not isinstance(cmd, SendControl):
                self._send(ctl, Kind.ERR, msg.rid, f"worker {self.index}: unexpected {msg.kind.name}")
                continue
            peer = self.peers.get(cmd.peer_id)
            try:
                if peer is None or not peer.tx:
                    raise ValueError(f"worker {self.index}: no peer {cmd.peer_id}")
                self._send_control(peer, cmd.packet)
            except Exception as e:
                self._send(ctl, Kind.ERR, msg.rid, str(e) or type(e).__name__)
            else:
                self._send(ctl, Kind.OK, msg.rid, None)

    # ------------------------------------------------------------------ controller channel

    def _on_chan(self, _ev: int) -> None:
        while self.running:
            try:
                batch = wire.recv_all(self.chan)
            except BlockingIOError:
                return
            except ProtocolError as e:
                log.error("engine worker %d: dropped a malformed request: %s", self.index, e)
                continue
            except OSError:
                self.running = False
                return
            if batch is None:
                self.running = False  # the controller is gone
                return
            for msg, fds in batch:
                try:
                    if msg.kind is not Kind.REQUEST or not isinstance(msg.body, dict):
                        raise ValueError(f"unexpected {msg.kind.name} message")
                    kind, answer = Kind.OK, self._dispatch(msg.body, fds)
                except Exception as e:  # reported to the controller, which turns it into BackendError
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    kind, answer = Kind.ERR, str(e) or type(e).__name__
                self._send(self.chan, kind, msg.rid, answer)

    def _dispatch(self, m: dict[str, Any], fds: list[int]) -> Any:
        op = m["op"]
        if op == "set_tun":
            return self._set_tun(m, fds)
        if op == "clear_tun":
            return self._clear_tun()
        if op == "add_peer":
            return self._add_peer(m["peer"], fds)
        if op == "exit":
            self.running = False
            return None
        if op == "set_routes":
            return self._set_routes(m)
        if op == "mp_stats":
            return self.mp_stats
        peer = self.peers.get(m["peer_id"])
        if peer is None or peer.gen != m.get("gen", peer.gen):
            raise ValueError(f"worker {self.index}: no peer {m['peer_id']}")
        if op == "del_peer":
            return self._del_peer(peer, bool(m.get("flush")))
        if op == "set_keepalive":
            return self._set_keepalive(peer, m["interval"], m["timeout"])
        if op == "new_key":
            cipher = Cipher(m["cipher"])
            ks = KeyState.from_directions(
                m["key_id"],
                cipher,
                KeyDirection(m["enc_key"], m["enc_tail"]) if "enc_key" in m else None,
                KeyDirection(m["dec_key"], m["dec_tail"]) if "dec_key" in m else None,
                replay_window=m["replay_window"],
            )
            peer.keys[m["slot"]] = ks
            peer.serials[m["slot"]] = m["serial"]
            return None
        if op == "del_key":
            peer.keys[m["slot"]] = None
            peer.serials[m["slot"]] = 0
            return None
        if op == "swap_keys":
            peer.keys.reverse()
            peer.serials.reverse()
            return None
        if op == "kill_key":
            for i in (0, 1):
                if peer.serials[i] == m["serial"]:
                    peer.keys[i] = None
                    peer.serials[i] = 0
            return None
        if op == "send_control":
            return self._send_control(peer, m["packet"])
        if op == "sync_remote":
            return self._sync_remote(peer)
        if op == "stats":
            return peer.stats
        if op == "debug":
            return debug_hook(peer, m["what"], m)
        raise ValueError(f"unknown worker op {op!r}")

    # ------------------------------------------------------------------ setup

    def _set_tun(self, m: dict[str, Any], fds: list[int]) -> None:
        self._clear_tun()
        fd = fds[0]
        self.router = PeerRouter() if m.get("mp") else None
        if len(fds) > 1:
            self.area = RemoteArea(fds[1])
            self.area.drop_fd()
        self.tun_fd = fd
        self.tun_vnet = bool(m["vnet"])
        self.tun_mtu = m["mtu"]
        self.tun_read = bool(m["read"])
        os.set_blocking(fd, False)
        if self.tun_read:
            self._register(fd, select.EPOLLIN, self._on_tun)

    def _set_routes(self, m: dict[str, Any]) -> None:
        """MP: the routes through the interface, ``(network, prefix length, next hop)`` as ints."""
        if self.router is None:
            raise ValueError(f"worker {self.index}: routes are for a multipoint interface")
        tables: list[PrefixTable[int]] = [PrefixTable(32), PrefixTable(128)]
        for table, rows in zip(tables, (m["routes4"], m["routes6"]), strict=True):
            for network, prefixlen, hop in rows:
                table.set(int(network), prefixlen, int(hop))
        self.router.set_routes(tables[0], tables[1])

    def _clear_tun(self) -> None:
        self.tun_paused = False
        self.tun_held_until = 0.0
        if self.tun_fd >= 0:
            self._unregister(self.tun_fd)
            with contextlib.suppress(OSError):
                os.close(self.tun_fd)
        self.tun_fd = -1
        self.tun_read = False
        self.area = None  # its mapping lives on while a peer's cell still refers to it

    def _add_peer(self, m: dict[str, Any], fds: list[int]) -> None:
        key = m.get("shared_key")
        shared = None
        if key is not None:  # MP over UDP: one copy of the server socket serves every peer
            key = (key[0], key[1])
            shared = self.shared.get(key)
            if shared is None:
                shared = self.shared[key] = _SharedRx(key, socket.socket(fileno=fds[0]))
                if m["rx"]:
                    self._register(shared.fd, select.EPOLLIN, lambda _ev, sh=shared: self._on_shared(sh))
                    shared.lane = open_lane(shared.sock)
                    self.ka_fire_at = 0.0  # the lane is drained on the keepalive timer
            else:
                os.close(fds[0])
            sock = shared.sock
        else:
            sock = socket.socket(fileno=fds[0])
        slot = m.get("cell_slot")
        if slot is not None and self.area is not None:
            cell: RemoteCell | None = self.area.cell(slot)
        elif len(fds) > 1:
            cell = RemoteCell(fds[1])
            cell.drop_fd()  # the mapping stays
        else:
            cell = None
        peer = _Peer(m, sock, cell)
        self._sync_remote(peer)
        old = self.peers.get(peer.peer_id)
        if old is not None:
            self._del_peer(old, False)
        self.peers[peer.peer_id] = peer
        if m.get("ka_interval") is not None:  # NewPeer's keepalive comes with the peer
            self._set_keepalive(peer, m["ka_interval"], m["ka_timeout"])
        if self.router is not None:
            self.router.add_peer(peer, peer.vpn4, peer.vpn6)  # the controller checked them
        elif peer.tx:
            self.tx_peer = peer
        if shared is not None:
            shared.attach(peer)
            return
        if peer.rx:
            self.rx_peer = peer
            if peer.transport is Transport.UDP:
                self._register(peer.fd, select.EPOLLIN, lambda _ev, p=peer: self._on_udp(p))
            else:
                self._register(peer.fd, select.EPOLLIN, lambda ev, p=peer: self._on_tcp_event(p, ev))
                if peer.tcp_rx:
                    self._tcp_process(peer)

    def _set_keepalive(self, peer: _Peer, interval: int, timeout: int) -> None:
        now = time.monotonic()
        peer.ka_interval = interval
        peer.ka_timeout = timeout
        peer.last_rx = peer.last_tx = now  # as the kernel: both timers restart when set
        peer.expired_sent = False
        if interval and timeout:  # the kernel only runs keepalive with both set
            self._ka_schedule(peer, now + min(interval, timeout))
        else:
            self.ka_heap.cancel(peer)

    def _ka_schedule(self, peer: _Peer, due: float) -> None:
        self.ka_heap.schedule(peer, due)
        fire = fire_time(due)
        if fire < self.ka_fire_at:
            self.ka_fire_at = fire

    def _del_peer(self, peer: _Peer, flush: bool) -> None:
        if flush and peer.ctl_q:
            # best effort: a control packet queued just before DelPeer (e.g. EXIT) should leave
            peer.ctl_retry_at = 0.0
            with contextlib.suppress(OSError):
                self._ctl_flush(peer)
        peer.dead = True
        self.ka_heap.cancel(peer)
        self.peers.pop(peer.peer_id, None)
        if self.tx_peer is peer:
            self.tx_peer = None
            self.tx_offs.clear()
            self.tx_lens.clear()
            self.tx_pos = 0
        if self.rx_peer is peer:
            self.rx_peer = None
        if flush and peer.transport is Transport.TCP and peer.tcp_tx:
            with contextlib.suppress(OSError):
                peer.sock.send(peer.tcp_tx)
        peer.ctl_q.clear()
        self.ctl_waiting.discard(peer)
        if not self.ctl_waiting:
            self._resume_tun()
        if self.router is not None:
            self.router.remove_peer(peer)
        shared = peer.shared
        if shared is not None:
            shared.detach(peer)
            if not shared.by_id:  # the last peer on it: our copy of the socket goes
                del self.shared[shared.key]
                self._unregister(shared.fd)
                if shared.lane is not None:
                    close_lane(shared.lane)
                    shared.lane = None
                with contextlib.suppress(OSError):
                    shared.sock.close()
        else:
            self._unregister(peer.fd)
            with contextlib.suppress(OSError):
                peer.sock.detach()
                os.close(peer.fd)
        if peer.cell is not None:
            with contextlib.suppress(OSError, ValueError):
                peer.cell.close()
        peer.keys = [None, None]

    @staticmethod
    def _sync_remote(peer: _Peer) -> None:
        """Adopt a remote address published by the controller (SetPeer) or the receive side (float)."""
        cell = peer.cell
        if cell is not None and cell.generation() != peer.cell_gen:
            old = (peer.raw_ip, peer.raw_port)
            peer.cell_gen, addr = cell.load()
            peer.set_send(addr, addr[0], addr[1])
            shared = peer.shared
            if shared is not None and shared.by_id.get(peer.peer_id) is peer:  # MP: SetPeer moved it
                shared.unindex(peer, old)
                shared.by_addr[(addr[0], addr[1])] = peer

    # ------------------------------------------------------------------ timers (keepalive)

    def _next_timer(self) -> float:
        best = self.ka_fire_at
        for p in self.ctl_waiting:
            d = self._ctl_deadline(p)
            best = d if d < best else best
        now = time.monotonic()
        timeout = max(0.0, best - now) + 0.001 if best != _NEVER else -1.0
        if self.tun_held_until:
            # `shaper`: epoll rounds up to whole milliseconds already; a margin on top would
            # cost a millisecond per burst
            held = max(0.0, self.tun_held_until - now)
            timeout = held if timeout < 0 or held < timeout else timeout
        return timeout

    def _run_timers(self) -> None:
        now = time.monotonic()
        if self.tun_held_until and now >= self.tun_held_until:
            self.tun_held_until = 0.0
            self._tun_interest()
        if self.ctl_waiting:
            for p in list(self.ctl_waiting):
                if p.ctl_q and now >= self._ctl_deadline(p):
                    self._ctl_flush(p)
        if now >= self.ka_fire_at:
            self._keepalive_pass(now)

    def _keepalive_pass(self, now: float) -> None:
        """Ping and expire the peers that are due; plan the next pass.

        Passes run on multiples of ``KA_QUANTUM`` (see :mod:`pyovpn.datachannel.deadlines`).
        The keepalive lanes are drained first, so no peer expires with its ping still queued
        there, and at least every ``LANE_MAX_DELAY``.
        """
        best = _NEVER
        for sh in list(self.shared.values()):
            if sh.lane is not None:
                self._on_shared(sh, lane=True)
                best = now + LANE_MAX_DELAY
        for p in self.ka_heap.pop_due(now):
            self._keepalive(p, now)
        earliest = self.ka_heap.earliest()
        if earliest is not None and earliest < best:
            best = earliest
        self.ka_fire_at = fire_time(best) if best != _NEVER else _NEVER

    def _keepalive(self, p: _Peer, now: float) -> None:
        """One peer's deadlines came: expire it (receive side) or ping it (transmit side)."""
        if p.dead or not (p.ka_interval and p.ka_timeout):
            return
        due = _NEVER
        if p.rx and not p.expired_sent:
            rx_due = p.last_rx + p.ka_timeout
            if now >= rx_due:
                p.expired_sent = True  # the controller deletes the peer
                self._event("expired", peer_id=p.peer_id, gen=p.gen)
            else:
                due = rx_due
        if p.tx:
            if now >= p.last_tx + p.ka_interval:
                self._send_ping(p, now)
                p.last_tx = max(p.last_tx, now)  # a lost ping must not make us spin
            due = min(due, p.last_tx + p.ka_interval)
        if due != _NEVER:
            self.ka_heap.schedule(p, due)

    def _send_ping(self, peer: _Peer, now: float) -> None:
        packet = seal_ping(peer, self._key_exhausted)
        if packet is None:
            return
        if peer.transport is Transport.TCP:
            if self._tcp_queue(peer, _FRAME_LEN.pack(len(packet)) + packet, control=False):
                peer.stats.link_tx_packets += 1
                peer.stats.link_tx_bytes += len(packet)
                peer.last_tx = now
            return
        self._sync_remote(peer)
        addr = peer.send_addr
        assert addr is not None, "a UDP peer always has a remote"  # NewPeer checked it
        try:
            peer.sock.sendto(packet, addr)
        except OSError:
            _count(peer.stats, "tx_dropped")
            return
        peer.stats.link_tx_packets += 1
        peer.stats.link_tx_bytes += len(packet)
        peer.last_tx = now

    def _key_exhausted(self, peer: _Peer, ks: KeyState) -> None:
        for i in (0, 1):
            if peer.keys[i] is ks:
                serial = peer.serials[i]
                peer.keys[i] = None
                peer.serials[i] = 0
                self._event(
                    "key_exhausted", peer_id=peer.peer_id, gen=peer.gen, serial=serial, key_id=ks.key_id
                )

    # ------------------------------------------------------------------ TUN -> network

    def _on_tun(self, _ev: int) -> None:
        if self.tun_paused or self.tun_held_until:
            return  # a control packet goes first, or `shaper` holds the TUN (reported before)
        fd = self.tun_fd
        readv = os.readv
        bufs = [self.tun_buf]
        tmv = self.tun_mv
        router = self.router
        for_dst = router.for_dst if router is not None else None
        peer = self.tx_peer
        ks = peer.keys[0] if peer is not None else None
        vnet = self.tun_vnet
        hl = gso.VNET_HDR_LEN if vnet else 0
        frame = peer is not None and peer.transport is Transport.TCP
        reserve = 26 if frame else 24
        offs = self.tx_offs
        lens = self.tx_lens
        mv = self.tx_mv
        dropped = 0
        vpn_bytes = 0
        vpn_packets = 0
        shaper = peer.shaper if peer is not None and for_dst is None else None
        if shaper is not None:
            assert peer is not None
            sent_before = peer.stats.link_tx_bytes
            budget = shaper.burst  # bytes read per wakeup: one burst, then the TUN waits its time
        else:
            sent_before = 0
            budget = 1 << 62
        for _ in range(_TUN_BATCH):
            if vpn_bytes >= budget:
                break
            try:
                n = readv(fd, bufs)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("engine worker %d: reading the TUN failed: %s", self.index, e)
                break
            if for_dst is not None:  # MP: the peer this packet routes to
                dst = for_dst(tmv[hl:n])
                if dst is not peer:
                    if peer is not None:  # what went to the previous peer leaves first
                        self._tun_batch_done(peer, ks, vpn_packets, vpn_bytes, dropped)
                        vpn_packets = vpn_bytes = dropped = 0
                    peer = dst
                    if peer is not None:
                        ks = peer.keys[0]
                        frame = peer.transport is Transport.TCP
                        reserve = 26 if frame else 24
                if peer is None:
                    _count(self.mp_stats, "tx_dropped_no_peer")
                    continue
            if ks is None:
                dropped += 1
                continue
            if vnet:
                flags, gtype, _hdr_len, gsize, cstart, coff = gso.VNET_HDR.unpack_from(tmv)
            else:
                flags = gtype = 0
            ln = n - hl
            if ln <= 0:
                continue
            if peer.passtos and (tos := inner_tos(tmv, hl)) != (marked := peer.shared or peer).tos:  # type: ignore[union-attr]
                # what was read before goes out with the TOS it was read under; a super-packet's
                # segments share their header's TOS. MP: the mark is the shared socket's.
                if offs:
                    ks = self._tx_flush(peer, ks)  # type: ignore[arg-type]
                    if ks is None:
                        dropped += 1
                        continue
                set_outer_tos(peer.sock, tos)  # type: ignore[union-attr]
                marked.tos = tos  # type: ignore[union-attr]
            pos = self.tx_pos
            if gtype == gso.GSO_NONE:
                p = pos + reserve
                mv[p : p + ln] = tmv[hl:n]
                if flags & gso.VNET_F_NEEDS_CSUM:
                    try:
                        gso.finish_partial(mv, p, p + ln, cstart, coff)
                    except ValueError:
                        dropped += 1
                        continue
                if gso.may_be_tcp_syn(self.tx_buf, p):
                    self._clamp(peer, p, ln)  # type: ignore[arg-type]
                offs.append(pos)
                lens.append(ln)
                self.tx_pos = pos + reserve + ln
                vpn_packets += 1
            else:
                if pos & 3:
                    pos += 4 - (pos & 3)  # 4-byte aligned rows let numpy sum 32-bit words
                try:
                    cnt, full, last = self.seg.segment(self.tun_np[hl:n], gtype, gsize, cstart, pos, reserve)
                except (ValueError, BufferError) as e:
                    _count(peer.stats, "tx_bad_gso")  # type: ignore[union-attr]
                    log.debug("engine worker %d: dropping a super-packet: %s", self.index, e)
                    dropped += 1
                    continue
                stride = reserve + full
                for i in range(cnt - 1):
                    offs.append(pos + i * stride)
                    lens.append(full)
                offs.append(pos + (cnt - 1) * stride)
                lens.append(last)
                self.tx_pos = pos + (cnt - 1) * stride + reserve + last
                vpn_packets += cnt
                _count(peer.stats, "tso_packets")  # type: ignore[union-attr]
            vpn_bytes += ln
            if self.tx_pos >= _TX_FLUSH_AT:
                ks = self._tx_flush(peer, ks)  # type: ignore[arg-type]
                if self.chan_poll.poll(0):
                    break  # a request (SendControl...) waits: serve it before the next chunk
        if peer is not None:
            self._tun_batch_done(peer, ks, vpn_packets, vpn_bytes, dropped)
            if shaper is not None:
                self._shaped(peer, shaper, sent_before)
        elif dropped:
            self.no_peer_drops += dropped

    def _tun_batch_done(
        self, peer: _Peer, ks: KeyState | None, vpn_packets: int, vpn_bytes: int, dropped: int
    ) -> None:
        """Send what the TUN gave for ``peer``, and count it."""
        st = peer.stats
        st.vpn_tx_packets += vpn_packets
        st.vpn_tx_bytes += vpn_bytes
        if self.tx_offs and ks is not None:
            self._tx_flush(peer, ks)
        if dropped:
            _count(st, "tx_dropped_no_key", dropped)

    def _clamp(self, peer: _Peer, p: int, ln: int) -> None:
        if gso.clamp_mss(self.tx_buf, p, ln, peer.mss4, peer.mss6):
            _count(peer.stats, "mss_clamped")

    def _tx_flush(self, peer: _Peer, ks: KeyState) -> KeyState | None:
        offs = self.tx_offs
        lens = self.tx_lens
        frame = peer.transport is Transport.TCP
        if peer.framing is not Framing.NONE:
            try:
                frame_slots(peer.framing, self.tx_mv, offs, lens, 26 if frame else 24)
            except ValueError:  # no room left to grow the slots: drop this batch, never the worker
                _count(peer.stats, "tx_dropped_framing", len(offs))
                offs.clear()
                lens.clear()
                self.tx_pos = 0
                return ks
        if peer.frag is not None:
            return self._tx_fragments(peer, ks, peer.frag)
        done = ks.encrypt_slots(self.tx_mv, offs, lens, peer.tx_peer_id, frame=frame)
        if done < len(offs):
            _count(peer.stats, "tx_dropped_no_key", len(offs) - done)
            self._key_exhausted(peer, ks)
            del offs[done:]
            del lens[done:]
            ks_next: KeyState | None = None
        else:
            ks_next = ks
        if offs:
            if frame:
                self._tcp_send_slots(peer)
            else:
                self._sync_remote(peer)
                self._udp_send_slots(peer)
            peer.last_tx = self.last_burst = time.monotonic()
        offs.clear()
        lens.clear()
        self.tx_pos = 0
        return ks_next

    def _tx_fragments(self, peer: _Peer, ks: KeyState, frag: Fragmenter) -> KeyState | None:
        """`fragment`: each payload of the batch cut into pieces (or marked whole), one datagram each.

        Slow by design (a packet at a time): the pieces differ in size, so no GSO train.
        """
        mv = self.tx_mv
        st = peer.stats
        out: list[bytes] = []
        ks_next: KeyState | None = ks
        for off, ln in zip(self.tx_offs, self.tx_lens, strict=True):
            try:
                pieces = frag.split(mv[off + 24 : off + 24 + ln])
            except FragmentError:
                _count(st, "tx_dropped_too_big")
                continue
            try:
                for piece in pieces:
                    out.append(ks.encrypt(piece, peer.tx_peer_id))
            except PacketIdExhaustedError:
                self._key_exhausted(peer, ks)
                ks_next = None
                break
        self.tx_offs.clear()
        self.tx_lens.clear()
        self.tx_pos = 0
        if out:
            self._sync_remote(peer)
            addr = peer.send_addr
            assert addr is not None, "a UDP peer always has a remote"  # `fragment` is UDP only
            for packet in out:
                try:
                    peer.sock.sendto(packet, addr)
                except OSError as e:
                    _count(st, "tx_dropped")
                    if e.errno not in _TRANSIENT:
                        log.debug("engine: send to peer %d failed: %s", peer.peer_id, e)
                    continue
                st.link_tx_packets += 1
                st.link_tx_bytes += len(packet)
            peer.last_tx = self.last_burst = time.monotonic()
        return ks_next

    def _udp_send_slots(self, peer: _Peer) -> None:
        offs = self.tx_offs
        lens = self.tx_lens
        mv = self.tx_mv
        sock = peer.sock
        addr = peer.send_addr
        assert addr is not None, "a UDP peer always has a remote"  # once per batch, not per packet
        st = peer.stats
        total = len(offs)
        i = 0
        sent_p = sent_b = 0
        while i < total:
            size = lens[i] + 24
            start = offs[i]
            j = i + 1
            end = start + size
            if size < peer.gso_max:
                limit = min(total, i + _GSO_MAX_SEGMENTS, i + _GSO_MAX_BYTES // size)
                while j < limit and offs[j] == end and lens[j] + 24 == size:
                    end += size
                    j += 1
                if j < limit and offs[j] == end and lens[j] + 24 < size:
                    end += lens[j] + 24
                    j += 1
            if j - i > 1:
                try:
                    sock.sendmsg([mv[start:end]], [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))], 0, addr)
                    sent_p += j - i
                    sent_b += end - start
                    _count(st, "gso_sends")
                    i = j
                    continue
                except OSError as e:
                    if gso_train_refused(peer, size, j - i, e, log, "engine"):
                        i = j
                        continue
            try:
                sock.sendto(mv[start : start + size], addr)
                sent_p += 1
                sent_b += size
            except OSError as e:
                _count(st, "tx_dropped")
                if e.errno not in _TRANSIENT:
                    log.debug("engine: send to peer %d failed: %s", peer.peer_id, e)
            i += 1
        st.link_tx_packets += sent_p
        st.link_tx_bytes += sent_b

    def _tcp_send_slots(self, peer: _Peer) -> None:
        offs = self.tx_offs
        lens = self.tx_lens
        # slots are contiguous except at 4-byte alignment gaps before super-packets
        start = offs[0]
        end = start
        chunks = []
        for off, ln in zip(offs, lens, strict=True):
            if off != end:
                chunks.append(self.tx_mv[start:end])
                start = off
            end = off + 26 + ln
        chunks.append(self.tx_mv[start:end])
        data = b"".join(chunks)
        if self._tcp_queue(peer, data, control=False):
            peer.stats.link_tx_packets += len(offs)
            peer.stats.link_tx_bytes += len(data) - 2 * len(offs)

    def _send_control(self, peer: _Peer, packet: bytes) -> None:
        """Send a control packet ahead of bulk data; a full buffer never drops it.

        TCP: the frame goes before every queued data frame. UDP: it is sent at once unless a
        data burst left less than ``_CTL_GAP`` ago; then the TUN is not read until the gap
        has passed and the packet is sent first. A socket that refuses it (EAGAIN/ENOBUFS)
        is retried, and data waits for it.
        """
        if peer.transport is Transport.TCP:
            self._tcp_queue(peer, _FRAME_LEN.pack(len(packet)) + packet, control=True)
            return
        if len(peer.ctl_q) >= _CTL_QUEUE_MAX:
            _count(peer.stats, "control_tx_dropped")
            raise OSError(errno.ENOBUFS, f"{len(peer.ctl_q)} control packets are already waiting")
        peer.ctl_q.append(packet)
        self.ctl_waiting.add(peer)
        if len(peer.ctl_q) == 1 and time.monotonic() >= self._ctl_deadline(peer):
            self._ctl_flush(peer, report=True)
        else:
            _count(peer.stats, "control_tx_held")
        if peer.ctl_q and (peer is self.tx_peer or self.router is not None):
            self._pause_tun()

    def _ctl_deadline(self, peer: _Peer) -> float:
        """When the queued control packets may go: the gap after the last burst has passed."""
        return max(self.last_burst + _CTL_GAP, peer.ctl_retry_at)

    def _ctl_flush(self, peer: _Peer, *, report: bool = False) -> None:
        """Send queued UDP control packets in order; stop (and retry soon) if the socket is full.

        Resumes reading the TUN once no peer has control packets waiting, also when a send
        fails (a peer left behind in ``ctl_waiting`` would keep the TUN paused for good).
        ``report``: raise a hard send error (the packet is dropped) instead of logging it.
        """
        try:
            self._ctl_send_queued(peer, report)
        finally:
            if not peer.ctl_q or peer.dead:
                self.ctl_waiting.discard(peer)
                if not self.ctl_waiting:
                    self._resume_tun()

    def _ctl_send_queued(self, peer: _Peer, report: bool) -> None:
        q = peer.ctl_q
        now = time.monotonic()
        if not q or peer.dead or now < peer.ctl_retry_at:
            return
        self._sync_remote(peer)
        st = peer.stats
        addr = peer.send_addr
        assert addr is not None, "a UDP peer always has a remote"
        done = 0  # q[:done] have left (or are dropped for good)
        try:
            while done < len(q):
                packet = q[done]
                try:
                    peer.sock.sendto(packet, addr)
                except OSError as e:
                    if e.errno in _CTL_RETRY_ERRNOS:
                        if not peer.ctl_refused_since:
                            peer.ctl_refused_since = now
                        if now - peer.ctl_refused_since < _CTL_RETRY_FOR:
                            peer.ctl_retry_at = now + _CTL_RETRY
                            _count(st, "control_tx_retries")
                            return
                    done += 1
                    peer.ctl_refused_since = 0.0
                    _count(st, "control_tx_dropped")
                    if e.errno in _TRANSIENT:  # unreachable, refused...: the control plane retransmits
                        continue
                    if report:
                        raise OSError(
                            e.errno, f"send to {peer.send_addr} failed: {e.strerror or e}"
                        ) from None
                    log.warning("engine: control packet to %s dropped: %s", peer.send_addr, e)
                    continue
                done += 1
                peer.ctl_refused_since = 0.0
                _count(st, "control_tx")
            peer.ctl_retry_at = 0.0
        finally:
            del q[:done]

    def _pause_tun(self) -> None:
        if not self.tun_paused and self.tun_read and self.tun_fd in self.handlers:
            self.tun_paused = True
            self._tun_interest()

    def _resume_tun(self) -> None:
        if self.tun_paused:
            self.tun_paused = False
            self._tun_interest()

    def _tun_interest(self) -> None:
        """Poll the TUN unless a control packet waits (``tun_paused``) or `shaper` holds it."""
        if self.tun_read and self.tun_fd in self.handlers:
            want = 0 if self.tun_paused or self.tun_held_until else select.EPOLLIN
            self.ep.modify(self.tun_fd, want)

    def _shaped(self, peer: _Peer, shaper: Shaper, sent_before: int) -> None:
        """`shaper`: what this wakeup sent is paid for in time; the TUN waits until then."""
        now = time.monotonic()
        shaper.sent(peer.stats.link_tx_bytes - sent_before, now)
        wait = shaper.wait(now)
        if wait > 0 and not self.tun_held_until:
            self.tun_held_until = now + wait
            self._tun_interest()

    # ------------------------------------------------------------------ network -> TUN

    def _on_udp(self, peer: _Peer) -> None:
        """Drain the socket, then write everything decrypted in this wakeup to the TUN at once.

        Decrypted packets from all receives of one wakeup are coalesced together, so TCP
        segments are merged into GSO writes even when the kernel delivers the datagrams one
        by one (a peer without UDP GSO, a path without GRO). Nothing waits for more traffic.

        Receives land one after another in the receive buffer and are decrypted as one batch
        per sender address (:class:`_RxBatch`): a stock peer sends one datagram per packet, and
        handing them to :meth:`_rx_datagrams` one at a time cost about a microsecond each in
        call setup alone.
        """
        if peer.mmsg is None and self.mmsg_ok:
            peer.mmsg = self._batch_receiver(peer.fd)
        if peer.mmsg is not None:
            self._on_udp_mmsg(peer, peer.mmsg)
            return
        sock = peer.sock
        rmv = self.rx_mv
        rx_limit = len(self.rx_buf) - _RX_ONE
        self._sync_remote(peer)
        rx = _RxBatch(self, peer, rmv)
        pos = 0
        for _ in range(_UDP_BATCH):
            if peer.dead:
                return
            if rx.dgrams >= _UDP_BATCH_DGRAMS:
                break
            try:
                if peer.gro:
                    n, anc, _flags, addr = sock.recvmsg_into([rmv[pos : pos + _RX_ONE]], _GRO_CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(rmv[pos : pos + _RX_ONE])
                    anc = None
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                _count(peer.stats, "rx_errors")
                if e.errno in RECV_ICMP_ERRNOS:
                    continue
                break
            rx.add(pos, n, gro_segment_size(anc) if anc else 0, addr)  # only a GRO receive has the cmsg
            pos = (pos + n + 15) & ~15
            if pos > rx_limit:  # the buffer is full: decrypt what it holds, then start over
                rx.decrypt()
                pos = 0
        rx.finish()

    def _batch_receiver(self, fd: int) -> mmsg.BatchReceiver:
        """A ``recvmmsg`` reader of ``fd`` into the worker's one slot buffer (made on first use)."""
        if self.mmsg_buf is None:
            self.mmsg_buf = mmsg.slot_buffer(_MMSG_COUNT)
            self.mmsg_mv = memoryview(self.mmsg_buf)
        return mmsg.BatchReceiver(fd, self.mmsg_buf, _MMSG_COUNT)

    def _on_udp_mmsg(self, peer: _Peer, rcv: mmsg.BatchReceiver) -> None:
        """:meth:`_on_udp` with ``recvmmsg``: up to :data:`_MMSG_COUNT` datagrams per call."""
        mv = self.mmsg_mv
        assert mv is not None
        self._sync_remote(peer)
        rx = _RxBatch(self, peer, mv)
        slot = mmsg.SLOT
        for _ in range(_UDP_BATCH):
            if peer.dead or rx.dgrams >= _UDP_BATCH_DGRAMS:
                break
            try:
                n = rcv.recv()
            except OSError as e:
                _count(peer.stats, "rx_errors")
                if e.errno in RECV_ICMP_ERRNOS:
                    continue
                break
            if not n:
                break
            lens, addrs, segs, truncated = rcv.results(n)
            total = sum(lens)
            if rcv.plain and rcv.one_sender and addrs[0] is not None and total <= rx.limit:
                # the common case, a stock peer's datagrams: one batch, no per-datagram checks here
                rx.add_run(list(zip(range(0, n * slot, slot), lens, strict=True)), total, addrs[0])
            else:
                for i in range(n):
                    addr = addrs[i]
                    if truncated[i] or addr is None:  # over 64 KiB, or not an IP sender: not ours
                        peer.stats.dropped_other += 1
                        _count(peer.stats, "rx_truncated" if truncated[i] else "rx_unknown_family")
                        continue
                    rx.add(i * slot, lens[i], segs[i], addr)
            rx.decrypt()  # the next call reuses the slots: decrypt this call's datagrams first
            if n < rcv.count:  # the queue is empty
                break
        rx.finish()

    def _on_shared(self, sh: _SharedRx, lane: bool = False) -> None:
        """MP network -> TUN: read the socket the UDP peers share, each datagram to its peer.

        The datagrams of one receive call are grouped by peer (clients' datagrams arrive
        interleaved) and each group is decrypted as one batch, as in :meth:`_on_udp`; a
        control packet from an address without a peer goes up with ``UNDEF_PEER_ID`` (a new
        client's handshake). ``lane``: drain the keepalive lane instead.
        """
        sock = sh.lane if lane else sh.sock
        if sock is None:
            return
        rcv = sh.lane_mmsg if lane else sh.mmsg
        if rcv is None and self.mmsg_ok:
            rcv = self._batch_receiver(sock.fileno())
            if lane:
                sh.lane_mmsg = rcv
            else:
                sh.mmsg = rcv
        by_id = sh.by_id
        by_addr = sh.by_addr
        rx: _RxBatch | None = None
        if rcv is not None:
            mv = self.mmsg_mv
            assert mv is not None
            step = mmsg.SLOT
        else:
            mv = self.rx_mv
            step = 0
        taken = 0
        for _ in range(_LANE_BATCH if lane else _UDP_BATCH):
            if (taken >= _UDP_BATCH_DGRAMS and not lane) or self.shared.get(sh.key) is not sh:
                break
            try:
                if rcv is not None:
                    n = rcv.recv()
                    if not n:
                        break
                    lens, addrs, segs, truncated = rcv.results(n)
                else:
                    got, anc, _flags, addr = sock.recvmsg_into([mv[:_RX_ONE]], _GRO_CMSG_SPACE)
                    n = 1
                    lens, addrs, segs, truncated = (
                        [got],
                        [addr],
                        [gro_segment_size(anc) if anc else 0],
                        [False],
                    )
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                _count(self.mp_stats, "rx_errors")
                if e.errno in RECV_ICMP_ERRNOS:
                    continue
                break
            groups: dict[_Peer, list[int]] = {}
            for i in range(n):
                addr = addrs[i]
                ln = lens[i]
                if truncated[i] or addr is None or not ln:  # over 64 KiB, no IP sender, empty
                    self.mp_stats.dropped_other += 1
                    continue
                off = i * step
                b0 = mv[off]
                opcode = b0 >> 3
                if opcode == OPCODE_DATA_V2 and ln >= 4:
                    rx_id = (mv[off + 1] << 16) | (mv[off + 2] << 8) | mv[off + 3]
                    peer = by_id.get(rx_id) if rx_id != UNDEF_PEER_ID else by_addr.get((addr[0], addr[1]))
                else:
                    peer = by_addr.get((addr[0], addr[1]))
                    if peer is None and opcode not in (OPCODE_DATA_V1, OPCODE_DATA_V2):
                        self._event(
                            "control",
                            peer_id=UNDEF_PEER_ID,
                            gen=0,
                            packet=bytes(mv[off : off + ln]),
                            addr=tuple(addr[:2]),
                        )
                        continue
                if peer is None:
                    self.mp_stats.dropped_other += 1
                    _count(self.mp_stats, "rx_unknown_peer")
                    continue
                group = groups.get(peer)
                if group is None:
                    groups[peer] = [i]
                else:
                    group.append(i)
            for peer, group in groups.items():
                if rx is None:
                    rx = _RxBatch(self, peer, mv, lane)
                else:
                    rx.use(peer)
                for i in group:
                    rx.add(i * step, lens[i], segs[i], addrs[i])
            if rx is not None:
                rx.decrypt()  # the next call reuses the buffer: decrypt this call's datagrams first
            taken += n
            if rcv is not None and n < rcv.count:  # the queue is empty
                break
        if rx is not None:
            rx.finish()

    def _rx_datagrams(
        self,
        peer: _Peer,
        rmv: memoryview,
        dgrams: list[tuple[int, int]],
        addr: Any,
        slots: list[tuple[int, int]],
        ppos: int,
        late: bool = False,
    ) -> int:
        """Decrypt datagrams of ``rmv`` into the plaintext buffer from ``ppos``; append their slots.

        ``late``: they waited on the keepalive lane, so newer data may have moved the replay
        window past them; such a ping is counted as ``keepalive_late``, not as a replay (the
        newer data refreshed the peer already).
        """
        st = peer.stats
        rx = rmv
        keys = peer.keys
        pmv = self.plain_mv
        plain = self.plain
        authed = False
        link_p = link_b = 0
        # fast path: DATA_V2 under the primary key for this peer's id (one header unpack
        # checks opcode, key id and peer id); anything else takes the general path below
        ks0 = keys[0]
        if ks0 is not None:
            fast_w0 = (((OPCODE_DATA_V2 << 3) | ks0.key_id) << 24) | peer.peer_id
            open0 = ks0.open_v2_into
        else:
            fast_w0 = -1
            open0 = None
        unpack_hdr = _DATA_V2_HDR.unpack_from
        room = len(plain)
        framing = peer.framing if peer.framing is not Framing.NONE else None
        for_src = self.router.for_src if self.router is not None else None
        reasm = peer.reasm
        # `fragment`: a packet put together outgrows its last datagram; what the datagrams
        # still to come need of the buffer stays free (the caller counted only their sizes)
        left = sum(sz + 2 for _off, sz in dgrams) if reasm is not None else 0  # +2: alignment
        for off, sz in dgrams:
            left -= sz + 2
            fast = False
            if sz >= DATA_V2_OVERHEAD and ppos + sz < room:
                w0, pid = unpack_hdr(rx, off)
                fast = w0 == fast_w0
            if not fast:
                if not sz:
                    _count(st, "rx_empty")
                    continue
                b0 = rx[off]
                opcode = b0 >> 3
                if opcode == OPCODE_DATA_V2:
                    if sz < 4:
                        st.dropped_other += 1
                        continue
                    if addr is None:  # TCP: the stream is the peer
                        pass
                    elif (
                        rx_id := (rx[off + 1] << 16) | (rx[off + 2] << 8) | rx[off + 3]
                    ) != peer.peer_id and (
                        rx_id != UNDEF_PEER_ID or addr[0] != peer.raw_ip or addr[1] != peer.raw_port
                    ):
                        _count(st, "rx_unknown_peer")
                        continue
                elif opcode != OPCODE_DATA_V1:
                    if (
                        addr is not None
                        and (addr[0] != peer.raw_ip or addr[1] != peer.raw_port)
                        and (b0 not in STRANGER_FIRST_BYTES or sz < MIN_FIRST_PACKET_LEN)
                    ):
                        # not from our peer and not a (re)starting client: the edge would drop
                        # it too; here it costs no trip through two more processes
                        _count(st, "rx_control_stranger")
                        continue
                    self._event(
                        "control",
                        peer_id=peer.peer_id,
                        gen=peer.gen,
                        packet=bytes(rmv[off : off + sz]),
                        addr=tuple(addr[:2]),
                    )
                    continue
                kid = b0 & 7
                ks = keys[0]
                if ks is None or ks.key_id != kid:
                    ks = keys[1]
                    if ks is None or ks.key_id != kid:
                        link_p += 1
                        link_b += sz
                        st.dropped_other += 1
                        _count(st, "rx_no_key")
                        continue
            link_p += 1
            link_b += sz
            try:
                if fast:
                    clen = open0(rmv, off, sz, pid, pmv, ppos)  # type: ignore[misc]
                else:
                    clen = ks.decrypt_into(rmv, off, sz, pmv[ppos:])  # type: ignore[union-attr]
            except AuthenticationError:
                st.dropped_auth += 1
                continue
            except ReplayError:
                if late:
                    _count(st, "keepalive_late")
                else:
                    st.dropped_replay += 1
                continue
            except ProtocolError:  # the general path only (a malformed packet)
                st.dropped_other += 1
                continue
            authed = True
            if reasm is not None:
                clen = self._reassemble(peer, reasm, ppos, clen, room - left - 16)
                if not clen:
                    continue  # a fragment of a packet still incomplete (or a bad one, counted)
            if framing is not None:
                try:
                    clen = unframe(framing, plain, ppos, clen)
                except FramingError as e:
                    note_framing_error(st, e, log, f"engine worker {self.index}", peer.peer_id)
                    continue
            if clen == 16 and pmv[ppos : ppos + 16] == PING_MAGIC:
                _count(st, "keepalive_rx")
                continue
            if not clen or (plain[ppos] >> 4) not in (4, 6):
                st.dropped_other += 1
                _count(st, "rx_not_ip")
                continue
            if for_src is not None and for_src(pmv[ppos : ppos + clen]) is not peer:
                # MP reverse-path check: the source must be this peer's VPN IP or behind its routes
                st.dropped_other += 1
                _count(st, "rx_dropped_src")
                continue
            slots.append((ppos, clen))
            ppos = (ppos + clen + 2) & ~1
        st.link_rx_packets += link_p
        st.link_rx_bytes += link_b
        if authed:
            peer.last_rx = time.monotonic()
            if addr is not None and (addr[0] != peer.raw_ip or addr[1] != peer.raw_port):
                shared = peer.shared
                if shared is not None:
                    shared.unindex(peer, (peer.raw_ip, peer.raw_port))
                    shared.by_addr[(addr[0], addr[1])] = peer
                peer.raw_ip = addr[0]
                peer.raw_port = addr[1]
                peer.send_addr = tuple(addr)
                if peer.cell is not None:
                    # before the packet reaches the TUN: the transmit side must answer there
                    peer.cell.store(peer.send_addr)
                    peer.cell_gen = peer.cell.generation()
                # packets decrypted so far go out first, so the reply to this one follows the float
                self._event("float", peer_id=peer.peer_id, gen=peer.gen, addr=tuple(addr))
        return ppos

    def _reassemble(self, peer: _Peer, reasm: Reassembler, ppos: int, clen: int, end: int) -> int:
        """`fragment`: the opened payload at ``plain[ppos:]`` joins its packet; the whole packet's
        length once it is complete (written at ``ppos``, never past ``end``), else 0."""
        st = peer.stats
        payload = bytes(self.plain_mv[ppos : ppos + clen])
        whole = reassemble(st, reasm, payload, time.monotonic(), log, self.name, peer.peer_id)
        if whole is None:
            return 0
        if ppos + len(whole) > end:
            st.dropped_other += 1
            _count(st, "rx_dropped_no_room")  # only a huge packet late in a full batch
            return 0
        self.plain_mv[ppos : ppos + len(whole)] = whole
        return len(whole)

    def _tun_write(self, slots: list[tuple[int, int]], owners: list[tuple[_Peer, int]]) -> None:
        """Write decrypted packets to the TUN; ``owners``: ``(peer, end)``, whose slots end where."""
        fd = self.tun_fd
        plain = self.plain
        start = 0
        for peer, end in owners:
            if peer.mss4 or peer.mss6:
                for off, ln in slots[start:end]:
                    if gso.may_be_tcp_syn(plain, off):
                        self._clamp_rx(peer, off, ln)
            st = peer.stats
            st.vpn_rx_packets += end - start
            st.vpn_rx_bytes += sum(ln for _o, ln in slots[start:end])
            start = end
        if self.tun_vnet and self.tun_gro:
            writes = gso.coalesce(plain, self.plain_np, slots, verify=self.verify_rx_csum)
        elif self.tun_vnet:
            pmv = self.plain_mv
            writes = [[gso.ZERO_VNET, pmv[o : o + ln]] for o, ln in slots]
        else:
            pmv = self.plain_mv
            writes = [[pmv[o : o + ln]] for o, ln in slots]
        writev = os.writev
        st = owners[0][0].stats  # a mixed batch's write errors and merges count for its first peer
        for iov in writes:
            try:
                writev(fd, iov)
            except OSError:
                st.dropped_other += 1
                _count(st, "tun_write_errors")
        if len(writes) < len(slots):
            _count(st, "gro_merged", len(slots) - len(writes))

    def _clamp_rx(self, peer: _Peer, off: int, ln: int) -> None:
        if gso.clamp_mss(self.plain, off, ln, peer.mss4, peer.mss6):
            _count(peer.stats, "mss_clamped")

    # ------------------------------------------------------------------ TCP transport

    def _on_tcp_event(self, peer: _Peer, ev: int) -> None:
        if ev & select.EPOLLOUT and peer.tx:
            self._on_tcp_writable(peer)
        if peer.dead:
            return
        if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and peer.rx:
            self._on_tcp_readable(peer)

    def _on_tcp_readable(self, peer: _Peer) -> None:
        for _ in range(16):
            try:
                data = peer.sock.recv(_TCP_RX_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._tcp_dead(peer, tcp_error_reason(e))
                return
            if not data:
                self._tcp_dead(peer, PeerDelReason.TRANSPORT_DISCONNECT)
                return
            peer.tcp_rx += data
            if not self._tcp_process(peer):
                return
            if len(data) < _TCP_RX_CHUNK:
                return

    def _tcp_dead(self, peer: _Peer, reason: PeerDelReason) -> None:
        self._unregister(peer.fd)
        if not peer.dead:
            self._event("tcp_closed", peer_id=peer.peer_id, gen=peer.gen, reason=reason)

    def _tcp_process(self, peer: _Peer) -> bool:
        """Handle every whole frame in the receive buffer; False if the stream is unusable."""
        frames, bad = take_frames(peer.tcp_rx)
        packets: list[bytearray] = []
        pending = 0
        for pkt in frames:
            size = len(pkt)
            opcode = pkt[0] >> 3
            if opcode in (OPCODE_DATA_V2, OPCODE_DATA_V1):
                if pending + size > _RX_BUF - 16:
                    self._tcp_rx_data(peer, packets)
                    packets = []
                    pending = 0
                packets.append(pkt)
                pending += size
            else:
                if packets:
                    self._tcp_rx_data(peer, packets)
                    packets = []
                    pending = 0
                self._event("control", peer_id=peer.peer_id, gen=peer.gen, packet=bytes(pkt), addr=None)
        if bad is not None:  # as before: the data frames not yet written are dropped with the stream
            self._tcp_dead(peer, PeerDelReason.TRANSPORT_ERROR)
            return False
        if packets:
            self._tcp_rx_data(peer, packets)
        return True

    def _tcp_rx_data(self, peer: _Peer, packets: list[bytearray]) -> None:
        dgrams = []
        off = 0
        rx = self.rx_buf
        for p in packets:
            rx[off : off + len(p)] = p
            dgrams.append((off, len(p)))
            off += len(p)
        slots: list[tuple[int, int]] = []
        self._rx_datagrams(peer, self.rx_mv, dgrams, None, slots, 0)
        if slots:
            self._tun_write(slots, [(peer, len(slots))])

    def _tcp_queue(self, peer: _Peer, frames: bytes, *, control: bool) -> bool:
        """Send whole frames or queue them; control frames overtake queued data frames."""
        out = peer.tcp_tx
        if out:
            if control:
                # ahead of every queued data frame, behind the frame in flight and earlier control
                pos = max(peer.tcp_bound, peer.tcp_ctl_end)
                out[pos:pos] = frames
                peer.tcp_ctl_end = pos + len(frames)
                _count(peer.stats, "control_tx_ahead")
                return True
            if len(out) >= _TCP_TX_HIGH_WATER:
                _count(peer.stats, "tx_dropped")
                return False
            out += frames
            return True
        try:
            sent = peer.sock.send(frames)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._tcp_dead(peer, PeerDelReason.TRANSPORT_ERROR)
            return False
        if sent < len(frames):
            out += frames
            peer.tcp_bound = 0
            peer.tcp_ctl_end = len(frames) if control else 0
            self._tcp_advance(peer, sent)
            if not peer.tcp_writer:
                mask = select.EPOLLOUT | (select.EPOLLIN if peer.rx else 0)
                self._register(peer.fd, mask, lambda ev, p=peer: self._on_tcp_event(p, ev))
                peer.tcp_writer = True
        return True

    @staticmethod
    def _tcp_advance(peer: _Peer, sent: int) -> None:
        """Drop ``sent`` bytes the socket took from ``tcp_tx``, keeping track of frame boundaries."""
        out = peer.tcp_tx
        b = peer.tcp_bound
        while b < sent:  # whole frames start at tcp_bound; find the one the socket stopped in
            b += 2 + ((out[b] << 8) | out[b + 1])
        peer.tcp_bound = b - sent
        peer.tcp_ctl_end = max(0, peer.tcp_ctl_end - sent)
        del out[:sent]

    def _on_tcp_writable(self, peer: _Peer) -> None:
        out = peer.tcp_tx
        try:
            sent = peer.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._tcp_dead(peer, PeerDelReason.TRANSPORT_ERROR)
            return
        self._tcp_advance(peer, sent)
        if not out and peer.tcp_writer:
            if peer.rx:
                self._register(peer.fd, select.EPOLLIN, lambda ev, p=peer: self._on_tcp_event(p, ev))
            else:
                self._unregister(peer.fd)  # a writer-only worker must not see EPOLLHUP forever
            peer.tcp_writer = False


def worker_main(
    index: int, chan: socket.socket, options: dict[str, Any], ctl: socket.socket | None = None
) -> None:
    """Entry point in the forked child: die with the controller, ignore terminal signals."""
    from pyovpn.datachannel.engine.proc import set_parent_death_signal

    set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Worker(index, chan, options, ctl).run()
