"""``/run/pyovpn``: what a running pyovpn leaves there, and whether the process that left it lives.

The route journal, the DNS state files and the control sockets all live in this one directory so
that a later start (or an operator) finds everything a killed pyovpn left behind in one place.
Each of them is keyed by the writer's pid and network namespace: a file is stale only when its
writer is gone *and* it belongs to this namespace, because devices and resolver files of the same
name in another namespace are somebody else's.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = Path("/run/pyovpn")


def netns_inode() -> int:
    """This process's network namespace (0 when /proc cannot tell)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def netns_id() -> str:
    """The network namespace as ``dev:inode``, unique on this host."""
    try:
        st = os.stat("/proc/self/ns/net")
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is another process that still runs (this process never counts)."""
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
