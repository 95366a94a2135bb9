"""`pyovpn genkey auth-token FILE`: a fresh auth-gen-token-secret, in the format OpenVPN writes."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pyovpn.server.authtoken import secret_pem

USAGE = "usage: pyovpn genkey auth-token FILE"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "auth-token":
        print(USAGE, file=sys.stderr)
        print(
            "(other key kinds: `openvpn --genkey secret|tls-crypt|tls-crypt-v2-server FILE`)", file=sys.stderr
        )
        return 1
    path = argv[1]
    try:
        # 0600 from the start: the secret must never be readable by others, even briefly
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"genkey: cannot create {path}: {exc.strerror}; pick a new file name", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(secret_pem(os.urandom(128)))
    return 0
