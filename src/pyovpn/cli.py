"""The ``pyovpn`` command: OpenVPN-style options in, a running tunnel out."""

from __future__ import annotations

import sys

from pyovpn import __version__
from pyovpn.errors import ConfigError

USAGE = """\
usage: pyovpn --config FILE [--option args ...]
       pyovpn --option args ...          (OpenVPN-style long options, later ones win)
       pyovpn demo                       (two network namespaces, a tunnel, a ping; needs root)
       pyovpn show [INTERFACE] [--json]  (running tunnels, peers, traffic; like `wg show`)
       pyovpn genkey KIND [FILE] [--key SERVERKEY] [--metadata B64]
                                         (secret, tls-crypt, tls-crypt-v2-server, tls-crypt-v2-client)
       pyovpn genkey auth-token FILE     (a secret for auth-gen-token-secret)

pyovpn reads OpenVPN 2.6 configuration syntax. Roles: `client` (pull from an OpenVPN server),
`tls-client` / `tls-server` with `ifconfig` (P2P). `--dco auto|kernel|userspace` picks the
data channel. Logs `Initialization Sequence Completed` once the tunnel is up.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 1
    if args[0] in ("--version", "version"):
        print(f"pyovpn {__version__}")
        return 0
    if args[0] == "show":
        from pyovpn.tools import show

        return show.main(args[1:])
    if args[0] == "genkey":
        from pyovpn.tools import genkey

        return genkey.main(args[1:])
    if args[0] == "demo":
        from pyovpn.tools import demo

        return demo.main(args[1:])
    if args[0] == "genkey":
        from pyovpn.tools import genkey

        return genkey.main(args[1:])
    from pyovpn.config import parse_args

    try:
        opts = parse_args(args)
    except ConfigError as exc:
        print(f"Options error: {exc}", file=sys.stderr)
        print("Use pyovpn --help for a summary.", file=sys.stderr)
        return 1
    from pyovpn import daemon

    return daemon.run(opts)
