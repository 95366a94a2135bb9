"""Runs one corpus config with stock OpenVPN and with pyovpn, and says what each made of it.

Each config runs inside a fresh pair of network namespaces from ``tests.netns.harness``
(stock in one, pyovpn in the other). Neither namespace has a route out, so remote hosts
cannot be resolved or reached and nothing leaves the machine: a run either stops on its
options (refused), or gets past them and keeps trying the network (accepted).

The config's placeholders and the files it names are filled with test material made here:
the same material and the same command line for both implementations.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from pyovpn.tools.pki import Pki, make_pki
from tests.corpus.sanitize import FILE_OPTIONS, OUTPUT_OPTIONS, PLACEHOLDER, SCRIPT_OPTIONS
from tests.netns.harness import Netns, Proc

CORPUS_DIR = Path(__file__).resolve().parent / "configs"
EXPECTED_REFUSALS = Path(__file__).resolve().parent / "expected_refusals.txt"

Impl = Literal["openvpn", "pyovpn"]
Verdict = Literal["accepted", "refused", "undecided"]

# A run that is still going this long after its banner line got past its options.
SETTLE_SECONDS = 3.0
# The most a run may take to print its banner (or refuse) on a loaded machine.
START_LIMIT_SECONDS = 40.0

_BANNER: dict[Impl, re.Pattern[str]] = {
    "openvpn": re.compile(r"OpenVPN 2\.\d+\.\d+ \S+ \[SSL"),
    "pyovpn": re.compile(r"pyovpn \S+ \(OpenVPN-compatible", re.M),
}
_OPTIONS_ERROR = re.compile(r"Options error: ?(.*)")
# pyovpn's line for an option it takes without acting on it.
_NO_EFFECT = re.compile(r"option '([^']+)' is accepted but has no effect")

CREDENTIALS = "corpus-user\ncorpus-password\n"
NOOP_SCRIPT = "#!/bin/sh\nexit 0\n"


@dataclass
class Material:
    """Test stand-ins for every kind of file or inline block the corpus uses."""

    pki: Pki
    dh_pem: str
    crl_pem: str
    tls_crypt_v2_server: str
    tls_crypt_v2_client: str
    client_p12_b64: str
    server_p12_b64: str
    client_fingerprint: str
    server_fingerprint: str

    def text(self, kind: str, *, server: bool) -> str:
        pki = self.pki
        if kind in ("ca", "extra-certs"):
            return pki.ca_crt.read_text()
        if kind == "cert":
            return (pki.server_crt if server else pki.client_crt).read_text()
        if kind == "key":
            return (pki.server_key if server else pki.client_key).read_text()
        if kind in ("tls-auth", "secret"):
            return pki.ta_key.read_text()
        if kind == "tls-crypt":
            return pki.tc_key.read_text()
        if kind == "tls-crypt-v2":
            return self.tls_crypt_v2_server if server else self.tls_crypt_v2_client
        if kind == "dh":
            return self.dh_pem
        if kind == "crl-verify":
            return self.crl_pem
        if kind == "pkcs12":
            return self.server_p12_b64 if server else self.client_p12_b64
        if kind == "peer-fingerprint":
            return self.client_fingerprint if server else self.server_fingerprint
        if kind in ("auth-user-pass", "http-proxy-user-pass"):
            return CREDENTIALS
        if kind == "askpass":
            return "corpus-password\n"
        raise ValueError(f"no test material for {kind!r}")


def _fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256())) + "\n"


def _crl(pki: Pki) -> str:
    ca_cert = x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise TypeError("the test CA key is neither EC nor RSA")
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM).decode()


def _p12(pki: Pki, cert_path: Path, key_path: Path) -> str:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise TypeError("the test key is neither EC nor RSA")
    blob = pkcs12.serialize_key_and_certificates(
        b"corpus",
        key,
        x509.load_pem_x509_certificate(cert_path.read_bytes()),
        [x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())],
        serialization.NoEncryption(),
    )
    return base64.encodebytes(blob).decode()


def _dh_params() -> str:
    # A named RFC 7919 group: instant, unlike generating fresh parameters.
    out = subprocess.run(
        ["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout


def _tls_crypt_v2_keys(workdir: Path) -> tuple[str, str]:
    # Stock OpenVPN is the reference for this key format, so it makes the keys.
    server, client = workdir / "tc2-server.key", workdir / "tc2-client.key"
    subprocess.run(
        ["openvpn", "--genkey", "tls-crypt-v2-server", str(server)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    subprocess.run(
        ["openvpn", "--tls-crypt-v2", str(server), "--genkey", "tls-crypt-v2-client", str(client)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return server.read_text(), client.read_text()


def make_material(workdir: Path) -> Material:
    """Fresh test PKI and keys under ``workdir`` (RSA, the kind most published profiles expect)."""
    pki = make_pki(workdir / "pki", key_type="rsa")
    v2_server, v2_client = _tls_crypt_v2_keys(workdir)
    return Material(
        pki=pki,
        dh_pem=_dh_params(),
        crl_pem=_crl(pki),
        tls_crypt_v2_server=v2_server,
        tls_crypt_v2_client=v2_client,
        client_p12_b64=_p12(pki, pki.client_crt, pki.client_key),
        server_p12_b64=_p12(pki, pki.server_crt, pki.server_key),
        client_fingerprint=_fingerprint(pki.client_crt),
        server_fingerprint=_fingerprint(pki.server_crt),
    )


def _words(line: str) -> list[str]:
    return line.strip().split()


def _directives(text: str) -> list[list[str]]:
    """The config's option lines as word lists (comments and inline block bodies left out)."""
    out: list[list[str]] = []
    in_block: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if in_block is not None:
            if stripped == f"</{in_block}>":
                in_block = None
            continue
        m = re.fullmatch(r"<([a-z0-9-]+)>", stripped)
        if m:
            in_block = m.group(1)
            continue
        if not stripped or stripped[0] in "#;":
            continue
        out.append(_words(stripped.lstrip("-")))
    return out


def is_server_config(text: str) -> bool:
    for words in _directives(text):
        if words[0] in ("server", "tls-server", "server-bridge") or words[:2] == ["mode", "server"]:
            return True
    return False


@dataclass
class Prepared:
    """A config made runnable in ``workdir``: its path and the extra command-line options."""

    config: Path
    extra_args: list[str] = field(default_factory=list)
    log_file: Path | None = None


def prepare(name: str, workdir: Path, material: Material) -> Prepared:
    """Copy corpus file ``name`` into ``workdir`` with its placeholders filled and its files provided."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(CORPUS_DIR / name, newline="") as fh:
        text = fh.read()
    server = is_server_config(text)
    for kind in re.findall(r"test material: ([a-z0-9-]+) ", text):
        body = material.text(kind, server=server).rstrip("\n")
        crlf = "\r\n" in text
        if crlf:
            body = body.replace("\n", "\r\n")
        text = text.replace(PLACEHOLDER.format(tag=kind), body, 1)
    config = workdir / name
    with open(config, "w", newline="") as fh:
        fh.write(text)
    extra: list[str] = []
    log_file: Path | None = None
    if any(words[0] in ("syslog", "log", "log-append", "daemon") for words in _directives(text)):
        # Their output would go to syslog or a file the test does not read: both get the
        # same `--log` so the verdict can be read.
        log_file = workdir / "output.log"
        extra += ["--log", log_file.name]
    for words in _directives(text):
        option = words[0]
        if option not in FILE_OPTIONS or option in OUTPUT_OPTIONS:
            continue
        if option in ("auth-user-pass", "askpass") and len(words) == 1:
            # A bare option would prompt on the terminal; both get the same file instead.
            (workdir / f"{option}.txt").write_text(material.text(option, server=server))
            extra += [f"--{option}", f"{option}.txt"]
            continue
        if len(words) < 2 or words[1] == "[inline]":
            continue
        target = workdir / words[1].strip("\"'")
        if option == "client-config-dir":
            target.mkdir(parents=True, exist_ok=True)
        elif option in SCRIPT_OPTIONS:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(NOOP_SCRIPT)
            target.chmod(0o755)
        elif option == "dh" and words[1] == "none":
            continue
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(material.text(option, server=server))
    return Prepared(config, extra, log_file)


@dataclass
class Outcome:
    """What one implementation made of one config."""

    verdict: Verdict
    reason: str  # the refusal message, or how it showed it got past its options
    no_effect: list[str]  # options pyovpn said it accepts without acting on them
    log_tail: str


def argv(impl: Impl, prepared: Prepared) -> list[str]:
    if impl == "openvpn":
        head = ["openvpn", "--config", prepared.config.name]
    else:
        head = [sys.executable, "-m", "pyovpn", "--config", prepared.config.name]
    return head + prepared.extra_args


# An exit after start-up that only the missing network explains still counts as accepted.
_NETWORK_FAILURE = re.compile(
    r"Cannot assign requested address|Network is unreachable|Socket bind failed|RESOLVE|"
    r"Cannot resolve host|Temporary failure in name resolution|No route to host"
)


def _output(proc: Proc, log_file: Path | None) -> str:
    text = proc.text()
    if log_file is not None and log_file.exists():
        text += log_file.read_text(errors="replace")
    return text


def judge(impl: Impl, proc: Proc, log_file: Path | None = None) -> Outcome:
    """Wait for ``proc`` to show it got past its options, or to stop, and classify that."""
    deadline = time.monotonic() + START_LIMIT_SECONDS
    banner_at: float | None = None
    while True:
        rc = proc.returncode
        if rc is not None:
            break
        if banner_at is None and _BANNER[impl].search(_output(proc, log_file)):
            banner_at = time.monotonic()
        if banner_at is not None and time.monotonic() - banner_at >= SETTLE_SECONDS:
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    text = _output(proc, log_file)
    no_effect = sorted(set(_NO_EFFECT.findall(text)))
    tail = "\n".join(text.splitlines()[-15:])
    if rc is None:
        if banner_at is None:
            return Outcome("undecided", "neither a start banner nor an exit in time", no_effect, tail)
        return Outcome("accepted", "running", no_effect, tail)
    message = _error_line(text)
    if not _OPTIONS_ERROR.search(text) and _NETWORK_FAILURE.search(text):
        return Outcome("accepted", f"stopped on the missing network: {message}", no_effect, tail)
    return Outcome("refused", message, no_effect, tail)


def _error_line(text: str) -> str:
    m = _OPTIONS_ERROR.search(text)
    if m:
        return m.group(1).strip() or "Options error"
    lines = [_TIMESTAMP.sub("", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not _NOISE.search(ln)]
    for ln in reversed(lines):
        if _FATALISH.search(ln):
            return ln
    return lines[-1] if lines else "(no output)"


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)?(?: us=\d+)? ")
_NOISE = re.compile(
    r"^(Use --help|Use pyovpn --help|Exiting due to fatal error$|Closing TUN/TAP|net_addr_|net_route_|SIG)"
)
_FATALISH = re.compile(r"(?i)error|fatal|failed|cannot|refus|not supported|unknown")


@dataclass
class FileResult:
    name: str
    stock: Outcome
    pyovpn: Outcome
    #: every option pyovpn refuses in the file (its run stops at the first)
    pyovpn_refusals: list[str] = field(default_factory=list)


def run_file(name: str, workdir: Path, material: Material) -> FileResult:
    """Both implementations on one corpus file, each in its own fresh namespace."""
    outcomes: dict[Impl, Outcome] = {}
    with Netns(workdir / "net") as net:
        started: dict[Impl, tuple[Proc, Prepared]] = {}
        sides: tuple[tuple[str, Impl], ...] = (("a", "openvpn"), ("b", "pyovpn"))
        for side, impl in sides:
            prepared = prepare(name, workdir / impl, material)
            proc = net.spawn(side, argv(impl, prepared), impl, cwd=prepared.config.parent)
            started[impl] = (proc, prepared)
        refusals = all_refusals(*_in_process_args(started["pyovpn"][1]))
        for impl, (proc, prepared) in started.items():
            outcome = judge(impl, proc, prepared.log_file)
            # Messages name the run's own copy of the file: keep just the file name.
            outcome.reason = outcome.reason.replace(f"{prepared.config.parent}/", "")
            outcomes[impl] = outcome
    return FileResult(name, outcomes["openvpn"], outcomes["pyovpn"], refusals)


def _in_process_args(prepared: Prepared) -> tuple[Path, list[str]]:
    """The config and its extra options with file names made absolute (no chdir in-process)."""
    folder = prepared.config.parent
    extra = [str(folder / a) if (folder / a).is_file() else a for a in prepared.extra_args]
    return prepared.config, extra


def all_refusals(config: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """Every option pyovpn's parser refuses in ``config``, not just the first: each refused line
    is commented out in a scratch copy and the parse repeated. In-process, no root needed."""
    from pyovpn.config import parse_args
    from pyovpn.errors import ConfigError

    with open(config, newline="") as fh:
        lines = fh.read().split("\n")
    scratch = config.with_name(config.name + ".refusals")
    found: list[str] = []
    for _ in range(len(lines)):
        with open(scratch, "w", newline="") as fh:
            fh.write("\n".join(lines))
        try:
            parse_args(["--config", str(scratch), *extra_args])
            break
        except ConfigError as exc:
            m = re.search(re.escape(scratch.name) + r":(\d+): ", str(exc))
            line = int(m.group(1)) if m else 0
            words = lines[line - 1].split() if 0 < line <= len(lines) else []
            if not words or words[0].startswith("#"):
                found.append("(whole config) " + str(exc).replace(f"{scratch}: ", ""))
                break
            found.append(words[0].strip("<>/"))
            block = re.fullmatch(r"<([a-z0-9-]+)>", words[0])
            end = line
            if block:
                closing = f"</{block.group(1)}>"
                while end < len(lines) and lines[end - 1].strip() != closing:
                    end += 1
            for i in range(line - 1, end):
                lines[i] = "# " + lines[i]
    scratch.unlink(missing_ok=True)
    # an inline block refused as a whole shows up once per line: name it once
    return list(dict.fromkeys(found))


def corpus_files() -> list[str]:
    return sorted(p.name for p in CORPUS_DIR.iterdir() if p.suffix in (".ovpn", ".conf"))


def regressions(results: Sequence[FileResult]) -> dict[str, str]:
    """Files stock accepts and pyovpn does not, with pyovpn's reason."""
    return {
        r.name: r.pyovpn.reason
        for r in results
        if r.stock.verdict == "accepted" and r.pyovpn.verdict != "accepted"
    }


def load_expected() -> dict[str, str]:
    """``expected_refusals.txt``: one ``file<TAB>reason`` line per file pyovpn refuses and stock accepts."""
    expected: dict[str, str] = {}
    for line in EXPECTED_REFUSALS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, reason = line.partition("\t")
        expected[name.strip()] = reason.strip()
    return expected


def run_corpus(names: Sequence[str], workdir: Path, *, parallel: int = 3) -> list[FileResult]:
    """Every file in ``names``, ``parallel`` files at a time (each run is mostly waiting)."""
    from concurrent.futures import ThreadPoolExecutor

    material = make_material(workdir / "material")
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [
            pool.submit(run_file, name, workdir / f"run-{i:03d}", material) for i, name in enumerate(names)
        ]
        results = [f.result() for f in futures]
    shutil.rmtree(workdir / "material" / "pki", ignore_errors=True)
    return results
