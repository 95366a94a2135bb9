#!/usr/bin/env python3
"""Run pyovpn with the offload engine as its data channel, until select.py knows the switch.

    PYOVPN_ENGINE=offload python3 bench/pyovpn_offload.py --config client.conf

Same command line as ``python -m pyovpn``; with ``PYOVPN_ENGINE=offload`` (the default for
this wrapper) ``dco auto|userspace`` selects :class:`OffloadDataChannel` instead of the
in-process userspace backend. ``PYOVPN_ENGINE_WORKERS`` sets the worker count.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyovpn.datachannel import select  # noqa: E402

_original = select.open_backend


async def _open_backend(choice: str):  # type: ignore[no-untyped-def]
    if os.environ.get("PYOVPN_ENGINE", "offload") == "offload" and choice in ("auto", "userspace"):
        from pyovpn.datachannel.offload import OffloadDataChannel

        workers = int(os.environ.get("PYOVPN_ENGINE_WORKERS", "0")) or None
        logging.getLogger("pyovpn").info("DCO: using the userspace offload engine (PYOVPN_ENGINE=offload)")
        return OffloadDataChannel(workers=workers)
    return await _original(choice)


select.open_backend = _open_backend

if __name__ == "__main__":
    from pyovpn.cli import main

    raise SystemExit(main())
