"""The status file (`status FILE [N]`, `status-version 1|2|3`) in OpenVPN 2.6's layouts.

Monitoring tools (openvpn-monitor, Prometheus exporters, openvpn-status-reader, `jc --openvpn`)
parse these files by their exact lines and columns, so the renderers here follow what stock
OpenVPN 2.6 writes for the same connection: the client's "OpenVPN STATISTICS" block in P2P
and client mode (any version), and the server's CLIENT LIST / ROUTING TABLE / GLOBAL STATS
(version 1) or TITLE/TIME/HEADER/CLIENT_LIST/ROUTING_TABLE/GLOBAL_STATS rows (version 2 with
commas, version 3 with tabs). Dates are local time, as 2.6 prints them.

The renderers are pure (rows and a time in, text out). :func:`write_atomic` replaces the file
in one rename, mode 0600, so a reader never sees half a file (OpenVPN rewrites in place, and
readers catch it half-written).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pyovpn import __version__

#: The TITLE row names a 2.6-style version first (exporters read "OpenVPN" + three words),
#: pyovpn's own name in a trailing bracket.
TITLE = (
    f"OpenVPN 2.6.14 {platform.machine() or 'x86_64'}-pc-linux-gnu [SSL (OpenSSL)] [AEAD] [DCO] "
    f"[pyovpn {__version__}]"
)


@dataclass(frozen=True)
class LinkCounters:
    """A P2P or client tunnel's byte counters, as the STATISTICS block names them."""

    tun_read: int = 0  # plaintext read from the TUN (sent through the tunnel)
    tun_write: int = 0  # plaintext written to the TUN (arrived through the tunnel)
    link_read: int = 0  # bytes read from the UDP/TCP socket
    link_write: int = 0  # bytes written to the UDP/TCP socket
    auth_read: int = 0  # bytes of received packets that passed authentication


@dataclass(frozen=True)
class ClientRow:
    """One connected client of a server."""

    common_name: str
    real_address: str  # "ip:port", IPv6 without brackets, as 2.6 prints it
    virtual_address: str  # "" when the client has no IPv4 address
    virtual_ipv6: str  # "" when none
    bytes_received: int
    bytes_sent: int
    connected_since: float
    username: str  # "UNDEF" when the client gave none
    client_id: int
    peer_id: int
    cipher: str
    last_ref: float
    iroutes: tuple[str, ...] = ()  # "10.55.0.0/24": extra ROUTING TABLE rows for this client


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render_client(c: LinkCounters, now: float) -> str:
    """The "OpenVPN STATISTICS" block (P2P and client mode; the same for every status-version)."""
    lines = [
        "OpenVPN STATISTICS",
        f"Updated,{_when(now)}",
        f"TUN/TAP read bytes,{c.tun_read}",
        f"TUN/TAP write bytes,{c.tun_write}",
        f"TCP/UDP read bytes,{c.link_read}",
        f"TCP/UDP write bytes,{c.link_write}",
        f"Auth read bytes,{c.auth_read}",
        "END",
    ]
    return "\n".join(lines) + "\n"


def _routes(r: ClientRow) -> list[str]:
    # 2.6's order (seen in a differential test): IPv4 address, IPv6 address, then iroutes
    return [a for a in (r.virtual_address, r.virtual_ipv6, *r.iroutes) if a]


def render_server(rows: Sequence[ClientRow], now: float, version: int, *, dco: bool = False) -> str:
    """A server's status file in ``status-version`` 1, 2 or 3."""
    if version == 1:
        out = [
            "OpenVPN CLIENT LIST",
            f"Updated,{_when(now)}",
            "Common Name,Real Address,Bytes Received,Bytes Sent,Connected Since",
        ]
        out += [
            f"{r.common_name},{r.real_address},{r.bytes_received},{r.bytes_sent},{_when(r.connected_since)}"
            for r in rows
        ]
        out += ["ROUTING TABLE", "Virtual Address,Common Name,Real Address,Last Ref"]
        out += [f"{a},{r.common_name},{r.real_address},{_when(r.last_ref)}" for r in rows for a in _routes(r)]
        out += ["GLOBAL STATS", "Max bcast/mcast queue length,0", "END"]
        return "\n".join(out) + "\n"
    if version not in (2, 3):
        raise ValueError(f"status-version {version}: use 1, 2 or 3")
    sep = "," if version == 2 else "\t"

    def row(*fields: object) -> str:
        return sep.join(str(f) for f in fields)

    out = [
        row("TITLE", TITLE),
        row("TIME", _when(now), int(now)),
        row(
            "HEADER",
            "CLIENT_LIST",
            "Common Name",
            "Real Address",
            "Virtual Address",
            "Virtual IPv6 Address",
            "Bytes Received",
            "Bytes Sent",
            "Connected Since",
            "Connected Since (time_t)",
            "Username",
            "Client ID",
            "Peer ID",
            "Data Channel Cipher",
        ),
    ]
    for r in rows:
        out.append(
            row(
                "CLIENT_LIST",
                r.common_name,
                r.real_address,
                r.virtual_address,
                r.virtual_ipv6,
                r.bytes_received,
                r.bytes_sent,
                _when(r.connected_since),
                int(r.connected_since),
                r.username,
                r.client_id,
                r.peer_id,
                r.cipher,
            )
        )
    out.append(
        row(
            "HEADER",
            "ROUTING_TABLE",
            "Virtual Address",
            "Common Name",
            "Real Address",
            "Last Ref",
            "Last Ref (time_t)",
        )
    )
    for r in rows:
        for a in _routes(r):
            out.append(
                row("ROUTING_TABLE", a, r.common_name, r.real_address, _when(r.last_ref), int(r.last_ref))
            )
    out.append(row("GLOBAL_STATS", "Max bcast/mcast queue length", 0))
    out.append(row("GLOBAL_STATS", "dco_enabled", 1 if dco else 0))
    out.append("END")
    return "\n".join(out) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename; the file is mode 0600 from its creation."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".status-", dir=directory)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
