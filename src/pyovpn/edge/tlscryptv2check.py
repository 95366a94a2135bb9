"""The server's checks of a tls-crypt-v2 client key's metadata: ``tls-crypt-v2-max-age`` and ``-verify``.

The sans-I/O wrap calls the check with the metadata of each client key it unwraps; this
module supplies the clock and runs the script. Like OpenVPN, the script runs synchronously
(the handshake of that client cannot go on before its verdict) with ``script_type``,
``metadata_type`` and ``metadata_file`` (the metadata without its type byte) in its environment;
exit status 0 accepts the key.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time

from pyovpn.config import Options
from pyovpn.errors import AuthenticationError
from pyovpn.proto import tlscryptv2
from pyovpn.scripts import SCRIPT_TIMEOUT, refusal

log = logging.getLogger(__name__)


def run_verify_script(command: str, metadata: bytes, *, script_security: int) -> None:
    """Raise AuthenticationError unless ``command`` accepts ``metadata`` (exit status 0)."""
    why = refusal("tls-crypt-v2-verify", script_security)
    if why is not None:
        raise AuthenticationError(why)
    fd, path = tempfile.mkstemp(prefix="tls_crypt_v2_metadata_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(metadata[1:])
        env = {
            **os.environ,
            "script_type": "tls-crypt-v2-verify",
            "metadata_type": str(metadata[0]) if metadata else "",
            "metadata_file": path,
        }
        try:
            status = subprocess.run(command.split(), env=env, timeout=SCRIPT_TIMEOUT, check=False).returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AuthenticationError(f"tls-crypt-v2-verify script {command} failed: {exc}") from None
    finally:
        os.unlink(path)
    if status != 0:
        raise AuthenticationError(f"tls-crypt-v2-verify script refused the client key (exit status {status})")


def metadata_check(opts: Options) -> tlscryptv2.MetadataCheck | None:
    """The check a server applies to each client key, or None when nothing is configured."""
    max_age, command = opts.tls_crypt_v2_max_age, opts.tls_crypt_v2_verify
    if max_age is None and command is None:
        return None

    def check(metadata: bytes) -> None:
        if not metadata:
            raise AuthenticationError("tls-crypt-v2 client key carries no metadata type")
        if max_age is not None:
            tlscryptv2.check_key_age(metadata, max_age, int(time.time()))
        if command is not None:
            run_verify_script(command, metadata, script_security=opts.script_security)

    return check
