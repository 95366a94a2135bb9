"""Config text the config tests build on: inline credentials and OpenVPN static key files."""

from __future__ import annotations

KEY_BYTES = bytes(range(256))

# <ca>, <cert> and <key> inline, so a config needs no files; the parser does not look inside
INLINE_CREDENTIALS = """\
<ca>
-----BEGIN CERTIFICATE-----
CA
-----END CERTIFICATE-----
</ca>
<cert>
CERT
</cert>
<key>
KEY
</key>
"""


def static_key_text(key: bytes = KEY_BYTES, *, per_line: int = 16) -> str:
    """``key`` as an OpenVPN static key file (``openvpn --genkey secret``), ``per_line`` bytes a line."""
    body = "\n".join(key[i : i + per_line].hex() for i in range(0, len(key), per_line))
    return (
        "#\n# 2048 bit OpenVPN static key\n#\n"
        f"-----BEGIN OpenVPN Static key V1-----\n{body}\n-----END OpenVPN Static key V1-----\n"
    )
