"""Turns a published OpenVPN config into a corpus file: secrets out, structure kept.

Inline key/cert blocks keep their tags but their contents become a one-line placeholder that
the corpus test replaces with freshly made test material; absolute paths of the files a config
references become bare names, so the test can provide them in its own directory.
"""

from __future__ import annotations

import re

# Inline blocks whose contents are secrets or certificates (anything else, e.g. <connection>,
# holds options and stays as it is).
MATERIAL_BLOCKS = (
    "ca",
    "cert",
    "key",
    "extra-certs",
    "tls-auth",
    "tls-crypt",
    "tls-crypt-v2",
    "secret",
    "dh",
    "pkcs12",
    "crl-verify",
    "peer-fingerprint",
    "auth-user-pass",
    "http-proxy-user-pass",
)

PLACEHOLDER = "test material: {tag} (the corpus test writes a test value here)"

# Scripts the config names: run by the implementation, so the corpus test provides them.
SCRIPT_OPTIONS = frozenset(
    {
        "up",
        "down",
        "route-up",
        "route-pre-down",
        "ipchange",
        "tls-verify",
        "tls-crypt-v2-verify",
        "learn-address",
        "client-connect",
        "client-disconnect",
        "auth-user-pass-verify",
    }
)
# Files the implementation writes or creates itself: nothing to provide.
OUTPUT_OPTIONS = frozenset(
    {"status", "log", "log-append", "writepid", "ifconfig-pool-persist", "replay-persist", "management"}
)
# Options whose first argument is a file (or a script/directory) the config depends on.
FILE_OPTIONS = (
    frozenset(
        {
            "ca",
            "cert",
            "key",
            "extra-certs",
            "dh",
            "tls-auth",
            "tls-crypt",
            "tls-crypt-v2",
            "secret",
            "crl-verify",
            "pkcs12",
            "auth-user-pass",
            "askpass",
            "client-config-dir",
        }
    )
    | SCRIPT_OPTIONS
    | OUTPUT_OPTIONS
)

_BLOCK_START = re.compile(r"^\s*<([a-z0-9-]+)>\s*$")


def _rewrite_path_line(line: str) -> str:
    """`ca /etc/openvpn/ca.crt` -> `ca ca.crt`: only the first argument, only absolute paths."""
    body = line.rstrip("\r\n")
    ending = line[len(body) :]
    words = body.split()
    if len(words) < 2 or words[0].lstrip("-") not in FILE_OPTIONS:
        return line
    lead = body[: len(body) - len(body.lstrip())]
    arg = words[1]
    quote = arg[0] if arg[:1] in "\"'" else ""
    path = arg.strip("\"'")
    if not path.startswith("/"):
        return line
    words[1] = quote + path.rsplit("/", 1)[-1] + quote
    return lead + " ".join(words) + ending


def sanitize(text: str) -> str:
    """The corpus form of a config (see the module docstring)."""
    out: list[str] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _BLOCK_START.match(line)
        if m and m.group(1) in MATERIAL_BLOCKS:
            tag = m.group(1)
            ending = "\r\n" if line.endswith("\r\n") else "\n"
            out.append(line)
            out.append(PLACEHOLDER.format(tag=tag) + ending)
            i += 1
            while i < len(lines) and lines[i].strip() != f"</{tag}>":
                i += 1
            if i < len(lines):
                out.append(lines[i])
            i += 1
            continue
        out.append(_rewrite_path_line(line))
        i += 1
    return "".join(out)
