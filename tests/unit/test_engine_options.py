"""The engine's options (``engine-workers``, ``userspace-engine``) and how they pick a backend."""

from __future__ import annotations

import pytest

from pyovpn.config import parse_config_text
from pyovpn.datachannel.choice import _userspace_backend
from pyovpn.datachannel.engine.proxy import EngineDataChannel
from pyovpn.datachannel.userspace import UserspaceDataChannel
from pyovpn.errors import ConfigError

from .test_config import CLIENT


def test_defaults_and_values() -> None:
    o = parse_config_text(CLIENT)
    assert (o.engine_workers, o.userspace_engine) == (None, "auto")
    o = parse_config_text(CLIENT + "engine-workers 3\nuserspace-engine inprocess\n")
    assert (o.engine_workers, o.userspace_engine) == (3, "inprocess")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("engine-workers 0", "engine-workers: must be an integer >= 1"),
        ("engine-workers two", "engine-workers: 'two' is not an integer"),
        ("engine-workers", "engine-workers"),
        ("userspace-engine threads", "userspace-engine: bad value 'threads'"),
    ],
)
def test_bad_values_name_file_and_line(line: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config_text(CLIENT + line + "\n", source="client.conf")
    line_no = CLIENT.count("\n") + 1
    assert f"client.conf:{line_no}" in str(err.value)
    assert needle in str(err.value)


def test_backend_choice_follows_the_options() -> None:
    engine = _userspace_backend(mssfix=None, engine="multiprocess", workers=1)
    assert isinstance(engine, EngineDataChannel) and engine._workers == 1
    assert isinstance(_userspace_backend(mssfix=None, engine="inprocess"), UserspaceDataChannel)
    assert isinstance(_userspace_backend(mssfix=None), EngineDataChannel)  # P2P and P2MP alike


def test_auto_puts_a_p2mp_server_in_process_unless_asked() -> None:
    """`auto` (the default) keeps a server on the in-process plane: the engine moves more data but
    costs more memory, connect CPU and idle CPU (docs/BENCHMARKS.md); `multiprocess` asks for it."""
    from pyovpn.edge import backendfit

    from .test_config_server import SERVER

    assert backendfit.userspace_engine(parse_config_text(CLIENT)) == "multiprocess"
    o = parse_config_text(SERVER)
    assert o.mode == "server" and backendfit.userspace_engine(o) == "inprocess"
    o = parse_config_text(SERVER + "userspace-engine multiprocess\n")
    assert backendfit.userspace_engine(o) == "multiprocess"
    o = parse_config_text(CLIENT + "userspace-engine auto\n")
    assert o.userspace_engine == "auto" and backendfit.userspace_engine(o) == "multiprocess"


def test_dev_null_and_fragment_run_on_the_engine() -> None:
    from pyovpn.edge import backendfit

    o = parse_config_text(CLIENT + "dev null\n")
    assert o.dev_type == "null" and backendfit.userspace_engine(o) == "multiprocess"
    o = parse_config_text(CLIENT + "proto udp\nfragment 1300\n")
    assert o.fragment and backendfit.userspace_engine(o) == "multiprocess"
