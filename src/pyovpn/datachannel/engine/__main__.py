"""``python -m pyovpn.datachannel.engine --fd N --parent PID [--workers N] [--options JSON]``.

Started by :class:`pyovpn.datachannel.engine.proxy.EngineDataChannel`, which owns its lifetime:
the engine exits when the control socket closes, and the kernel kills it (and it its
workers) if the parent process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyovpn.datachannel.engine")
    ap.add_argument(
        "--fd", type=int, required=True, help="SOCK_SEQPACKET control socket inherited from the parent"
    )
    ap.add_argument("--parent", type=int, default=None, help="die if this process is not our parent")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: os.cpu_count())")
    ap.add_argument("--options", default="{}", help="engine options as JSON")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)

    from pyovpn.datachannel.engine.proc import set_parent_death_signal

    set_parent_death_signal(expected_parent=args.parent)
    # the control plane decides when we stop: a terminal's ^C or a group SIGTERM goes to it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s engine[%(process)d] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    options = json.loads(args.options)
    proxy = socket.socket(fileno=args.fd)
    wanted = args.workers or os.cpu_count() or 1
    # P2P has one peer: its transmit and receive sides are the units of work (see controller)
    count = max(1, min(wanted, 2))

    # heavy imports before forking, so the workers share them
    from pyovpn.datachannel.engine import controller, worker

    # per worker: a channel to the controller and a direct one to the proxy (control packets)
    chans = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(count)]
    direct = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(count)]
    workers: list[tuple[int, socket.socket, int]] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                keep = (chans[index][1], direct[index][1])
                for s in (proxy, *(s for pair in (*chans, *direct) for s in pair)):
                    if s not in keep:
                        s.close()
                worker.worker_main(index, keep[0], options, keep[1])
            except BaseException:
                logging.getLogger("pyovpn.engine").exception("engine worker %d crashed", index)
                os._exit(1)
            os._exit(0)
        workers.append((index, chans[index][0], pid))
    for pair in (*chans, *direct):
        pair[1].close()
    ctl = controller.Controller(proxy, workers, options, direct=[pair[0] for pair in direct])
    try:
        asyncio.run(ctl.serve())
    finally:
        for _i, _s, pid in workers:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
