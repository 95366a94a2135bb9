"""crl-verify at run time: a replaced CRL file is re-read, a broken one keeps the old CRL, DIR form."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from cryptography import x509

from pyovpn.config import parse_config_text
from pyovpn.edge.crl import CrlDir, CrlFile, revocation_check
from pyovpn.errors import ConfigError, ProtocolError
from pyovpn.proto.tls import PeerCheck, check_peer_certificate
from pyovpn.tools.pki import Pki, issue_client, make_pki, write_crl


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


class FakeFs:
    """stat() whose mtime the test sets, and read() that counts: when does CrlFile re-read?"""

    def __init__(self) -> None:
        self.mtime_ns = 1_000_000_000
        self.reads = 0

    def stat(self, path: str) -> os.stat_result:
        fields = list(os.stat(path))[:10]
        fields[8] = self.mtime_ns // 1_000_000_000
        return os.stat_result(fields, {"st_mtime_ns": self.mtime_ns})

    def read(self, path: str) -> bytes:
        self.reads += 1
        return Path(path).read_bytes()


def test_replaced_crl_is_reread_only_when_the_file_changed(pki: Pki, tmp_path: Path) -> None:
    alice, _ = issue_client(pki, "alice")
    crl = write_crl(pki, tmp_path / "crl.pem")
    fs = FakeFs()
    revoked = CrlFile(str(crl), stat=fs.stat, read=fs.read)
    serial = _cert(alice).serial_number
    assert not revoked(serial)
    assert not revoked(serial)
    assert fs.reads == 1  # unchanged stat: the parsed CRL is reused

    write_crl(pki, crl, revoked=[alice])
    # same mtime and inode but a different size is a change too
    assert revoked(serial)
    assert fs.reads == 2
    assert not revoked(_cert(pki.client_crt).serial_number)


def test_broken_replacement_keeps_the_previous_crl_and_logs(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bob, _ = issue_client(pki, "bob")
    crl = write_crl(pki, tmp_path / "crl.pem", revoked=[bob])
    fs = FakeFs()
    revoked = CrlFile(str(crl), stat=fs.stat, read=fs.read)
    serial = _cert(bob).serial_number
    assert revoked(serial)

    crl.write_text("-----BEGIN X509 CRL-----\ntruncated")
    fs.mtime_ns += 1
    with caplog.at_level(logging.ERROR, logger="pyovpn.crl"):
        assert revoked(serial)  # still revoked: a half-written CRL must not let bob back in
        assert revoked(serial)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "KEEPING the previous CRL" in errors[0], errors
    assert fs.reads == 2  # the broken version is not parsed again on every handshake

    write_crl(pki, crl)  # fixed: an empty CRL un-revokes bob
    fs.mtime_ns += 1
    assert not revoked(serial)


def test_missing_file_keeps_the_previous_crl(pki: Pki, tmp_path: Path) -> None:
    carol, _ = issue_client(pki, "carol")
    crl = write_crl(pki, tmp_path / "crl.pem", revoked=[carol])
    revoked = CrlFile(str(crl))
    crl.unlink()
    assert revoked(_cert(carol).serial_number)


def test_unparsable_crl_at_start_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "crl.pem"
    bad.write_text("-----BEGIN X509 CRL-----\nnope\n-----END X509 CRL-----\n")
    with pytest.raises(ConfigError, match="PEM CRL"):
        CrlFile(str(bad))


def test_crl_dir_revokes_by_decimal_serial_file(pki: Pki, tmp_path: Path) -> None:
    dave, _ = issue_client(pki, "dave")
    serial = _cert(dave).serial_number
    check = CrlDir(str(tmp_path))
    assert not check(serial)
    (tmp_path / str(serial)).touch()
    assert check(serial)
    assert not check(serial + 1)


def test_config_gives_the_run_time_check_and_the_tls_layer_uses_it(pki: Pki, tmp_path: Path) -> None:
    erin, _ = issue_client(pki, "erin")
    crl = write_crl(pki, tmp_path / "crl.pem")
    base = "client\ndev tun\nremote 127.0.0.1\n"
    base += f"ca {pki.ca_crt}\ncert {pki.client_crt}\nkey {pki.client_key}\n"
    o = parse_config_text(base + f"crl-verify {crl}\n")
    assert o.crl_verify_source == (str(crl), False)
    is_revoked = revocation_check(o.crl_verify_source)
    assert is_revoked is not None
    check = PeerCheck(crl=o.crl_verify, is_revoked=is_revoked)
    check_peer_certificate(_cert(erin), check)  # not revoked yet
    write_crl(pki, crl, revoked=[erin])
    with pytest.raises(ProtocolError, match="revoked"):
        check_peer_certificate(_cert(erin), check)

    d = parse_config_text(base + f"crl-verify {tmp_path} dir\n")
    assert d.crl_verify_source == (str(tmp_path), True) and d.crl_verify is None
    assert revocation_check(None) is None
