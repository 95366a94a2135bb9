"""Hypothesis fuzzing of the engine's message decoder: only pyovpn's ProtocolError may escape,
and every value the engine sends comes back equal."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyovpn.datachannel import api
from pyovpn.datachannel.engine import wire
from pyovpn.errors import ProtocolError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_addr = st.tuples(st.from_regex(r"[0-9a-f:.]{1,45}", fullmatch=True), st.integers(0, 65535))
_scalars = st.none() | st.booleans() | _ints | st.text(max_size=20) | st.binary(max_size=40)
_control_packets = st.builds(
    api.ControlPacket, st.integers(0, 2**32 - 1), st.binary(max_size=200), st.none() | _addr
)
_notes = st.one_of(
    _control_packets,
    st.builds(api.PeerDeleted, _ints, st.sampled_from(api.PeerDelReason)),
    st.builds(api.PeerFloated, _ints, _addr),
    st.builds(api.KeyExhausted, _ints, _ints),
    st.builds(
        api.NewKey,
        _ints,
        st.sampled_from(api.KeySlot),
        _ints,
        st.sampled_from(api.Cipher),
        st.builds(api.KeyDirection, st.binary(max_size=32), st.binary(max_size=8)),
        st.builds(api.KeyDirection, st.binary(max_size=32), st.binary(max_size=8)),
    ),
)
_values = st.recursive(
    _scalars | _notes,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _only_protocol_errors(data: bytes) -> None:
    try:
        wire.unpack(data)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_unpack_any_bytes(data: bytes) -> None:
    _only_protocol_errors(data)


@FUZZ
@given(st.sampled_from(wire.Kind), st.binary(max_size=200))
def test_unpack_any_body_of_each_kind(kind: wire.Kind, body: bytes) -> None:
    _only_protocol_errors(bytes([kind]) + b"\x01\x00\x00\x00" + body)


@FUZZ
@given(_values, st.data())
def test_values_round_trip_and_survive_damage(value: Any, data: st.DataObject) -> None:
    raw = wire.pack(wire.Kind.OK, 7, value)
    msg = wire.unpack(raw)
    assert (msg.kind, msg.rid, msg.body) == (wire.Kind.OK, 7, value)
    # a cut or a flipped byte is refused with ProtocolError or decodes to something else
    cut = data.draw(st.integers(0, len(raw) - 1))
    _only_protocol_errors(raw[:cut])
    pos = data.draw(st.integers(0, len(raw) - 1))
    _only_protocol_errors(raw[:pos] + bytes([raw[pos] ^ data.draw(st.integers(1, 255))]) + raw[pos + 1 :])


@FUZZ
@given(_control_packets, st.integers(0, 2**32 - 1))
def test_control_packets_round_trip(note: api.ControlPacket, rid: int) -> None:
    assert wire.unpack(wire.pack(wire.Kind.CONTROL, rid, note)) == (wire.Kind.CONTROL, rid, note)
    send = api.SendControl(note.peer_id, note.packet)
    assert wire.unpack(wire.pack(wire.Kind.SEND_CONTROL, rid, send)) == (wire.Kind.SEND_CONTROL, rid, send)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 4))
def test_unpack_batch_any_bytes(data: bytes, nfds: int) -> None:
    try:
        wire.unpack_batch(bytes([wire.Kind.BATCH]) + data, nfds)
    except ProtocolError:
        pass
    try:
        wire.unpack_batch(data, nfds)
    except ProtocolError:
        pass


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from([wire.Kind.OK, wire.Kind.REQUEST, wire.Kind.NOTE]), _values), max_size=6
    ),
    st.data(),
)
def test_batches_round_trip_and_survive_damage(
    items: list[tuple[wire.Kind, Any]], data: st.DataObject
) -> None:
    """What an Outbox would send for these messages decodes to them; damage gives ProtocolError only."""
    raws = [wire.pack(kind, rid, value) for rid, (kind, value) in enumerate(items)]
    datagram = b"".join(
        [bytes([wire.Kind.BATCH]) + bytes(4)] + [len(r).to_bytes(4, "little") + b"\x00" + r for r in raws]
    )
    if items:
        got = wire.unpack_batch(datagram, 0)
        assert [(m.kind, m.rid, m.body) for m, _n in got] == [(k, i, v) for i, (k, v) in enumerate(items)]
    cut = data.draw(st.integers(0, len(datagram) - 1))
    try:
        wire.unpack_batch(datagram[:cut], 0)
    except ProtocolError:
        pass
    pos = data.draw(st.integers(0, len(datagram) - 1))
    flipped = datagram[:pos] + bytes([datagram[pos] ^ data.draw(st.integers(1, 255))]) + datagram[pos + 1 :]
    try:
        wire.unpack_batch(flipped, data.draw(st.integers(0, 3)))
    except ProtocolError:
        pass


def test_dict_items_read_inline_are_checked_like_the_rest() -> None:
    """The dict decoder reads keys and scalar values itself: each is bounds- and type-checked."""
    raw = wire.pack_value({"ab": 7, "s": "x", "n": None, "t": True, "f": False, "l": [1]})
    assert wire.unpack_value(raw) == {"ab": 7, "s": "x", "n": None, "t": True, "f": False, "l": [1]}
    key_at = 5  # after the dict's tag and count
    bad_key = raw[:key_at] + bytes([3]) + raw[key_at + 1 :]  # the key's tag says int
    for damaged in (bad_key, raw[: key_at + 3], raw[: key_at + 7], raw[: key_at + 8]):
        try:
            wire.unpack_value(damaged)
        except ProtocolError:
            continue
        raise AssertionError(f"{damaged!r} decoded")
    bad_utf8 = wire.pack_value({"k": "é"}).replace("é".encode(), b"\xff\xfe")
    try:
        wire.unpack_value(bad_utf8)
    except ProtocolError as e:
        assert "UTF-8" in str(e)
    else:
        raise AssertionError("bad UTF-8 decoded")
