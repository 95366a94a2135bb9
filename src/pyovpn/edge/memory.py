"""Giving freed heap memory back to the system, so a long-running daemon's RSS stays flat.

glibc's malloc returns memory to the system on its own only from the top of its heap. Every
renegotiation and every client that comes and goes frees OpenSSL's and Python's buffers in the
middle of the heap; those pages stay resident, and over hours the holes shift and RSS creeps up
although nothing is in use (the soaks in docs/RELIABILITY.md show malloc's in-use bytes flat
while RSS rises). ``malloc_trim(0)`` hands every whole free page back (``MADV_DONTNEED``), so the
daemon calls it now and then. It costs well under a millisecond on a control plane's heap.
Without glibc (musl, other systems) there is nothing to call and nothing is done.

CPython keeps memory of its own that only a full collection gives back: the free lists in which it
parks freed tuples, lists, dicts and floats for reuse (thousands of tuples per size). The
interpreter runs a full collection only when the objects that survived since the last one reach a
quarter of all, which in a daemon whose live set barely changes takes many minutes; in between,
every renegotiation leaves a few more parked blocks and the small-object pools they sit in stay
resident (the P2P soak in docs/RELIABILITY.md: 64- and 80-byte blocks rising for ten minutes, then
dropping at once). So the daemon also runs a full collection once a minute, before the trim. On a
control plane's ~50,000 tracked objects it takes about 6 ms.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_INTERVAL = 30.0  # seconds between trims: short against a soak's slope, long against its cost
COLLECT_EVERY = 2  # trims per full collection: once a minute


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _find_malloc_trim()


def give_back() -> bool:
    """Return the heap's free pages to the system now; False where the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def collect_fully() -> int:
    """A full collection: cyclic garbage, and the interpreter's free lists emptied; what it found."""
    return gc.collect()


async def give_back_periodically(interval: float = TRIM_INTERVAL, collect_every: int = COLLECT_EVERY) -> None:
    """Every ``interval`` seconds :func:`give_back`, and every ``collect_every``-th time a
    :func:`collect_fully` first, so what the collection frees is trimmed too; until cancelled."""
    if _malloc_trim is None:
        log.debug("no malloc_trim in this C library; freed heap pages stay with the process")
    rounds = 0
    while True:
        await asyncio.sleep(interval)
        rounds += 1
        if rounds % collect_every == 0:
            collect_fully()
        give_back()
