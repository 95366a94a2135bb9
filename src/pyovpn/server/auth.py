"""Client authentication on the server: the client's identity and script environment,
``auth-user-pass-verify``, ``tls-verify`` and the other per-client scripts.

Deciding what to do with the answers (reject, drop a duplicate, accept) stays with
:class:`pyovpn.server.multi.MultiServer`; this module only asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping

from pyovpn.config import Options
from pyovpn.proto.session import ClientAuthRequest
from pyovpn.scripts import ScriptRefused, run_script

log = logging.getLogger("pyovpn.server")

Addr = tuple[str, int]
VERIFY_TIMEOUT = 30.0


def common_name(opts: Options, req: ClientAuthRequest) -> str:
    """The name the client goes by: its certificate's CN, or its username with username-as-common-name."""
    if opts.username_as_common_name and req.username:
        return req.username
    return req.common_name


def auth_env(cn: str, req: ClientAuthRequest, addr: Addr) -> dict[str, str]:
    """The environment every script about this client gets (OpenVPN's names), IV_/UV_ peer info included."""
    return {
        "common_name": cn,
        "username": req.username,
        "untrusted_ip": addr[0],
        "untrusted_port": str(addr[1]),
        "script_type": "user-pass-verify",
        **{k: v for k, v in req.peer_info.items() if k.startswith(("IV_", "UV_"))},
    }


def must_wait(opts: Options) -> bool:
    """Whether authenticating a client runs a script (so it cannot finish within one packet)."""
    return bool(
        opts.auth_user_pass_verify or opts.tls_verify or opts.client_connect or opts.management_client_auth
    )


async def user_pass_verify(verify: tuple[str, str], req: ClientAuthRequest, env: Mapping[str, str]) -> bool:
    """Run ``auth-user-pass-verify`` (via-file or via-env); True if it accepts the username/password."""
    command, method = verify
    extra_env = dict(env)
    args = command.split()
    tmp = None
    if method == "via-file":
        fd, tmp = tempfile.mkstemp(prefix="pyovpn-auth-")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{req.username}\n{req.password}\n")
        args.append(tmp)
    else:
        extra_env["password"] = req.password
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            env={**os.environ, **extra_env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await asyncio.wait_for(proc.wait(), VERIFY_TIMEOUT) == 0
    except (OSError, TimeoutError) as exc:
        log.warning("auth-user-pass-verify %s failed to run: %s", command, exc)
        return False
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


async def run_client_script(
    opts: Options,
    command: str | None,
    script_type: str,
    env: Mapping[str, str],
    vpn_ip: str | None,
    *args: str,
) -> int:
    """Run one per-client script (tls-verify, client-connect, ...); its exit status, 0 if none is set."""
    if not command:
        return 0
    full_env = dict(env)
    if vpn_ip:
        full_env["ifconfig_pool_remote_ip"] = vpn_ip
    try:
        return await run_script(
            command, script_type, args=args, env=full_env, script_security=opts.script_security
        )
    except ScriptRefused as exc:
        log.error("%s", exc)
        return 1
