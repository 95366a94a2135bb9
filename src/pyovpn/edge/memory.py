"""Giving freed heap memory back to the system, so a long-running daemon's RSS stays flat.

glibc's malloc returns memory to the system on its own only from the top of its heap. Every
renegotiation and every client that comes and goes frees OpenSSL's and Python's buffers in the
middle of the heap; those pages stay resident, and over hours the holes shift and RSS creeps up
although nothing is in use (the soaks in docs/RELIABILITY.md show malloc's in-use bytes flat
while RSS rises). ``malloc_trim(0)`` hands every whole free page back (``MADV_DONTNEED``), so the
daemon calls it now and then. It costs well under a millisecond on a control plane's heap.
Without glibc (musl, other systems) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_INTERVAL = 30.0  # seconds between trims: short against a soak's slope, long against its cost


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


async def give_back_periodically(interval: float = TRIM_INTERVAL) -> None:
    """Run :func:`give_back` every ``interval`` seconds until cancelled."""
    if _malloc_trim is None:
        log.debug("no malloc_trim in this C library; freed heap pages stay with the process")
        return
    while True:
        await asyncio.sleep(interval)
        give_back()
