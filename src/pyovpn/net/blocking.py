"""Running pyroute2's synchronous netlink calls from code that may sit inside an asyncio loop.

pyroute2 0.9's synchronous API refuses to nest inside a running event loop, so a call made
from the loop's thread goes to a short-lived thread instead; elsewhere it runs in place.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_outside_loop(fn: Callable[[], T]) -> T:
    """``fn()``, in a helper thread if this thread runs an asyncio loop; its result or exception."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    box: list[T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            box.append(fn())
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=worker, name="pyovpn-netlink", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return box[0]
