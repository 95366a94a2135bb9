"""Applying DNS settings to the host resolver for one tunnel device, and undoing it.

Stock OpenVPN leaves DNS to scripts on Linux; pyovpn applies pushed or configured DNS itself
(`pyovpn-dns auto`, the default) through whatever manages the resolver here:

* systemd-resolved (running): per-link servers and domains with ``resolvectl``; undone by
  ``resolvectl revert``.
* ``resolvconf`` (Debian resolvconf or openresolv): a resolv.conf fragment as ``DEV.openvpn``;
  undone by ``resolvconf -d``.
* neither: /etc/resolv.conf rewritten in place (in place, because it may be a bind mount, e.g.
  under ``ip netns exec``), the original restored on exit.

Inside a named network namespace (`ip netns add NAME`) only the namespace's own resolver file
is touched: `ip netns exec NAME` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf,
and that file is rewritten in place. systemd-resolved and resolvconf belong to the host (they
would apply a namespace's settings to a host link, or to the host's resolv.conf), and without a
private file the namespace shares the host's, so then DNS is left alone with a warning.

Before anything changes, a state file under /run/pyovpn records what is about to be changed
(and for /etc/resolv.conf its original text), so the next start undoes what a killed process left.
The state file is named after the network namespace and device (/run is shared between
namespaces, where every client's device may be tun0), so a start elsewhere leaves it alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyovpn.proto.dnsopts import DnsSettings, resolv_conf_fragment
from pyovpn.rundir import RUN_DIR, netns_id, netns_inode, pid_alive

log = logging.getLogger("pyovpn.dns")

STATE_DIR = RUN_DIR
NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add` pins named namespaces
NETNS_ETC_DIR = Path("/etc/netns")  # where `ip netns exec` finds a namespace's own resolv.conf
RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_SOCKET = Path("/run/systemd/resolve/io.systemd.Resolve")
TURN_OFF_HINT = "add `pyovpn-dns off` to the config to leave DNS to your up/down scripts"
_COMMAND_TIMEOUT = 10.0


def named_netns(run_dir: Path = NETNS_RUN_DIR) -> str | None:
    """The `ip netns` name of this process's network namespace; None if it has none (the host's)."""
    try:
        own = os.stat("/proc/self/ns/net")
        entries = sorted(run_dir.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return entry.name
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def resolvectl_commands(dev: str, s: DnsSettings) -> list[list[str]]:
    """The resolvectl calls that give ``dev`` these servers and domains."""
    cmds = [["resolvectl", "dns", dev, *s.servers]]
    if s.domains:
        cmds.append(["resolvectl", "domain", dev, *s.domains])
    if s.servers:
        # like update-systemd-resolved: a tunnel with its own servers answers names outside its domains too
        cmds.append(["resolvectl", "default-route", dev, "true"])
    return cmds


def merged_resolv_conf(original: str, s: DnsSettings, dev: str) -> str:
    """/etc/resolv.conf with the tunnel's servers/domains in front; other lines (options) are kept."""
    keep = []
    for line in original.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("search", "domain") and s.domains:
            continue
        if word == "nameserver" and s.servers:
            continue
        keep.append(line + "\n")
    header = f"# written by pyovpn for {dev}; the previous file comes back when the tunnel closes\n"
    return header + resolv_conf_fragment(s) + "".join(keep)


@dataclass
class _Applied:
    method: str  # "resolved" | "resolvconf" | "file"
    dev: str
    written: str = ""  # file method: what pyovpn wrote
    original: str = ""  # file method: what was there before


class ResolverSetup:
    """DNS for one tunnel device: :meth:`apply` once up, :meth:`restore` when it closes."""

    def __init__(
        self,
        state_dir: Path = STATE_DIR,
        resolv_conf: Path = RESOLV_CONF,
        netns_dirs: tuple[Path, Path] = (NETNS_RUN_DIR, NETNS_ETC_DIR),
    ) -> None:
        self.state_dir = state_dir
        self.resolv_conf = resolv_conf
        self.netns_run_dir, self.netns_etc_dir = netns_dirs
        self._applied: _Applied | None = None

    def _state_path(self, dev: str) -> Path:
        return self.state_dir / f"dns-{netns_inode()}-{dev}.json"

    def _method(self) -> tuple[str | None, str]:
        """How DNS is applied here, and when it is not, why and what to do."""
        writable = os.access(self.resolv_conf, os.W_OK)
        name = named_netns(self.netns_run_dir)
        if name is None:
            why = f"no systemd-resolved, no resolvconf and {self.resolv_conf} is not writable; "
            return self.pick_method(writable), why + "install resolvconf or run as root"
        private = self.netns_etc_dir / name / "resolv.conf"
        if not _same_file(private, self.resolv_conf):
            return None, (
                f"network namespace {name} has no resolver file of its own ({self.resolv_conf} is the "
                f"host's, and the host's resolver manager cannot see this namespace's links); create "
                f"{private}, which `ip netns exec {name}` mounts over {self.resolv_conf}"
            )
        return ("file" if writable else None), f"{private} is not writable; run as root"

    def _save_state(self, a: _Applied) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._state_path(a.dev)
        tmp = path.with_suffix(".tmp")
        data: dict[str, object] = {
            "method": a.method,
            "dev": a.dev,
            "written": a.written,
            "original": a.original,
        }
        data |= {"netns": netns_id(), "resolv_conf": str(self.resolv_conf), "pid": os.getpid()}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @staticmethod
    def pick_method(resolv_conf_writable: bool = True) -> str | None:
        if RESOLVED_SOCKET.exists() and shutil.which("resolvectl"):
            return "resolved"
        if shutil.which("resolvconf"):
            return "resolvconf"
        return "file" if resolv_conf_writable else None

    def apply(self, dev: str, s: DnsSettings) -> None:
        """Give ``dev``'s DNS settings to the resolver; logs where, or why not (never raises)."""
        self.restore()
        if s.is_empty():
            return
        method, why_not = self._method()
        servers = ", ".join(s.servers) or "no servers"
        domains = f" (domains {', '.join(s.domains)})" if s.domains else ""
        try:
            if method == "resolved":
                self._save_state(_Applied("resolved", dev))
                for cmd in resolvectl_commands(dev, s):
                    _run(cmd)
                where = f"systemd-resolved for link {dev}"
            elif method == "resolvconf":
                self._save_state(_Applied("resolvconf", dev))
                _run(["resolvconf", "-a", f"{dev}.openvpn"], stdin=resolv_conf_fragment(s))
                where = f"resolvconf as {dev}.openvpn"
            elif method == "file":
                original = self.resolv_conf.read_text(encoding="utf-8") if self.resolv_conf.exists() else ""
                written = merged_resolv_conf(original, s, dev)
                self._save_state(_Applied("file", dev, written, original))
                self.resolv_conf.write_text(written, encoding="utf-8")
                where = f"{self.resolv_conf} (no resolver manager for this network namespace)"
            else:
                log.warning("DNS %s%s not applied: %s", servers, domains, why_not)
                return
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("DNS %s%s could not be applied: %s; %s", servers, domains, exc, TURN_OFF_HINT)
            _undo_state(self._state_path(dev))
            return
        self._applied = _Applied(method, dev)
        log.info("DNS %s%s applied via %s; %s", servers, domains, where, TURN_OFF_HINT)

    def restore(self) -> None:
        """Undo what :meth:`apply` did, if anything."""
        if self._applied is not None:
            _undo_state(self._state_path(self._applied.dev))
            self._applied = None

    def restore_stale(self) -> None:
        """Undo what an earlier, killed pyovpn in this network namespace left behind."""
        if not self.state_dir.is_dir():
            return
        here = netns_id()
        for path in sorted(self.state_dir.glob("dns-*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if data.get("netns") != here or pid_alive(int(data.get("pid", 0))):
                continue
            log.warning("undoing the DNS settings a previous pyovpn left for %s (%s)", data.get("dev"), path)
            _undo_state(path)


def _run(cmd: Sequence[str], stdin: str | None = None) -> None:
    res = subprocess.run(
        list(cmd), input=stdin, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
    )
    if res.returncode != 0:
        raise subprocess.SubprocessError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.returncode}")


def _undo_state(path: Path) -> None:
    """Undo what the state file at ``path`` records and remove it; problems are logged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except PermissionError as exc:
        # after `user nobody` (/run/pyovpn is root's): the next start as root undoes it
        log.warning("DNS settings not undone: state %s out of reach (%s); the next start retries", path, exc)
        return
    except (OSError, ValueError) as exc:
        log.warning("DNS state %s unreadable (%s); removing it", path, exc)
        path.unlink(missing_ok=True)
        return
    method, dev = data.get("method"), str(data.get("dev", ""))
    try:
        if method == "resolved":
            _run(["resolvectl", "revert", dev])
        elif method == "resolvconf":
            _run(["resolvconf", "-d", f"{dev}.openvpn", "-f"])
        elif method == "file":
            target = Path(data["resolv_conf"])
            current = target.read_text(encoding="utf-8") if target.exists() else ""
            if current not in (data["written"], data["original"]):
                log.warning(
                    "%s changed since pyovpn wrote it; leaving it as it is (the text before pyovpn was:\n%s)",
                    target,
                    data["original"],
                )
            else:
                target.write_text(data["original"], encoding="utf-8")
    except (OSError, KeyError, subprocess.SubprocessError) as exc:
        # e.g. after `user nobody`: the next start as root undoes it, so the state file stays
        log.warning("DNS settings for %s could not be undone: %s; the next start retries", dev, exc)
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove DNS state %s: %s", path, exc)
