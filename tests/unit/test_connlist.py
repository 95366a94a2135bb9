"""Tests for the connection list (pyovpn.connlist) and the config that feeds it (`remote` lines,
`<connection>` blocks, connect-retry, connect-retry-max, server-poll-timeout, resolv-retry)."""

from __future__ import annotations

import pytest

from pyovpn.config import Remote, parse_config_text
from pyovpn.connlist import ConnectionList, Entry, GiveUp, randomized_hostname
from pyovpn.errors import ConfigError
from tests.unit.configtext import INLINE_CREDENTIALS

A = Entry("a.example", 1194, "udp")
B = Entry("b.example", 443, "tcp-client")
C = Entry("c.example", 1195, "udp")


def test_entries_are_tried_in_order_and_wrap() -> None:
    cl = ConnectionList([A, B, C])
    assert [cl.advance() for _ in range(5)] == [A, B, C, A, B]


def test_remote_random_shuffles_once_at_start() -> None:
    picks = iter([0, 0])  # i=2 swaps with 0, i=1 swaps with 0
    cl = ConnectionList([A, B, C], shuffle=lambda n: next(picks))
    assert cl.entries == [B, C, A]
    assert [cl.advance() for _ in range(4)] == [B, C, A, B]


def test_first_attempt_is_immediate_then_connect_retry_then_backoff() -> None:
    e = Entry("a", 1, "udp", connect_retry=5, connect_retry_max_seconds=300)
    cl = ConnectionList([e])
    delays = []
    for _ in range(9):
        cl.advance()
        delays.append(cl.delay())
    # OpenVPN counts the first attempt too and doubles the wait from the 5th round on, up to the max
    assert delays == [0.0, 5.0, 5.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
    for _ in range(5):
        cl.advance()
    assert cl.delay() == 300.0


def test_backoff_counts_rounds_of_the_whole_list() -> None:
    cl = ConnectionList([A, B])  # connect_retry 1
    delays = []
    for _ in range(12):
        cl.advance()
        delays.append(cl.delay())
    assert delays[:9] == [0.0] + [1.0] * 8  # rounds of the 2 entries, not single attempts, count
    assert delays[9:] == [2.0, 2.0, 4.0]


def test_connect_retry_max_gives_up_after_that_many_rounds() -> None:
    cl = ConnectionList([A, B], connect_retry_max=2)
    tried = [cl.advance() for _ in range(4)]
    assert tried == [A, B, A, B]
    with pytest.raises(GiveUp, match=r"connect-retry-max \(2\) times unsuccessful"):
        cl.advance()


def test_restart_after_success_stays_on_the_entry_once() -> None:
    cl = ConnectionList([A, B, C], connect_retry_max=1)
    assert cl.advance() == A
    assert cl.advance() == B
    cl.connected()  # Initialization Sequence Completed on B
    assert cl.advance() == B  # the restart (ping-restart, SIGUSR1) tries B again
    assert cl.advance() == C  # that failed: move on
    assert cl.advance() == A  # the success reset the counter: a full round is allowed again
    assert cl.advance() == B
    with pytest.raises(GiveUp):
        cl.advance()


def test_resolv_retry_gives_up_after_the_window() -> None:
    cl = ConnectionList([A], resolv_retry=10)
    cl.resolve_failed(100.0, "cannot resolve a.example")
    cl.resolve_failed(105.0, "cannot resolve a.example")
    with pytest.raises(GiveUp, match="resolv-retry 10"):
        cl.resolve_failed(110.0, "cannot resolve a.example")
    infinite = ConnectionList([A])
    infinite.resolve_failed(0.0, "x")
    infinite.resolve_failed(1e9, "x")  # never gives up


def test_resolving_again_resets_the_resolv_retry_window() -> None:
    cl = ConnectionList([A], resolv_retry=10)
    cl.resolve_failed(100.0, "x")
    cl.resolved()
    cl.resolve_failed(200.0, "x")
    cl.resolve_failed(209.0, "x")  # within a fresh window


def test_randomized_hostname_only_for_names() -> None:
    assert randomized_hostname("vpn.example", lambda n: bytes(range(n))) == "000102030405.vpn.example"
    assert randomized_hostname("10.0.0.1", lambda n: b"\xff" * n) == "10.0.0.1"
    assert randomized_hostname("fd00::1", lambda n: b"\xff" * n) == "fd00::1"


# -- configuration ------------------------------------------------------------------------------

CLIENT_NO_REMOTE = "tls-client\n" + INLINE_CREDENTIALS


def test_connection_blocks_in_order_with_their_own_settings() -> None:
    o = parse_config_text(
        "port 1300\nproto tcp\nconnect-retry 3 20\n"
        "<connection>\nremote one.example 1195 udp\nserver-poll-timeout 7\n</connection>\n"
        "<connection>\nremote 10.0.0.1\nconnect-retry 9\n</connection>\n" + CLIENT_NO_REMOTE
    )
    assert o.remotes == (
        Remote("one.example", 1195, "udp", None, 3, 20, 7),
        Remote("10.0.0.1", 1300, "tcp-client", None, 9, 20, 120),
    )


def test_connection_block_copies_globals_given_before_it() -> None:
    o = parse_config_text("<connection>\nremote a.example\n</connection>\nport 1400\n" + CLIENT_NO_REMOTE)
    assert o.remotes == (Remote("a.example", 1194, "udp", None, 1, 300, 120),)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("remote a\nverb 3", "option 'verb' cannot be used in a <connection> block"),
        ("remote a\nmssfix 1400", "`mssfix` inside a <connection> block is not supported by pyovpn"),
        ("remote a\nexplicit-exit-notify 1", "set it once outside the blocks"),
        ("port 5", "exactly one `remote"),
        ("remote a\nremote b", "exactly one `remote"),
        ("remote a 99999", "remote"),
    ],
)
def test_connection_block_errors(body: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as info:
        parse_config_text(f"<connection>\n{body}\n</connection>\n" + CLIENT_NO_REMOTE, source="c.ovpn")
    assert info.value.line is not None and info.value.line >= 1


def test_remote_lines_and_connection_blocks_cannot_mix() -> None:
    with pytest.raises(ConfigError, match="cannot be mixed"):
        parse_config_text("remote x.example\n<connection>\nremote a\n</connection>\n" + CLIENT_NO_REMOTE)


def test_connection_timer_options() -> None:
    o = parse_config_text(
        "remote-random\nremote-random-hostname\nconnect-retry 4 2\nconnect-retry-max 3\n"
        "connect-timeout 11\nresolv-retry 30\nremote a.example\n" + CLIENT_NO_REMOTE
    )
    assert o.remote_random and o.remote_random_hostname
    assert (o.connect_retry, o.connect_retry_max_seconds) == (4, 4)  # max never below the base
    assert o.connect_retry_max == 3
    assert o.server_poll_timeout == 11
    assert o.resolv_retry == 30
    assert not o.ignored


@pytest.mark.parametrize("line", ["connect-retry x", "resolv-retry soon", "server-poll-timeout -1"])
def test_bad_timer_values(line: str) -> None:
    with pytest.raises(ConfigError):
        parse_config_text(line + "\nremote a\n" + CLIENT_NO_REMOTE)


def test_ping_exit_and_inactive_options() -> None:
    o = parse_config_text("ping 2\nping-exit 9\ninactive 30 1000\nremote a\n" + CLIENT_NO_REMOTE)
    assert (o.ping_restart, o.ping_exit) == (9, True)
    assert o.inactive == (30, 1000)
    later = parse_config_text("ping-exit 9\nping-restart 12\ninactive 0\nremote a\n" + CLIENT_NO_REMOTE)
    assert (later.ping_restart, later.ping_exit) == (12, False)  # the later one decides
    assert later.inactive is None  # 0 turns it off, as in OpenVPN


def test_ping_exit_conflicts_with_keepalive() -> None:
    with pytest.raises(ConfigError, match="conflicts"):
        parse_config_text("keepalive 10 60\nping-exit 30\nremote a\n" + CLIENT_NO_REMOTE)


@pytest.mark.parametrize("line", ["inactive 60", "ping-exit 60"])
def test_exit_timers_are_refused_on_a_p2mp_server(line: str) -> None:
    server = "server 10.8.0.0 255.255.255.0\ntopology subnet\ntls-server\n" + INLINE_CREDENTIALS
    with pytest.raises(ConfigError, match="not supported in P2MP server mode"):
        parse_config_text(line + "\n" + server)


def test_entry_options_after_the_blocks_are_reported_as_without_effect() -> None:
    o = parse_config_text(
        "<connection>\nremote a.example\n</connection>\nconnect-retry 7\nproto tcp\n" + CLIENT_NO_REMOTE,
        source="late.ovpn",
    )
    assert o.remotes == (Remote("a.example", 1194, "udp", None, 1, 300, 120),)
    assert [(name, line) for name, _src, line in o.ignored] == [("connect-retry", 4), ("proto", 5)]


def test_connect_retry_max_in_a_block_applies_to_the_list() -> None:
    """OpenVPN takes connect-retry-max inside a block (a provider profile does); pyovpn keeps one value."""
    o = parse_config_text(
        CLIENT_NO_REMOTE + "<connection>\nremote a 1194 udp\nconnect-retry-max 4\n</connection>\n"
    )
    assert o.connect_retry_max == 4


def test_cbc_only_data_ciphers_offer_the_aead_defaults() -> None:
    o = parse_config_text(CLIENT_NO_REMOTE + "remote a 1194\ndata-ciphers AES-256-CBC\n")
    assert o.unoffered_ciphers == ("AES-256-CBC",)
    assert o.data_ciphers and all(c.endswith(("GCM", "POLY1305")) for c in o.data_ciphers)
