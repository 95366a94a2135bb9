"""The daemon's periodic heap trim and full collection: freed pages in the middle of glibc's heap, and
the blocks CPython parks in its free lists, go back."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from pyovpn.edge import memory

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.heapwatch import _pymalloc_counts


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(memory._malloc_trim is None, reason="this C library has no malloc_trim (not glibc)")
def test_freed_pages_below_a_live_allocation_are_given_back() -> None:
    # 80 MB of malloc'ed buffers (above pymalloc's 512-byte limit, below malloc's mmap threshold),
    # then one live buffer above them: free() alone cannot shrink the heap past that buffer
    held = [bytearray(4000) for _ in range(20_000)]
    above = bytearray(4000)
    del held
    before = _rss_kib()
    assert memory.give_back()
    after = _rss_kib()
    assert before - after > 40_000, f"RSS {before} -> {after} KiB: the free pages stayed resident"
    assert len(above) == 4000


def test_the_periodic_task_trims_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda pad: calls.append(pad) or 1)

    async def run() -> None:
        task = asyncio.create_task(memory.give_back_periodically(0.01))
        # every second round also runs a real full collection, which in a process that has run
        # hundreds of tests can take tens of milliseconds: wait for the trims, not a fixed time
        for _ in range(500):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(calls) >= 3 and set(calls) == {0}


def test_the_periodic_task_collects_fully_every_few_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda pad: order.append("trim") or 1)
    monkeypatch.setattr(memory, "collect_fully", lambda: order.append("collect") or 0)

    async def run() -> None:
        task = asyncio.create_task(memory.give_back_periodically(0.01, collect_every=3))
        while order.count("trim") < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    # the collection comes before that round's trim, so the trim hands back what it freed
    assert order[:8] == ["trim", "trim", "collect", "trim", "trim", "trim", "collect", "trim"]


def test_a_full_collection_empties_the_tuple_free_list() -> None:
    # CPython parks freed tuples for reuse, and its small-object pools count them as in use until
    # a full collection; this is the growth the P2P soak saw between the interpreter's own rare ones
    memory.collect_fully()
    before = _pymalloc_counts()[4].get(64, (0, 0))[1]
    burst = [(i, -i) for i in range(100_000, 101_500)]  # 2-tuples: 64-byte blocks
    del burst
    parked = _pymalloc_counts()[4].get(64, (0, 0))[1]
    memory.collect_fully()
    after = _pymalloc_counts()[4].get(64, (0, 0))[1]
    assert parked - before > 1000, (before, parked)
    assert parked - after > 1000, (parked, after)
