"""The daemon's periodic heap trim: freed pages in the middle of glibc's heap go back to the system."""

from __future__ import annotations

import asyncio

import pytest

from pyovpn.edge import memory


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
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(calls) >= 3 and set(calls) == {0}
