"""The installers' server configs (installer_servers/) laid out as the installers do, with a fresh
test PKI under the file names each config uses; shared by the tests that run them."""

from __future__ import annotations

import shutil
from pathlib import Path

from pyovpn.tools.pki import Pki, issue_client, write_crl

TEMPLATES = Path(__file__).parent / "installer_servers"
# the files each server config names, relative to its directory, as the installers lay them out
KEY_FILES = {"tc.key": "tc_key", "tls-crypt.key": "tc_key", "ta.key": "ta_key"}


def lay_out(pki: Pki, workdir: Path, installer: str, server_ip: str) -> Path:
    """``installer``-server.conf and the files it names, test PKI in place of its keys."""
    shutil.copy(pki.ca_crt, workdir / "ca.crt")
    shutil.copy(pki.server_crt, workdir / "server.crt")
    shutil.copy(pki.server_key, workdir / "server.key")
    for name, attr in KEY_FILES.items():
        shutil.copy(getattr(pki, attr), workdir / name)
    shutil.copy(TEMPLATES / "ffdhe2048.pem", workdir / "dh.pem")
    write_crl(pki, workdir / "crl.pem")
    (workdir / "ccd").mkdir(exist_ok=True)
    conf = workdir / f"{installer}-server.conf"
    conf.write_text((TEMPLATES / f"{installer}-server.conf").read_text().replace("SERVER_IP", server_ip))
    return conf


def issue(pki: Pki, workdir: Path, cn: str) -> Path:
    """A client certificate kept in the workdir, so revoking it and connecting with it agree."""
    crt, key = issue_client(pki, cn)
    shutil.copy(key, workdir / f"{cn}.key")
    return Path(shutil.copy(crt, workdir / f"{cn}.crt"))
