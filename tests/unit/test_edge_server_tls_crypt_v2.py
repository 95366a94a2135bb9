"""The P2MP server (on the fake data channel) with tls-crypt-v2 clients, 2.6-style and 2.5-style."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from pyovpn.proto import session as session_module
from pyovpn.proto import tlscryptv2 as v2
from tests.unit.edgefakes import RunningDaemon
from tests.unit.test_edge_server import PullClient, client_cfg, connect, info_logs, pki, serve, server_text

__all__ = ["info_logs", "pki"]  # fixtures used here


class LegacyClientWrap(v2.TlsCryptV2Client):
    """A 2.5 client: no early negotiation, so it never resends WKc."""

    PID_START = 0


def _keys(tmp_path: Path) -> tuple[Path, v2.ClientKey, v2.ClientKey]:
    server = v2.ServerKey(bytes(range(128)))
    kc = bytes(range(255, -1, -1))
    good = v2.ClientKey(kc, v2.wrap_client_key(server, kc, v2.timestamp_metadata(1_700_000_000)))
    other = v2.ServerKey(bytes(128))
    foreign = v2.ClientKey(kc, v2.wrap_client_key(other, kc, v2.user_metadata(b"x")))
    path = tmp_path / "v2s.key"
    path.write_text(server.to_pem())
    return path, good, foreign


def test_server_admits_2_6_and_2_5_clients_and_refuses_foreign_keys(
    pki: object, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file, good, foreign = _keys(tmp_path)

    async def body(server: RunningDaemon, port: int) -> None:
        base = client_cfg(pki, port)  # type: ignore[arg-type]
        modern = await connect(server, replace(base, tls_crypt_v2_client=good), port)
        assert modern.is_up()
        assert "cookie verified, tls-crypt-v2 client key accepted" in caplog.text

        with monkeypatch.context() as m:
            m.setattr(session_module, "TlsCryptV2Client", LegacyClientWrap)
            legacy = await connect(server, replace(base, tls_crypt_v2_client=good), port)
        assert legacy.is_up()
        assert "new client session (tls-crypt-v2 client key accepted)" in caplog.text

        cfg = replace(base, tls_crypt_v2_client=foreign)
        refused = PullClient(cfg, ("127.0.0.1", port))
        for _ in range(50):
            if "tls-crypt-v2 client key refused" in caplog.text:
                break
            await asyncio.sleep(0.1)
        assert "not made with this server's tls-crypt-v2 key" in caplog.text
        assert not refused.is_up()
        for c in (modern, legacy, refused):
            c.close()

    caplog.set_level(logging.INFO)
    serve(
        lambda port: server_text(pki, port, "server 10.8.0.0 255.255.255.0", f"tls-crypt-v2 {key_file}"), body
    )  # type: ignore[arg-type]
