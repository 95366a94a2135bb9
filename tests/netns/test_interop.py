"""pyovpn <-> stock OpenVPN interop matrix over a namespace pair (pairwise design + rekey soaks).

Each cell brings a tunnel up (pyovpn on one end, ``openvpn`` 2.6 on the other), pings the
far end's inner IPv4 and IPv6 address, pushes >= 50 MB through iperf3 and stops both
ends, requiring pyovpn to exit 0 on SIGTERM. The full product of the factors below is
432 cells; :data:`CELLS` is a 12-row covering design instead: every
direction x proto x family combination once, and every pair of values of any two
factors at least once (checked by :func:`test_matrix_is_pairwise`).

The ``slow`` cells run one rekey soak per cipher (reneg-sec 10, 40 s of iperf3) and count
the renegotiations in the openvpn log. They are part of the normal run (CI included).

pyovpn is started as ``sys.executable -m pyovpn --config FILE``; its config gets
``dco $PYOVPN_TEST_DCO`` (default ``userspace``; set it empty to omit the line).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    MAX_STALL_SECONDS,
    Family,
    HarnessError,
    Impl,
    Netns,
    Proto,
    Role,
    Tunnel,
    TunnelSpec,
    Wrap,
    count_rekeys,
    describe_iperf,
    iperf3_transfer,
    ping,
    start_tunnel,
)

pytestmark = pytest.mark.netns

MB = 1_000_000
INIT_TIMEOUT = 30.0
PYOVPN_DCO = os.environ.get("PYOVPN_TEST_DCO", "userspace") or None

# direction -> (role, server implementation in ns b, client implementation in ns a)
DIRECTIONS: dict[str, tuple[Role, Impl, Impl]] = {
    # pyovpn client (pull) <-> openvpn --mode server
    "pull": ("server", "openvpn", "pyovpn"),
    # openvpn P2P tls-client <-> pyovpn P2P tls-server
    "p2p-pyserver": ("p2p", "pyovpn", "openvpn"),
    # pyovpn P2P tls-client <-> openvpn P2P tls-server
    "p2p-pyclient": ("p2p", "openvpn", "pyovpn"),
}
CIPHERS = ("AES-128-GCM", "AES-256-GCM", "CHACHA20-POLY1305")
WRAPS: tuple[Wrap, ...] = ("none", "tls-auth", "tls-crypt")
PROTOS: tuple[Proto, ...] = ("udp", "tcp")
FAMILIES: tuple[Family, ...] = (4, 6)


@dataclass(frozen=True)
class Cell:
    """One matrix cell. ``reverse``: iperf3 data flows server -> client; ``inline``: inline blocks."""

    direction: str
    cipher: str
    wrap: Wrap
    proto: Proto
    family: Family
    reverse: bool
    inline: bool

    @property
    def id(self) -> str:
        parts = [self.direction, self.cipher, self.wrap, f"{self.proto}{self.family}"]
        parts.append("down" if self.reverse else "up")
        if self.inline:
            parts.append("inline")
        return "-".join(parts)


FACTOR_LEVELS: dict[str, tuple[object, ...]] = {
    "direction": tuple(DIRECTIONS),
    "cipher": CIPHERS,
    "wrap": WRAPS,
    "proto": PROTOS,
    "family": FAMILIES,
    "reverse": (False, True),
    "inline": (False, True),
}

_A128, _A256, _CHACHA = CIPHERS
# Found by a seeded local search: rows enumerate direction x proto x family; the other
# columns were chosen so every pair of factor values occurs and each cipher and each
# wrap appears exactly 4 times, with all 9 cipher x wrap pairs present.
_MATRIX = """\
direction     cipher             wrap       transport  iperf3  blocks
pull          AES-128-GCM        tls-auth   udp4       up      inline
pull          CHACHA20-POLY1305  tls-crypt  udp6       down    files
pull          AES-256-GCM        tls-auth   tcp4       up      files
pull          CHACHA20-POLY1305  none       tcp6       down    inline
p2p-pyserver  CHACHA20-POLY1305  tls-crypt  udp4       up      inline
p2p-pyserver  AES-128-GCM        none       udp6       down    files
p2p-pyserver  AES-128-GCM        tls-crypt  tcp4       down    inline
p2p-pyserver  AES-256-GCM        tls-auth   tcp6       up      files
p2p-pyclient  AES-256-GCM        tls-crypt  udp4       down    inline
p2p-pyclient  CHACHA20-POLY1305  tls-auth   udp6       down    files
p2p-pyclient  AES-128-GCM        none       tcp4       up      inline
p2p-pyclient  AES-256-GCM        none       tcp6       down    files
"""


def _cell(row: str) -> Cell:
    direction, cipher, wrap, transport, iperf3, blocks = row.split()
    proto, family = transport[:3], int(transport[3:])
    return Cell(direction, cipher, wrap, proto, family, iperf3 == "down", blocks == "inline")  # type: ignore[arg-type]


CELLS: tuple[Cell, ...] = tuple(_cell(row) for row in _MATRIX.splitlines()[1:])

# One rekey soak per cipher, spread over directions, wraps and transports.
SOAK_CELLS: tuple[Cell, ...] = (
    Cell("pull", _A128, "tls-crypt", "udp", 4, False, False),
    Cell("p2p-pyserver", _A256, "tls-auth", "tcp", 6, True, False),
    Cell("p2p-pyclient", _CHACHA, "none", "udp", 6, False, False),
)
SOAK_RENEG_SEC = 10
SOAK_SECONDS = 40
SOAK_MIN_REKEYS = 3
MAX_STALL = MAX_STALL_SECONDS


def _spec(cell: Cell, reneg_sec: int | None = None) -> TunnelSpec:
    role, _, _ = DIRECTIONS[cell.direction]
    return TunnelSpec(
        role=role,
        cipher=cell.cipher,
        wrap=cell.wrap,
        proto=cell.proto,
        family=cell.family,
        inline=cell.inline,
        reneg_sec=reneg_sec,
        dco=PYOVPN_DCO,
    )


def _fail(msg: str, tunnel: Tunnel) -> NoReturn:
    """Fail the test with ``msg`` followed by the tails of both ends' logs."""
    pytest.fail(f"{msg}\n{tunnel.logs()}", pytrace=False)


def _start(net: Netns, pki: Pki, cell: Cell, spec: TunnelSpec) -> Tunnel:
    _, server_impl, client_impl = DIRECTIONS[cell.direction]
    try:
        return start_tunnel(
            net, pki, spec, server_impl=server_impl, client_impl=client_impl, timeout=INIT_TIMEOUT
        )
    except HarnessError as e:
        error = e
    # Failing outside the except block keeps the report to one message, which already
    # holds the log tails of both ends.
    pytest.fail(f"[{cell.id}] tunnel did not come up: {error}", pytrace=False)


def _check_pings(net: Netns, tunnel: Tunnel, cell: Cell) -> None:
    for addr in (tunnel.addrs.server4, tunnel.addrs.server6):
        res = ping(net.a, addr)
        if not res.ok:
            _fail(f"[{cell.id}] ping {addr} through the tunnel failed:\n{res.output}", tunnel)


def _iperf(
    net: Netns, tunnel: Tunnel, cell: Cell, *, nbytes: int | None = None, seconds: float | None = None
) -> dict[str, Any]:
    # Inner family opposite to the outer one, so 4-in-6 and 6-in-4 both carry bulk data.
    addr = tunnel.addrs.server6 if cell.family == 4 else tunnel.addrs.server4
    try:
        return iperf3_transfer(
            net.a, net.b, addr, nbytes=nbytes, seconds=seconds, reverse=cell.reverse, log_dir=net.workdir
        )
    except HarnessError as e:
        error = e
    _fail(f"[{cell.id}] iperf3 to {addr} failed: {error}", tunnel)


def _stop_and_check(tunnel: Tunnel, cell: Cell) -> None:
    codes = tunnel.stop()
    pyovpn_side = "server" if tunnel.server_impl == "pyovpn" else "client"
    if codes[pyovpn_side] != 0:
        _fail(f"[{cell.id}] pyovpn ({pyovpn_side}) exited {codes[pyovpn_side]} on SIGTERM, want 0", tunnel)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_interop(net: Netns, pki: Pki, cell: Cell) -> None:
    tunnel = _start(net, pki, cell, _spec(cell))
    _check_pings(net, tunnel, cell)
    res = _iperf(net, tunnel, cell, nbytes=50 * MB)
    if res["bytes"] < 50 * MB:
        _fail(f"[{cell.id}] iperf3 moved too little:\n{describe_iperf(res)}", tunnel)
    if res["max_stall"] > MAX_STALL:
        _fail(f"[{cell.id}] transfer stalled:\n{describe_iperf(res)}", tunnel)
    _stop_and_check(tunnel, cell)


@pytest.mark.slow
@pytest.mark.parametrize("cell", SOAK_CELLS, ids=lambda c: f"rekey-{c.id}")
def test_interop_rekey_soak(net: Netns, pki: Pki, cell: Cell) -> None:
    tunnel = _start(net, pki, cell, _spec(cell, reneg_sec=SOAK_RENEG_SEC))
    _check_pings(net, tunnel, cell)
    res = _iperf(net, tunnel, cell, seconds=SOAK_SECONDS)
    detail = describe_iperf(res)
    rekeys = count_rekeys(tunnel.openvpn_log())
    if rekeys < SOAK_MIN_REKEYS:
        _fail(
            f"[{cell.id}] openvpn logged {rekeys} completed rekeys, want >= {SOAK_MIN_REKEYS}\n{detail}",
            tunnel,
        )
    if res["max_stall"] > MAX_STALL:
        _fail(f"[{cell.id}] no progress for {res['max_stall']:.1f}s (> {MAX_STALL}s):\n{detail}", tunnel)
    # Pings after the soak: the newest key must carry traffic both ways.
    _check_pings(net, tunnel, cell)
    _stop_and_check(tunnel, cell)


def _pairs(cells: tuple[Cell, ...]) -> Iterator[tuple[str, str, object, object]]:
    names = [f.name for f in fields(Cell)]
    for c in cells:
        for x, y in itertools.combinations(names, 2):
            yield x, y, getattr(c, x), getattr(c, y)


def test_matrix_is_pairwise() -> None:
    """Every pair of values of any two factors occurs in CELLS; direction x proto x family fully."""
    seen = set(_pairs(CELLS))
    names = list(FACTOR_LEVELS)
    missing = [
        (x, y, vx, vy)
        for x, y in itertools.combinations(names, 2)
        for vx in FACTOR_LEVELS[x]
        for vy in FACTOR_LEVELS[y]
        if (x, y, vx, vy) not in seen
    ]
    assert not missing, f"pairs not covered: {missing}"
    triples = {(c.direction, c.proto, c.family) for c in CELLS}
    assert len(triples) == len(DIRECTIONS) * len(PROTOS) * len(FAMILIES)
    assert len({c.id for c in CELLS}) == len(CELLS)
    assert {c.cipher for c in SOAK_CELLS} == set(CIPHERS)
