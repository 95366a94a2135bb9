"""The soak benches' measuring tools: the slope fit, the per-mapping RSS diff, the allocator counts.

They decide whether docs/RELIABILITY.md may call a slope zero, so they are checked on
known series and on this very process.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import random
import sys
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.heapwatch import (  # noqa: E402
    _container_lengths,
    _garbage_census,
    _live_census,
    _malloc_counts,
    _owner,
    _pymalloc_counts,
    _untracked,
)
from bench.soak import slope, smaps, smaps_growth  # noqa: E402


def test_slope_finds_a_known_trend_and_no_trend_in_noise() -> None:
    rng = random.Random(7)
    ts = [5.0 * i for i in range(400)]  # 5 s apart, as the soaks sample
    rising = [50 + 0.01 * t + rng.gauss(0, 0.05) for t in ts]  # 0.6 per minute
    b, half = slope(ts, rising)
    assert abs(b - 0.6) < half
    assert half < 0.05
    flat = [50 + rng.gauss(0, 0.05) for _ in ts]
    b, half = slope(ts, flat)
    assert abs(b) <= half  # the interval contains zero


def _range(key: str) -> tuple[int, int]:
    lo, hi = key.split(" ", 1)[0].split("-")
    return int(lo, 16), int(hi, 16)


def test_smaps_sees_pages_touched_in_a_new_mapping() -> None:
    size = 8 * 1024 * 1024
    with mmap.mmap(-1, size) as region:
        view = ctypes.c_char.from_buffer(region)
        address = ctypes.addressof(view)
        del view  # an exported buffer would keep the mapping from closing
        before = smaps(os.getpid())
        for off in range(0, size // 2, mmap.PAGESIZE):
            region[off] = 1
        after = smaps(os.getpid())
    lines = smaps_growth(before, after)
    assert lines[0].startswith("resident change over all mappings")
    # the kernel may merge the new mapping with a neighbour: compare what covers the same range
    (key,) = [k for k in after if "-" in k.split(" ", 1)[0] and _covers(k, address)]
    lo, hi = _range(key)
    earlier = sum(v for k, v in before.items() if "-" in k.split(" ", 1)[0] and lo <= _range(k)[0] < hi)
    assert after[key] - earlier >= 4096 - 64  # KiB: half of the 8 MiB region


def _range(key: str) -> tuple[int, int]:
    lo, hi = key.split(" ", 1)[0].split("-")
    return int(lo, 16), int(hi, 16)


def _covers(key: str, address: int) -> bool:
    lo, hi = _range(key)
    return lo <= address < hi


def test_smaps_of_a_missing_process_is_empty() -> None:
    assert smaps(2**22 + 12345) == {}


def test_allocator_counts_are_read() -> None:
    if sys.implementation.name != "cpython":
        pytest.skip("CPython's small-object allocator only")
    arenas, pools, used, free, classes = _pymalloc_counts()
    assert arenas >= 1 and pools >= 1
    assert used > 0 and free >= 0
    assert used + free <= pools * 16 * 1024  # pools are 16 KiB in CPython 3.10+
    assert pools == sum(p for p, _blocks in classes.values())
    keep = [bytearray(200) for _ in range(50_000)]  # ~10 MB of small objects
    _arenas, pools_after, used_after, _free, classes_after = _pymalloc_counts()
    assert used_after > used + 5_000_000
    assert pools_after > pools
    # each bytearray's 201-byte buffer is one block of the 208-byte class
    assert classes_after[208][1] >= classes.get(208, (0, 0))[1] + 50_000
    del keep
    in_use, held = _malloc_counts()
    if held:  # glibc
        assert 0 < in_use <= held


def test_gc_census_names_what_a_cycle_was_made_of() -> None:
    def make_cycle() -> None:
        holder: dict[str, object] = {}

        def closure() -> object:
            return holder

        holder["f"] = closure  # dict -> function -> cell -> dict
        holder["proxy"] = weakref.proxy(closure)  # dead by the census: must not raise ReferenceError
        try:
            raise ValueError("kept")
        except ValueError as exc:
            holder["exc"] = exc  # exception -> traceback -> this frame -> holder

    gc.collect()
    gc.disable()
    try:
        make_cycle()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        census = _garbage_census(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert census["CallableProxyType"] == 1
    assert census["dict"] >= 1 and census["ValueError"] == 1 and census["traceback"] >= 1
    closures = [k for k in census if k.startswith("function ") and k.endswith("make_cycle.<locals>.closure")]
    assert closures and census[closures[0]] == 1
    assert any(k.startswith("frame test_soak_tools.py:") and k.endswith(" make_cycle") for k in census)


def test_live_census_counts_containers_by_type() -> None:
    class Marker:
        pass

    before = _live_census()["test_live_census_counts_containers_by_type.<locals>.Marker"]
    keep = [Marker() for _ in range(1000)]
    after = _live_census()["test_live_census_counts_containers_by_type.<locals>.Marker"]
    assert after - before == len(keep)


class _Holder:
    def __init__(self) -> None:
        self.items: list[bytes] = []


def test_container_lengths_and_owner_find_a_list_that_grows() -> None:
    holder = _Holder()
    before = _container_lengths()[id(holder.items)]
    holder.items.extend(os.urandom(20) for _ in range(300))
    kind, length = _container_lengths()[id(holder.items)]
    assert before == (list, 0) and (kind, length) == (list, 300)
    assert "_Holder.items" in _owner(holder.items)


def test_untracked_census_finds_atoms_and_who_holds_them() -> None:
    holder = _Holder()
    holder.items.extend(os.urandom(20) for _ in range(300))  # atoms: the collector never tracks bytes
    found = _untracked([])
    held = [found.get(id(b)) for b in holder.items]
    assert all(h == (f"bytes:{sys.getsizeof(holder.items[0])}", id(holder.items)) for h in held)
    # the watcher's own containers are left out, so its bookkeeping never counts as growth
    again = _untracked([holder.items])
    assert all(id(b) not in again for b in holder.items)
