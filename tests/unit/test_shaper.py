"""`shaper`'s time debt (datachannel/shaper.py), driven with given times, no clock."""

from __future__ import annotations

import pytest

from pyovpn.datachannel.shaper import BURST, MAX_CREDIT, SHAPER_MAX, SHAPER_MIN, Shaper


def test_each_batch_waits_its_bytes_over_the_rate() -> None:
    s = Shaper(1000)
    assert s.wait(10.0) == 0.0  # nothing sent yet
    s.sent(500, 10.0)  # after a pause, at most MAX_CREDIT of it is credited
    assert s.wait(10.0) == pytest.approx(0.5 - MAX_CREDIT)
    assert s.wait(10.25) == pytest.approx(0.25 - MAX_CREDIT)
    s.sent(1000, s.ready_at)  # on time: the debt runs on from where it was
    assert s.ready_at == pytest.approx(11.5 - MAX_CREDIT)


def test_a_late_wakeup_is_credited_but_no_more_than_a_little() -> None:
    rate = 1_000_000
    s = Shaper(rate)
    s.sent(BURST, 0.0)
    due = BURST / rate
    # the timer fired a millisecond late: the next batch's time counts from when it was due
    s.sent(BURST, due + 0.001)
    assert s.ready_at == pytest.approx(2 * due)
    # idle for a long time: only MAX_CREDIT of it counts, so no flood after a pause
    s.sent(BURST, 100.0)
    assert s.wait(100.0) == pytest.approx(due - MAX_CREDIT)
    # at a high rate the credit is at most one burst's time
    fast = Shaper(100_000_000)
    fast.sent(1500, 0.0)
    fast.sent(1500, 50.0)
    assert fast.burst == 200_000  # a tick's worth: the timer could not keep up with 64 KiB bursts
    assert fast.ready_at == pytest.approx(50.0 - 0.002 + 1500 / 100_000_000)
    assert Shaper(1_000_000).burst == BURST


def test_the_rate_over_many_batches_is_the_rate_asked() -> None:
    s = Shaper(50_000)
    now = 0.0
    sent = 0
    while now < 10.0:
        now += s.wait(now) + 0.0007  # each wakeup a little late, as an epoll timer is
        s.sent(1500, now)
        sent += 1500
    assert sent / now == pytest.approx(50_000, rel=0.05)


@pytest.mark.parametrize("rate", [SHAPER_MIN - 1, SHAPER_MAX + 1, 0])
def test_rates_outside_openvpns_bounds_are_refused(rate: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        Shaper(rate)


def test_a_pushed_shaper_wins_where_the_backend_keeps_it(caplog: pytest.LogCaptureFixture) -> None:
    """As an OpenVPN client: a pushed `shaper` replaces the configured one. A backend that cannot
    keep it says so in a warning; a pushed rate out of bounds is skipped and stays in `ignored`,
    whose warning names it (edge/pushwarn.py)."""
    from pyovpn.config import parse_config_text
    from pyovpn.datachannel.api import Capabilities
    from pyovpn.edge.backendfit import session_shaper
    from pyovpn.proto.push import parse_pushed_options
    from tests.unit.configtext import INLINE_CREDENTIALS

    pushed = parse_pushed_options(["ifconfig 10.8.0.2 255.255.255.0", "shaper 50000", "shaper 5"])
    assert pushed.shaper == 50000 and pushed.ignored == ["shaper 5"]
    # not a number to int(), though str.isdigit() says digits: skipped, never a crash
    odd = parse_pushed_options(["shaper \u00b2", "shaper \u0663\u0660\u0660", "shaper -1"])
    assert odd.shaper is None and len(odd.ignored) == 3
    opts = parse_config_text("tls-client\nremote vpn.example.com 1194\nshaper 200000\n" + INLINE_CREDENTIALS)
    engine, kernel = Capabilities(shaper=True), Capabilities()
    assert session_shaper(opts, None, engine, "userspace") == 200000
    assert session_shaper(opts, 50000, engine, "userspace") == 50000
    with caplog.at_level("WARNING"):
        assert session_shaper(opts, 50000, kernel, "kernel") == 0
    assert "'shaper 50000' is not applied: the kernel data channel" in caplog.text
