"""``pyovpn genkey``: key files in the formats stock OpenVPN's ``--genkey`` writes and reads.

``secret``/``tls-auth``/``tls-crypt`` write an OpenVPN Static key V1; ``tls-crypt-v2-server``
and ``tls-crypt-v2-client`` write the PEM-style tls-crypt-v2 keys, interchangeable with
``openvpn --genkey`` output both ways; ``auth-token`` writes an ``auth-gen-token-secret``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import secrets
import sys
import time
from pathlib import Path

from pyovpn.proto import tlscryptv2
from pyovpn.server.authtoken import secret_pem
from pyovpn.tools.pki import static_key_text

_STATIC_KINDS = ("secret", "tls-auth", "tls-crypt")
_KINDS = (*_STATIC_KINDS, "tls-crypt-v2-server", "tls-crypt-v2-client", "auth-token")


def _write_private(path: str | None, text: str) -> None:
    if path is None or path == "":
        sys.stdout.write(text)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def client_key_text(server: tlscryptv2.ServerKey, metadata_b64: str | None, now: int) -> str:
    """A new client key wrapped by ``server``; metadata is the user's bytes or a timestamp."""
    if metadata_b64 is None:
        metadata = tlscryptv2.timestamp_metadata(now)
    else:
        try:
            user = base64.b64decode(metadata_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("--metadata must be base64 (e.g. `echo -n text | base64`)") from None
        metadata = tlscryptv2.user_metadata(user)
        if len(metadata) > tlscryptv2.MAX_METADATA_LEN:
            raise ValueError(
                f"metadata too long ({len(user)} bytes, max {tlscryptv2.MAX_METADATA_LEN - 1} bytes)"
            )
    kc = secrets.token_bytes(tlscryptv2.CLIENT_KEY_LEN)
    return tlscryptv2.ClientKey(kc, tlscryptv2.wrap_client_key(server, kc, metadata)).to_pem()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pyovpn genkey", description="write an OpenVPN key file")
    parser.add_argument("kind", choices=_KINDS)
    parser.add_argument("file", nargs="?", help="where to write the key (default: standard output)")
    parser.add_argument("--key", "--tls-crypt-v2", dest="server_key", help="tls-crypt-v2 server key file")
    parser.add_argument("--metadata", help="tls-crypt-v2 client metadata, base64 (default: a timestamp)")
    args = parser.parse_args(argv)
    if args.kind in _STATIC_KINDS:
        _write_private(args.file, static_key_text())
        return 0
    if args.kind == "auth-token":
        if not args.file:
            print("genkey auth-token needs a FILE (the secret never goes to the terminal)", file=sys.stderr)
            return 1
        try:
            # 0600 from the start, and never over an existing secret
            fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            print(f"genkey: cannot create {args.file}: {exc.strerror}; pick a new file name", file=sys.stderr)
            return 1
        with os.fdopen(fd, "wb") as f:
            f.write(secret_pem(os.urandom(128)))
        return 0
    if args.kind == "tls-crypt-v2-server":
        _write_private(
            args.file, tlscryptv2.ServerKey(secrets.token_bytes(tlscryptv2.SERVER_KEY_LEN)).to_pem()
        )
        return 0
    if args.server_key is None:
        print("genkey tls-crypt-v2-client needs the server key: add --key SERVERKEY", file=sys.stderr)
        return 1
    try:
        server = tlscryptv2.parse_server_key(Path(args.server_key).read_text())
        text = client_key_text(server, args.metadata, int(time.time()))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"genkey tls-crypt-v2-client: {exc}", file=sys.stderr)
        return 1
    _write_private(args.file, text)
    return 0
