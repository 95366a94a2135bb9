"""PUSH_REPLY: merging continuations and parsing the pushed options a pull client applies."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from pyovpn.datachannel.api import SHAPER_MAX, SHAPER_MIN, Framing
from pyovpn.errors import ProtocolError
from pyovpn.proto.redirect import REDIRECT_OPTIONS, BadRedirectFlag, RedirectFlags, add_redirect

ROUTE_KEYWORDS = ("vpn_gateway", "net_gateway", "remote_host")


@dataclass
class PushedOptions:
    ifconfig: tuple[str, str] | None = None  # (local, netmask-or-remote)
    ifconfig_ipv6: tuple[str, str | None] | None = None  # ("addr/len", remote)
    # (network, netmask, gateway, metric); network/gateway may be net_gateway, remote_host, vpn_gateway
    routes: list[tuple[str, str, str | None, int | None]] = field(default_factory=list)
    routes_ipv6: list[tuple[str, str | None, int | None]] = field(
        default_factory=list
    )  # ("net/len", gw, metric)
    route_gateway: str | None = None
    route_metric: int | None = None
    redirects: list[tuple[str, ...]] = field(default_factory=list)  # ("redirect-gateway", "def1", ...)
    topology: str = "net30"
    peer_id: int | None = None
    cipher: str | None = None
    ping: int | None = None
    ping_restart: int | None = None
    tls_ekm: bool = False
    cc_exit: bool = False
    dyn_tls_crypt: bool = False
    aead_epoch: bool = False
    tun_mtu: int | None = None
    explicit_exit_notify: int | None = None
    auth_token: str | None = None
    auth_token_user: str | None = None  # base64, as pushed
    compression: tuple[str, str] | None = None  # pushed comp-lzo/compress and its argument ("" for none)
    shaper: int | None = None  # pushed `shaper N` (bytes per second)
    dns_lines: list[str] = field(default_factory=list)  # pushed `dhcp-option ...`/`dns ...`, see dnsopts
    ignored: list[str] = field(default_factory=list)


def split_push_message(message: str) -> tuple[list[str], bool]:
    """Options of one ``PUSH_REPLY,…`` message and whether more messages follow (push-continuation 2)."""
    if not message.startswith("PUSH_REPLY"):
        raise ProtocolError("not a PUSH_REPLY")
    rest = message[len("PUSH_REPLY") :]
    if rest and not rest.startswith(","):
        raise ProtocolError("malformed PUSH_REPLY")
    opts = [o.strip() for o in rest[1:].split(",") if o.strip()]
    more = False
    kept = []
    for o in opts:
        if o.startswith("push-continuation"):
            more = o.split()[-1] == "2"
        else:
            kept.append(o)
    return kept, more


def _int(words: list[str], idx: int, name: str) -> int:
    try:
        return int(words[idx])
    except (IndexError, ValueError):
        raise ProtocolError(f"pushed option {name!r} needs an integer argument") from None


def _ip(value: str, name: str, *, v6: bool = False) -> str:
    try:
        if v6:
            ipaddress.IPv6Interface(value)
        else:
            ipaddress.IPv4Address(value)
    except ValueError:
        raise ProtocolError(f"pushed option {name!r} has a bad address {value!r}") from None
    return value


def parse_pushed_options(options: list[str]) -> PushedOptions:
    """Interpret pushed options; unknown or irrelevant ones are kept in ``ignored``."""
    p = PushedOptions()
    for opt in options:
        words = opt.split()
        if not words:
            continue
        name = words[0]
        if name == "ifconfig" and len(words) >= 3:
            p.ifconfig = (_ip(words[1], name), _ip(words[2], name))
        elif name == "ifconfig-ipv6" and len(words) >= 2:
            p.ifconfig_ipv6 = (_ip(words[1], name, v6=True), words[2] if len(words) > 2 else None)
        elif name == "route" and len(words) >= 2:
            mask = words[2] if len(words) > 2 and words[2] != "default" else "255.255.255.255"
            gw = words[3] if len(words) > 3 and words[3] not in ("vpn_gateway", "default") else None
            metric = _int(words, 4, name) if len(words) > 4 and words[4] != "default" else None
            network = words[1] if words[1] in ROUTE_KEYWORDS else _ip(words[1], name)
            gateway = gw if gw is None or gw in ROUTE_KEYWORDS else _ip(gw, name)
            p.routes.append((network, _ip(mask, name), gateway, metric))
        elif name == "route-ipv6" and len(words) >= 2:
            gw6 = words[2] if len(words) > 2 and words[2] not in ("vpn_gateway", "default") else None
            metric = _int(words, 3, name) if len(words) > 3 and words[3] != "default" else None
            if gw6 is not None and gw6 != "net_gateway":
                _ip(gw6, name, v6=True)
            p.routes_ipv6.append((_ip(words[1], name, v6=True), gw6, metric))
        elif name == "route-metric":
            p.route_metric = _int(words, 1, name)
        elif name in REDIRECT_OPTIONS:
            try:
                add_redirect(RedirectFlags(), name, words[1:])
            except BadRedirectFlag:
                p.ignored.append(opt)  # as OpenVPN: an option error in a push skips that option
                continue
            p.redirects.append(tuple(words))
        elif name == "route-gateway" and len(words) >= 2:
            p.route_gateway = words[1] if words[1] != "dhcp" else None
        elif name == "topology" and len(words) >= 2:
            if words[1] not in ("net30", "p2p", "subnet"):
                raise ProtocolError(f"pushed topology {words[1]!r} is unknown")
            p.topology = words[1]
        elif name == "peer-id":
            p.peer_id = _int(words, 1, name)
            if not 0 <= p.peer_id <= 0xFFFFFF:
                raise ProtocolError("pushed peer-id out of range")
        elif name == "cipher" and len(words) >= 2:
            p.cipher = words[1].upper()
        elif name == "ping":
            p.ping = _int(words, 1, name)
        elif name == "ping-restart":
            p.ping_restart = _int(words, 1, name)
        elif name == "key-derivation" and len(words) >= 2:
            p.tls_ekm = p.tls_ekm or words[1] == "tls-ekm"
        elif name == "protocol-flags":
            flags = set(words[1:])
            p.tls_ekm = p.tls_ekm or "tls-ekm" in flags
            p.cc_exit = "cc-exit" in flags
            p.dyn_tls_crypt = "dyn-tls-crypt" in flags
            p.aead_epoch = "aead-epoch" in flags
        elif name == "tun-mtu":
            p.tun_mtu = _int(words, 1, name)
        elif name == "explicit-exit-notify":
            p.explicit_exit_notify = _int(words, 1, name) if len(words) > 1 else 1
        elif name == "auth-token" and len(words) >= 2:
            p.auth_token = words[1]
        elif name == "auth-token-user" and len(words) >= 2:
            p.auth_token_user = words[1]
        elif name in ("comp-lzo", "compress") and len(words) <= 2:
            p.compression = (name, words[1] if len(words) > 1 else "")
            try:
                Framing.from_option(p.compression)
            except ValueError:
                raise ProtocolError(
                    f"pushed option {opt!r} is a compression setting pyovpn does not know"
                ) from None
        elif name in ("dhcp-option", "dns"):
            p.dns_lines.append(" ".join(words))
        elif name == "shaper" and len(words) == 2 and words[1].isascii() and words[1].isdigit():
            # isascii: str.isdigit() also takes digits such as '²' that int() refuses
            if not SHAPER_MIN <= int(words[1]) <= SHAPER_MAX:
                p.ignored.append(opt)  # as OpenVPN: an option error in a push skips that option
                continue
            p.shaper = int(words[1])
        else:
            p.ignored.append(opt)
    return p
