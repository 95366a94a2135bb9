"""The soak benches' measuring tools: the slope fit, the per-mapping RSS diff, the allocator counts.

They decide whether docs/RELIABILITY.md may call a slope zero, so they are checked on
known series and on this very process.
"""

from __future__ import annotations

import mmap
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.heapwatch import _malloc_counts, _pymalloc_counts  # noqa: E402
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


def test_smaps_sees_pages_touched_in_a_new_mapping() -> None:
    size = 8 * 1024 * 1024
    with mmap.mmap(-1, size) as region:
        before = smaps(os.getpid())
        for off in range(0, size // 2, mmap.PAGESIZE):
            region[off] = 1
        after = smaps(os.getpid())
    lines = smaps_growth(before, after)
    assert lines[0].startswith("resident change over all mappings")
    grown = max(after.get(k, 0) - before.get(k, 0) for k in after)
    assert grown >= 4096 - 64  # KiB: half of the 8 MiB region, maybe merged with a neighbour
    assert any("[anon]" in line for line in lines[1:3])


def test_smaps_of_a_missing_process_is_empty() -> None:
    assert smaps(2**22 + 12345) == {}


def test_allocator_counts_are_read() -> None:
    if sys.implementation.name != "cpython":
        pytest.skip("CPython's small-object allocator only")
    arenas, pools, used, free = _pymalloc_counts()
    assert arenas >= 1 and pools >= 1
    assert used > 0 and free >= 0
    assert used + free <= pools * 16 * 1024  # pools are 16 KiB in CPython 3.10+
    keep = [bytearray(200) for _ in range(50_000)]  # ~10 MB of small objects
    _arenas, pools_after, used_after, _free = _pymalloc_counts()
    assert used_after > used + 5_000_000
    assert pools_after > pools
    del keep
    in_use, held = _malloc_counts()
    if held:  # glibc
        assert 0 < in_use <= held
