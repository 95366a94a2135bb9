"""A tiny UDP DNS answerer for tests: every A query under the domain given gets the address given.

Usage: dns_responder.py LISTEN_ADDR DOMAIN ANSWER_ADDR. Anything else is answered NXDOMAIN.
Runs only inside a test's own network namespace.
"""

from __future__ import annotations

import socket
import struct
import sys

QTYPE_A = 1


def answer(query: bytes, domain: str, address: str) -> bytes:
    ident, _flags, qdcount = struct.unpack("!HHH", query[:6])
    pos, labels = 12, []
    while query[pos]:
        length = query[pos]
        labels.append(query[pos + 1 : pos + 1 + length].decode("ascii").lower())
        pos += 1 + length
    qtype = struct.unpack("!H", query[pos + 1 : pos + 3])[0]
    question = query[12 : pos + 5]
    name = ".".join(labels)
    if qdcount == 1 and qtype == QTYPE_A and (name == domain or name.endswith("." + domain)):
        header = struct.pack("!HHHHHH", ident, 0x8180, 1, 1, 0, 0)
        record = b"\xc0\x0c" + struct.pack("!HHIH", QTYPE_A, 1, 60, 4) + socket.inet_aton(address)
        return header + question + record
    rcode = 3 if qtype == QTYPE_A else 0  # NXDOMAIN for names not ours, empty answer for AAAA etc.
    return struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, 0, 0, 0) + question


def main() -> None:
    listen, domain, address = sys.argv[1], sys.argv[2].lower(), sys.argv[3]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((listen, 53))
    print(f"answering {domain} on {listen}:53", flush=True)
    while True:
        data, peer = sock.recvfrom(512)
        if len(data) > 12:
            sock.sendto(answer(data, domain, address), peer)


if __name__ == "__main__":
    main()
