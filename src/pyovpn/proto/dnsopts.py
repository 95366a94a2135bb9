"""DNS settings from `dhcp-option` and OpenVPN 2.6's `dns` option, local or pushed (sans-I/O).

Both spellings end up in one :class:`DnsSettings`. The `dns` option's servers and search domains
win over `dhcp-option DNS`/`DOMAIN-SEARCH` when both are given, as in OpenVPN 2.6. Only the parts that a
Linux resolver can carry out are modelled; other `dhcp-option` kinds (WINS, NBT, NTP, ...) are
Windows-only and kept as text so the caller can say they had no effect.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from pyovpn.errors import ProtocolError

# dhcp-option kinds that configure a resolver; the rest only matter to Windows DHCP.
RESOLVER_KINDS = ("DNS", "DNS6", "DOMAIN", "DOMAIN-SEARCH", "ADAPTER_DOMAIN_SUFFIX")
WINDOWS_ONLY_KINDS = ("WINS", "NBDD", "NTP", "NBT", "NBS", "DISABLE-NBT", "PROXY_HTTP")
MAX_DNS_SERVER_PRIORITY = 127  # OpenVPN 2.6 refuses server priorities outside -128..127


@dataclass
class DnsServer:
    priority: int
    addresses: list[str] = field(default_factory=list)  # bare addresses; ports are not supported


@dataclass
class DnsSettings:
    """The resolver configuration gathered from all `dhcp-option`/`dns` lines."""

    dhcp_servers: list[str] = field(default_factory=list)  # from dhcp-option DNS/DNS6, in order
    dns_servers: dict[int, DnsServer] = field(default_factory=dict)  # from `dns server N ...`
    domain: str | None = None  # dhcp-option DOMAIN / ADAPTER_DOMAIN_SUFFIX: the link's own domain
    search: list[str] = field(default_factory=list)  # from dhcp-option DOMAIN-SEARCH
    dns_search: list[str] = field(default_factory=list)  # from `dns search-domains`: replaces `search`
    windows_only: list[str] = field(default_factory=list)  # dhcp-option lines with no effect here

    @property
    def servers(self) -> list[str]:
        """Name servers in use order: `dns server` by priority, else the `dhcp-option DNS` ones."""
        if self.dns_servers:
            return [a for _, s in sorted(self.dns_servers.items()) for a in s.addresses]
        return list(self.dhcp_servers)

    @property
    def domains(self) -> list[str]:
        """Search domains, the link's own domain first."""
        out = [self.domain] if self.domain else []
        return out + [d for d in (self.dns_search or self.search) if d not in out]

    def foreign_options(self) -> list[str]:
        """`dhcp-option` lines as OpenVPN 2.6 exports them once a `dns` option is in play.

        The `dns` servers and search domains then replace `dhcp-option DNS`/`DOMAIN-SEARCH`
        (observed with stock 2.6.14: DOMAIN first, then the servers, then the search domains).
        """
        out = [f"dhcp-option DOMAIN {self.domain}"] if self.domain else []
        out += [f"dhcp-option {'DNS6' if ':' in a else 'DNS'} {a}" for a in self.servers]
        out += [f"dhcp-option DOMAIN-SEARCH {d}" for d in (self.dns_search or self.search)]
        return out + self.windows_only

    def is_empty(self) -> bool:
        return not self.servers and not self.domains


def _address(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ProtocolError(f"{where}: {value!r} is not an IPv4 or IPv6 address") from None


def _domain(value: str, where: str) -> str:
    name = value.rstrip(".")
    labels = name.split(".")
    if not name or any(
        not lbl or len(lbl) > 63 or not all(c.isalnum() or c in "-_" for c in lbl) for lbl in labels
    ):
        raise ProtocolError(f"{where}: {value!r} is not a domain name")
    return name


def add_dhcp_option(s: DnsSettings, words: list[str]) -> None:
    """Apply one `dhcp-option KIND VALUE` (``words`` without the option name)."""
    line = "dhcp-option " + " ".join(words)
    if not words:
        raise ProtocolError("dhcp-option needs a kind, e.g. `dhcp-option DNS 10.8.0.1`")
    kind = words[0].upper()
    if kind in WINDOWS_ONLY_KINDS:
        s.windows_only.append(line)
        return
    if kind not in RESOLVER_KINDS:
        raise ProtocolError(
            f"{line!r}: unknown kind {words[0]!r}; use one of "
            + ", ".join(RESOLVER_KINDS + WINDOWS_ONLY_KINDS)
        )
    if len(words) < 2:
        raise ProtocolError(f"{line!r} needs a value, e.g. `dhcp-option {kind} ...`")
    if kind in ("DNS", "DNS6"):
        addr = _address(words[1], line)
        if (kind == "DNS6") != (":" in addr):
            raise ProtocolError(f"{line!r}: DNS takes an IPv4 address, DNS6 an IPv6 address")
        if addr not in s.dhcp_servers:
            s.dhcp_servers.append(addr)
    elif kind in ("DOMAIN", "ADAPTER_DOMAIN_SUFFIX"):
        s.domain = _domain(words[1], line)
    else:  # DOMAIN-SEARCH: one domain per option
        name = _domain(words[1], line)
        if name not in s.search:
            s.search.append(name)


def add_dns_option(s: DnsSettings, words: list[str]) -> None:
    """Apply one OpenVPN 2.6 `dns ...` line (``words`` without the option name).

    Accepted: `dns search-domains D...`, `dns server N address A...`; `dns server N resolve-domains`,
    `dnssec`, `transport`, `sni` are refused because pyovpn cannot carry them out.
    """
    line = "dns " + " ".join(words)
    if len(words) >= 2 and words[0] == "search-domains":
        for d in words[1:]:
            name = _domain(d, line)
            if name not in s.dns_search:
                s.dns_search.append(name)
        return
    if len(words) >= 4 and words[0] == "server":
        try:
            prio = int(words[1])
        except ValueError:
            raise ProtocolError(f"{line!r}: the server priority must be a number") from None
        if not -MAX_DNS_SERVER_PRIORITY - 1 <= prio <= MAX_DNS_SERVER_PRIORITY:
            raise ProtocolError(f"{line!r}: the server priority must be between -128 and 127")
        if words[2] != "address":
            raise ProtocolError(
                f"{line!r}: pyovpn carries out only `dns server N address ADDR...`; "
                f"`{words[2]}` is not supported (remove it, or use `dhcp-option DNS ADDR`)"
            )
        server = s.dns_servers.setdefault(prio, DnsServer(prio))
        for a in words[3:]:
            if a.startswith("[") or a.count(":") == 1:
                raise ProtocolError(f"{line!r}: a DNS server port is not supported; give the bare address")
            addr = _address(a, line)
            if addr not in server.addresses:
                server.addresses.append(addr)
        return
    raise ProtocolError(
        f"{line!r}: not understood; use `dns search-domains DOMAIN...` or `dns server N address ADDR...`"
    )


def parse_dns_lines(lines: list[str]) -> DnsSettings:
    """One settings object from option lines (`dhcp-option ...`/`dns ...`); others are skipped."""
    s = DnsSettings()
    for line in lines:
        words = line.split()
        if not words:
            continue
        if words[0] == "dhcp-option":
            add_dhcp_option(s, words[1:])
        elif words[0] == "dns":
            add_dns_option(s, words[1:])
    return s


def resolv_conf_fragment(s: DnsSettings) -> str:
    """The resolv.conf lines for these settings (resolvconf input or a whole /etc/resolv.conf)."""
    out = [f"nameserver {a}" for a in s.servers[:3]]  # the libc resolver reads at most three
    if s.domains:
        out.append("search " + " ".join(s.domains))
    return "".join(line + "\n" for line in out)
