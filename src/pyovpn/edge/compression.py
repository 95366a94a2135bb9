"""Which compression framing a connection's data channel applies, and the log lines that say so.

The framing comes from the configuration's `comp-lzo`/`compress`, or for a pull client from
the server's push, which overrides it for that session (as in OpenVPN). pyovpn never
compresses; the backends decompress what arrives (see ``datachannel/framing.py``).
"""

from __future__ import annotations

import logging

from pyovpn.config import Options
from pyovpn.datachannel.api import Capabilities, Framing
from pyovpn.errors import BackendError
from pyovpn.proto.push import PushedOptions

log = logging.getLogger("pyovpn")

_STUBS = {("comp-lzo", "no"), ("compress", ""), ("compress", "stub"), ("compress", "stub-v2")}
# stub-v2 frames only payloads that start with 0x50, which an IP packet never does: the kernel
# carries it unchanged (OpenVPN 2.6 allows it with DCO for the same reason)
_KERNEL_SAFE = ("compress", "stub-v2")


def describe(option: tuple[str, str]) -> str:
    return " ".join(part for part in option if part)


def kernel_refusal(opts: Options) -> str | None:
    """Why the configuration keeps the kernel data channel out, or None."""
    if opts.compression is None or opts.compression == _KERNEL_SAFE:
        return None
    return f"`{describe(opts.compression)}` needs compression framing, which the kernel ovpn driver lacks"


def log_configured(opts: Options) -> None:
    """OpenVPN's warnings about a configured compression setting, in pyovpn's terms."""
    if opts.compression is None:
        return
    if opts.compression not in _STUBS:
        log.warning(
            "%s: compressed packets from the peer are decompressed, but pyovpn never compresses what it "
            "sends (as OpenVPN's `allow-compression asym`; compression has been used to break encryption)",
            describe(opts.compression),
        )
    if opts.allow_compression == "yes":
        log.warning("allow-compression yes: pyovpn still sends uncompressed packets (framed only)")


def session_framing(
    opts: Options, pushed: PushedOptions | None, caps: Capabilities, backend: str, remote_occ: str = ""
) -> Framing:
    """The framing for this session's peer; BackendError if the backend cannot apply it.

    ``remote_occ``: the peer's options string; its ``comp-lzo`` marker without any setting here
    is the classic silent failure (every packet dropped for a bad framing byte), so it is logged.
    """
    option = pushed.compression if pushed is not None and pushed.compression is not None else opts.compression
    framing = Framing.from_option(option)
    if option is None and "comp-lzo" in remote_occ.split(","):
        log.warning(
            "the peer has comp-lzo/compress configured (its options string says comp-lzo), but neither "
            "this config nor the server's push does: unless the peer uses `compress stub-v2`, it "
            "expects a framing byte in every packet and the tunnel carries nothing. Add the peer's "
            "comp-lzo/compress line here (pyovpn then frames on its userspace data channel)"
        )
    if framing is Framing.NONE or option is None:
        return framing
    source = "pushed by the server" if option is not opts.compression else "configured"
    if not caps.framing and option == _KERNEL_SAFE:
        log.info(
            "Data Channel: `compress stub-v2` (%s) adds no bytes to IP packets; nothing to frame", source
        )
        return Framing.NONE
    if not caps.framing:
        raise BackendError(
            f"`{describe(option)}` ({source}) needs compression framing, which the {backend} data channel "
            "cannot apply: run with --dco userspace, or remove comp-lzo/compress on the server"
        )
    if option is not opts.compression:
        # configured framing was reported when the backend was chosen; a pushed one is news
        log.info(
            "DCO: kernel data channel not used: the server pushed `%s` (compression framing, which "
            "the kernel ovpn driver lacks); this session runs on the %s data channel",
            describe(option),
            backend,
        )
    log.info(
        "Data Channel: compression framing '%s' (%s); outgoing packets are not compressed",
        describe(option),
        source,
    )
    return framing
