"""The management protocol's pure parts: line splitting, history, state lines, options."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyovpn.config import ConfigError, parse_config_text, split_words
from pyovpn.mgmt import protocol as p
from tests.unit.configtext import INLINE_CREDENTIALS

CLIENT = "client\ndev tun\nremote 127.0.0.1 1194\n" + INLINE_CREDENTIALS


def test_line_splitter_handles_partial_and_overlong_lines() -> None:
    s = p.LineSplitter(limit=10)
    assert s.feed(b"pid\r\nsta") == ["pid"]
    assert s.feed(b"te on\n") == ["state on"]
    out = s.feed(b"x" * 25)
    assert out == [p.TOO_LONG]
    assert s.feed(b"yyy\nversion\n") == ["version"]  # the rest of the long line is skipped
    assert s.feed(b"a" * 11 + b"\n") == [p.TOO_LONG]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_garbage_only_yields_lines_or_too_long(chunks: list[bytes]) -> None:
    s = p.LineSplitter(limit=64)
    for chunk in chunks:
        for item in s.feed(chunk):
            assert item is p.TOO_LONG or (isinstance(item, str) and len(item.encode()) <= 64 * 4)
            if isinstance(item, str):
                try:
                    split_words(item)
                except ConfigError:
                    pass  # an unterminated quote: the only error the lexer may raise


def test_history_and_state_lines() -> None:
    h = p.History(3)
    for i in range(5):
        h.add(str(i))
    assert h.last(None) == ["2", "3", "4"]
    assert h.last(2) == ["3", "4"] and h.last(0) == []
    e = p.StateEntry(1796395804, "CONNECTED", "SUCCESS", "10.99.0.2", "127.0.0.1", "11940", tun6="fd99::1000")
    assert e.text() == "1796395804,CONNECTED,SUCCESS,10.99.0.2,127.0.0.1,11940,,,fd99::1000"
    assert len(p.StateEntry(1, "WAIT").text().split(",")) >= 8
    assert p.lines(["a", "END"]) == b"a\r\nEND\r\n"
    assert p.version_lines()[1:] == ["Management Version: 5", "END"]


def test_management_options() -> None:
    o = parse_config_text(CLIENT + "management 127.0.0.1 7505\nmanagement-hold\nmanagement-log-cache 50\n")
    assert o.management == ("127.0.0.1", 7505) and o.management_unix is None
    assert o.management_hold and o.management_log_cache == 50
    u = parse_config_text(CLIENT + "management /run/x.sock unix\n")
    assert u.management_unix == "/run/x.sock" and u.management is None
    q = parse_config_text(CLIENT + "management /run/x.sock unix\nmanagement-query-passwords\n")
    assert q.management_query_passwords
    with pytest.raises(ConfigError, match="needs a management interface"):
        parse_config_text(CLIENT + "management-query-passwords\n")
    f = parse_config_text(CLIENT + "management /run/x.sock unix\nmanagement-forget-disconnect\n")
    assert f.management_forget_disconnect
    with pytest.raises(ConfigError, match="`management-forget-disconnect` needs a management interface"):
        parse_config_text(CLIENT + "management-forget-disconnect\n")
    with pytest.raises(ConfigError, match="stdin"):
        parse_config_text(CLIENT + "management 127.0.0.1 7505 stdin\n")
