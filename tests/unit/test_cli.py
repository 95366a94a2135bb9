"""The ``pyovpn`` command as a user meets it: help, config errors, backend choice errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyovpn.datachannel.choice import kernel_ovpn_status
from pyovpn.tools.pki import make_pki


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyovpn", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_help_and_version() -> None:
    res = run("--help")
    assert res.returncode == 0 and "--config FILE" in res.stdout
    assert run("--version").stdout.startswith("pyovpn ")
    assert run().returncode == 1


def test_unknown_option_names_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("client\n# comment\nfrobnicate yes\n")
    res = run("--config", str(conf))
    assert res.returncode == 1
    assert f"{conf}:3" in res.stderr and "frobnicate" in res.stderr


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("compress migrate", "migrate"),
        ("secret static.key", "static-key"),
        ("cipher AES-192-GCM", "AEAD"),
        ("dev tap0", "tap"),
    ],
)
def test_non_offloadable_options_are_refused_with_a_reason(tmp_path: Path, line: str, needle: str) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"client\nremote 127.0.0.1\nca ca.crt\n{line}\n")
    (tmp_path / "ca.crt").write_text("x")
    res = run("--config", str(conf), cwd=tmp_path)
    assert res.returncode == 1
    assert needle.lower() in res.stderr.lower() and ":4" in res.stderr


def test_dco_kernel_without_the_driver_fails_clearly(tmp_path: Path) -> None:
    ok, _ = kernel_ovpn_status()
    if ok:
        pytest.skip("this kernel has the ovpn driver; the failure path cannot be shown here")
    pki = make_pki(tmp_path)
    conf = tmp_path / "c.conf"
    conf.write_text(
        f"tls-client\nremote 127.0.0.1 1\nnobind\nca {pki.ca_crt}\n"
        f"cert {pki.client_crt}\nkey {pki.client_key}\ndev tun0\nifconfig 10.9.0.2 10.9.0.1\ndco kernel\n"
    )
    res = run("--config", str(conf))
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert "--dco kernel" in out and "ovpn" in out and "userspace" in out
