"""User scripts: ``up`` / ``down`` (the tunnel device) and the server's per-client scripts.

Every script goes through :func:`run_script`, which refuses to run anything below
``script-security 2`` (OpenVPN's rule; the config check already refuses such configs, this
is the last line of defence for options built in code) and runs the command with its
arguments appended and the OpenVPN-style environment added to ours.

``up`` and ``down`` follow OpenVPN 2.6 (``--dev tun``)::

    cmd tun_dev tun_mtu 0 ifconfig_local ifconfig_remote_or_netmask init|restart

The third argument was the link MTU before 2.6 and is always ``0`` now; the fifth is the
netmask with ``topology subnet`` and the remote end of the point-to-point link otherwise;
addresses that are not configured are passed as empty strings. The environment carries
``script_type`` (``up``/``down``), ``script_context``, ``dev``, ``dev_type``, ``tun_mtu``,
``ifconfig_local``, ``ifconfig_netmask`` (subnet) or
``ifconfig_remote``, the ``ifconfig_ipv6_*`` variables, and for ``down`` the ``signal`` that
ended the tunnel.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyovpn.errors import PyovpnError

log = logging.getLogger("pyovpn.scripts")

SCRIPT_TIMEOUT = 30.0
MIN_SCRIPT_SECURITY = 2

# The config's `setenv NAME VALUE` variables. OpenVPN hands them to every script it runs, so
# they live here, where every script starts, rather than being threaded through each caller.
_config_env: dict[str, str] = {}


def set_config_env(pairs: Sequence[tuple[str, str]]) -> None:
    """The config's `setenv` variables, for every script run from now on (later names win)."""
    _config_env.clear()
    _config_env.update(pairs)


class ScriptRefused(PyovpnError):
    """script-security forbids running user scripts."""


class ScriptFailed(PyovpnError):
    """A script whose failure is fatal (``up``) could not run or exited non-zero."""


def refusal(script_type: str, script_security: int) -> str | None:
    """Why a ``script_type`` script must not run at this script-security level, or None."""
    if script_security >= MIN_SCRIPT_SECURITY:
        return None
    return (
        f"refusing to run the {script_type} script: script-security {script_security} forbids calling "
        f"user-defined scripts; set `script-security {MIN_SCRIPT_SECURITY}` to allow it"
    )


async def run_script(
    command: str,
    script_type: str,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    script_security: int,
    timeout: float = SCRIPT_TIMEOUT,
) -> int:
    """Run ``command`` (a path plus optional arguments) with ``args`` appended; its exit status.

    ``env`` is added to this process's environment, with ``script_type`` set. Raises
    :class:`ScriptRefused` below script-security 2; a script that cannot be started or
    runs longer than ``timeout`` counts as failed (status 1, logged).
    """
    why = refusal(script_type, script_security)
    if why is not None:
        raise ScriptRefused(why)
    argv = [*command.split(), *args]
    full_env = {**os.environ, **_config_env, **(env or {}), "script_type": script_type}
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=full_env)
    except OSError as exc:
        log.warning("%s script %s failed to start: %s", script_type, command, exc)
        return 1
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        log.warning("%s script %s still running after %.0f s; killed", script_type, command, timeout)
        proc.kill()
        await proc.wait()
        return 1


@dataclass(frozen=True)
class TunParams:
    """What ``up`` and ``down`` are told about the tunnel device."""

    dev: str
    tun_mtu: int
    topology: str = "subnet"  # "subnet" | "net30" | "p2p"
    ifconfig: tuple[str, str] | None = None  # (local, netmask with subnet / remote otherwise)
    ifconfig_ipv6: str | None = None  # local address with prefix length, e.g. "fd00::1/64"
    ifconfig_ipv6_remote: str | None = None
    session_env: tuple[tuple[str, str], ...] = ()  # routes, foreign_option_N, ... (see script_env)
    dev_type: str = "tun"  # "tun" | "null" (`dev null`)


def up_down_args(p: TunParams, context: str) -> list[str]:
    """The arguments OpenVPN 2.6 appends to an up/down command (``--dev tun``)."""
    local, other = p.ifconfig if p.ifconfig else ("", "")
    return [p.dev, str(p.tun_mtu), "0", local, other, context]


def up_down_env(p: TunParams, context: str, *, signal: str | None = None) -> dict[str, str]:
    """The environment variables of an up/down script, beyond ``script_type``."""
    # OpenVPN sets redirect_gateway only once it has handled the routes, after `up`
    env = {k: v for k, v in p.session_env if signal is not None or k != "redirect_gateway"}
    env |= {"dev": p.dev, "dev_type": p.dev_type, "tun_mtu": str(p.tun_mtu), "script_context": context}
    if p.ifconfig:
        local, other = p.ifconfig
        env["ifconfig_local"] = local
        if p.topology == "subnet":
            env["ifconfig_netmask"] = other  # no ifconfig_broadcast: OpenVPN 2.6 sets it for tap only
        else:
            env["ifconfig_remote"] = other
    if p.ifconfig_ipv6:
        iface6 = ipaddress.IPv6Interface(p.ifconfig_ipv6)
        env["ifconfig_ipv6_local"] = str(iface6.ip)
        env["ifconfig_ipv6_netbits"] = str(iface6.network.prefixlen)
        if p.ifconfig_ipv6_remote:
            env["ifconfig_ipv6_remote"] = p.ifconfig_ipv6_remote
    if signal is not None:
        env["signal"] = signal
    return env
