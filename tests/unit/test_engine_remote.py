"""RemoteCell and RemoteArea: remote addresses shared between the engine's processes by memfd."""

from __future__ import annotations

import os

import pytest

from pyovpn.datachannel.engine.remote import RemoteArea, RemoteCell


def test_cell_round_trips_both_families_through_a_second_mapping() -> None:
    writer = RemoteCell()
    reader = RemoteCell(os.dup(writer.fd))  # what a worker maps from the passed descriptor
    try:
        writer.store(("192.0.2.7", 1194))
        gen, addr = reader.load()
        assert addr == ("192.0.2.7", 1194) and gen % 2 == 0
        writer.store(("2001:db8::5", 443, 0, 3))
        gen2, addr = reader.load()
        assert addr == ("2001:db8::5", 443, 0, 3) and gen2 > gen
    finally:
        writer.close()
        reader.close()


def test_area_slots_are_independent_and_shared_by_descriptor() -> None:
    area = RemoteArea()
    other = RemoteArea(os.dup(area.fd))  # a worker's view
    try:
        a, b = area.take(), area.take()
        assert (a, b) == (0, 1)
        area.cell(a).store(("198.51.100.1", 1000))
        area.cell(b).store(("198.51.100.2", 2000))
        assert other.cell(a).load()[1] == ("198.51.100.1", 1000)
        assert other.cell(b).load()[1] == ("198.51.100.2", 2000)
        gen_b = other.cell(b).generation()
        area.cell(a).store(("198.51.100.3", 3000))  # a float of peer a leaves b alone
        assert other.cell(b).generation() == gen_b
        area.give(a)
        assert area.take() == a  # a freed slot is reused; its generation keeps counting up
        cell = area.cell(a)
        before = cell.generation()
        cell.store(("203.0.113.9", 9))
        assert other.cell(a).load() == (before + 2, ("203.0.113.9", 9))
        with pytest.raises(ValueError, match="out of range"):
            area.cell(RemoteArea.SLOTS)
        cell.close()  # a slot's cell does not own the mapping
        assert other.cell(b).load()[1] == ("198.51.100.2", 2000)
    finally:
        area.close()
        other.close()


def test_area_runs_out_of_slots_with_none() -> None:
    area = RemoteArea()
    try:
        area._next = RemoteArea.SLOTS - 1  # internal: skip to the last slot
        assert area.take() == RemoteArea.SLOTS - 1
        assert area.take() is None  # the controller then gives the peer a mapping of its own
    finally:
        area.close()
