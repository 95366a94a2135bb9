"""Saying out loud which pushed options pyovpn does not carry out, so none is silently dropped."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pyovpn.proto.push import PushedOptions

log = logging.getLogger("pyovpn")

# Windows-only in OpenVPN too: nothing to do on Linux, but still worth one line in the log
_WINDOWS_ONLY = frozenset(
    {"block-outside-dns", "register-dns", "dhcp-renew", "dhcp-pre-release", "tap-sleep"}
)


def warn_unapplied(pushed: PushedOptions, handled: Iterable[str] = ()) -> list[str]:
    """Log a warning for each pushed option in ``pushed.ignored`` whose name is not in ``handled``.

    ``handled`` names the options another part of the edge carries out itself (e.g. DNS), so they
    are not reported. Returns the options warned about.
    """
    done = set(handled)
    warned = []
    for line in pushed.ignored:
        name = line.split(maxsplit=1)[0] if line.strip() else line
        if name in done:
            continue
        warned.append(line)
        if name in _WINDOWS_ONLY:
            log.warning("pushed option '%s' only has an effect on Windows; it is not applied here", line)
            continue
        log.warning(
            "pushed option '%s' is not applied by pyovpn; configure its effect locally if you need it, "
            'or add `pull-filter ignore "%s"` to the config to accept that it is dropped',
            line,
            name,
        )
    return warned
