"""comp-lzo/compress/allow-compression in the config, the backend choice they force, and the
per-session framing decision (configured or pushed)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pyovpn.config import parse_config_text
from pyovpn.datachannel import choice
from pyovpn.datachannel.api import Capabilities, Framing
from pyovpn.edge import compression
from pyovpn.errors import BackendError, ConfigError
from pyovpn.proto.push import PushedOptions
from tests.unit.configtext import INLINE_CREDENTIALS

CLIENT = "tls-client\nremote vpn.example.com 1194\n" + INLINE_CREDENTIALS


@pytest.mark.parametrize(
    ("line", "option"),
    [
        ("comp-lzo", ("comp-lzo", "")),
        ("comp-lzo no", ("comp-lzo", "no")),
        ("comp-lzo yes", ("comp-lzo", "yes")),
        ("comp-lzo adaptive", ("comp-lzo", "adaptive")),
        ("compress", ("compress", "")),
        ("compress stub-v2", ("compress", "stub-v2")),
        ("compress lz4", ("compress", "lz4")),
        ("compress lz4-v2", ("compress", "lz4-v2")),
        ("compress lzo", ("compress", "lzo")),
    ],
)
def test_compression_options_are_accepted(line: str, option: tuple[str, str]) -> None:
    opts = parse_config_text(CLIENT + line + "\n")
    assert opts.compression == option
    assert opts.ignored == ()
    # stub-v2 never adds a byte to an IP packet, so the kernel may carry it (as with OpenVPN's DCO)
    assert (compression.kernel_refusal(opts) is None) == (line == "compress stub-v2")


def test_allow_compression_values() -> None:
    for value in ("no", "asym", "yes"):
        assert parse_config_text(CLIENT + f"allow-compression {value}\n").allow_compression == value
    opts = parse_config_text(CLIENT + "allow-compression no\ncomp-lzo no\n")
    assert opts.compression == ("comp-lzo", "no")  # stub framing is fine with `no`
    assert compression.kernel_refusal(parse_config_text(CLIENT)) is None


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("allow-compression no\ncomp-lzo yes\n", ["allow-compression no", "comp-lzo yes", "comp-lzo no"]),
        ("compress lz4-v2\nallow-compression no\n", ["allow-compression no", "compress lz4-v2"]),
        ("allow-compression no\nallow-compression yes\n", ["after it was set to 'no'"]),
        ("comp-lzo no\ndco kernel\n", ["kernel", "--dco userspace", "comp-lzo no"]),
    ],
)
def test_compression_conflicts(text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text(CLIENT + text)
    for needle in needles:
        assert needle in str(info.value)


def test_auto_runs_a_framing_config_in_userspace_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> str:
        dc = await choice.open_backend(
            "auto", engine="inprocess", kernel_refusal="`comp-lzo no` needs compression framing"
        )
        try:
            assert dc.capabilities.framing
            return dc.name
        finally:
            await dc.close()

    with caplog.at_level(logging.INFO, "pyovpn"):
        assert asyncio.run(main()) == "userspace"
    lines = [r.getMessage() for r in caplog.records if "kernel data channel not used" in r.getMessage()]
    assert lines == ["DCO: kernel data channel not used: `comp-lzo no` needs compression framing"]


def test_kernel_choice_with_framing_is_refused() -> None:
    with pytest.raises(BackendError, match="--dco auto or --dco userspace"):
        asyncio.run(choice.open_backend("kernel", kernel_refusal="`compress` needs compression framing"))


def test_pushed_framing_overrides_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    opts = parse_config_text(CLIENT + "compress stub-v2\n")
    framing_caps = Capabilities(framing=True)
    pushed = PushedOptions(compression=("comp-lzo", "no"))
    with caplog.at_level(logging.INFO, "pyovpn"):
        assert compression.session_framing(opts, pushed, framing_caps, "userspace") is Framing.LZO_PREFIX
    assert any("the server pushed `comp-lzo no`" in r.getMessage() for r in caplog.records)
    assert compression.session_framing(opts, PushedOptions(), framing_caps, "userspace") is Framing.V2
    plain = parse_config_text(CLIENT)
    assert compression.session_framing(plain, None, Capabilities(), "kernel") is Framing.NONE


def test_stub_v2_needs_no_framing_on_the_kernel() -> None:
    opts = parse_config_text(CLIENT + "compress stub-v2\ndco kernel\n")
    assert compression.session_framing(opts, None, Capabilities(), "kernel") is Framing.NONE
    pushed = PushedOptions(compression=("compress", "stub-v2"))
    assert (
        compression.session_framing(parse_config_text(CLIENT), pushed, Capabilities(), "kernel")
        is Framing.NONE
    )


def test_pushed_framing_on_a_backend_without_it_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match=r"comp-lzo no.*pushed.*--dco userspace"):
        compression.session_framing(
            parse_config_text(CLIENT), PushedOptions(compression=("comp-lzo", "no")), Capabilities(), "kernel"
        )


def test_a_peer_with_compression_we_lack_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    occ = "V4,dev-type tun,link-mtu 1549,tun-mtu 1500,proto UDPv4,comp-lzo,key-method 2,tls-server"
    plain = parse_config_text(CLIENT)
    with caplog.at_level(logging.WARNING, "pyovpn"):
        assert (
            compression.session_framing(plain, PushedOptions(), Capabilities(), "kernel", occ) is Framing.NONE
        )
        assert compression.session_framing(
            plain, None, Capabilities(), "kernel", occ.replace(",comp-lzo", "")
        ) is (Framing.NONE)
    warnings = [r.getMessage() for r in caplog.records if "carries nothing" in r.getMessage()]
    assert len(warnings) == 1 and "Add the peer's comp-lzo/compress line" in warnings[0]
