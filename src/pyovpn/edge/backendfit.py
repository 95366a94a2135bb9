"""Whether a configuration can run on the kernel data channel, and which userspace engine it needs.

The kernel ovpn driver is used whenever the connection allows; what it cannot do (compression
framing, `passtos`, `dev null`, `fragment`, `shaper`, a net30 P2MP server) sends the connection
to pyovpn's userspace data plane, and the reasons go into the one log line that says so
(``datachannel/choice.py``).
"""

from __future__ import annotations

import logging

from pyovpn.config import Options
from pyovpn.datachannel.api import Capabilities
from pyovpn.edge import compression

log = logging.getLogger(__name__)


def kernel_refusal(opts: Options) -> str | None:
    """Why the configuration keeps the kernel data channel out (all reasons in one sentence), or None."""
    reasons = []
    framing = compression.kernel_refusal(opts)
    if framing is not None:
        reasons.append(framing)
    if opts.passtos:
        # OpenVPN 2.6 keeps DCO and then does not copy the TOS; pyovpn carries the option out
        reasons.append(
            "`passtos` copies each packet's TOS/DSCP to the outer packet, which the kernel ovpn driver "
            "does not"
        )
    if opts.dev_type == "null":
        # as OpenVPN 2.6 ("null tun type selected, disabling data channel offload")
        reasons.append("`dev null` has no device for the kernel ovpn driver to deliver packets to")
    if opts.fragment:
        # as OpenVPN 2.6 ("--fragment disables data channel offload")
        reasons.append("`fragment` is OpenVPN's own fragmentation, which the kernel ovpn driver lacks")
    if opts.shaper:
        reasons.append("`shaper` holds the sending rate in userspace; the kernel ovpn driver sends at once")
    if opts.mode == "server" and opts.topology == "net30":
        # as OpenVPN 2.6 ("NOT using '--topology subnet' disables data channel offload")
        reasons.append(
            "`topology net30` on a P2MP server routes every client through one point-to-point "
            "address, which the kernel ovpn driver cannot map to its peers"
        )
    return "; ".join(reasons) if reasons else None


def session_shaper(opts: Options, pushed: int | None, caps: Capabilities, backend: str) -> int:
    """The `shaper` rate for this session's peer: the server's push wins over the config, as in
    OpenVPN. A pushed rate the backend cannot keep is logged and not applied: the backend was
    chosen before the push arrived (a configured one chose the userspace engine already)."""
    if pushed is None:
        return opts.shaper
    if not caps.shaper:
        log.warning(
            "pushed option 'shaper %d' is not applied: the %s data channel sends at once. Put "
            "`shaper` in this config to run on the userspace engine, which keeps it",
            pushed,
            backend,
        )
        return 0
    log.info("Data Channel: shaper %d bytes per second, pushed by the server", pushed)
    return pushed


def userspace_engine(opts: Options) -> str:
    """The `userspace-engine` to use.

    `auto` (the default) is the engine, except for a P2MP server: there the engine moves more
    data (bench/p2mp_throughput.py) but costs more memory per client (three processes) and
    more CPU to connect clients (bench/p2mp.py), so a server takes it only when asked with
    `userspace-engine multiprocess`.
    """
    if opts.userspace_engine == "auto":
        return "inprocess" if opts.mode == "server" else "multiprocess"
    return opts.userspace_engine
