"""`crl-verify` at run time: the CRL file re-read when it changes, or a `crl-verify DIR dir` lookup.

OpenVPN consults the CRL on every TLS handshake, so replacing the file revokes a client without a
restart. Here the file's (mtime, size, inode) is checked per handshake and the CRL parsed again only
when that changed; a replacement that does not parse keeps the previous CRL and says so loudly,
so a half-written file never lets revoked clients back in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from pyovpn.errors import ConfigError

log = logging.getLogger("pyovpn.crl")

Stat = Callable[[str], os.stat_result]
Read = Callable[[str], bytes]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass
class _Loaded:
    stamp: tuple[int, int, int]
    crl: x509.CertificateRevocationList


class CrlFile:
    """A PEM CRL file, reloaded when its stat changes; call it with a serial: is it revoked?"""

    def __init__(self, path: str, *, stat: Stat = os.stat, read: Read = _read) -> None:
        self.path = path
        self._stat = stat
        self._read = read
        self._loaded: _Loaded | None = None
        self._failed_stamp: tuple[int, int, int] | None = None
        self._refresh()
        if self._loaded is None:
            raise ConfigError(f"crl-verify: '{path}' cannot be read as a PEM CRL; give a valid PEM CRL file")

    def _refresh(self) -> None:
        try:
            st = self._stat(self.path)
        except OSError as exc:
            if self._failed_stamp != (-1, -1, -1):
                self._failed_stamp = (-1, -1, -1)
                log.error(
                    "crl-verify: cannot stat '%s' (%s); still using the CRL read before", self.path, exc
                )
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if (self._loaded is not None and stamp == self._loaded.stamp) or stamp == self._failed_stamp:
            return
        try:
            crl = x509.load_pem_x509_crl(self._read(self.path))
        except (OSError, ValueError) as exc:
            self._failed_stamp = stamp
            log.error(
                "crl-verify: '%s' changed but cannot be loaded (%s); KEEPING the previous CRL until the "
                "file is fixed (write a PEM CRL, e.g. `openssl ca -gencrl -out %s`)",
                self.path,
                exc,
                self.path,
            )
            return
        if self._loaded is not None:
            log.info("crl-verify: reloaded '%s' (%d revoked)", self.path, len(crl))
        self._loaded = _Loaded(stamp, crl)
        self._failed_stamp = None

    def __call__(self, serial: int) -> bool:
        self._refresh()
        assert self._loaded is not None  # __init__ refuses to start without one
        return self._loaded.crl.get_revoked_certificate_by_serial_number(serial) is not None


class CrlDir:
    """`crl-verify DIR dir`: a certificate is revoked when DIR holds a file named by its decimal serial."""

    def __init__(self, path: str, *, exists: Callable[[str], bool] = os.path.exists) -> None:
        self.path = path
        self._exists = exists

    def __call__(self, serial: int) -> bool:
        return self._exists(os.path.join(self.path, str(serial)))


def revocation_check(source: tuple[str, bool] | None) -> Callable[[int], bool] | None:
    """The per-handshake check for `crl-verify`'s file or directory, or None (inline CRL or none)."""
    if source is None:
        return None
    path, is_dir = source
    return CrlDir(path) if is_dir else CrlFile(path)
