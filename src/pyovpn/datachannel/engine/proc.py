"""Process plumbing shared by the engine's controller and workers."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1

__all__ = ["set_parent_death_signal"]


def set_parent_death_signal(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux prctl).

    Exits at once if the parent is already gone (or is not ``expected_parent``): the
    death signal only covers a parent that dies after the call.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    ppid = os.getppid()
    if ppid == 1 or (expected_parent is not None and ppid != expected_parent):
        os._exit(1)
