"""What `redirect-gateway`/`redirect-private` flags and `pull-filter`/`route-nopull` mean, as text rules.

Both the local options and a PUSH_REPLY use these, so they live below config and the edge. The flag
semantics follow OpenVPN 2.6: the options add up (a pushed redirect-gateway adds to a local one),
`!ipv4` turns the IPv4 part off again, and `redirect-private` enables the server host route and
block-local without moving the default route.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

REDIRECT_OPTIONS = ("redirect-gateway", "redirect-private")
REDIRECT_FLAGS = ("local", "autolocal", "def1", "bypass-dhcp", "bypass-dns", "block-local", "ipv6", "!ipv4")

#: pushed options that `route-nopull` drops (OpenVPN's route and DHCP/DNS option classes)
NOPULL_OPTIONS = frozenset(
    {
        "route",
        "route-ipv6",
        "route-metric",
        "redirect-gateway",
        "redirect-private",
        "block-ipv6",
        "client-nat",
        "dhcp-option",
        "dns",
        "block-outside-dns",
        "tap-sleep",
        "dhcp-renew",
        "dhcp-pre-release",
        "register-dns",
    }
)

PullFilterAction = Literal["accept", "ignore", "reject"]


@dataclass(frozen=True)
class RedirectFlags:
    """The accumulated redirect state; ``enabled`` is OpenVPN's RG_ENABLE, ``reroute_v4`` RG_REROUTE_GW."""

    enabled: bool = False
    reroute_v4: bool = False
    reroute_v6: bool = False
    def1: bool = False
    local: bool = False
    autolocal: bool = False
    bypass_dhcp: bool = False
    bypass_dns: bool = False
    block_local: bool = False


#: the flags that turn one field of :class:`RedirectFlags` on
_FLAG_FIELDS = {
    "local": "local",
    "autolocal": "autolocal",
    "def1": "def1",
    "bypass-dhcp": "bypass_dhcp",
    "bypass-dns": "bypass_dns",
    "block-local": "block_local",
    "ipv6": "reroute_v6",
}


class BadRedirectFlag(ValueError):
    """A redirect option with a flag OpenVPN does not know."""


def add_redirect(flags: RedirectFlags, name: str, words: Sequence[str]) -> RedirectFlags:
    """``flags`` with one `redirect-gateway`/`redirect-private FLAGS...` added; unknown flags raise."""
    f = replace(flags, enabled=True, reroute_v4=flags.reroute_v4 or name == "redirect-gateway")
    for word in words:
        if word == "!ipv4":
            f = replace(f, enabled=False, reroute_v4=False)
        elif word in _FLAG_FIELDS:
            f = replace(f, **{_FLAG_FIELDS[word]: True})
        else:
            raise BadRedirectFlag(f"unknown {name} flag {word!r}; known flags: {', '.join(REDIRECT_FLAGS)}")
    return f


def redirect_from(options: Iterable[tuple[str, ...]], start: RedirectFlags | None = None) -> RedirectFlags:
    """The flags of several ``(name, flag...)`` options applied in order."""
    flags = start or RedirectFlags()
    for name, *words in options:
        flags = add_redirect(flags, name, words)
    return flags


@dataclass(frozen=True)
class FilterResult:
    kept: list[str]
    removed: list[str]  # by `pull-filter ignore` or `route-nopull`, for the log
    rejected: str | None = None  # the first option a `pull-filter reject` matched


def filter_pushed(
    options: Sequence[str], filters: Sequence[tuple[PullFilterAction, str]], *, route_nopull: bool
) -> FilterResult:
    """Apply `pull-filter`s (first matching text prefix decides) and `route-nopull` to pushed options."""
    kept: list[str] = []
    removed: list[str] = []
    for line in options:
        verdict: PullFilterAction = "accept"
        for action, pattern in filters:
            if line.startswith(pattern):
                verdict = action
                break
        if verdict == "reject":
            return FilterResult(kept, removed, rejected=line)
        name = line.split(maxsplit=1)[0] if line.strip() else ""
        if verdict == "ignore" or (route_nopull and name in NOPULL_OPTIONS):
            removed.append(line)
        else:
            kept.append(line)
    return FilterResult(kept, removed)
