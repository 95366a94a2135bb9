"""Whether the process that left a state file behind (a route journal, DNS state) still runs, so
the next start knows if what it finds is a crash's leftover to undo or a live process's to leave."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """False for our own pid, no such process, and a killed process not reaped yet (a zombie)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # a killed process its parent has not reaped yet is gone for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]
