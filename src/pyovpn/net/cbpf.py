"""Classic BPF programs for sockets: the instruction encodings we use and ``struct sock_fprog``.

Two socket programs use them: the keepalive lane's reuseport steering
(:mod:`pyovpn.datachannel.lane`) and the P2P stranger filter
(:mod:`pyovpn.datachannel.strangers`). Classic BPF needs no privileges beyond owning the socket,
runs in the kernel's receive path before any process wakes, and is JIT-compiled on x86 and arm.
"""

from __future__ import annotations

import ctypes
import struct

Insn = tuple[int, int, int, int]  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}

LD_W_ABS = 0x20  # A = 32-bit word at k (network byte order)
LD_H_ABS = 0x28  # A = 16-bit half word at k
LD_B_ABS = 0x30  # A = byte at k
LD_W_LEN = 0x80  # A = length of the data the program sees
ALU_AND_K = 0x54
ALU_RSH_K = 0x74
JEQ_K = 0x15
JGE_K = 0x35
RET_K = 0x06

# Loads from k = NET_OFF + n read byte n of the network (IP) header, wherever the program's data
# starts (linux/filter.h SKF_NET_OFF, as an unsigned 32-bit k).
NET_OFF = (-0x100000) & 0xFFFFFFFF


def fprog(program: tuple[Insn, ...] | list[Insn]) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """``struct sock_fprog`` for setsockopt, and the buffer it points at (keep it alive for the call)."""
    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    return struct.pack("=HxxxxxxQ", len(program), ctypes.addressof(buf)), buf
