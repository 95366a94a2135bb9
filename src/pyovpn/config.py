"""OpenVPN configuration syntax: config files and command lines in, one validated frozen `Options` out.

The pipeline has three stages:

1. `tokenize` splits text into `Directive`s (source, line, name, args) with OpenVPN's quoting,
   comment and inline-block (`<ca>` ... `</ca>`) rules (OpenVPN's `parse_line`/`read_config_file`).
2. The applier folds directives, in order, into a mutable `_Builder`; later options override earlier
   ones, `config FILE` includes are expanded where they occur, and file arguments are read at once.
3. `_Builder.validate` does the cross-option checks and produces the frozen `Options`, expanding
   OpenVPN's helper directives (`server`, `server-ipv6`, and `keepalive` in server mode) into the
   settings they stand for so that nothing downstream has to recompute them.

Per-client files of a P2MP server's `client-config-dir` are read separately by `parse_ccd`.

Every problem is reported as `pyovpn.errors.ConfigError` naming the option, where it came from and
what to do about it. Anything pyovpn cannot do (sending compressed packets, tap, non-AEAD
ciphers, static-key mode, proxies, ...) is refused loudly rather than silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, cast

from pyovpn.datachannel.api import SHAPER_MAX, SHAPER_MIN
from pyovpn.errors import ConfigError, ProtocolError
from pyovpn.proto import dnsopts, tlscryptv2
from pyovpn.proto.redirect import BadRedirectFlag, PullFilterAction, add_redirect, redirect_from

__all__ = [
    "AEAD_CIPHERS",
    "CcdOptions",
    "Directive",
    "Options",
    "Proto",
    "Remote",
    "Route",
    "RouteV6",
    "load_static_key",
    "parse_args",
    "parse_ccd",
    "parse_config_text",
    "tokenize",
]

Proto = Literal["udp", "tcp-client", "tcp-server"]
Family = Literal[4, 6] | None

#: Data-channel ciphers pyovpn can run (both the kernel ovpn module and the userspace data plane).
AEAD_CIPHERS: tuple[str, ...] = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")

#: `auth` digests usable for tls-auth HMACs.
_DIGESTS = ("SHA1", "SHA256", "SHA384", "SHA512")

COMMAND_LINE = "command line"
_MAX_INCLUDE_DEPTH = 10  # same limit as OpenVPN's read_config_file
_MAX_FILE_SIZE = 4 * 1024 * 1024  # guards against `ca /dev/zero` and friends
_STATIC_KEY_LEN = 256
_STATIC_KEY_HEAD = "-----BEGIN OpenVPN Static key V1-----"
_STATIC_KEY_FOOT = "-----END OpenVPN Static key V1-----"
_GENKEY_HINT = "generate a fresh one with `openvpn --genkey secret ta.key` and use it on both peers"

# C isspace() in the "C" locale; Python's str.isspace() also accepts Unicode spaces, OpenVPN does not.
_SPACE = frozenset(" \t\n\v\f\r")
_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_TAG_LINE_RE = re.compile(r"[ \t\v\f\r]*<(/?)([A-Za-z0-9_-]+)>[ \t\v\f\r]*", re.ASCII)


# --------------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """One `remote HOST [PORT [PROTO]]` entry; None means "use the global setting"."""

    host: str
    port: int | None = None
    proto: Proto | None = None
    #: 4 or 6 when the per-remote proto forces an address family (`udp4`, `tcp6-client`, ...).
    family: Literal[4, 6] | None = None
    #: Set by a `<connection>` block (its own connect-retry / server-poll-timeout); None: the global one.
    connect_retry: int | None = None
    connect_retry_max_seconds: int | None = None
    server_poll_timeout: int | None = None


@dataclass(frozen=True)
class Route:
    """One IPv4 `route NETWORK [NETMASK [GATEWAY [METRIC]]]`.

    network/gateway may also be OpenVPN's special words `vpn_gateway`, `net_gateway`, `remote_host`.
    """

    network: str
    netmask: str = "255.255.255.255"
    gateway: str | None = None
    metric: int | None = None


@dataclass(frozen=True)
class RouteV6:
    """One `route-ipv6 NETWORK/BITS [GATEWAY [METRIC]]`; network always carries a /prefix."""

    network: str
    gateway: str | None = None
    metric: int | None = None


@dataclass(frozen=True)
class Directive:
    """One option occurrence: `name args...` from `source` at `line` (0 for the command line).

    For an inline block (`<ca>...</ca>`) `inline` is True and `args` is the one-element block body.
    `base_dir` is the directory of the config file it came from, for resolving relative paths.
    """

    source: str
    line: int
    name: str
    args: tuple[str, ...]
    inline: bool = False
    base_dir: str | None = None


@dataclass(frozen=True)
class Options:
    """The validated configuration. Defaults are OpenVPN's defaults.

    In server mode the helper directives are already expanded: `ifconfig`, `ifconfig_ipv6`,
    `ifconfig_pool`, `ifconfig_ipv6_pool`, `ping`/`ping_restart` and `push` hold what `server`,
    `server-ipv6` and `keepalive` stand for, exactly as OpenVPN's helper computes them.

    Secret material (key, tls_auth, tls_crypt, auth_user_pass) is kept out of repr() so that logging
    an Options never leaks it.
    """

    config_sources: tuple[str, ...] = ()
    #: "server" for a P2MP server (`mode server`, or implied by `server`/`server-ipv6`).
    mode: Literal["p2p", "server"] = "p2p"
    pull: bool = False
    tls_role: Literal["client", "server"] | None = None
    dev: str = "tun"
    dev_type: str = "tun"
    proto: Proto = "udp"
    family: Literal[4, 6] | None = None
    remotes: tuple[Remote, ...] = ()
    #: The connection list's timers and order (see pyovpn.connlist); OpenVPN's defaults.
    remote_random: bool = False
    remote_random_hostname: bool = False
    connect_retry: int = 1
    connect_retry_max_seconds: int = 300
    connect_retry_max: int = 0  # 0: try forever
    server_poll_timeout: int = 120
    resolv_retry: int | None = None  # None: infinite
    port: int = 1194
    #: Set only by an explicit `lport`/`rport` after the last `port`; see local_port / remote_port_for.
    lport: int | None = None
    rport: int | None = None
    local: str | None = None
    nobind: bool = False
    ifconfig: tuple[str, str] | None = None
    ifconfig_ipv6: tuple[str, str] | None = None
    routes: tuple[Route, ...] = ()
    routes_ipv6: tuple[RouteV6, ...] = ()
    #: `redirect-gateway`/`redirect-private` as given: (option name, flag, ...), in order
    redirects: tuple[tuple[str, ...], ...] = ()
    route_gateway: str | None = None
    route_metric: int | None = None
    route_nopull: bool = False
    route_noexec: bool = False
    ifconfig_noexec: bool = False
    pull_filters: tuple[tuple[PullFilterAction, str], ...] = ()
    topology: Literal["net30", "p2p", "subnet"] = "net30"
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    #: Recorded only: pyovpn uses ECDHE. "none", the file path as given, or "inline".
    dh: str | None = None
    tls_auth: bytes | None = field(default=None, repr=False)
    key_direction: int | None = None
    tls_crypt: bytes | None = field(default=None, repr=False)
    #: `tls-crypt-v2 FILE`: a client key (Kc + WKc) or, on a server, the server key.
    tls_crypt_v2_client: tlscryptv2.ClientKey | None = field(default=None, repr=False)
    tls_crypt_v2_server: tlscryptv2.ServerKey | None = field(default=None, repr=False)
    # kept out of repr() with the keys: repr must not name any tls-crypt field (see its test)
    tls_crypt_v2_verify: str | None = field(default=None, repr=False)
    tls_crypt_v2_max_age: int | None = field(default=None, repr=False)
    remote_cert_tls: Literal["server", "client"] | None = None
    verify_x509_name: tuple[str, str] | None = None
    data_ciphers: tuple[str, ...] = AEAD_CIPHERS
    data_ciphers_fallback: str | None = None
    #: `cipher`: AEAD, or a CBC cipher used only as the fallback for peers that do not negotiate
    cipher: str | None = None
    #: CBC ciphers named in `data-ciphers`: not offered (the daemon logs that)
    unoffered_ciphers: tuple[str, ...] = ()
    auth: str = "SHA1"
    #: `comp-lzo [ARG]` / `compress [ALG]` as (option, argument or ""): the compression framing
    #: the data channel applies (pyovpn never compresses; it decompresses what it receives).
    compression: tuple[str, str] | None = None
    #: `passtos`: each outgoing packet's TOS/DSCP is copied to the outer packet (userspace data plane)
    passtos: bool = False
    #: `fragment MAX [mtu]`: the largest UDP payload OpenVPN's own fragmentation lets out (0: off)
    fragment: int = 0
    #: `shaper N`: the tunnel datagrams sent to the peer held to N bytes per second (0: off; P2P)
    shaper: int = 0
    #: `allow-compression no|asym|yes` as given ("" when absent).
    allow_compression: str = ""
    reneg_sec: int = 3600
    #: `keepalive PING RESTART` as given; ping/ping_restart hold what it stands for.
    keepalive: tuple[int, int] | None = None
    ping: int = 0
    ping_restart: int = 0
    #: `ping-exit N`: ping_restart holds N, and a silent peer ends the process instead of restarting.
    ping_exit: bool = False
    #: `inactive SECONDS [BYTES]`: exit once a period passes with no more than BYTES of tunnel traffic.
    inactive: tuple[int, int] | None = None
    tun_mtu: int = 1500
    mssfix: int | None = None
    explicit_exit_notify: int = 0
    # a None part is asked of the user when connecting (edge/credentials.py)
    auth_user_pass: tuple[str | None, str | None] | None = field(default=None, repr=False)
    auth_nocache: bool = False
    ns_cert_type: str | None = None
    #: auth-gen-token (lifetime s, renewal s (0 = reneg-sec), external-auth) and its secret (PEM)
    auth_gen_token: tuple[int, int, bool] | None = None
    auth_gen_token_secret: bytes | None = field(default=None, repr=False)
    auth_retry: str = "none"
    static_challenge: tuple[str, bool] | None = None
    askpass: str | None = None  # "" = ask the user for the key passphrase
    pkcs12: bytes | None = field(default=None, repr=False)
    verb: int = 1
    log: str | None = None
    log_append: str | None = None
    writepid: str | None = None
    #: `status FILE [N]`: write the status file every N seconds (OpenVPN's default 60).
    status_file: str | None = None
    status_interval: int = 60
    #: `status-version 1|2|3`: the server's status layout (a P2P/client status is the same in all).
    status_version: int = 1
    #: `suppress-timestamps`: log lines without the date (journald adds its own).
    suppress_timestamps: bool = False
    #: `syslog [NAME]` / `daemon [NAME]`: log to syslog under NAME (default "pyovpn").
    syslog: str | None = None
    #: `daemon [NAME]`: detach from the terminal after the configuration is read.
    daemon: bool = False
    #: `cd DIR`: the working directory (relative files after it, scripts, the status file).
    cd: str | None = None
    #: `chroot DIR`: the process's root after the first tunnel is up (files and scripts used later,
    #: e.g. `up` with `up-restart`, are looked up inside it, as with OpenVPN).
    chroot: str | None = None
    #: `up-restart`: run `up`/`down` again on every restart, not only when the pulled options change.
    up_restart: bool = False
    #: `management IP PORT [pw-file]` -> ("IP", PORT); `management PATH unix [pw-file]` -> unix path.
    management: tuple[str, int] | None = None
    management_unix: str | None = None
    management_password_file: str | None = None
    #: `management-hold`: wait for `hold release` on the management interface before connecting.
    management_hold: bool = False
    #: `management-log-cache N`: how many log/state/echo lines `log all` & co. replay.
    management_log_cache: int = 1000
    #: `management-client-user U` / `management-client-group G`: owner of the unix socket.
    management_client_user: str | None = None
    management_client_group: str | None = None
    #: `management-client-auth`: a management client accepts or denies each connecting client.
    management_client_auth: bool = False
    #: `management-query-passwords`: the username/password `auth-user-pass` lacks are asked over
    #: the management interface (`>PASSWORD:Need 'Auth' username/password`), not on the terminal.
    management_query_passwords: bool = False
    #: `management-forget-disconnect`: a management client leaving makes pyovpn forget the
    #: passwords and auth-token it was given (the next connection asks again).
    management_forget_disconnect: bool = False
    #: `pyovpn-metrics [HOST:]PORT`: a Prometheus endpoint (prometheus-client), default host 127.0.0.1.
    metrics: tuple[str, int] | None = None
    #: `pyovpn-events FILE`: connect/disconnect/rekey events appended as JSON lines.
    events_file: str | None = None
    persist_tun: bool = False
    persist_key: bool = False
    dco: Literal["auto", "kernel", "userspace"] = "auto"
    #: `engine-workers N`: worker processes of the multi-process userspace engine (None: one per CPU).
    engine_workers: int | None = None
    #: `userspace-engine`: the userspace data channel's shape; "inprocess" forces the in-process
    #: backend everywhere, "multiprocess" uses the engine wherever it can (P2P, clients, P2MP
    #: servers), "auto" the engine except for a P2MP server (see edge/backendfit.py).
    userspace_engine: Literal["auto", "multiprocess", "inprocess"] = "auto"
    tls_timeout: int = 2
    hand_window: int = 60
    tran_window: int = 3600
    replay_window: tuple[int, int] = (64, 15)
    mute_replay_warnings: bool = False
    tls_version_min: str | None = None
    #: `tls-groups`: the key exchange groups TLS may use, in order of preference (OpenSSL names)
    tls_groups: str | None = None
    tls_cert_profile: str | None = None
    user: str | None = None
    group: str | None = None
    #: Accept authenticated packets from a new peer address (`float`).
    float_: bool = False
    #: PEM content of `crl-verify` (file or inline <crl-verify>).
    crl_verify: bytes | None = None
    #: Where `crl-verify` reads from, re-checked at each handshake: (path, is a `dir` of serials).
    crl_verify_source: tuple[str, bool] | None = None
    # -- P2MP server ------------------------------------------------------------------------------
    #: `server NETWORK NETMASK [nopool]`: (network, netmask) as given; already expanded into
    #: ifconfig, ifconfig_pool and push.
    server_network: tuple[str, str] | None = None
    server_nopool: bool = False
    #: `server-ipv6 NETWORK/BITS` (normalized); already expanded into ifconfig_ipv6,
    #: ifconfig_ipv6_pool and push.
    server_ipv6: str | None = None
    #: (first, last, netmask or None) addresses handed out to clients.
    ifconfig_pool: tuple[str, str, str | None] | None = None
    #: "FIRST_ADDRESS/BITS" of the IPv6 pool.
    ifconfig_ipv6_pool: str | None = None
    #: (file, seconds between writes; 0 = only read at startup).
    ifconfig_pool_persist: tuple[str, int] | None = None
    #: Options pushed to every client, in order: the config's `push "..."` lines verbatim, then those
    #: added by the helpers (`tun-ipv6`; `route-gateway NET+1`, `topology subnet`; `ping A`,
    #: `ping-restart B` from `keepalive A B`), as in OpenVPN's push list.
    push: tuple[str, ...] = ()
    #: Directory of per-client files (see parse_ccd), resolved like file arguments.
    client_config_dir: str | None = None
    ccd_exclusive: bool = False
    client_to_client: bool = False
    duplicate_cn: bool = False
    max_clients: int = 1024
    verify_client_cert: Literal["none", "optional", "require"] = "require"
    username_as_common_name: bool = False
    # -- scripts (only with script_security >= 2); each is one command line, words joined by spaces --
    script_security: int = 1
    #: (command, "via-env" | "via-file")
    auth_user_pass_verify: tuple[str, str] | None = None
    tls_verify: str | None = None
    client_connect: str | None = None
    client_disconnect: str | None = None
    learn_address: str | None = None
    up: str | None = None
    down: str | None = None
    route_up: str | None = None  # after `up` and the routes, no arguments (as OpenVPN 2.6)
    # -- DNS: local `dhcp-option`/`dns` lines as written (parsed by proto.dnsopts) --
    dns_lines: tuple[str, ...] = ()
    #: `pyovpn-dns auto` applies DNS settings to the system resolver; `off` leaves that to scripts.
    pyovpn_dns: Literal["auto", "off"] = "auto"
    # -- logging and lifecycle details the corpus of published configs uses ----------------------
    #: `down-pre`: run `down` before the device is closed rather than after.
    down_pre: bool = False
    #: `mute N`: at most N consecutive log lines of one kind (0: no limit).
    mute: int = 0
    #: `remote-cert-ku [HEX...]`: the peer certificate's key usage (empty tuple: only present).
    remote_cert_ku: tuple[int, ...] | None = None
    #: `remote-cert-eku OID`: an extended key usage the peer certificate must list.
    remote_cert_eku: str | None = None
    #: `sndbuf N` / `rcvbuf N`: transport socket buffer sizes in bytes (0: the system's).
    sndbuf: int = 0
    rcvbuf: int = 0
    #: `mark N`: firewall mark of the transport socket's packets (0: none).
    mark: int = 0
    #: `bind-dev DEV`: the interface the transport socket is bound to.
    bind_dev: str | None = None
    #: `tls-version-max`: the highest TLS version to offer or accept.
    tls_version_max: str | None = None
    #: `nice N`: the process's scheduling priority change.
    nice: int = 0
    #: `tls-cipher`: TLS <= 1.2 suites (OpenVPN or OpenSSL names, see pyovpn.proto.tls_ciphers).
    tls_cipher: str | None = None
    #: `tls-ciphersuites`: TLS 1.3 suites (OpenSSL names).
    tls_ciphersuites: str | None = None
    #: `setenv NAME VALUE` pairs, in order: added to every script's environment.
    setenv: tuple[tuple[str, str], ...] = ()
    #: (option, source, line) of options accepted without effect, so the daemon can warn about them.
    ignored: tuple[tuple[str, str, int], ...] = ()

    @property
    def local_port(self) -> int:
        """The UDP/TCP port to bind locally (`lport`, else `port`)."""
        return self.lport if self.lport is not None else self.port

    def remote_port_for(self, remote: Remote) -> int:
        """The port to contact `remote` on: its own port, else `rport`, else `port`."""
        if remote.port is not None:
            return remote.port
        return self.rport if self.rport is not None else self.port


@dataclass(frozen=True)
class CcdOptions:
    """One client-config-dir file (per-client options of a P2MP server), see `parse_ccd`.

    The server builds a client's push list like OpenVPN: start from the server's `push` list, drop
    it entirely if `push_reset`, else drop every entry that starts with one of `push_remove`
    (the special words "ifconfig"/"ifconfig-ipv6" instead block pushing that address), then append
    `push`. `push` already reflects push-reset/push-remove lines that came after a push line in
    the file.
    """

    #: (client address, netmask); with `topology subnet` the second word is the netmask.
    ifconfig_push: tuple[str, str] | None = None
    #: ("ADDRESS/BITS", server-side address or None for the server's own ifconfig-ipv6 address)
    ifconfig_ipv6_push: tuple[str, str | None] | None = None
    #: (network, netmask) routed to this client.
    iroutes: tuple[tuple[str, str], ...] = ()
    #: "NETWORK/BITS" routed to this client.
    iroutes_ipv6: tuple[str, ...] = ()
    push: tuple[str, ...] = ()
    push_reset: bool = False
    push_remove: tuple[str, ...] = ()
    #: The client is refused.
    disable: bool = False


# --------------------------------------------------------------------------------------------------
# Stage 1: tokenizing
# --------------------------------------------------------------------------------------------------


def _error(d: Directive, message: str) -> ConfigError:
    return ConfigError(message, source=d.source, line=d.line or None)


def split_words(text: str, source: str = "<management>") -> list[str]:
    """One line split into words the way OpenVPN splits config and management lines."""
    return _split_line(text, source, 0)


def _split_line(text: str, source: str, line: int) -> list[str]:
    """Split one config line into words exactly like OpenVPN's parse_line state machine."""
    initial, unquoted, dquoted, squoted = 0, 1, 2, 3
    words: list[str] = []
    word: list[str] = []
    state = initial
    backslash = False
    # "" plays the role of C's terminating NUL: it ends an unquoted word.
    for ch in (*text, ""):
        if not backslash and ch == "\\" and state != squoted:
            backslash = True
            continue
        is_space = ch == "" or ch in _SPACE
        out = ""
        done = False
        if state == initial:
            if not is_space:
                # OpenVPN treats # or ; at the start of any word as a comment, not only at line start.
                if ch in "#;":
                    backslash = False
                    break
                if not backslash and ch == '"':
                    state = dquoted
                elif not backslash and ch == "'":
                    state = squoted
                else:
                    out = ch
                    state = unquoted
        elif state == unquoted:
            if not backslash and is_space:
                done = True
            else:
                out = ch
        elif state == dquoted:
            if not backslash and ch == '"':
                done = True
            else:
                out = ch
        elif ch == "'":
            done = True
        else:
            out = ch
        if done:
            words.append("".join(word))
            word = []
            state = initial
        if backslash and out and out not in '\\"' and out not in _SPACE:
            raise ConfigError(
                f"bad backslash escape '\\{out}': outside single quotes a backslash may only escape "
                '\\, " or a space; write a literal backslash as \\\\ (e.g. "C:\\\\keys\\\\ta.key") '
                "or put the word in single quotes",
                source=source,
                line=line or None,
            )
        backslash = False
        if out:
            word.append(out)
    if state == dquoted:
        raise ConfigError(
            'no closing double quote (") on this line; close the quote or escape a literal quote as \\"',
            source=source,
            line=line or None,
        )
    if state == squoted:
        raise ConfigError(
            "no closing single quote (') on this line; close the quote",
            source=source,
            line=line or None,
        )
    if state != initial:
        raise ConfigError(
            "the line ends with a backslash; remove it (options cannot continue on the next line)",
            source=source,
            line=line or None,
        )
    return words


def tokenize(text: str, *, source: str = "<string>", base_dir: str | None = None) -> list[Directive]:
    """Turn config-file text into directives, collecting `<tag>` ... `</tag>` inline blocks.

    `config` includes are not expanded here; they are ordinary directives for the applier.
    """
    if "\0" in text:
        bad = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(
            "the file contains a NUL byte; is this really an OpenVPN configuration file?",
            source=source,
            line=bad,
        )
    text = text.removeprefix("\ufeff")  # UTF-8 BOM, which OpenVPN also skips
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    directives: list[Directive] = []
    i = 0
    while i < len(lines):
        lineno = i + 1
        words = _split_line(lines[i], source, lineno)
        i += 1
        if not words:
            continue
        name = words[0]
        if len(name) >= 3 and name.startswith("--"):
            name = name[2:]
        if len(words) == 1 and len(name) >= 2 and name.startswith("<") and name.endswith(">"):
            tag = name[1:-1]
            if tag.startswith("/"):
                raise ConfigError(
                    f"closing tag <{tag}> without a matching opening <{tag[1:]}>; "
                    "remove it or add the opening tag",
                    source=source,
                    line=lineno,
                )
            body, i = _read_inline_block(lines, i, tag, source, lineno)
            directives.append(Directive(source, lineno, tag, (body,), inline=True, base_dir=base_dir))
            continue
        directives.append(Directive(source, lineno, name, tuple(words[1:]), base_dir=base_dir))
    return directives


def _read_inline_block(
    lines: list[str], start: int, tag: str, source: str, open_line: int
) -> tuple[str, int]:
    """Collect the body of `<tag>` opened at `open_line`; return it and the index after `</tag>`."""
    close = f"</{tag}>"
    body: list[str] = []
    i = start
    while i < len(lines):
        raw = lines[i]
        stripped = raw.lstrip(" \t\n\v\f\r")
        if stripped.startswith(close):
            return "".join(body), i + 1
        m = _TAG_LINE_RE.fullmatch(raw)
        if m is not None:
            # A key or certificate body never contains a bare tag line, so this is a typo or a
            # forgotten closing tag; OpenVPN would swallow the rest of the file into the block.
            other = ("/" if m.group(1) else "") + m.group(2)
            raise ConfigError(
                f"inline block <{tag}> opened at line {open_line} is not closed: found <{other}> at "
                f"line {i + 1} before {close}; add {close} at the end of the block",
                source=source,
                line=i + 1,
            )
        body.append(raw + "\n")
        i += 1
    raise ConfigError(
        f"inline block <{tag}> is never closed; add {close} after its content",
        source=source,
        line=open_line,
    )


# --------------------------------------------------------------------------------------------------
# Static keys
# --------------------------------------------------------------------------------------------------


class _KeyFormatError(ValueError):
    """A static key text is malformed; the message is meant for the user."""


def load_static_key(text: str, *, source: str) -> bytes:
    """Parse an "OpenVPN Static key V1" text into exactly 256 key bytes (OpenVPN's read_key_file).

    Text before the BEGIN line is ignored; between BEGIN and END only hex digits and whitespace may
    appear. Anything else, or a key that is not exactly 256 bytes, is a ConfigError.
    """
    try:
        return _parse_static_key(text)
    except _KeyFormatError as exc:
        raise ConfigError(str(exc), source=source) from None


def _parse_static_key(text: str) -> bytes:
    lines = text.split("\n")
    start = next((n for n, ln in enumerate(lines) if ln.startswith(_STATIC_KEY_HEAD)), None)
    if start is None:
        raise _KeyFormatError(
            f"not an OpenVPN static key: no '{_STATIC_KEY_HEAD}' line found; "
            f"check that the right file is used, or {_GENKEY_HINT}"
        )
    digits: list[str] = []
    for n in range(start + 1, len(lines)):
        ln = lines[n]
        if ln.startswith("-"):
            if not ln.startswith(_STATIC_KEY_FOOT):
                raise _KeyFormatError(
                    f"static key line {n + 1}: expected '{_STATIC_KEY_FOOT}'; "
                    f"the key looks damaged, copy it again or {_GENKEY_HINT}"
                )
            break
        for ch in ln:
            if ch in _SPACE:
                continue
            if ch not in "0123456789abcdefABCDEF":
                raise _KeyFormatError(
                    f"static key line {n + 1}: invalid character {ch!r} in the hex key data; "
                    f"copy the key again or {_GENKEY_HINT}"
                )
            digits.append(ch)
    else:
        raise _KeyFormatError(
            f"static key has no '{_STATIC_KEY_FOOT}' line; the key is truncated, "
            f"copy it again or {_GENKEY_HINT}"
        )
    if len(digits) != 2 * _STATIC_KEY_LEN:
        raise _KeyFormatError(
            f"static key has {len(digits)} hex digits, expected exactly {2 * _STATIC_KEY_LEN} "
            f"({_STATIC_KEY_LEN} bytes); copy the whole key or {_GENKEY_HINT}"
        )
    return bytes.fromhex("".join(digits))


# --------------------------------------------------------------------------------------------------
# Stage 2: the applier
# --------------------------------------------------------------------------------------------------

Handler = Callable[["_Builder", Directive], None]


@dataclass(frozen=True)
class _Spec:
    handler: Handler
    min_args: int
    max_args: int | None
    usage: str
    inline: bool


_OPTIONS: dict[str, _Spec] = {}


def _option(
    *names: str, args: tuple[int, int | None] = (0, 0), usage: str = "", inline: bool = False
) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            _OPTIONS[name] = _Spec(fn, args[0], args[1], usage or name, inline)
        return fn

    return register


@dataclass
class _Builder:
    """Mutable accumulation of options while directives are applied in order.

    `opts` is the working copy of the result: handlers replace it with `dataclasses.replace`, so every
    option's name, type and default is the one declared in `Options`. Only what `Options` does not
    hold (or holds only in resolved form) is declared here.
    """

    cwd: str
    opts: Options = field(default_factory=Options)
    #: The roles as given (`client`/`tls-client`, `tls-server`); validate() settles Options.tls_role.
    tls_client: bool = False
    tls_server: bool = False
    #: The last `proto` as written, None if not given. A bare "tcp" only gets its side (Options.proto)
    #: in validate(), once server mode is known.
    proto_word: str | None = None
    #: `remote` entries as (host, port, proto word, family); their protos are resolved like proto_word.
    remote_words: list[tuple[str, int | None, str | None, Family]] = field(default_factory=list)
    #: `<connection>` blocks, complete: (remote word as above, connect-retry, its max, server-poll-timeout).
    connection_blocks: list[tuple[tuple[str, int, str | None, Family], int, int, int]] = field(
        default_factory=list
    )
    ignore_unknown: set[str] = field(default_factory=set)
    #: `setenv FORWARD_COMPATIBLE 1`: from there on unknown options are warnings, as in OpenVPN.
    forward_compatible: bool = False
    #: Last directive that set each option, so validate() can point at the offending line.
    where: dict[str, Directive] = field(default_factory=dict)

    # -- applying -------------------------------------------------------------------------------

    def apply_all(self, directives: Sequence[Directive], depth: int) -> None:
        for d in directives:
            self.apply(d, depth)

    def apply(self, d: Directive, depth: int, *, forgiving: bool = False) -> None:
        if d.name == "config":
            self._include(d, depth)
            return
        if d.name == "setenv":
            self._setenv(d, depth)
            return
        spec = _OPTIONS.get(d.name)
        if spec is None:
            if forgiving or self.forward_compatible or d.name in self.ignore_unknown:
                self.ignore(d)
                return
            raise _error(
                d,
                f"unknown option '{d.name}'; check the spelling, remove it, or put "
                f"`ignore-unknown-option {d.name}` before it if it is safe to ignore",
            )
        if d.inline and not spec.inline:
            raise _error(
                d,
                f"option '{d.name}' cannot be given as an inline <{d.name}> block; "
                f"write it on one line as `{spec.usage}`",
            )
        if not d.inline:
            n = len(d.args)
            if n < spec.min_args or (spec.max_args is not None and n > spec.max_args):
                raise _error(d, f"option '{d.name}' {_count_text(spec, n)}; usage: {spec.usage}")
        spec.handler(self, d)
        self.where[d.name] = d
        if self.connection_blocks and d.name in _CONNECTION_LATE_NO_EFFECT:
            self.ignore(d)  # OpenVPN too: the blocks above already copied the value they use

    def _include(self, d: Directive, depth: int) -> None:
        if d.inline or len(d.args) != 1:
            raise _error(d, "option 'config' takes exactly 1 argument; usage: config FILE")
        if depth >= _MAX_INCLUDE_DEPTH:
            raise _error(
                d,
                f"config: too many nested includes (more than {_MAX_INCLUDE_DEPTH}) while including "
                f"'{d.args[0]}'; does a config file include itself?",
            )
        path = self.resolve(d, d.args[0])
        text = _read_config_text(d, path)
        self.opts = replace(self.opts, config_sources=(*self.opts.config_sources, path))
        base = os.path.dirname(os.path.abspath(path))
        self.apply_all(tokenize(text, source=path, base_dir=base), depth + 1)

    def _setenv(self, d: Directive, depth: int) -> None:
        if d.inline:
            raise _error(d, "option 'setenv' cannot be an inline block; usage: setenv NAME VALUE")
        if d.args and d.args[0] == "opt":
            # `setenv opt X ...` is OpenVPN's way to say "X is fine to ignore if unknown".
            if len(d.args) < 2:
                raise _error(d, "`setenv opt` needs an option after it; usage: setenv opt OPTION [ARGS]")
            inner = Directive(d.source, d.line, d.args[1], d.args[2:], base_dir=d.base_dir)
            self.apply(inner, depth, forgiving=True)
            return
        if not 1 <= len(d.args) <= 2:
            raise _error(
                d, f"option 'setenv' takes 1 or 2 arguments, got {len(d.args)}; usage: setenv NAME VALUE"
            )
        _apply_setenv(self, d, depth)

    # -- helpers for handlers -------------------------------------------------------------------

    def resolve(self, d: Directive, path: str) -> str:
        """Find a relative file like OpenVPN (process cwd) and then next to the config file."""
        if os.path.isabs(path):
            return path
        tried = [os.path.join(self.cwd, path)]
        if d.base_dir is not None:
            tried.append(os.path.join(d.base_dir, path))
        for candidate in tried:
            if os.path.exists(candidate):
                return candidate
        where = " or ".join(f"'{t}'" for t in dict.fromkeys(tried))
        raise _error(
            d,
            f"{d.name}: file '{path}' not found (looked for {where}); "
            "give an absolute path or put the file next to the config file",
        )

    def resolve_dir(self, d: Directive, path: str) -> str:
        """Find a directory like `resolve` finds a file: process cwd first, then the config's directory."""
        tried = [path] if os.path.isabs(path) else [os.path.join(self.cwd, path)]
        if not os.path.isabs(path) and d.base_dir is not None:
            tried.append(os.path.join(d.base_dir, path))
        tried = list(dict.fromkeys(tried))
        for candidate in tried:
            if os.path.isdir(candidate):
                return candidate
        for candidate in tried:
            if os.path.exists(candidate):
                raise _error(d, f"{d.name}: '{candidate}' is not a directory; give the directory's path")
        where = " or ".join(f"'{t}'" for t in tried)
        raise _error(
            d,
            f"{d.name}: directory '{path}' not found (looked for {where}); create it (e.g. "
            f"`mkdir {path}`) or give the right path",
        )

    def file_or_inline(self, d: Directive) -> bytes:
        if d.inline:
            return _to_bytes(d.args[0])
        return _read_bytes(d, self.resolve(d, d.args[0]))

    def ignore(self, d: Directive) -> None:
        self.opts = replace(self.opts, ignored=(*self.opts.ignored, (d.name, d.source, d.line)))


def _count_text(spec: _Spec, n: int) -> str:
    lo, hi = spec.min_args, spec.max_args
    if hi is None:
        want = f"at least {lo} argument{'s' if lo != 1 else ''}"
    elif lo == hi:
        want = "no arguments" if lo == 0 else f"exactly {lo} argument{'s' if lo != 1 else ''}"
    else:
        want = f"{lo} to {hi} arguments"
    return f"takes {want}, got {n}"


def _read_bytes(d: Directive, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_SIZE + 1)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _error(
            d, f"{d.name}: cannot read '{path}' ({reason}); check the path and permissions"
        ) from None
    if len(data) > _MAX_FILE_SIZE:
        raise _error(d, f"{d.name}: '{path}' is larger than {_MAX_FILE_SIZE} bytes; is this the right file?")
    return data


def _read_config_text(d: Directive, path: str) -> str:
    # OpenVPN reads bytes; surrogateescape keeps e.g. Latin-1 comments harmless and lets inline
    # blocks be turned back into the exact original bytes.
    return _read_bytes(d, path).decode("utf-8", "surrogateescape")


def _to_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _as_text(d: Directive, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _error(d, f"{d.name}: the content is not UTF-8 text; is this the right file?") from None


def _int(d: Directive, value: str, what: str, lo: int, hi: int | None = None) -> int:
    if not _INT_RE.fullmatch(value):
        raise _error(d, f"{what}: '{value}' is not an integer; give a whole number")
    n = int(value)
    if n < lo or (hi is not None and n > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise _error(d, f"{what}: must be an integer {rng}, not {n}")
    return n


def _port(d: Directive, value: str, what: str, lo: int = 1) -> int:
    return _int(d, value, f"{what} port", lo, 65535)


_ADDRESS_EXAMPLE = {4: "10.8.0.1", 6: "fd00::1"}


def _address(d: Directive, value: str, what: str, version: Literal[4, 6]) -> str:
    """``value`` if it is an IP address of this version, else a ConfigError with an example."""
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.version != version:
        example = _ADDRESS_EXAMPLE[version]
        raise _error(d, f"{what}: '{value}' is not a valid IPv{version} address (like {example})")
    return value


def _ipv4(d: Directive, value: str, what: str) -> str:
    return _address(d, value, what, 4)


def _ipv6(d: Directive, value: str, what: str) -> str:
    return _address(d, value, what, 6)


def _netmask_bits(d: Directive, value: str, what: str) -> int:
    """The prefix length of a dotted netmask like 255.255.255.0; non-contiguous masks are errors."""
    mask = int(ipaddress.IPv4Address(_ipv4(d, value, what)))
    bits = 32 - (~mask & 0xFFFFFFFF).bit_length()
    if mask != (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF:
        raise _error(d, f"{what}: '{value}' is not a valid netmask; use one like 255.255.255.0")
    return bits


def _ipv6_prefix(d: Directive, value: str, what: str, lo: int, hi: int, *, default: int | None = None) -> int:
    """Check "ADDRESS/BITS" (or a bare address when `default` bits are given); return the bits."""
    addr, sep, bits = value.partition("/")
    if not sep and default is None:
        raise _error(d, f"{what}: '{value}' has no /prefix; write it like fd00::1/64")
    _ipv6(d, addr, what)
    return _int(d, bits, f"{what} prefix length", lo, hi) if sep else cast(int, default)


def _check_network(d: Directive, network: str, bits: int, what: str) -> None:
    """Refuse a network address with host bits set (it would never match any packet)."""
    net = ipaddress.ip_network(f"{network}/{bits}", strict=False)
    if str(net.network_address) != str(ipaddress.ip_address(network)):
        raise _error(
            d,
            f"{what}: {network}/{bits} has host bits set; use the network address "
            f"{net.network_address}/{bits}",
        )


# OpenVPN's proto names (socket_util.c proto_names); "tcp" is resolved to a side in validate().
_PROTOS: dict[str, tuple[str, Family]] = {
    "udp": ("udp", None),
    "tcp": ("tcp", None),
    "tcp-client": ("tcp-client", None),
    "tcp-server": ("tcp-server", None),
    "udp4": ("udp", 4),
    "tcp4": ("tcp", 4),
    "tcp4-client": ("tcp-client", 4),
    "tcp4-server": ("tcp-server", 4),
    "udp6": ("udp", 6),
    "tcp6": ("tcp", 6),
    "tcp6-client": ("tcp-client", 6),
    "tcp6-server": ("tcp-server", 6),
}


def _proto(d: Directive, value: str) -> tuple[str, Family]:
    try:
        return _PROTOS[value]
    except KeyError:
        raise _error(d, f"{d.name}: bad protocol '{value}'; use one of: {', '.join(_PROTOS)}") from None


_CBC_RE = re.compile(r"[A-Z0-9]+(-[A-Z0-9]+)*-CBC", re.ASCII)


def _aead_or_cbc(d: Directive, name: str) -> str:
    """A cipher for `cipher`/`data-ciphers-fallback`: AEAD, or a CBC cipher kept as the fallback for
    peers that do not negotiate (refused at run time if such a peer shows up, see proto/session.py)."""
    upper = name.upper()
    return upper if _CBC_RE.fullmatch(upper) else _aead(d, name)


# AEAD ciphers OpenVPN 2.6 has that the kernel data channel does not: left out of a data-ciphers
# list (the daemon logs it), as OpenVPN skips a cipher its library lacks.
_UNOFFERED_AEAD = frozenset({"AES-192-GCM"})


def _aead(d: Directive, name: str) -> str:
    upper = name.upper()
    if upper not in AEAD_CIPHERS:
        raise _error(
            d,
            f"{d.name}: cipher '{name}' is not supported: pyovpn's offloaded data channel runs only the "
            f"AEAD ciphers {', '.join(AEAD_CIPHERS)} (CBC, BF and 'none' cannot be offloaded, "
            "AES-192-GCM is not offered by the kernel). Remove it, or use e.g. "
            "`data-ciphers AES-256-GCM:AES-128-GCM` here and make sure the server offers one of them "
            "(OpenVPN >= 2.4 negotiates the data cipher)",
        )
    return upper


# -- connection and device ---------------------------------------------------------------------


@_option("mode", args=(1, 1), usage="mode p2p|server")
def _opt_mode(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("p2p", "server"):
        raise _error(d, f"mode: bad value '{d.args[0]}'; use `mode p2p` or `mode server`")
    b.opts = replace(b.opts, mode=cast(Literal["p2p", "server"], d.args[0]))


@_option("client", usage="client")
def _opt_client(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, pull=True)
    b.tls_client = True
    b.where["tls-client"] = d
    b.where["pull"] = d


@_option("tls-client", usage="tls-client")
def _opt_tls_client(b: _Builder, d: Directive) -> None:
    b.tls_client = True


@_option("tls-server", usage="tls-server")
def _opt_tls_server(b: _Builder, d: Directive) -> None:
    b.tls_server = True


@_option("dev", args=(1, 1), usage="dev tun|tunN|null|NAME")
def _opt_dev(b: _Builder, d: Directive) -> None:
    if not d.args[0]:
        raise _error(d, "dev: the device name is empty; use `dev tun`")
    b.opts = replace(b.opts, dev=d.args[0])


@_option("dev-type", args=(1, 1), usage="dev-type tun|null")
def _opt_dev_type(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("tun", "null"):
        raise _error(d, _layer2_message(f"dev-type {d.args[0]}"))
    b.opts = replace(b.opts, dev_type=d.args[0])


def _layer2_message(what: str) -> str:
    return (
        f"`{what}` is not supported: pyovpn's offloaded data channel carries only routed IP "
        "packets (layer 3, tun, or OpenVPN's `dev null`), not Ethernet frames (tap); use `dev tun` "
        "here and on the server"
    )


@_option("proto", args=(1, 1), usage="proto udp|tcp-client|tcp-server (or udp4, tcp6-client, ...)")
def _opt_proto(b: _Builder, d: Directive) -> None:
    b.proto_word, family = _proto(d, d.args[0])
    b.opts = replace(b.opts, family=family)


@_option("remote", args=(1, 3), usage="remote HOST [PORT [PROTO]]")
def _opt_remote(b: _Builder, d: Directive) -> None:
    host = d.args[0]
    if not host:
        raise _error(d, "remote: the host is empty; usage: remote HOST [PORT [PROTO]]")
    port = _port(d, d.args[1], "remote") if len(d.args) > 1 else None
    proto, family = _proto(d, d.args[2]) if len(d.args) > 2 else (None, None)
    b.remote_words.append((host, port, proto, family))


@_option("connect-retry", args=(1, 2), usage="connect-retry SECONDS [MAX_SECONDS]")
def _opt_connect_retry(b: _Builder, d: Directive) -> None:
    # OpenVPN clamps the base to 65535 and never lets the max fall below the base
    seconds = min(_int(d, d.args[0], "connect-retry", 0), 0xFFFF)
    most = max(_int(d, d.args[1], "connect-retry max", 0), seconds) if len(d.args) > 1 else None
    b.opts = replace(b.opts, connect_retry=seconds)
    if most is not None:
        b.opts = replace(b.opts, connect_retry_max_seconds=most)


@_option("server-poll-timeout", args=(1, 1), usage="server-poll-timeout SECONDS")
@_option("connect-timeout", args=(1, 1), usage="connect-timeout SECONDS")
def _opt_server_poll_timeout(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, server_poll_timeout=_int(d, d.args[0], d.name, 0))


@_option("resolv-retry", args=(1, 1), usage="resolv-retry SECONDS|infinite")
def _opt_resolv_retry(b: _Builder, d: Directive) -> None:
    value = None if d.args[0] == "infinite" else _int(d, d.args[0], "resolv-retry", 0)
    b.opts = replace(b.opts, resolv_retry=value)


# Per-entry options given after a <connection> block no longer reach any entry.
_CONNECTION_LATE_NO_EFFECT = frozenset(
    {"proto", "rport", "connect-retry", "server-poll-timeout", "connect-timeout"}
)

# What OpenVPN 2.6 accepts inside a <connection> block (its OPT_P_CONNECTION options).
_CONNECTION_PER_ENTRY = frozenset(
    {"remote", "proto", "port", "rport", "connect-retry", "server-poll-timeout", "connect-timeout"}
)
_CONNECTION_GLOBAL_ONLY = frozenset(
    {
        "bind", "explicit-exit-notify", "float", "fragment", "http-proxy",
        "http-proxy-option", "http-proxy-retry", "http-proxy-timeout", "key-direction", "link-mtu",
        "local", "lport", "max-packet-size", "mssfix", "mtu-disc", "mtu-dynamic", "nobind",
        "ping-timer-rem", "socks-proxy", "socks-proxy-retry", "tls-auth", "tls-crypt",
        "tls-crypt-v2", "topology", "tun-mtu", "tun-mtu-extra", "tun-mtu-max", "udp-mtu",
    }
)  # fmt: skip


# Allowed inside a block by OpenVPN; pyovpn keeps one value for the whole connection list.
_CONNECTION_APPLIED_GLOBALLY = frozenset({"connect-retry-max"})


@_option(
    "connection", args=(0, 0), inline=True, usage="<connection> remote HOST [PORT [PROTO]] ... </connection>"
)
def _opt_connection(b: _Builder, d: Directive) -> None:
    if not d.inline:
        raise _error(d, "`connection` is a block: write <connection>, its options, then </connection>")
    # A block starts from the global options as they stand here, like OpenVPN's copy of them.
    sub = _Builder(cwd=b.cwd, opts=b.opts, proto_word=b.proto_word)
    for inner in tokenize(d.args[0], source=d.source, base_dir=d.base_dir):
        inner = replace(inner, line=d.line + inner.line)
        if inner.name in _CONNECTION_APPLIED_GLOBALLY:
            b.apply(inner, 0)  # one value for the whole list here; the last one given wins
            continue
        if inner.name in _CONNECTION_GLOBAL_ONLY:
            raise _error(
                inner,
                f"`{inner.name}` inside a <connection> block is not supported by pyovpn (it takes only "
                f"{', '.join(sorted(_CONNECTION_PER_ENTRY))} there); set it once outside the blocks",
            )
        if inner.name not in _CONNECTION_PER_ENTRY:
            raise _error(
                inner,
                f"option '{inner.name}' cannot be used in a <connection> block; OpenVPN allows only "
                "connection options there (remote, proto, port, connect-retry, ...): move it outside",
            )
        sub.apply(inner, 0)
    if len(sub.remote_words) != 1:
        raise _error(d, "each <connection> block must contain exactly one `remote HOST [PORT [PROTO]]`")
    host, port, proto, family = sub.remote_words[0]
    if port is None:
        port = sub.opts.rport if sub.opts.rport is not None else sub.opts.port
    if proto is None:
        proto, family = (sub.proto_word or sub.opts.proto), sub.opts.family
    o = sub.opts
    entry = ((host, port, proto, family), o.connect_retry, o.connect_retry_max_seconds, o.server_poll_timeout)
    b.connection_blocks.append(entry)


@_option("port", args=(1, 1), usage="port PORT")
def _opt_port(b: _Builder, d: Directive) -> None:
    # `port` sets both the local and the remote port, overriding earlier lport/rport.
    b.opts = replace(b.opts, port=_port(d, d.args[0], "port"), lport=None, rport=None)


@_option("lport", args=(1, 1), usage="lport PORT")
def _opt_lport(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, lport=_port(d, d.args[0], "lport", lo=0))


@_option("rport", args=(1, 1), usage="rport PORT")
def _opt_rport(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, rport=_port(d, d.args[0], "rport"))


@_option("local", args=(1, 2), usage="local HOST [PORT]")
def _opt_local(b: _Builder, d: Directive) -> None:
    host = d.args[0]
    if not host:
        raise _error(d, "local: the address is empty; use `local ADDRESS` or `local *`")
    b.opts = replace(b.opts, local=None if host == "*" else host)
    if len(d.args) > 1:
        b.opts = replace(b.opts, lport=_port(d, d.args[1], "local", lo=0))


@_option("ifconfig", args=(2, 2), usage="ifconfig LOCAL_IP REMOTE_IP|NETMASK")
def _opt_ifconfig(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, ifconfig=(_ipv4(d, d.args[0], "ifconfig"), _ipv4(d, d.args[1], "ifconfig")))


@_option("ifconfig-ipv6", args=(2, 2), usage="ifconfig-ipv6 ADDRESS/BITS REMOTE_ADDRESS")
def _opt_ifconfig_ipv6(b: _Builder, d: Directive) -> None:
    addr, sep, bits = d.args[0].partition("/")
    if not sep:
        raise _error(d, f"ifconfig-ipv6: '{d.args[0]}' has no /prefix; write it like fd00::2/64")
    _ipv6(d, addr, "ifconfig-ipv6")
    _int(d, bits, "ifconfig-ipv6 prefix length", 64, 124)
    b.opts = replace(b.opts, ifconfig_ipv6=(d.args[0], _ipv6(d, d.args[1], "ifconfig-ipv6")))


_ROUTE_SPECIAL = ("vpn_gateway", "net_gateway", "remote_host")


@_option("route", args=(1, 4), usage="route NETWORK [NETMASK [GATEWAY [METRIC]]]")
def _opt_route(b: _Builder, d: Directive) -> None:
    args = list(d.args) + [""] * (4 - len(d.args))
    network = args[0] if args[0] in _ROUTE_SPECIAL else _ipv4(d, args[0], "route network")
    netmask = "255.255.255.255"
    if args[1] and args[1] != "default":
        netmask = _ipv4(d, args[1], "route netmask")
    gateway: str | None = None
    if args[2] and args[2] != "default":
        gateway = args[2] if args[2] in _ROUTE_SPECIAL else _ipv4(d, args[2], "route gateway")
    metric = None
    if args[3] and args[3] != "default":
        metric = _int(d, args[3], "route metric", 0)
    b.opts = replace(b.opts, routes=(*b.opts.routes, Route(network, netmask, gateway, metric)))


@_option("route-ipv6", args=(1, 3), usage="route-ipv6 NETWORK/BITS [GATEWAY [METRIC]]")
def _opt_route_ipv6(b: _Builder, d: Directive) -> None:
    addr, sep, bits = d.args[0].partition("/")
    _ipv6(d, addr, "route-ipv6 network")
    network = d.args[0] if sep else f"{addr}/128"
    if sep:
        _int(d, bits, "route-ipv6 prefix length", 0, 128)
    gateway = None
    if len(d.args) > 1 and d.args[1] == "net_gateway":
        gateway = d.args[1]
    elif len(d.args) > 1 and d.args[1] != "default":
        gateway = _ipv6(d, d.args[1], "route-ipv6 gateway")
    metric = _int(d, d.args[2], "route-ipv6 metric", 0) if len(d.args) > 2 else None
    b.opts = replace(b.opts, routes_ipv6=(*b.opts.routes_ipv6, RouteV6(network, gateway, metric)))


# what only a client's route setup (pyovpn.edge.clientroutes) carries out
_CLIENT_ROUTING_OPTIONS = (
    "redirect-private",
    "route-gateway",
    "route-metric",
    "route-nopull",
    "route-noexec",
    "ifconfig-noexec",
    "pull-filter",
)


@_option("redirect-gateway", "redirect-private", args=(0, None), usage="redirect-gateway [FLAGS...]")
def _opt_redirect(b: _Builder, d: Directive) -> None:
    try:
        add_redirect(redirect_from(()), d.name, d.args)
    except BadRedirectFlag as exc:
        raise _error(d, str(exc)) from None
    b.opts = replace(b.opts, redirects=(*b.opts.redirects, (d.name, *d.args)))


@_option("route-gateway", args=(1, 1), usage="route-gateway GATEWAY")
def _opt_route_gateway(b: _Builder, d: Directive) -> None:
    if d.args[0] == "dhcp":
        raise _error(d, "`route-gateway dhcp` needs a TAP device; pyovpn is layer-3 (tun): give the address")
    b.opts = replace(b.opts, route_gateway=_ipv4(d, d.args[0], "route-gateway"))


@_option("pull-filter", args=(2, 2), usage="pull-filter accept|ignore|reject TEXT")
def _opt_pull_filter(b: _Builder, d: Directive) -> None:
    action = d.args[0]
    if action not in ("accept", "ignore", "reject"):
        raise _error(d, f"pull-filter: unknown type {action!r}; use accept, ignore or reject")
    entry = (cast(PullFilterAction, action), d.args[1])
    b.opts = replace(b.opts, pull_filters=(*b.opts.pull_filters, entry))


@_option("topology", args=(1, 1), usage="topology net30|p2p|subnet")
def _opt_topology(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("net30", "p2p", "subnet"):
        raise _error(d, f"topology: bad value '{d.args[0]}'; use net30, p2p or subnet")
    b.opts = replace(b.opts, topology=cast(Literal["net30", "p2p", "subnet"], d.args[0]))


@_option("tun-mtu", args=(1, 2), usage="tun-mtu MTU [OCC_MTU]")
def _opt_tun_mtu(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, tun_mtu=_int(d, d.args[0], "tun-mtu", 100, 65536))
    if len(d.args) > 1:
        _int(d, d.args[1], "tun-mtu occ-mtu", 100, 65536)


@_option("mssfix", args=(0, 2), usage="mssfix [MAX_BYTES ['mtu'|'fixed']]")
def _opt_mssfix(b: _Builder, d: Directive) -> None:
    if not d.args:
        b.opts = replace(b.opts, mssfix=1492)
        return
    value = _int(d, d.args[0], "mssfix", 0, 65535)
    if 0 < value < 154:
        raise _error(d, f"mssfix: must be 0 (off) or at least 154, not {value}")
    if len(d.args) > 1 and d.args[1] not in ("mtu", "fixed"):
        raise _error(d, f"mssfix: unknown flag '{d.args[1]}'; use 'mtu' or 'fixed'")
    b.opts = replace(b.opts, mssfix=value)


@_option("dco", args=(1, 1), usage="dco auto|kernel|userspace")
def _opt_dco(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("auto", "kernel", "userspace"):
        raise _error(d, f"dco: bad value '{d.args[0]}'; use auto, kernel or userspace")
    b.opts = replace(b.opts, dco=cast(Literal["auto", "kernel", "userspace"], d.args[0]))


@_option("disable-dco", usage="disable-dco")
def _opt_disable_dco(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, dco="userspace")


@_option("userspace-engine", args=(1, 1), usage="userspace-engine auto|multiprocess|inprocess")
def _opt_userspace_engine(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("auto", "multiprocess", "inprocess"):
        raise _error(d, f"userspace-engine: bad value '{d.args[0]}'; use auto, multiprocess or inprocess")
    b.opts = replace(b.opts, userspace_engine=cast(Literal["auto", "multiprocess", "inprocess"], d.args[0]))


# -- TLS and keys ------------------------------------------------------------------------------


@_option("ca", args=(1, 1), usage="ca FILE", inline=True)
def _opt_ca(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, ca=b.file_or_inline(d))


@_option("cert", args=(1, 1), usage="cert FILE", inline=True)
def _opt_cert(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, cert=b.file_or_inline(d))


@_option("key", args=(1, 1), usage="key FILE", inline=True)
def _opt_key(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, key=b.file_or_inline(d))


@_option("dh", args=(1, 1), usage="dh FILE|none", inline=True)
def _opt_dh(b: _Builder, d: Directive) -> None:
    if d.inline:
        b.opts = replace(b.opts, dh="inline")
    elif d.args[0] == "none":
        b.opts = replace(b.opts, dh="none")
    else:
        b.file_or_inline(d)  # read only to report a missing file like OpenVPN would
        b.opts = replace(b.opts, dh=d.args[0])


@_option("extra-certs", args=(1, 1), usage="extra-certs FILE", inline=True)
def _opt_extra_certs(b: _Builder, d: Directive) -> None:
    b.file_or_inline(d)
    b.ignore(d)


def _static_key(b: _Builder, d: Directive) -> bytes:
    try:
        return _parse_static_key(_as_text(d, b.file_or_inline(d)))
    except _KeyFormatError as exc:
        raise _error(d, f"{d.name}: {exc}") from None


def _key_direction(d: Directive, value: str) -> int:
    if value not in ("0", "1"):
        raise _error(
            d, f"{d.name}: bad key direction '{value}'; use 0 (usually the server) or 1 (the client)"
        )
    return int(value)


@_option("tls-auth", args=(1, 2), usage="tls-auth FILE [0|1]", inline=True)
def _opt_tls_auth(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, tls_auth=_static_key(b, d))
    if not d.inline and len(d.args) > 1:
        b.opts = replace(b.opts, key_direction=_key_direction(d, d.args[1]))


@_option("key-direction", args=(1, 1), usage="key-direction 0|1")
def _opt_key_direction(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, key_direction=_key_direction(d, d.args[0]))


@_option("tls-crypt", args=(1, 1), usage="tls-crypt FILE", inline=True)
def _opt_tls_crypt(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, tls_crypt=_static_key(b, d))


@_option("tls-crypt-v2", args=(1, 2), usage="tls-crypt-v2 FILE [force-cookie|allow-noncookie]", inline=True)
def _opt_tls_crypt_v2(b: _Builder, d: Directive) -> None:
    if not d.inline and len(d.args) > 1 and d.args[1] not in ("force-cookie", "allow-noncookie"):
        raise _error(d, f"tls-crypt-v2: unknown flag '{d.args[1]}'; use force-cookie or allow-noncookie")
    if not d.inline and len(d.args) > 1 and d.args[1] == "force-cookie":
        raise _error(
            d,
            "tls-crypt-v2 ... force-cookie is not supported: pyovpn keeps state for tls-crypt-v2 clients "
            "from their first packet; drop the flag (allow-noncookie is the behaviour you get)",
        )
    text = _as_text(d, b.file_or_inline(d))
    try:
        if tlscryptv2.key_kind(text) == "server":
            server = tlscryptv2.parse_server_key(text)
            b.opts = replace(b.opts, tls_crypt_v2_server=server, tls_crypt_v2_client=None)
        else:
            client = tlscryptv2.parse_client_key(text)
            b.opts = replace(b.opts, tls_crypt_v2_client=client, tls_crypt_v2_server=None)
    except tlscryptv2.KeyFileError as exc:
        raise _error(d, f"tls-crypt-v2: {exc}") from None


@_option("remote-cert-tls", args=(1, 1), usage="remote-cert-tls server|client")
def _opt_remote_cert_tls(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("server", "client"):
        raise _error(d, f"remote-cert-tls: bad value '{d.args[0]}'; use server or client")
    b.opts = replace(b.opts, remote_cert_tls=cast(Literal["server", "client"], d.args[0]))


@_option("verify-x509-name", args=(1, 2), usage="verify-x509-name NAME [subject|name|name-prefix]")
def _opt_verify_x509_name(b: _Builder, d: Directive) -> None:
    if not d.args[0]:
        raise _error(d, "verify-x509-name: the name is empty; give the expected certificate name")
    kind = d.args[1] if len(d.args) > 1 else "subject"
    if kind not in ("subject", "name", "name-prefix"):
        raise _error(d, f"verify-x509-name: unknown type '{kind}'; use subject, name or name-prefix")
    b.opts = replace(b.opts, verify_x509_name=(d.args[0], kind))


@_option("data-ciphers", "ncp-ciphers", args=(1, 1), usage="data-ciphers CIPHER[:CIPHER...]")
def _opt_data_ciphers(b: _Builder, d: Directive) -> None:
    ciphers: list[str] = []
    unoffered: list[str] = []
    for item in d.args[0].split(":"):
        if not item:
            continue
        # "?CIPHER" is optional in OpenVPN: skipped when unavailable, which is what a non-AEAD one is here.
        if item.startswith("?"):
            if item[1:].upper() in AEAD_CIPHERS:
                ciphers.append(item[1:].upper())
            continue
        if _CBC_RE.fullmatch(item.upper()) or item.upper() in _UNOFFERED_AEAD:
            unoffered.append(item.upper())  # logged by the daemon: a peer that negotiates never needs it
            continue
        ciphers.append(_aead(d, item))
    if not ciphers and unoffered:
        # only ciphers pyovpn cannot run: offer the AEAD defaults, said loudly at start (daemon);
        # a server that negotiates (any 2.4+) picks one, one that insists on CBC fails with a reason
        ciphers = list(AEAD_CIPHERS)
    if not ciphers:
        raise _error(d, f"{d.name}: no usable cipher in '{d.args[0]}'; use e.g. AES-256-GCM:AES-128-GCM")
    b.opts = replace(b.opts, data_ciphers=tuple(dict.fromkeys(ciphers)), unoffered_ciphers=tuple(unoffered))


@_option("data-ciphers-fallback", args=(1, 1), usage="data-ciphers-fallback CIPHER")
def _opt_data_ciphers_fallback(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, data_ciphers_fallback=_aead_or_cbc(d, d.args[0]))


@_option("cipher", args=(1, 1), usage="cipher CIPHER")
def _opt_cipher(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, cipher=_aead_or_cbc(d, d.args[0]))


@_option("auth", args=(1, 1), usage="auth SHA1|SHA256|SHA384|SHA512")
def _opt_auth(b: _Builder, d: Directive) -> None:
    digest = d.args[0].upper().replace("-", "")
    if digest not in _DIGESTS:
        raise _error(
            d,
            f"auth: digest '{d.args[0]}' is not supported; use one of {', '.join(_DIGESTS)} "
            "(it only matters for tls-auth, since the data channel uses AEAD ciphers)",
        )
    b.opts = replace(b.opts, auth=digest)


@_option("reneg-sec", args=(1, 2), usage="reneg-sec SECONDS [MIN_SECONDS]")
def _opt_reneg_sec(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, reneg_sec=_int(d, d.args[0], "reneg-sec", 0))
    if len(d.args) > 1:
        _int(d, d.args[1], "reneg-sec minimum", 0)


@_option("replay-window", args=(1, 2), usage="replay-window PACKETS [SECONDS]")
def _opt_replay_window(b: _Builder, d: Directive) -> None:
    size = _int(d, d.args[0], "replay-window size", 0, 65536)
    seconds = _int(d, d.args[1], "replay-window time", 0, 600) if len(d.args) > 1 else b.opts.replay_window[1]
    b.opts = replace(b.opts, replay_window=(size, seconds))


@_option("tls-version-min", args=(1, 2), usage="tls-version-min 1.2|1.3 ['or-highest']")
def _opt_tls_version_min(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("1.0", "1.1", "1.2", "1.3"):
        raise _error(d, f"tls-version-min: unknown version '{d.args[0]}'; use 1.2 or 1.3")
    if len(d.args) > 1 and d.args[1] != "or-highest":
        raise _error(d, f"tls-version-min: unknown flag '{d.args[1]}'; only 'or-highest' is allowed")
    b.opts = replace(b.opts, tls_version_min=d.args[0])


@_option("tls-groups", args=(1, 1), usage="tls-groups GROUP[:GROUP...]")
def _opt_tls_groups(b: _Builder, d: Directive) -> None:
    groups = [g for g in d.args[0].split(":") if g]
    if not groups:
        raise _error(d, "tls-groups: name at least one group, e.g. `tls-groups X25519:prime256v1`")
    b.opts = replace(b.opts, tls_groups=":".join(groups))


@_option("tls-cert-profile", args=(1, 1), usage="tls-cert-profile legacy|preferred|suiteb|insecure")
def _opt_tls_cert_profile(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("legacy", "preferred", "suiteb", "insecure"):
        raise _error(d, f"tls-cert-profile: unknown profile '{d.args[0]}'; use legacy, preferred or suiteb")
    b.opts = replace(b.opts, tls_cert_profile=d.args[0])


@_option("auth-user-pass", args=(0, 1), usage="auth-user-pass [FILE]", inline=True)
def _opt_auth_user_pass(b: _Builder, d: Directive) -> None:
    if d.args and d.args[0] == "username-only":
        raise _error(
            d,
            "auth-user-pass username-only is not supported; use `auth-user-pass` (asks for both) or "
            "`auth-user-pass FILE`",
        )
    if not d.args and not d.inline:
        b.opts = replace(b.opts, auth_user_pass=(None, None))  # asked when connecting
        return
    # username on line 1, password on line 2; without line 2 the password is asked (as OpenVPN 2.6)
    text = _as_text(d, b.file_or_inline(d))
    lines = [ln.removesuffix("\r") for ln in text.removesuffix("\n").split("\n")]
    if not lines[0]:
        raise _error(d, "auth-user-pass: the username (first line) is empty; put the username there")
    b.opts = replace(b.opts, auth_user_pass=(lines[0], lines[1] if len(lines) > 1 else None))


@_option("ns-cert-type", args=(1, 1), usage="ns-cert-type server|client")
def _opt_ns_cert_type(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("server", "client"):
        raise _error(d, f"ns-cert-type: bad value '{d.args[0]}'; use server or client (or remote-cert-tls)")
    b.opts = replace(b.opts, ns_cert_type=d.args[0])


@_option("auth-gen-token", args=(0, 3), usage="auth-gen-token [LIFETIME] [RENEWAL] [external-auth]")
def _opt_auth_gen_token(b: _Builder, d: Directive) -> None:
    args = list(d.args)
    external = bool(args) and args[-1] == "external-auth"
    if external:
        args.pop()
    if len(args) > 2:
        raise _error(
            d, f"auth-gen-token: unexpected '{args[2]}'; usage: {d.name} [LIFETIME] [RENEWAL] [external-auth]"
        )
    lifetime = _int(d, args[0], "auth-gen-token lifetime", 0) if args else 0
    renewal = _int(d, args[1], "auth-gen-token renewal", 0) if len(args) > 1 else 0
    b.opts = replace(b.opts, auth_gen_token=(lifetime, renewal, external))


@_option("auth-gen-token-secret", args=(1, 1), usage="auth-gen-token-secret FILE", inline=True)
def _opt_auth_gen_token_secret(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, auth_gen_token_secret=b.file_or_inline(d))


@_option("auth-retry", args=(1, 1), usage="auth-retry none|nointeract|interact")
def _opt_auth_retry(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("none", "nointeract", "interact"):
        raise _error(d, f"auth-retry: unknown mode '{d.args[0]}'; use none, nointeract or interact")
    b.opts = replace(b.opts, auth_retry=d.args[0])


@_option("static-challenge", args=(2, 2), usage="static-challenge TEXT ECHO")
def _opt_static_challenge(b: _Builder, d: Directive) -> None:
    if d.args[1] not in ("0", "1"):
        raise _error(d, f"static-challenge: ECHO must be 0 or 1, not '{d.args[1]}'")
    b.opts = replace(b.opts, static_challenge=(d.args[0], d.args[1] == "1"))


@_option("askpass", args=(0, 1), usage="askpass [FILE]")
def _opt_askpass(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, askpass=d.args[0] if d.args else "")


@_option("pkcs12", args=(1, 1), usage="pkcs12 FILE", inline=True)
def _opt_pkcs12(b: _Builder, d: Directive) -> None:
    data = b.file_or_inline(d)
    if d.inline:
        # an inline <pkcs12> block holds the DER bundle in base64, as in OpenVPN
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        except binascii.Error:
            raise _error(
                d, "<pkcs12>: the block is not base64; paste `base64 client.p12` between the tags"
            ) from None
    b.opts = replace(b.opts, pkcs12=data)


# -- timers, logging, process ------------------------------------------------------------------


@_option("ping-restart", args=(1, 1), usage="ping-restart SECONDS")
def _opt_ping_restart(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, ping_restart=_int(d, d.args[0], "ping-restart", 0, 86400), ping_exit=False)


@_option("ping-exit", args=(1, 1), usage="ping-exit SECONDS")
def _opt_ping_exit(b: _Builder, d: Directive) -> None:
    # one timeout in OpenVPN: the later of ping-restart / ping-exit decides what it does
    b.opts = replace(b.opts, ping_restart=_int(d, d.args[0], "ping-exit", 0, 86400), ping_exit=True)


@_option("inactive", args=(1, 2), usage="inactive SECONDS [BYTES]")
def _opt_inactive(b: _Builder, d: Directive) -> None:
    seconds = _int(d, d.args[0], "inactive", 0)
    least = _int(d, d.args[1], "inactive bytes", 0) if len(d.args) > 1 else 0
    b.opts = replace(b.opts, inactive=(seconds, least) if seconds else None)


@_option("keepalive", args=(2, 2), usage="keepalive PING_SECONDS RESTART_SECONDS")
def _opt_keepalive(b: _Builder, d: Directive) -> None:
    interval = _int(d, d.args[0], "keepalive ping", 1, 86400)
    timeout = _int(d, d.args[1], "keepalive timeout", 1, 86400)
    if interval * 2 > timeout:
        raise _error(
            d,
            f"keepalive: the restart timeout ({timeout}) must be at least twice the ping interval "
            f"({interval}); the usual setting is `keepalive 10 60`",
        )
    b.opts = replace(b.opts, keepalive=(interval, timeout))


@_option("explicit-exit-notify", args=(0, 1), usage="explicit-exit-notify [N]")
def _opt_explicit_exit_notify(b: _Builder, d: Directive) -> None:
    notify = _int(d, d.args[0], "explicit-exit-notify", 0) if d.args else 1
    b.opts = replace(b.opts, explicit_exit_notify=notify)


Setter = Callable[[Options, str], Options]
Switch = Callable[[Options], Options]

#: Options whose one argument is kept as given: (usage, how it goes into Options).
_WORD_OPTIONS: dict[str, tuple[str, Setter]] = {
    "log": ("log FILE", lambda o, v: replace(o, log=v)),
    "log-append": ("log-append FILE", lambda o, v: replace(o, log_append=v)),
    "writepid": ("writepid FILE", lambda o, v: replace(o, writepid=v)),
    "user": ("user NAME", lambda o, v: replace(o, user=v)),
    "group": ("group NAME", lambda o, v: replace(o, group=v)),
    "pyovpn-events": ("pyovpn-events FILE", lambda o, v: replace(o, events_file=v)),
    "management-client-user": (
        "management-client-user USER",
        lambda o, v: replace(o, management_client_user=v),
    ),
    "management-client-group": (
        "management-client-group GROUP",
        lambda o, v: replace(o, management_client_group=v),
    ),
    "remote-cert-eku": ("remote-cert-eku OID", lambda o, v: replace(o, remote_cert_eku=v)),
    "tls-cipher": ("tls-cipher SUITE[:SUITE...]", lambda o, v: replace(o, tls_cipher=v)),
    "tls-ciphersuites": ("tls-ciphersuites SUITE[:SUITE...]", lambda o, v: replace(o, tls_ciphersuites=v)),
}


def _opt_word(b: _Builder, d: Directive) -> None:
    b.opts = _WORD_OPTIONS[d.name][1](b.opts, d.args[0])


for _name, (_usage, _) in _WORD_OPTIONS.items():
    _option(_name, args=(1, 1), usage=_usage)(_opt_word)
del _name, _usage

_MAX_CLIENTS = 1048576

#: Options with one whole number: usage, the lowest and highest (None: any) value, and where it goes.
_NUMBER_OPTIONS: dict[str, tuple[str, int, int | None, Callable[[Options, int], Options]]] = {
    "connect-retry-max": ("connect-retry-max N", 0, None, lambda o, v: replace(o, connect_retry_max=v)),
    "route-metric": ("route-metric METRIC", 0, None, lambda o, v: replace(o, route_metric=v)),
    "engine-workers": ("engine-workers N", 1, None, lambda o, v: replace(o, engine_workers=v)),
    "tls-crypt-v2-max-age": (
        "tls-crypt-v2-max-age DAYS",
        1,
        None,
        lambda o, v: replace(o, tls_crypt_v2_max_age=v),
    ),
    "tls-timeout": ("tls-timeout SECONDS", 0, None, lambda o, v: replace(o, tls_timeout=v)),
    "hand-window": ("hand-window SECONDS", 0, None, lambda o, v: replace(o, hand_window=v)),
    "tran-window": ("tran-window SECONDS", 0, None, lambda o, v: replace(o, tran_window=v)),
    "verb": ("verb LEVEL", 0, None, lambda o, v: replace(o, verb=v)),
    "mute": ("mute N", 0, None, lambda o, v: replace(o, mute=v)),
    "ping": ("ping SECONDS", 0, 86400, lambda o, v: replace(o, ping=v)),
    "max-clients": ("max-clients N", 1, _MAX_CLIENTS, lambda o, v: replace(o, max_clients=v)),
    "script-security": ("script-security 0|1|2|3", 0, 3, lambda o, v: replace(o, script_security=v)),
    "management-log-cache": (
        "management-log-cache N",
        1,
        1_000_000,
        lambda o, v: replace(o, management_log_cache=v),
    ),
    "mark": ("mark N", 0, 0xFFFFFFFF, lambda o, v: replace(o, mark=v)),
}


def _opt_number(b: _Builder, d: Directive) -> None:
    _usage, lowest, highest, setter = _NUMBER_OPTIONS[d.name]
    b.opts = setter(b.opts, _int(d, d.args[0], d.name, lowest, highest))


for _name in _NUMBER_OPTIONS:
    _option(_name, args=(1, 1), usage=_NUMBER_OPTIONS[_name][0])(_opt_number)
del _name

#: Options without arguments that switch something on.
_FLAGS: dict[str, Switch] = {
    "persist-tun": lambda o: replace(o, persist_tun=True),
    "persist-key": lambda o: replace(o, persist_key=True),
    "mute-replay-warnings": lambda o: replace(o, mute_replay_warnings=True),
    "ccd-exclusive": lambda o: replace(o, ccd_exclusive=True),
    "client-to-client": lambda o: replace(o, client_to_client=True),
    "duplicate-cn": lambda o: replace(o, duplicate_cn=True),
    "pull": lambda o: replace(o, pull=True),
    "remote-random": lambda o: replace(o, remote_random=True),
    "remote-random-hostname": lambda o: replace(o, remote_random_hostname=True),
    "nobind": lambda o: replace(o, nobind=True),
    "route-nopull": lambda o: replace(o, route_nopull=True),
    "route-noexec": lambda o: replace(o, route_noexec=True),
    "ifconfig-noexec": lambda o: replace(o, ifconfig_noexec=True),
    "auth-nocache": lambda o: replace(o, auth_nocache=True),
    "float": lambda o: replace(o, float_=True),
    "username-as-common-name": lambda o: replace(o, username_as_common_name=True),
    "suppress-timestamps": lambda o: replace(o, suppress_timestamps=True),
    "up-restart": lambda o: replace(o, up_restart=True),
    "management-hold": lambda o: replace(o, management_hold=True),
    "management-client-auth": lambda o: replace(o, management_client_auth=True),
    "management-query-passwords": lambda o: replace(o, management_query_passwords=True),
    "management-forget-disconnect": lambda o: replace(o, management_forget_disconnect=True),
    "down-pre": lambda o: replace(o, down_pre=True),
}


def _opt_flag(b: _Builder, d: Directive) -> None:
    b.opts = _FLAGS[d.name](b.opts)


for _name in _FLAGS:
    _option(_name)(_opt_flag)
del _name


@_option("ignore-unknown-option", args=(1, None), usage="ignore-unknown-option OPTION [OPTION...]")
def _opt_ignore_unknown_option(b: _Builder, d: Directive) -> None:
    b.ignore_unknown.update(name.removeprefix("--") for name in d.args)


@_option("allow-compression", args=(1, 1), usage="allow-compression no|asym|yes")
def _opt_allow_compression(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("no", "asym", "yes"):
        raise _error(d, f"allow-compression: bad value '{d.args[0]}'; use no, asym or yes")
    if b.opts.allow_compression == "no" and d.args[0] != "no":
        raise _error(d, f"allow-compression: cannot set it to '{d.args[0]}' after it was set to 'no'")
    b.opts = replace(b.opts, allow_compression=d.args[0])


@_option("key-method", args=(1, 1), usage="key-method 2")
def _opt_key_method(b: _Builder, d: Directive) -> None:
    if d.args[0] != "2":
        raise _error(
            d, f"key-method {d.args[0]} is not supported (only 2 exists since OpenVPN 2.5); remove it"
        )
    b.ignore(d)


@_option("crl-verify", args=(1, 2), usage="crl-verify FILE | crl-verify DIR dir", inline=True)
def _opt_crl_verify(b: _Builder, d: Directive) -> None:
    if not d.inline and len(d.args) > 1:
        if d.args[1] != "dir":
            raise _error(
                d, f"crl-verify: unknown flag '{d.args[1]}'; usage: crl-verify FILE or crl-verify DIR dir"
            )
        # OpenVPN's directory form: a file named by a certificate's decimal serial number revokes it
        b.opts = replace(b.opts, crl_verify=None, crl_verify_source=(b.resolve_dir(d, d.args[0]), True))
        return
    data = b.file_or_inline(d)
    if b"-----BEGIN X509 CRL-----" not in data:
        what = "the inline <crl-verify> block" if d.inline else f"'{d.args[0]}'"
        raise _error(
            d,
            f"crl-verify: {what} is not a PEM CRL (no '-----BEGIN X509 CRL-----' line); give the "
            "CRL in PEM form (convert a DER one with `openssl crl -inform DER -in crl.der -out crl.pem`)",
        )
    # a CRL file is re-read when it changes (OpenVPN reads it on every handshake); an inline one cannot
    source = None if d.inline else (b.resolve(d, d.args[0]), False)
    b.opts = replace(b.opts, crl_verify=data, crl_verify_source=source)


# -- P2MP server -------------------------------------------------------------------------------

#: Smallest and largest `server` networks (OpenVPN: at most a /16 pool, at least a /29 with tun).
_SERVER_MIN_BITS, _SERVER_MAX_BITS = 16, 29
_POOL_MAX = 65536  # OpenVPN's IFCONFIG_POOL_MAX


@_option("server", args=(2, 3), usage="server NETWORK NETMASK ['nopool']")
def _opt_server(b: _Builder, d: Directive) -> None:
    network = _ipv4(d, d.args[0], "server network")
    bits = _netmask_bits(d, d.args[1], "server netmask")
    if network == "0.0.0.0":
        raise _error(d, "server: the network 0.0.0.0 is not usable; use e.g. `server 10.8.0.0 255.255.255.0`")
    _check_network(d, network, bits, "server")
    if bits < _SERVER_MIN_BITS:
        raise _error(
            d,
            f"server: the netmask {d.args[1]} (/{bits}) allows too many addresses; use a subnet of "
            f"255.255.0.0 (/{_SERVER_MIN_BITS}) or smaller",
        )
    if bits > _SERVER_MAX_BITS:
        raise _error(
            d,
            f"server: the netmask {d.args[1]} (/{bits}) leaves no room for clients; use a subnet of "
            f"255.255.255.248 (/{_SERVER_MAX_BITS}) or larger",
        )
    nopool = False
    if len(d.args) > 2:
        if d.args[2] != "nopool":
            raise _error(d, f"server: unknown flag '{d.args[2]}'; the only flag is 'nopool'")
        nopool = True
    b.opts = replace(b.opts, server_network=(network, d.args[1]), server_nopool=nopool)


@_option("server-ipv6", args=(1, 1), usage="server-ipv6 NETWORK/BITS")
def _opt_server_ipv6(b: _Builder, d: Directive) -> None:
    bits = _ipv6_prefix(d, d.args[0], "server-ipv6", 64, 124)
    network = d.args[0].partition("/")[0]
    _check_network(d, network, bits, "server-ipv6")
    b.opts = replace(b.opts, server_ipv6=str(ipaddress.IPv6Network(f"{network}/{bits}")))


@_option("ifconfig-pool", args=(2, 3), usage="ifconfig-pool START_IP END_IP [NETMASK]")
def _opt_ifconfig_pool(b: _Builder, d: Directive) -> None:
    start = _ipv4(d, d.args[0], "ifconfig-pool start")
    end = _ipv4(d, d.args[1], "ifconfig-pool end")
    first, last = int(ipaddress.IPv4Address(start)), int(ipaddress.IPv4Address(end))
    if first > last:
        raise _error(d, f"ifconfig-pool: the start {start} is after the end {end}; swap them")
    if last - first >= _POOL_MAX:
        raise _error(
            d, f"ifconfig-pool: {start} - {end} is too large; a pool holds at most {_POOL_MAX} addresses"
        )
    netmask = None
    if len(d.args) > 2:
        _netmask_bits(d, d.args[2], "ifconfig-pool netmask")
        netmask = d.args[2]
    b.opts = replace(b.opts, ifconfig_pool=(start, end, netmask))


@_option("ifconfig-ipv6-pool", args=(1, 1), usage="ifconfig-ipv6-pool FIRST_ADDRESS/BITS")
def _opt_ifconfig_ipv6_pool(b: _Builder, d: Directive) -> None:
    bits = _ipv6_prefix(d, d.args[0], "ifconfig-ipv6-pool", 64, 124)
    first = ipaddress.IPv6Address(d.args[0].partition("/")[0])
    b.opts = replace(b.opts, ifconfig_ipv6_pool=f"{first}/{bits}")


@_option("ifconfig-pool-persist", args=(1, 2), usage="ifconfig-pool-persist FILE [SECONDS]")
def _opt_ifconfig_pool_persist(b: _Builder, d: Directive) -> None:
    if not d.args[0]:
        raise _error(d, "ifconfig-pool-persist: the file name is empty; usage: ifconfig-pool-persist FILE")
    seconds = _int(d, d.args[1], "ifconfig-pool-persist seconds", 0) if len(d.args) > 1 else 600
    b.opts = replace(b.opts, ifconfig_pool_persist=(d.args[0], seconds))


def _push_option(d: Directive, option: str) -> str:
    """Check one `push "..."` argument; it is pushed verbatim."""
    if not option.strip():
        raise _error(d, 'push: the option is empty; usage: push "route 10.0.0.0 255.255.255.0"')
    if "," in option:
        raise _error(
            d,
            f"push: '{option}' contains a comma, which separates options in the pushed message; "
            'push each option separately, e.g. `push "dhcp-option DNS 10.8.0.1"` once per option',
        )
    words = option.split()
    if words[0] in ("comp-lzo", "compress"):
        _compression_arg(d, words[0], words[1:])
    return option


@_option("push", args=(1, 1), usage='push "OPTION [ARGS]" (quote the whole option)')
def _opt_push(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, push=(*b.opts.push, _push_option(d, d.args[0])))


def _ccd_only(b: _Builder, d: Directive) -> None:
    raise _error(
        d,
        f"`{d.name}` is only valid in a client-config-dir file (the per-client files in the "
        "`client-config-dir` directory, named after the client's certificate common name); move it there",
    )


for _name in ("push-reset", "push-remove", "iroute", "iroute-ipv6", "ifconfig-push", "ifconfig-ipv6-push",
              "disable"):  # fmt: skip
    _option(_name, args=(0, None))(_ccd_only)
del _name


@_option("client-config-dir", args=(1, 1), usage="client-config-dir DIR")
def _opt_client_config_dir(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, client_config_dir=b.resolve_dir(d, d.args[0]))


@_option("verify-client-cert", args=(0, 1), usage="verify-client-cert none|optional|require")
def _opt_verify_client_cert(b: _Builder, d: Directive) -> None:
    value = d.args[0] if d.args else "require"
    if value not in ("none", "optional", "require"):
        raise _error(d, f"verify-client-cert: bad value '{value}'; use none, optional or require")
    b.opts = replace(b.opts, verify_client_cert=cast(Literal["none", "optional", "require"], value))


# -- scripts -----------------------------------------------------------------------------------

#: Script options, in the order validate() reports them.
_SCRIPTS = (
    "up", "down", "tls-verify", "tls-crypt-v2-verify", "auth-user-pass-verify", "client-connect",
    "client-disconnect", "learn-address", "route-up",
)  # fmt: skip


def _command(d: Directive, words: Sequence[str]) -> str:
    command = " ".join(words)
    if not command.strip():
        raise _error(
            d, f"{d.name}: the command is empty; give the script to run, e.g. `{d.name} /path/script`"
        )
    return command


@_option("dhcp-option", "dns", args=(1, None), usage="dhcp-option DNS|DNS6|DOMAIN|DOMAIN-SEARCH VALUE")
def _opt_dns(b: _Builder, d: Directive) -> None:
    line = " ".join((d.name, *d.args))
    try:
        dnsopts.parse_dns_lines([line])
    except ProtocolError as exc:
        raise _error(d, str(exc)) from None
    b.opts = replace(b.opts, dns_lines=(*b.opts.dns_lines, line))


@_option("pyovpn-dns", args=(1, 1), usage="pyovpn-dns auto|off")
def _opt_pyovpn_dns(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("auto", "off"):
        raise _error(
            d,
            f"pyovpn-dns: {d.args[0]!r} is not 'auto' or 'off'; `auto` applies pushed DNS to the system "
            "resolver, `off` leaves DNS to your up/down scripts",
        )
    b.opts = replace(b.opts, pyovpn_dns=cast(Literal["auto", "off"], d.args[0]))


@_option("auth-user-pass-verify", args=(2, None), usage="auth-user-pass-verify COMMAND via-file|via-env")
def _opt_auth_user_pass_verify(b: _Builder, d: Directive) -> None:
    method = d.args[-1]
    if method not in ("via-file", "via-env"):
        raise _error(
            d,
            f"auth-user-pass-verify: the last word must be 'via-file' or 'via-env', not '{method}'; "
            "usage: auth-user-pass-verify COMMAND via-file",
        )
    b.opts = replace(b.opts, auth_user_pass_verify=(_command(d, d.args[:-1]), method))


#: The script options with one command line (auth-user-pass-verify also takes a method).
_SCRIPT_SETTERS: dict[str, Setter] = {
    "up": lambda o, v: replace(o, up=v),
    "down": lambda o, v: replace(o, down=v),
    "tls-verify": lambda o, v: replace(o, tls_verify=v),
    "tls-crypt-v2-verify": lambda o, v: replace(o, tls_crypt_v2_verify=v),
    "client-connect": lambda o, v: replace(o, client_connect=v),
    "client-disconnect": lambda o, v: replace(o, client_disconnect=v),
    "learn-address": lambda o, v: replace(o, learn_address=v),
    "route-up": lambda o, v: replace(o, route_up=v),
}


def _opt_script(b: _Builder, d: Directive) -> None:
    b.opts = _SCRIPT_SETTERS[d.name](b.opts, _command(d, d.args))


for _name in _SCRIPTS:
    if _name != "auth-user-pass-verify":
        _option(_name, args=(1, None), usage=f"{_name} COMMAND")(_opt_script)
del _name


# -- operations: status file, logging targets, service-manager command lines -----------------


@_option("status", args=(1, 2), usage="status FILE [SECONDS]")
def _opt_status(b: _Builder, d: Directive) -> None:
    seconds = _int(d, d.args[1], "status", 1) if len(d.args) > 1 else 60
    b.opts = replace(b.opts, status_file=d.args[0], status_interval=seconds)


@_option("status-version", args=(0, 1), usage="status-version 1|2|3")
def _opt_status_version(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, status_version=_int(d, d.args[0], "status-version", 1, 3) if d.args else 1)


@_option("syslog", args=(0, 1), usage="syslog [NAME]")
def _opt_syslog(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, syslog=d.args[0] if d.args else "pyovpn")


@_option("daemon", args=(0, 1), usage="daemon [NAME]")
def _opt_daemon(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, daemon=True, syslog=d.args[0] if d.args else (b.opts.syslog or "pyovpn"))


@_option("cd", args=(1, 1), usage="cd DIR")
def _opt_cd(b: _Builder, d: Directive) -> None:
    target = d.args[0] if os.path.isabs(d.args[0]) else os.path.join(b.cwd, d.args[0])
    if not os.path.isdir(target):
        raise _error(d, f"cd: '{d.args[0]}' is not a directory; give an existing directory")
    # as OpenVPN's chdir: files named after this option are relative to it
    b.cwd = os.path.abspath(target)
    b.opts = replace(b.opts, cd=b.cwd)


@_option("chroot", args=(1, 1), usage="chroot DIR")
def _opt_chroot(b: _Builder, d: Directive) -> None:
    target = d.args[0] if os.path.isabs(d.args[0]) else os.path.join(b.cwd, d.args[0])
    if not os.path.isdir(target):
        raise _error(d, f"chroot: '{d.args[0]}' is not a directory; give an existing directory")
    b.opts = replace(b.opts, chroot=os.path.abspath(target))


# -- the management interface ---------------------------------------------------------------


@_option("management", args=(2, 3), usage="management IP PORT [PW-FILE] | management PATH unix [PW-FILE]")
def _opt_management(b: _Builder, d: Directive) -> None:
    if len(d.args) > 2 and d.args[2] == "stdin":
        raise _error(d, "management: a password from stdin is not supported; put it in a file, name the file")
    pw = b.resolve(d, d.args[2]) if len(d.args) > 2 else None
    if d.args[1] == "unix":
        b.opts = replace(b.opts, management_unix=d.args[0], management=None, management_password_file=pw)
        return
    port = _port(d, d.args[1], "management", 0)
    b.opts = replace(b.opts, management=(d.args[0], port), management_unix=None, management_password_file=pw)


@_option("pyovpn-metrics", args=(1, 1), usage="pyovpn-metrics [HOST:]PORT")
def _opt_pyovpn_metrics(b: _Builder, d: Directive) -> None:
    host, _, port = d.args[0].rpartition(":")
    b.opts = replace(b.opts, metrics=(host.strip("[]") or "127.0.0.1", _port(d, port, "pyovpn-metrics")))


_MANAGEMENT_NOT_YET = {
    "management-client": "connecting out to a management client",
    "management-external-key": "private keys held by the management client",
    "management-external-cert": "certificates held by the management client",
    "management-query-remote": "choosing the remote over the management interface",
    "management-query-proxy": "choosing a proxy over the management interface",
    "management-signal": "a restart (SIGUSR1) when the management client disconnects",
}


def _make_management_refusal(name: str, what: str) -> Handler:
    def refuse(b: _Builder, d: Directive) -> None:
        raise _error(
            d,
            f"`{name}` ({what}) is not implemented yet in pyovpn's management interface; remove it, "
            "or supply credentials in files (`auth-user-pass FILE`)",
        )

    return refuse


for _name, _what in _MANAGEMENT_NOT_YET.items():
    _option(_name, args=(0, None))(_make_management_refusal(_name, _what))
del _name, _what


# Options accepted without any effect, with OpenVPN's argument counts (to still catch typos).
_IGNORED: dict[str, tuple[int, int | None]] = {
    "persist-remote-ip": (0, 0),
    "persist-local-ip": (0, 0),
    "tls-exit": (0, 0),
    "route-delay": (0, 2),
    "route-method": (1, 1),
    "setenv-safe": (1, 2),
    "push-peer-info": (0, 0),
    "txqueuelen": (1, 1),
    "fast-io": (0, 0),
    "block-outside-dns": (0, 0),
    "keysize": (1, 1),
    "ecdh-curve": (1, 1),
    "tun-ipv6": (0, 0),
    "max-routes": (0, 1),
    # OpenVPN applies it to TAP devices only; pyovpn is layer 3 (tun), where OpenVPN ignores it too
    "tun-mtu-extra": (1, 1),
}


def _opt_ignored(b: _Builder, d: Directive) -> None:
    b.ignore(d)


for _name, _count in _IGNORED.items():
    _option(_name, args=_count, usage=f"{_name} ...")(_opt_ignored)
del _name, _count


# -- refused: things an offloaded, AEAD-only, layer-3 data channel cannot do ------------------

_REFUSED: dict[str, str] = {
    "secret": (
        "static-key mode (`secret`) is not supported: it has no forward secrecy or key renegotiation "
        "and OpenVPN itself deprecates it. Use TLS instead: `tls-server`/`tls-client` with ca/cert/key "
        "(a static key can still protect the handshake via `tls-crypt`)"
    ),
    "http-proxy": (
        "`http-proxy` is not supported: pyovpn connects to the server directly. Remove it, or run "
        "the connection through a system-level proxy/tunnel"
    ),
    "socks-proxy": (
        "`socks-proxy` is not supported: pyovpn connects to the server directly. Remove it, or run "
        "the connection through a system-level proxy/tunnel"
    ),
    "ncp-disable": (
        "`ncp-disable` was removed in OpenVPN 2.6; remove it and restrict ciphers with `data-ciphers`"
    ),
    "plugin": (
        "`plugin` is not supported: pyovpn cannot load OpenVPN's C plugins. For PAM logins use a "
        "script instead: `script-security 2` and `auth-user-pass-verify /path/to/check-pam.sh via-file` "
        "(the script gets the username and password and exits 0 to accept)"
    ),
    "port-share": (
        "`port-share` is not supported: pyovpn does not proxy non-OpenVPN TCP connections to another "
        "server. Remove it and give the other service its own port (or put a TLS/SNI-aware proxy in front)"
    ),
    "client-cert-not-required": (
        "`client-cert-not-required` was removed in OpenVPN 2.5; use `verify-client-cert none` (with "
        "`auth-user-pass-verify` to check the clients' usernames and passwords)"
    ),
}


def _make_refusal(message: str) -> Handler:
    def refuse(b: _Builder, d: Directive) -> None:
        raise _error(d, message)

    return refuse


for _name, _message in _REFUSED.items():
    _option(_name, args=(0, None), inline=True)(_make_refusal(_message))
del _name, _message


_COMPRESSION_ARGS = {
    "comp-lzo": ("", "yes", "no", "adaptive"),
    "compress": ("", "stub", "stub-v2", "lz4", "lz4-v2", "lzo"),
}
# framings that announce a real algorithm: refused by `allow-compression no`, as in OpenVPN
_NON_STUB_COMPRESSION = {("comp-lzo", a) for a in ("", "yes", "adaptive")} | {
    ("compress", a) for a in ("lz4", "lz4-v2", "lzo")
}


def _compression_arg(d: Directive, name: str, args: Sequence[str]) -> str:
    """The checked argument of `comp-lzo`/`compress` (in the config or in a `push`)."""
    if len(args) > 1:
        raise _error(d, f"{name}: takes at most one argument, got '{' '.join(args)}'")
    arg = args[0] if args else ""
    if name == "compress" and arg == "migrate":
        raise _error(
            d,
            "`compress migrate` is not supported: pyovpn does not rewrite clients' compression "
            "settings. Push `comp-lzo no` (or `compress stub-v2`) explicitly to the clients that need "
            "framing, or remove compression from the clients",
        )
    if arg not in _COMPRESSION_ARGS[name]:
        allowed = ", ".join(a for a in _COMPRESSION_ARGS[name] if a)
        raise _error(d, f"{name}: bad argument '{arg}'; use one of {allowed} (or none)")
    return arg


@_option("comp-lzo", "compress", args=(0, 1), inline=True)
def _opt_compression(b: _Builder, d: Directive) -> None:
    b.opts = replace(b.opts, compression=(d.name, _compression_arg(d, d.name, d.args)))


@_option("comp-noadapt", args=(0, 0))
def _opt_comp_noadapt(b: _Builder, d: Directive) -> None:
    pass  # adaptive compression only changes how often a sender compresses; pyovpn never does


def _check_compression(o: Options, fail: Callable[..., ConfigError]) -> None:
    if o.compression is None:
        return
    what = " ".join(part for part in o.compression if part)
    if o.allow_compression == "no" and o.compression in _NON_STUB_COMPRESSION:
        raise fail(
            f"`allow-compression no` conflicts with `{what}`, which enables compression; use "
            f"`comp-lzo no` or `compress stub-v2` for framing only, or drop `allow-compression no`",
            "allow-compression",
            o.compression[0],
        )
    if o.dco == "kernel" and o.compression != ("compress", "stub-v2"):  # stub-v2: nothing for IP packets
        raise fail(
            f"`{what}` adds OpenVPN's compression framing, which the kernel data channel cannot "
            "carry: use `--dco auto` or `--dco userspace` (pyovpn then runs this connection in "
            "userspace), or remove compression here and on the peer",
            o.compression[0],
            "dco",
        )


# -- what published configs use that is carried out here -----------------------------------------
# (mute and down-pre act in pyovpn.daemon / pyovpn.logsinks)


# `setenv` names OpenVPN treats as options rather than variables for scripts.
_SETENV_AS_OPTION = {"PUSH_PEER_INFO": "push-peer-info", "SERVER_POLL_TIMEOUT": "server-poll-timeout"}


def _apply_setenv(b: _Builder, d: Directive, depth: int) -> None:
    """`setenv NAME [VALUE]`: a variable for every script (see pyovpn.scripts), with OpenVPN's
    special names: FORWARD_COMPATIBLE 1, PUSH_PEER_INFO and SERVER_POLL_TIMEOUT N."""
    name, value = d.args[0], (d.args[1] if len(d.args) > 1 else "")
    if name in _SETENV_AS_OPTION and (name == "PUSH_PEER_INFO") == (len(d.args) == 1):
        option = Directive(d.source, d.line, _SETENV_AS_OPTION[name], d.args[1:], base_dir=d.base_dir)
        b.apply(option, depth)
        return
    if name == "FORWARD_COMPATIBLE" and value == "1":
        b.forward_compatible = True
    b.opts = replace(b.opts, setenv=(*b.opts.setenv, (name, value)))


# Why some accepted-and-ignored options truly change nothing here; the daemon's warning says so.
_NO_EFFECT_WHY: dict[str, str] = {
    "keysize": "it sets the key size of variable-key CBC/BF ciphers, which pyovpn does not run "
    "(OpenVPN 2.6 ignores it for AEAD ciphers too)",
    "block-outside-dns": "it is Windows-only (it blocks DNS outside the tunnel with the Windows "
    "Filtering Platform)",
    "route-method": "it chooses how routes are set on Windows",
    "tun-ipv6": "a tun device carries IPv6 anyway (OpenVPN >= 2.4 ignores it too)",
    "max-routes": "the number of pulled routes is not limited (OpenVPN >= 2.4 ignores it too)",
    "ecdh-curve": "with OpenSSL 3 the curve is negotiated (OpenVPN 2.6 ignores it too); restrict "
    "curves with `tls-groups`",
    "fast-io": "it speeds up OpenVPN's own UDP write loop, which pyovpn's data channel does not use",
}


def no_effect_reason(option: str) -> str | None:
    """Why ``option`` is accepted without effect, when that is a fact of the platform."""
    return _NO_EFFECT_WHY.get(option)


@_option("remote-cert-ku", args=(0, None), usage="remote-cert-ku [HEX...]")
def _opt_remote_cert_ku(b: _Builder, d: Directive) -> None:
    values: list[int] = []
    for word in d.args:
        try:
            value = int(word, 16)
        except ValueError:
            value = -1
        if not 0 < value <= 0xFFFF:
            raise _error(d, f"remote-cert-ku: '{word}' is not a key usage in hex (e.g. a0 or 88)")
        values.append(value)
    b.opts = replace(b.opts, remote_cert_ku=tuple(values))


@_option("sndbuf", "rcvbuf", args=(1, 1), usage="sndbuf|rcvbuf BYTES")
def _opt_socket_buffer(b: _Builder, d: Directive) -> None:
    size = _int(d, d.args[0], d.name, 0, 0x7FFFFFFF)
    if d.name == "sndbuf":
        b.opts = replace(b.opts, sndbuf=size)
    else:
        b.opts = replace(b.opts, rcvbuf=size)


@_option("bind-dev", args=(1, 1), usage="bind-dev DEVICE")
def _opt_bind_dev(b: _Builder, d: Directive) -> None:
    if not 0 < len(d.args[0]) < 16 or "/" in d.args[0]:
        raise _error(d, f"bind-dev: '{d.args[0]}' is not an interface name")
    b.opts = replace(b.opts, bind_dev=d.args[0])


@_option("tls-version-max", args=(1, 1), usage="tls-version-max 1.2|1.3")
def _opt_tls_version_max(b: _Builder, d: Directive) -> None:
    if d.args[0] not in ("1.0", "1.1", "1.2", "1.3"):
        raise _error(d, f"tls-version-max: unknown version '{d.args[0]}'; use 1.2 or 1.3")
    b.opts = replace(b.opts, tls_version_max=d.args[0])


@_option("nice", args=(1, 1), usage="nice N")
def _opt_nice(b: _Builder, d: Directive) -> None:
    try:
        n = int(d.args[0])
    except ValueError:
        n = 99
    if not -20 <= n <= 19:
        raise _error(d, f"nice: '{d.args[0]}' is not a priority change between -20 and 19")
    b.opts = replace(b.opts, nice=n)


@_option("disable-occ", usage="disable-occ")
def _opt_disable_occ(b: _Builder, d: Directive) -> None:
    # Carried out by design: pyovpn never warns about differences between its own and the
    # peer's options string (the peer's string is only read for the fallback cipher).
    pass


@_option("ping-timer-rem", usage="ping-timer-rem")
def _opt_ping_timer_rem(b: _Builder, d: Directive) -> None:
    # Carried out by design: the keepalive timers start only when a tunnel is up, i.e. once the
    # peer's address is known, which is what this option asks for.
    pass


@_option("reneg-bytes", "reneg-pkts", args=(1, 1), usage="reneg-bytes 0")
def _opt_reneg_volume(b: _Builder, d: Directive) -> None:
    # 0 turns volume-based renegotiation off, which is what pyovpn does (and OpenVPN's default
    # for the AEAD ciphers pyovpn runs), so it is carried out by doing nothing.
    if _int(d, d.args[0], d.name, 0) != 0:
        raise _error(
            d,
            f"`{d.name} {d.args[0]}` is not supported: pyovpn renegotiates by time only; remove it "
            "(AEAD ciphers need no volume limit) or renegotiate more often with `reneg-sec`",
        )


@_option("fragment", args=(1, 2), usage="fragment MAX [mtu]")
def _opt_fragment(b: _Builder, d: Directive) -> None:
    # carried out on the in-process userspace plane (datachannel/fragment.py)
    size = _int(d, d.args[0], "fragment", 100, 65535)
    if len(d.args) == 2:
        if d.args[1] != "mtu":
            raise _error(d, f"fragment: bad second argument '{d.args[1]}'; only `mtu` may follow the size")
        size -= 48  # MAX counts the IP and UDP headers: leave room for IPv6's, the larger
    b.opts = replace(b.opts, fragment=size)


@_option("shaper", args=(1, 1), usage="shaper BYTES_PER_SECOND")
def _opt_shaper(b: _Builder, d: Directive) -> None:
    # carried out on the userspace engine (datachannel/shaper.py); see edge/backendfit.py
    b.opts = replace(b.opts, shaper=_int(d, d.args[0], "shaper", SHAPER_MIN, SHAPER_MAX))


@_option("passtos")
def _opt_passtos(b: _Builder, d: Directive) -> None:
    # carried out on the userspace data plane (the kernel ovpn driver sends every packet with the
    # socket's TOS); see edge/backendfit.py and datachannel/tos.py
    b.opts = replace(b.opts, passtos=True)


# --------------------------------------------------------------------------------------------------
# Stage 3: validation
# --------------------------------------------------------------------------------------------------


def _validate(b: _Builder) -> Options:
    """Cross-option checks; turn the builder into the frozen Options."""
    o = b.opts
    top = o.config_sources[0] if o.config_sources else COMMAND_LINE

    def fail(message: str, *option_names: str) -> ConfigError:
        for name in option_names:
            d = b.where.get(name)
            if d is not None:
                return _error(d, message)
        return ConfigError(message, source=top)

    # `server`/`server-ipv6` imply `mode server` and `tls-server`, whatever `mode` says (as in OpenVPN).
    helper = o.server_network is not None or o.server_ipv6 is not None
    server = helper or o.mode == "server"

    dev_type = o.dev_type
    if "dev-type" not in b.where:
        dev_type = "tap" if o.dev.startswith("tap") else "null" if o.dev.startswith("null") else "tun"
    if dev_type not in ("tun", "null"):
        raise fail(_layer2_message(f"dev {o.dev}"), "dev")
    if o.fragment and server:
        raise fail(
            "`fragment` on a P2MP server is not supported: fragmentation runs per connection on "
            "pyovpn's in-process data plane, which does it for P2P only; use `mssfix` instead",
            "fragment",
        )
    if o.shaper and server:
        raise fail("`shaper` cannot be used on a P2MP server (as in OpenVPN); remove it", "shaper")
    if o.shaper and o.userspace_engine == "inprocess":
        raise fail(
            "`shaper` runs on the userspace engine, not with `userspace-engine inprocess`: remove "
            "one of the two",
            "shaper",
            "userspace-engine",
        )
    if dev_type == "null" and server:
        raise fail(
            "`dev null` on a P2MP server is not supported: a server routes its clients' packets "
            "through its device; use `dev tun`",
            "dev",
            "dev-type",
        )

    for name, used in (
        ("management-query-passwords", o.management_query_passwords),
        ("management-forget-disconnect", o.management_forget_disconnect),
    ):
        if used and o.management is None and o.management_unix is None:
            raise fail(
                f"`{name}` needs a management interface (`management IP PORT` or "
                "`management PATH unix`) for the passwords; add one or remove the option",
                name,
            )

    tls_server = b.tls_server
    if server:
        if b.tls_client or o.pull:
            raise fail(
                "a P2MP server (`server`/`mode server`) cannot also be a client: remove "
                "`client`/`tls-client`/`pull` from the server's config (they belong in the clients' configs)",
                "tls-client",
                "pull",
            )
        if not helper and not b.tls_server:
            raise fail(
                "`mode server` requires `tls-server`; add it (the `server NETWORK NETMASK` helper "
                "implies both)",
                "mode",
            )
        tls_server = True

    if b.tls_client and tls_server:
        raise fail(
            "both a client role (`client`/`tls-client`) and `tls-server` are set; keep only one",
            "tls-server",
            "tls-client",
        )
    if not (b.tls_client or tls_server):
        raise fail("pyovpn supports TLS modes only: add `client`, `tls-client` or `tls-server`")
    role: Literal["client", "server"] = "client" if b.tls_client else "server"

    if o.pull and role != "client":
        raise fail(
            "`pull` needs the client role; use `client` (or `tls-client`) instead of `tls-server`", "pull"
        )
    if o.auth_user_pass is not None and server:
        raise fail(
            "`auth-user-pass` is for clients (their own username and password) and cannot be used by a "
            "server; remove it, and check the clients' passwords with `auth-user-pass-verify` instead",
            "auth-user-pass",
        )
    if o.auth_user_pass is not None and not o.pull:
        raise fail("auth-user-pass requires `pull`; add `client` (or `pull`)", "auth-user-pass")

    if o.ca is None and o.pkcs12 is None:
        who = "the server's" if role == "client" else "the clients'"
        raise fail(
            f"tls-{role} needs `ca`: the CA certificate that signed {who} certificate; add `ca FILE` or <ca>"
        )
    if o.pkcs12 is not None:
        pass  # ca, cert and key come from the bundle (edge/keymaterial.py)
    elif role == "server" or not o.pull:
        for name, value in (("cert", o.cert), ("key", o.key)):
            if value is None:
                raise fail(
                    f"tls-{role} needs `{name}` (its own certificate and private key); add `{name} FILE`"
                )
    elif (o.cert is None) != (o.key is None):
        raise fail("if you use one of `cert` or `key`, you must use both", "cert", "key")
    elif o.cert is None and o.auth_user_pass is None:
        raise fail("the client has no way to authenticate: add `cert` and `key`, or `auth-user-pass FILE`")

    wraps = [n for n in ("tls-auth", "tls-crypt", "tls-crypt-v2") if n in b.where]
    if len(wraps) > 1 and "tls-crypt-v2" in wraps:
        raise fail(f"`{'` and `'.join(wraps)}` cannot be used together; keep only `tls-crypt-v2`", *wraps)
    if o.tls_crypt_v2_server is not None and role == "client":
        raise fail(
            "`tls-crypt-v2` on a client needs a client key, but this is the server key; make one with "
            "`openvpn --genkey tls-crypt-v2-client client.key --tls-crypt-v2 server.key`",
            "tls-crypt-v2",
        )
    if o.tls_crypt_v2_client is not None and role == "server":
        raise fail(
            "`tls-crypt-v2` on a server needs the server key "
            "(-----BEGIN OpenVPN tls-crypt-v2 server key-----), but this is a client key",
            "tls-crypt-v2",
        )
    if o.tls_auth is not None and o.tls_crypt is not None:
        raise fail(
            "`tls-auth` and `tls-crypt` cannot be used together; keep one (tls-crypt is preferred)",
            "tls-crypt",
            "tls-auth",
        )

    if role == "client" and not (b.remote_words or b.connection_blocks):
        raise fail("a TLS client needs to know its server: add `remote HOST [PORT]`", "tls-client", "client")

    if o.keepalive is not None and any(n in b.where for n in ("ping", "ping-restart", "ping-exit")):
        raise fail(
            "`keepalive` conflicts with `ping`/`ping-restart`/`ping-exit`; use only `keepalive` "
            "(it sets both), or `ping` with `ping-exit`",
            "keepalive",
        )

    _check_scripts(b, fail)

    if server:
        _check_server(b, fail)
    else:
        for name in (
            "ifconfig-pool", "ifconfig-ipv6-pool", "ifconfig-pool-persist", "push", "client-config-dir",
            "ccd-exclusive", "client-to-client", "duplicate-cn", "auth-user-pass-verify",
            "client-connect", "client-disconnect", "learn-address", "username-as-common-name",
        ):  # fmt: skip
            if name in b.where:
                raise fail(
                    f"`{name}` is a server option and needs P2MP server mode: add `server NETWORK NETMASK` "
                    "and `topology subnet`, or remove it",
                    name,
                )
        if o.verify_client_cert != "require":
            raise fail(
                "`verify-client-cert` is a server option and needs P2MP server mode; remove it",
                "verify-client-cert",
            )

    # Outside server mode OpenVPN resolves a bare "tcp" to the client side, in server mode to the server.
    def side(proto: str) -> Proto:
        return cast(Proto, ("tcp-server" if server else "tcp-client") if proto == "tcp" else proto)

    remotes = tuple(
        Remote(host, port, side(proto) if proto is not None else None, family)
        for host, port, proto, family in b.remote_words
    )
    if b.connection_blocks:
        if b.remote_words:
            # OpenVPN silently drops the `remote` lines then; say so instead
            raise fail(
                "`remote` lines and <connection> blocks cannot be mixed (OpenVPN would ignore the "
                "`remote` lines): move each server into its own <connection> block",
                "remote",
            )
        remotes = tuple(
            Remote(host, port, side(proto) if proto else None, family, retry, retry_max, poll)
            for (host, port, proto, family), retry, retry_max, poll in b.connection_blocks
        )

    protos = [r.proto or b.proto_word or "udp" for r in remotes] or [b.proto_word or "udp"]
    if o.fragment and any(p.startswith("tcp") for p in protos):
        raise fail("`fragment` can only be used with `proto udp` (as in OpenVPN); remove it", "fragment")

    # Helper expansion (OpenVPN's helper_client_server / helper_keepalive), in OpenVPN's push order.
    ping, ping_restart = o.ping, o.ping_restart
    ifconfig, ifconfig_ipv6 = o.ifconfig, o.ifconfig_ipv6
    pool, pool6 = o.ifconfig_pool, o.ifconfig_ipv6_pool
    push = list(o.push)
    topology = o.topology
    if o.server_ipv6 is not None:
        net6 = ipaddress.IPv6Network(o.server_ipv6)
        base6, bits6 = net6.network_address, net6.prefixlen
        ifconfig_ipv6 = (f"{base6 + 1}/{bits6}", str(base6 + 2))
        # OpenVPN starts the pool at +0x1000, or at +2 in networks too small to reach that far.
        pool6 = f"{base6 + (0x1000 if bits6 < 112 else 2)}/{bits6}"
        push.append("tun-ipv6")
    if o.server_network is not None and topology == "net30":
        # OpenVPN's net30 helper: the server is .1 with the point-to-point peer .2, each client a /30
        # from .4 on (client .6 with peer .5, ...); the clients get a route to the server's address
        network, netmask = o.server_network
        net = ipaddress.IPv4Network(f"{network}/{netmask}")
        ifconfig = (str(net.network_address + 1), str(net.network_address + 2))
        if not o.server_nopool:
            pool = (str(net.network_address + 4), str(net.broadcast_address - 4), "")
        server_route = (
            f"route {network} {netmask}" if o.client_to_client else f"route {net.network_address + 1}"
        )
        push.append(server_route)
    elif o.server_network is not None:
        network, netmask = o.server_network
        net = ipaddress.IPv4Network(f"{network}/{netmask}")
        ifconfig = (str(net.network_address + 1), netmask)
        if not o.server_nopool:
            pool = (str(net.network_address + 2), str(net.broadcast_address - 1), netmask)
        push += [f"route-gateway {net.network_address + 1}", f"topology {topology}"]
    if o.keepalive is not None:
        ping, ping_restart = o.keepalive
        if server:
            # The server waits twice as long as it tells its clients to.
            ping_restart *= 2
            push += [f"ping {o.keepalive[0]}", f"ping-restart {o.keepalive[1]}"]

    if server:
        if pool is None and pool6 is None and o.ifconfig_pool_persist is not None:
            raise fail(
                "`ifconfig-pool-persist` needs an address pool: use `server NETWORK NETMASK` (without "
                "nopool) or `ifconfig-pool`/`ifconfig-ipv6-pool`",
                "ifconfig-pool-persist",
            )
        if pool6 is not None and ifconfig_ipv6 is None:
            raise fail(
                "`ifconfig-ipv6-pool` needs the server's own IPv6 address: add `ifconfig-ipv6 ADDRESS/BITS "
                "REMOTE` or use `server-ipv6 NETWORK/BITS` instead",
                "ifconfig-ipv6-pool",
            )
    _check_compression(o, fail)

    return replace(
        o,
        mode="server" if server else "p2p",
        tls_role=role,
        dev_type=dev_type,
        proto=side(b.proto_word) if b.proto_word is not None else o.proto,
        remotes=remotes,
        ifconfig=ifconfig,
        ifconfig_ipv6=ifconfig_ipv6,
        ping=ping,
        ping_restart=ping_restart,
        ifconfig_pool=pool,
        ifconfig_ipv6_pool=pool6,
        push=tuple(push),
    )


_Fail = Callable[..., ConfigError]


def _check_scripts(b: _Builder, fail: _Fail) -> None:
    """OpenVPN refuses to run scripts below `script-security 2`; say so now instead of at run time."""
    o = b.opts
    for name in _SCRIPTS:
        if name in b.where and o.script_security < 2:
            level = "is set to 0 or 1" if "script-security" in b.where else "defaults to 1"
            raise fail(
                f"`{name}` runs a script, which needs script-security 2 (script-security {level}, "
                "where OpenVPN refuses to run scripts); add `script-security 2`",
                name,
            )
    if (
        o.auth_user_pass_verify is not None
        and o.auth_user_pass_verify[1] == "via-env"
        and o.script_security < 3
    ):
        raise fail(
            "`auth-user-pass-verify ... via-env` passes the password in the environment, which OpenVPN "
            "only does with `script-security 3` (at 2 the script would never see the password); use "
            "via-file (recommended) or set `script-security 3`",
            "auth-user-pass-verify",
        )


def _check_server(b: _Builder, fail: _Fail) -> None:
    """The checks OpenVPN makes for `mode server`, plus what an offloaded data channel needs."""
    o = b.opts
    if o.topology == "p2p":
        raise fail(
            "a P2MP server with `topology p2p` is not supported: use `topology subnet` (recommended) "
            "or `topology net30`",
            "topology",
        )
    if b.proto_word == "tcp-client":
        raise fail(
            "a P2MP server needs `proto udp` or `proto tcp-server` (it waits for clients); change the proto",
            "proto",
        )
    for name in ("inactive", "ping-exit"):
        if name in b.where:
            raise fail(
                f"`{name}` is not supported in P2MP server mode (clients that go silent are dropped "
                "by `keepalive`); remove it",
                name,
            )
    if b.remote_words or b.connection_blocks:
        raise fail(
            "`remote` cannot be used by a P2MP server (it waits for clients to connect); remove it",
            "remote",
        )
    if o.nobind:
        raise fail("`nobind` cannot be used by a P2MP server (it must listen); remove it", "nobind")
    if "redirect-gateway" in b.where:
        raise fail(
            "`redirect-gateway` cannot be used by a P2MP server; to send the clients' traffic through "
            'the VPN, use `push "redirect-gateway def1"` instead',
            "redirect-gateway",
        )
    for name in _CLIENT_ROUTING_OPTIONS:
        if name in b.where:
            raise fail(
                f"`{name}` is a client's routing option; a P2MP server does not apply it. Remove it, "
                f'or push it to the clients (push "{name} ...") if they need it',
                name,
            )
    if o.keepalive is not None and o.keepalive[1] > 43200:
        raise fail(
            "keepalive: in server mode the timeout must not exceed 43200 (the server waits twice as "
            "long); use a smaller value, like `keepalive 10 60`",
            "keepalive",
        )
    if o.server_network is not None:
        if "ifconfig" in b.where:
            raise fail(
                "`server` sets the server's own address itself (the first address of the network); "
                "remove `ifconfig`",
                "ifconfig",
            )
        if o.ifconfig_pool is not None and not o.server_nopool:
            raise fail(
                "`server` already defines the address pool; remove `ifconfig-pool`, or add `nopool` to "
                "`server` to use your own pool",
                "ifconfig-pool",
            )
    if o.server_ipv6 is not None:
        if o.server_nopool:
            raise fail(
                "`server-ipv6` always defines an IPv6 address pool and cannot be combined with "
                "`server ... nopool`; remove `nopool`, or set up IPv6 by hand with `ifconfig-ipv6` "
                "instead of `server-ipv6`",
                "server",
            )
        if "ifconfig-ipv6" in b.where:
            raise fail(
                "`server-ipv6` sets the server's own IPv6 address itself; remove `ifconfig-ipv6`",
                "ifconfig-ipv6",
            )
        if o.ifconfig_ipv6_pool is not None:
            raise fail(
                "`server-ipv6` already defines the IPv6 address pool; remove `ifconfig-ipv6-pool`",
                "ifconfig-ipv6-pool",
            )
    if o.management_client_auth and o.management is None and o.management_unix is None:
        raise fail(
            "`management-client-auth` needs a management interface (`management IP PORT` or "
            "`management PATH unix`) for the program that decides; add one or remove the option",
            "management-client-auth",
        )
    if o.ccd_exclusive and o.client_config_dir is None:
        raise fail(
            "`ccd-exclusive` needs `client-config-dir DIR` (it refuses clients without a file there); "
            "add it or remove ccd-exclusive",
            "ccd-exclusive",
        )
    if o.auth_user_pass_verify is None:
        if o.verify_client_cert != "require":
            raise fail(
                f"`verify-client-cert {o.verify_client_cert}` lets clients connect without a "
                "certificate, but there is no other authentication method; add "
                "`auth-user-pass-verify COMMAND via-file` (with `script-security 2`) to check their "
                "passwords, or remove verify-client-cert",
                "verify-client-cert",
            )
        if o.username_as_common_name:
            raise fail(
                "`username-as-common-name` needs `auth-user-pass-verify COMMAND via-file` (the username "
                "is only trusted once a script has checked it); add it or remove username-as-common-name",
                "username-as-common-name",
            )


# --------------------------------------------------------------------------------------------------
# Client-config-dir files
# --------------------------------------------------------------------------------------------------


#: A ccd directive's handler: the options so far and the directive in, the updated options out.
CcdHandler = Callable[[CcdOptions, Directive], CcdOptions]

#: name -> (handler, min args, max args, usage)
_CCD_OPTIONS: dict[str, tuple[CcdHandler, int, int, str]] = {}


def _ccd_option(name: str, lo: int, hi: int, usage: str) -> Callable[[CcdHandler], CcdHandler]:
    def register(fn: CcdHandler) -> CcdHandler:
        _CCD_OPTIONS[name] = (fn, lo, hi, usage)
        return fn

    return register


@_ccd_option("ifconfig-push", 2, 2, "ifconfig-push CLIENT_IP NETMASK")
def _ccd_ifconfig_push(c: CcdOptions, d: Directive) -> CcdOptions:
    local = _ipv4(d, d.args[0], "ifconfig-push")
    if local == "0.0.0.0":
        raise _error(d, "ifconfig-push: 0.0.0.0 is not a usable client address")
    try:
        bits = _netmask_bits(d, d.args[1], "ifconfig-push netmask")
    except ConfigError:
        raise _error(
            d,
            f"ifconfig-push: '{d.args[1]}' is not a netmask; with `topology subnet` (the only server "
            "topology pyovpn supports) the second argument is the netmask, e.g. "
            f"`ifconfig-push {local} 255.255.255.0`, not the net30-style peer address",
        ) from None
    if bits == 0:
        raise _error(d, "ifconfig-push: the netmask 0.0.0.0 is not usable; use the server's netmask")
    return replace(c, ifconfig_push=(local, d.args[1]))


@_ccd_option("ifconfig-ipv6-push", 1, 2, "ifconfig-ipv6-push CLIENT_ADDRESS/BITS [SERVER_ADDRESS]")
def _ccd_ifconfig_ipv6_push(c: CcdOptions, d: Directive) -> CcdOptions:
    _ipv6_prefix(d, d.args[0], "ifconfig-ipv6-push", 64, 124)
    remote = _ipv6(d, d.args[1], "ifconfig-ipv6-push server address") if len(d.args) > 1 else None
    return replace(c, ifconfig_ipv6_push=(d.args[0], remote))


@_ccd_option("iroute", 1, 2, "iroute NETWORK [NETMASK]")
def _ccd_iroute(c: CcdOptions, d: Directive) -> CcdOptions:
    network = _ipv4(d, d.args[0], "iroute network")
    netmask = d.args[1] if len(d.args) > 1 else "255.255.255.255"
    _check_network(d, network, _netmask_bits(d, netmask, "iroute netmask"), "iroute")
    return replace(c, iroutes=(*c.iroutes, (network, netmask)))


@_ccd_option("iroute-ipv6", 1, 1, "iroute-ipv6 NETWORK/BITS")
def _ccd_iroute_ipv6(c: CcdOptions, d: Directive) -> CcdOptions:
    bits = _ipv6_prefix(d, d.args[0], "iroute-ipv6", 0, 128, default=128)
    network = d.args[0].partition("/")[0]
    _check_network(d, network, bits, "iroute-ipv6")
    return replace(c, iroutes_ipv6=(*c.iroutes_ipv6, f"{network}/{bits}"))


@_ccd_option("push", 1, 1, 'push "OPTION [ARGS]" (quote the whole option)')
def _ccd_push(c: CcdOptions, d: Directive) -> CcdOptions:
    return replace(c, push=(*c.push, _push_option(d, d.args[0])))


@_ccd_option("push-reset", 0, 0, "push-reset")
def _ccd_push_reset(c: CcdOptions, d: Directive) -> CcdOptions:
    return replace(c, push_reset=True, push=(), push_remove=())


@_ccd_option("push-remove", 1, 1, "push-remove OPTION")
def _ccd_push_remove(c: CcdOptions, d: Directive) -> CcdOptions:
    prefix = d.args[0]
    if not prefix:
        raise _error(
            d, "push-remove: the option is empty; usage: push-remove OPTION (e.g. push-remove route)"
        )
    push = c.push
    if prefix not in ("ifconfig", "ifconfig-ipv6"):
        # Like OpenVPN: a prefix match on the options pushed so far.
        push = tuple(opt for opt in push if not opt.startswith(prefix))
    return replace(c, push=push, push_remove=(*c.push_remove, prefix))


@_ccd_option("disable", 0, 0, "disable")
def _ccd_disable(c: CcdOptions, d: Directive) -> CcdOptions:
    return replace(c, disable=True)


def parse_ccd(text: str, *, source: str) -> CcdOptions:
    """Parse one client-config-dir file (the per-client options of a P2MP server).

    Only ifconfig-push, ifconfig-ipv6-push, iroute, iroute-ipv6, push, push-reset, push-remove and
    disable are allowed; anything else is a ConfigError naming `source` and the line.
    """
    c = CcdOptions()
    allowed = ", ".join(_CCD_OPTIONS)
    for d in tokenize(text, source=source):
        entry = _CCD_OPTIONS.get(d.name)
        if entry is None:
            raise _error(
                d,
                f"option '{d.name}' is not allowed in a client-config-dir file (allowed there: "
                f"{allowed}); remove it, or put server-wide options in the server's config",
            )
        handler, lo, hi, usage = entry
        if d.inline:
            raise _error(d, f"option '{d.name}' cannot be an inline <{d.name}> block; write `{usage}`")
        if not lo <= len(d.args) <= hi:
            spec = _Spec(_opt_ignored, lo, hi, usage, False)
            raise _error(d, f"option '{d.name}' {_count_text(spec, len(d.args))}; usage: {usage}")
        c = handler(c, d)
    return c


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def parse_config_text(
    text: str, *, source: str = "<string>", base_dir: str | None = None, cwd: str | None = None
) -> Options:
    """Parse one configuration text (as in a .conf/.ovpn file) into validated Options.

    Relative file names are looked up in `cwd` (default: the process cwd), then in `base_dir`.
    """
    b = _Builder(cwd=cwd if cwd is not None else os.getcwd())
    b.opts = replace(b.opts, config_sources=(source,))
    b.apply_all(tokenize(text, source=source, base_dir=base_dir), depth=1)
    return _validate(b)


def _argv_directives(argv: Sequence[str]) -> Iterator[Directive]:
    # Like OpenVPN's parse_argv: a lone non-option argument is the config file.
    if len(argv) == 1 and not argv[0].startswith("--"):
        yield Directive(COMMAND_LINE, 0, "config", (argv[0],))
        return
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("--"):
            raise ConfigError(
                f"expected an --option but got '{word}'; option arguments follow their option "
                "(e.g. `--verb 3`), and a config file is given as `--config FILE`",
                source=COMMAND_LINE,
            )
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        yield Directive(COMMAND_LINE, 0, word[2:], tuple(argv[i + 1 : j]))
        i = j


def parse_args(argv: list[str], *, cwd: str | None = None) -> Options:
    """Parse an OpenVPN-style command line (`--config FILE`, `--opt ARG...`) into validated Options.

    Options apply in order, later ones overriding earlier ones; a `--config` file's options take
    effect at the position of `--config`.
    """
    if not argv:
        raise ConfigError(
            "no configuration given; pass a config file (`pyovpn client.conf`) or options like "
            "`--config FILE`",
            source=COMMAND_LINE,
        )
    b = _Builder(cwd=cwd if cwd is not None else os.getcwd())
    for d in _argv_directives(argv):
        b.apply(d, depth=0)
    return _validate(b)
