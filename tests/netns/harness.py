"""Network-namespace test harness: namespaces, processes, VPN configs, ping/iperf3 and log parsing.

Safety rule this module enforces: every packet a test sends goes to an address inside a
pair of namespaces that this module created for that test (``pov-<pid>-<rand>-a|b``), and
those namespaces and every process inside them are removed on exit, including on
failure, KeyboardInterrupt and SIGTERM. Nothing here ever runs a network client in the
caller's own namespace.

Layout of one :class:`Netns`:

    ns a (client side)  veth0 172.31.254.1/24, fd00:6f76:706e::1/64
    ns b (server side)  veth0 172.31.254.2/24, fd00:6f76:706e::2/64

and inside the tunnel (``tun0`` in both namespaces):

    server  10.77.0.1, fd00:77::1
    client  10.77.0.2, fd00:77::2 (P2P) or fd00:77::1000 (first pool address in pull mode)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal, Self

from pyovpn.tools.pki import Pki

Side = Literal["a", "b"]
Role = Literal["server", "p2p"]
Wrap = Literal["none", "tls-auth", "tls-crypt"]
Proto = Literal["udp", "tcp"]
Family = Literal[4, 6]
Impl = Literal["openvpn", "pyovpn"]

NS_PREFIX = "pov-"
# Outer (veth) addresses: only ever configured inside our own namespaces.
OUTER4: dict[Side, str] = {"a": "172.31.254.1", "b": "172.31.254.2"}
OUTER6: dict[Side, str] = {"a": "fd00:6f76:706e::1", "b": "fd00:6f76:706e::2"}
OUTER4_PREFIX = 24
OUTER6_PREFIX = 64

INNER4_NET = "10.77.0.0"
INNER4_MASK = "255.255.255.0"
INNER6_NET = "fd00:77::/64"
INIT_LINE = "Initialization Sequence Completed"
DEFAULT_PORT = 1194
IPERF_PORT = 5201
_IPERF_RUNS = itertools.count(1)


class HarnessError(Exception):
    """A harness step failed; the message carries the relevant log tails."""


class ProcessDied(HarnessError):
    """A process exited while we were waiting for it to print something."""


class WaitTimeout(HarnessError):
    """A wait ran out of time."""


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise HarnessError(
            f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}"
        )
    return res


def netns_exec(ns: str) -> list[str]:
    """The argv prefix that runs a command inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns]


def _ns_exists(ns: str) -> bool:
    return Path("/run/netns", ns).exists()


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def tail_text(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Proc:
    """One process started inside a namespace, stdout+stderr captured to ``log_path``.

    ``ip netns exec`` execs the command after setns(), so :attr:`pid` is the program
    itself and SIGTERM reaches it directly. The process gets its own session so a
    terminal Ctrl-C reaches only pytest, which then tears everything down in order.
    """

    def __init__(
        self,
        ns: str,
        argv: Sequence[str],
        log_path: str | os.PathLike[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        if not _ns_exists(ns):
            # Refuse rather than fall back to the host namespace.
            raise HarnessError(f"namespace {ns} does not exist")
        self.ns = ns
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.log_path = Path(log_path)
        full_env = dict(os.environ if env is None else env)
        # Python children must not block-buffer their log when stdout is a file.
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [*netns_exec(ns), *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _peek(self) -> int | None:
        """Exit code if the process has exited, without reaping it.

        The zombie is left in place until :meth:`stop` so its pid, which is also its
        process-group id, cannot be reused before stop() has killed the rest of the group.
        """
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.popen.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    @property
    def returncode(self) -> int | None:
        return self._peek()

    def running(self) -> bool:
        return self._peek() is None

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """Current log length, to pass as ``since`` to wait for lines printed after now."""
        return len(self.text())

    def tail(self, lines: int = 60) -> str:
        state = "running" if self.running() else f"exited {self.returncode}"
        head = f"----- {self.name} in {self.ns} ({state}), {self.log_path} -----"
        return f"{head}\n{tail_text(self.text(), lines)}"

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float, *, since: int = 0
    ) -> re.Match[str]:
        """Wait until the log (from offset ``since``) matches ``pattern`` (a regex).

        Raises :class:`ProcessDied` as soon as the process exits without printing it, and
        :class:`WaitTimeout` after ``timeout`` seconds.
        """
        return wait_for_lines([self], pattern, timeout, since={self: since})[self]

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the process to exit (without reaping); return its code."""
        deadline = time.monotonic() + timeout
        while (rc := self._peek()) is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.argv, timeout)
            time.sleep(0.02)
        return rc

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL (whole process group) after ``timeout`` s; return the exit code.

        The code is Popen's: negative for death by signal (-9 if it had to be killed).
        """
        if self.popen.returncode is None:
            if self._peek() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGTERM)
                try:
                    self.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.popen.pid, signal.SIGKILL)
            # The leader is at most a zombie here, so the group id is still ours: anything
            # it left behind in its group goes too. Then reap.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
        rc = self.popen.returncode
        assert rc is not None
        return rc


def wait_for_lines(
    procs: Sequence[Proc],
    pattern: str | re.Pattern[str],
    timeout: float,
    *,
    since: Mapping[Proc, int] | None = None,
    poll: float = 0.1,
) -> dict[Proc, re.Match[str]]:
    """Wait until every process in ``procs`` has printed ``pattern``; fail fast if one dies.

    All logs are polled together so a crash on either side of a tunnel is reported at
    once with both log tails, instead of after the other side's timeout.
    """
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    offsets = dict(since or {})
    found: dict[Proc, re.Match[str]] = {}
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if p in found:
                continue
            # Check exit status before reading, so a line printed just before exiting counts.
            exited = not p.running()
            m = rx.search(p.text(), offsets.get(p, 0))
            if m:
                found[p] = m
            elif exited:
                raise ProcessDied(
                    f"{p.name} exited with {p.returncode} before printing {rx.pattern!r}\n" + logs_tail(procs)
                )
        if len(found) == len(procs):
            return found
        if time.monotonic() >= deadline:
            missing = ", ".join(p.name for p in procs if p not in found)
            raise WaitTimeout(
                f"timeout after {timeout:.0f}s waiting for {rx.pattern!r} from {missing}\n" + logs_tail(procs)
            )
        time.sleep(poll)


def logs_tail(procs: Iterable[Proc], lines: int = 60) -> str:
    """The tails of several logs, for assertion messages."""
    return "\n".join(p.tail(lines) for p in procs)


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (of all its threads)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return out


def cmdline(pid: int) -> str:
    """The command line of ``pid``, its arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def engine_processes(pyovpn_pid: int) -> tuple[int, list[int]]:
    """The userspace engine under a pyovpn process: its controller's pid and its workers' pids."""
    engines = [p for p in child_pids(pyovpn_pid) if "pyovpn.datachannel.engine" in cmdline(p)]
    assert len(engines) == 1, f"expected one engine process under {pyovpn_pid}, found {engines}"
    return engines[0], child_pids(engines[0])


# ---------------------------------------------------------------------------------------
# Namespaces
# ---------------------------------------------------------------------------------------

_LIVE: set[_Namespaces] = set()
_LIVE_LOCK = threading.Lock()
# The SIGTERM disposition we replaced while namespaces are live; None when not replaced.
_SAVED_SIGTERM: list[Any] = []


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into KeyboardInterrupt: pytest then stops and runs fixture teardown,
    # which deletes the namespaces; a bare SIGTERM would leave them behind.
    raise KeyboardInterrupt(f"signal {signum}")


def _register(n: _Namespaces) -> None:
    with _LIVE_LOCK:
        if not _LIVE and threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            # Only replace the default action; someone else's handler stays in charge.
            if prev == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
                _SAVED_SIGTERM.append(prev)
        _LIVE.add(n)


def _unregister(n: _Namespaces) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(n)
        if not _LIVE and _SAVED_SIGTERM and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _SAVED_SIGTERM.pop())


@atexit.register
def _cleanup_all() -> None:
    # Backstop for paths where no context manager exit ran (e.g. an unhandled error in
    # a fixture generator that was never resumed).
    for n in list(_LIVE):
        n.close()


def _kill_ns_pids(ns: str) -> None:
    res = _run(["ip", "netns", "pids", ns], check=False)
    for word in res.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _delete_ns(ns: str) -> None:
    if not _ns_exists(ns):
        return
    _kill_ns_pids(ns)
    # Processes need a moment to die before the namespace can really go away; ip netns
    # del only unmounts it, the kernel frees it once the last user is gone.
    _run(["ip", "netns", "del", ns], check=False)


def _stop_and_delete(procs: Sequence[Proc], namespaces: Iterable[str], *, proc_timeout: float) -> None:
    """Stop our processes (newest first, so exit codes are collected), then kill anything else
    inside the namespaces and delete them."""
    for p in reversed(procs):
        with contextlib.suppress(Exception):
            p.stop(timeout=proc_timeout)
    for ns in namespaces:
        _delete_ns(ns)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # A zombie (state Z, after the ")" that ends the command name) is a dead run.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def sweep_stale_namespaces() -> list[str]:
    """Delete ``pov-<pid>-*`` namespaces whose creating process is gone (a SIGKILLed run).

    Namespaces of live processes, i.e. of parallel runs, are left alone.
    """
    removed = []
    res = _run(["ip", "netns", "list"], check=False)
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)-[0-9a-f]+-(?:[abs]|p\d+)", name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_ns(name)
            removed.append(name)
    return removed


PYOVPN_RUN_DIR = Path("/run/pyovpn")


def _ns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def _sweep_namespace_state(inodes: Iterable[int]) -> None:
    """Remove what pyovpn keeps per network namespace under /run (route journals, DNS state,
    named ``*-<netns inode>-<dev>.*``) for namespaces just deleted: a test killed with -9 leaves
    them, and no later start can undo anything in a namespace that is gone."""
    # an inode number a new namespace (a parallel run's) has taken meanwhile is that one's
    live = {_ns_inode(entry.name) for entry in Path("/run/netns").glob("*")}
    for ino in set(inodes) - live:
        for path in PYOVPN_RUN_DIR.glob(f"*-{ino}-*"):
            with contextlib.suppress(OSError):
                path.unlink()


class _Namespaces:
    """What Netns and Star share: a context manager that creates its namespaces on entry
    (deleting them again if that fails) and on exit stops its processes, kills anything else
    inside and deletes every namespace; registered meanwhile so SIGTERM and exit clean up."""

    PROC_TIMEOUT = 3.0  # seconds each spawned process gets to stop on close

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self._open = False

    def namespaces(self) -> Iterable[str]:
        raise NotImplementedError

    def _create(self) -> None:
        raise NotImplementedError

    def _closed(self) -> None:
        """Called once the namespaces are gone."""

    def __enter__(self) -> Self:
        sweep_stale_namespaces()
        _register(self)
        self._open = True
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop our processes, kill anything else inside, delete the namespaces. Idempotent."""
        if not self._open:
            return
        inodes = [ino for ino in map(_ns_inode, self.namespaces()) if ino is not None]
        try:
            _stop_and_delete(self.procs, self.namespaces(), proc_timeout=self.PROC_TIMEOUT)
            _sweep_namespace_state(inodes)
        finally:
            self._open = False
            _unregister(self)
            self._closed()


class Netns(_Namespaces):
    """Two fresh namespaces ``a`` and ``b`` joined by a veth pair; a context manager.

    Use :meth:`spawn` to start processes in them: those are stopped first on exit (so
    their exit codes are collected), then every remaining process in either namespace is
    killed and both namespaces are deleted.
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        self.run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.names: dict[Side, str] = {"a": f"{NS_PREFIX}{self.run_id}-a", "b": f"{NS_PREFIX}{self.run_id}-b"}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="pov-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__()

    @property
    def a(self) -> str:
        return self.names["a"]

    def start_server(
        self,
        impl: Impl,
        config: str | os.PathLike[str],
        *,
        proto: Proto = "udp",
        port: int = DEFAULT_PORT,
        name: str | None = None,
        timeout: float = 10.0,
        argv: list[str] | None = None,
    ) -> Proc:
        """Start ``impl`` on ``config`` in namespace b; return once it has its port open.

        ``argv`` replaces the usual command line (a wrapper such as bench/heapwatch.py, which must
        be given ``config`` itself).
        """
        server = self.spawn("b", argv or vpn_argv(impl, config), name or f"server-{impl}")
        wait_listening(self.b, proto, port, timeout=timeout, proc=server)
        return server

    @property
    def b(self) -> str:
        return self.names["b"]

    def ns(self, side: Side | str) -> str:
        """Namespace name for side ``a``/``b`` (a full name is passed through)."""
        return self.names.get(side, side)  # type: ignore[call-overload]

    @staticmethod
    def outer(side: Side, family: Family) -> str:
        return OUTER4[side] if family == 4 else OUTER6[side]

    def namespaces(self) -> Iterable[str]:
        return self.names.values()

    def _create(self) -> None:
        for ns in self.names.values():
            _run(["ip", "netns", "add", ns])
        # Create the pair directly inside the namespaces so interface names never clash
        # with the host or with parallel runs.
        veth = ["link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", self.b]
        _run(["ip", "-n", self.a, *veth])
        for side, ns in self.names.items():
            # No DAD: the tun0 addresses openvpn/pyovpn add later would otherwise stay
            # "tentative" for ~1-2 s and the first pings after the init line would fail.
            _run(
                [
                    *netns_exec(ns),
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=0",
                    "net.ipv6.conf.default.disable_ipv6=0",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ]
            )
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{OUTER4[side]}/{OUTER4_PREFIX}", "dev", "veth0"])
            _run(["ip", "-n", ns, "addr", "add", f"{OUTER6[side]}/{OUTER6_PREFIX}", "dev", "veth0", "nodad"])
            _run(["ip", "-n", ns, "link", "set", "veth0", "up"])
        self._wait_veth_up()

    def _wait_veth_up(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [
                _run(["ip", "-n", ns, "-o", "link", "show", "veth0"], check=False).stdout
                for ns in self.names.values()
            ]
            if all("LOWER_UP" in s for s in states):
                return
            time.sleep(0.05)
        raise WaitTimeout("veth pair did not come up")

    def spawn(
        self,
        side: Side | str,
        argv: Sequence[str],
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Proc:
        """Start ``argv`` in namespace ``side``; output goes to ``workdir/<name>.log``."""
        if not self._open:
            raise HarnessError("Netns is not open")
        p = Proc(
            self.ns(side), argv, self.workdir / f"{name}.log", name=name, env=env, cwd=cwd or self.workdir
        )
        self.procs.append(p)
        return p

    def _closed(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def p2mp_server_config(
    pki: Pki, network: str, *extra: str, port: int = DEFAULT_PORT, netmask: str = "255.255.255.0"
) -> str:
    """A P2MP UDP server on tun0 for a Star: ``network``/``netmask`` (/24 unless told; topology
    subnet), the PKI's server certificate and tls-crypt key, keepalive 10 60, then the ``extra`` lines."""
    return (
        "\n".join(
            [
                "dev tun0",
                "proto udp",
                f"port {port}",
                f"server {network} {netmask}",
                "topology subnet",
                f"ca {pki.ca_crt}",
                f"cert {pki.server_crt}",
                f"key {pki.server_key}",
                "dh none",
                f"tls-crypt {pki.tc_key}",
                "keepalive 10 60",
                *extra,
            ]
        )
        + "\n"
    )


def p2mp_client_config(
    pki: Pki, remote: str, cert: Path, key: Path, *extra: str, port: int = DEFAULT_PORT
) -> str:
    """A pulling UDP client of :func:`p2mp_server_config` with this certificate, then the ``extra`` lines."""
    return (
        "\n".join(
            [
                "client",
                "dev tun0",
                "proto udp",
                f"remote {remote} {port}",
                "nobind",
                f"ca {pki.ca_crt}",
                f"cert {cert}",
                f"key {key}",
                f"tls-crypt {pki.tc_key}",
                "remote-cert-tls server",
                *extra,
            ]
        )
        + "\n"
    )


class Star(_Namespaces):
    """A server namespace ``s`` with its own veth to each of ``n`` peer namespaces; a context manager.

    Peer ``i`` is 172.31.(base+i).2/24, the server's end of its link 172.31.(base+i).1. On exit
    the spawned processes are stopped, anything else inside is killed and every namespace goes.
    """

    def __init__(self, workdir: Path, n: int, *, base: int, cwd: Path | None = None) -> None:
        run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.workdir = workdir
        self.base = base
        self.server = f"{NS_PREFIX}{run_id}-s"
        self.peers = [f"{NS_PREFIX}{run_id}-p{i}" for i in range(n)]
        self._cwd = cwd or workdir
        self._veth_tag = secrets.token_hex(2)  # interface names are global while being moved
        super().__init__()

    def server_addr(self, i: int) -> str:
        return f"172.31.{self.base + i}.1"

    def peer_addr(self, i: int) -> str:
        return f"172.31.{self.base + i}.2"

    PROC_TIMEOUT = 5.0

    def namespaces(self) -> Iterable[str]:
        return (self.server, *self.peers)

    def _create(self) -> None:
        for ns in (self.server, *self.peers):
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i, ns in enumerate(self.peers):
            s_end, p_end = f"vs{self._veth_tag}{i}", f"vp{self._veth_tag}{i}"
            _run(["ip", "link", "add", s_end, "type", "veth", "peer", "name", p_end])
            _run(["ip", "link", "set", s_end, "netns", self.server])
            _run(["ip", "link", "set", p_end, "netns", ns])
            _run(["ip", "-n", self.server, "addr", "add", f"{self.server_addr(i)}/24", "dev", s_end])
            _run(["ip", "-n", ns, "addr", "add", f"{self.peer_addr(i)}/24", "dev", p_end])
            _run(["ip", "-n", self.server, "link", "set", s_end, "up"])
            _run(["ip", "-n", ns, "link", "set", p_end, "up"])

    def spawn(self, ns: str, argv: list[str], name: str) -> Proc:
        p = Proc(ns, argv, self.workdir / f"{name}.log", name=name, cwd=self._cwd)
        self.procs.append(p)
        return p

    def start_server(self, impl: Impl, config: str | os.PathLike[str], *, port: int = DEFAULT_PORT) -> Proc:
        """Start ``impl`` on ``config`` in the server namespace; return once its UDP port is bound."""
        server = self.spawn(self.server, vpn_argv(impl, config), f"server-{impl}")
        wait_listening(self.server, "udp", port, proc=server)
        return server


def wait_listening(ns: str, proto: Proto, port: int, timeout: float = 10.0, proc: Proc | None = None) -> None:
    """Poll ``ss`` in ``ns`` until something listens on ``port`` (TCP) or has it bound (UDP).

    Works for any implementation, unlike waiting for an implementation-specific log line.
    If ``proc`` is given and dies meanwhile, fail at once with its log.
    """
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    deadline = time.monotonic() + timeout
    while True:
        out = _run([*netns_exec(ns), "ss", flag, "sport", "=", f":{port}"], check=False).stdout
        if out.strip():
            return
        if proc is not None and not proc.running():
            raise ProcessDied(f"{proc.name} exited with {proc.returncode} before listening\n" + proc.tail())
        if time.monotonic() >= deadline:
            msg = f"nothing listening on {proto}/{port} in {ns} after {timeout:.0f}s"
            raise WaitTimeout(msg + ("\n" + proc.tail() if proc else ""))
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------
# VPN configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelSpec:
    """What a tunnel looks like; the same spec yields matching server and client configs.

    ``role="server"``: openvpn ``mode server`` (``server``/``server-ipv6`` helpers,
    topology subnet) and a ``client`` that pulls its addresses. ``role="p2p"``:
    ``tls-server``/``tls-client`` with static ``ifconfig``/``ifconfig-ipv6``.
    """

    role: Role = "server"
    cipher: str = "AES-256-GCM"
    wrap: Wrap = "none"
    proto: Proto = "udp"
    family: Family = 4
    reneg_sec: int | None = None
    keepalive: tuple[int, int] | None = (10, 60)
    port: int = DEFAULT_PORT
    # Certificates and keys as <ca>...</ca> blocks (plus key-direction) instead of paths.
    inline: bool = False
    verb: int = 4
    # pyovpn only: emits `dco <mode>`; stock openvpn always gets `disable-dco` so the
    # control group never depends on whichever DCO module the kernel happens to have.
    dco: str | None = "userspace"
    # stock openvpn with its kernel DCO (only inside the guest kernel that has the ovpn driver)
    openvpn_dco: bool = False
    # extra config lines for the stock openvpn end(s) only, e.g. ("rcvbuf 4194304",)
    openvpn_extra: tuple[str, ...] = ()
    # extra config lines for the pyovpn end(s) only, e.g. ("userspace-engine multiprocess",)
    pyovpn_extra: tuple[str, ...] = ()

    def with_(self, **changes: Any) -> TunnelSpec:
        return replace(self, **changes)


@dataclass(frozen=True)
class InnerAddrs:
    """Tunnel addresses of both ends (what to ping / run iperf3 against)."""

    server4: str
    server6: str
    client4: str
    client6: str


def inner_addrs(spec: TunnelSpec) -> InnerAddrs:
    if spec.role == "server":
        # topology subnet: the server takes .1 and the pool starts at .2; the IPv6 pool
        # starts at base + 0x1000 (openvpn's server-ipv6 helper).
        return InnerAddrs("10.77.0.1", "fd00:77::1", "10.77.0.2", "fd00:77::1000")
    return InnerAddrs("10.77.0.1", "fd00:77::1", "10.77.0.2", "fd00:77::2")


def _inline_block(tag: str, path: Path) -> list[str]:
    return [f"<{tag}>", path.read_text().strip(), f"</{tag}>"]


def _crypto_lines(spec: TunnelSpec, pki: Pki, *, is_server: bool) -> list[str]:
    cert, key = (pki.server_crt, pki.server_key) if is_server else (pki.client_crt, pki.client_key)
    direction = "0" if is_server else "1"
    lines: list[str] = []
    if spec.inline:
        lines += _inline_block("ca", pki.ca_crt) + _inline_block("cert", cert) + _inline_block("key", key)
        if spec.wrap == "tls-auth":
            lines += [f"key-direction {direction}", *_inline_block("tls-auth", pki.ta_key)]
        elif spec.wrap == "tls-crypt":
            lines += _inline_block("tls-crypt", pki.tc_key)
    else:
        lines += [f"ca {pki.ca_crt}", f"cert {cert}", f"key {key}"]
        if spec.wrap == "tls-auth":
            lines.append(f"tls-auth {pki.ta_key} {direction}")
        elif spec.wrap == "tls-crypt":
            lines.append(f"tls-crypt {pki.tc_key}")
    lines.append("remote-cert-tls client" if is_server else "remote-cert-tls server")
    if is_server:
        lines.append("dh none")
    return lines


def _common_tail(spec: TunnelSpec, impl: Impl) -> list[str]:
    lines = [f"data-ciphers {spec.cipher}"]
    if spec.reneg_sec is not None:
        lines.append(f"reneg-sec {spec.reneg_sec}")
    lines.append(f"verb {spec.verb}")
    if impl == "openvpn":
        if not spec.openvpn_dco:
            lines.append("disable-dco")
        lines += spec.openvpn_extra
    else:
        if spec.dco:
            lines.append(f"dco {spec.dco}")
        lines += spec.pyovpn_extra
    return lines


def server_config(spec: TunnelSpec, pki: Pki, *, impl: Impl, local: str, dev: str = "tun0") -> str:
    """Config text for the listening side (``mode server`` or P2P ``tls-server``) bound to ``local``."""
    lines = [f"# {impl} {spec.role} server, generated by tests/netns/harness.py", f"dev {dev}"]
    lines += [
        f"proto {'udp' if spec.proto == 'udp' else 'tcp-server'}",
        f"local {local}",
        f"lport {spec.port}",
    ]
    if spec.role == "server":
        lines += [
            f"server {INNER4_NET} {INNER4_MASK}",
            f"server-ipv6 {INNER6_NET}",
            "topology subnet",
        ]
    else:
        a = inner_addrs(spec)
        lines += [
            "tls-server",
            f"ifconfig {a.server4} {a.client4}",
            f"ifconfig-ipv6 {a.server6}/64 {a.client6}",
        ]
    lines += _crypto_lines(spec, pki, is_server=True)
    if spec.keepalive:
        lines.append(f"keepalive {spec.keepalive[0]} {spec.keepalive[1]}")
    lines += _common_tail(spec, impl)
    return "\n".join(lines) + "\n"


def client_config(spec: TunnelSpec, pki: Pki, *, impl: Impl, remote: str, dev: str = "tun0") -> str:
    """Config text for the connecting side (pull ``client`` or P2P ``tls-client``) of ``remote``."""
    lines = [f"# {impl} {spec.role} client, generated by tests/netns/harness.py"]
    lines += ["client" if spec.role == "server" else "tls-client", f"dev {dev}"]
    lines += [
        f"proto {'udp' if spec.proto == 'udp' else 'tcp-client'}",
        f"remote {remote} {spec.port}",
        "nobind",
    ]
    if spec.role == "p2p":
        a = inner_addrs(spec)
        lines += [f"ifconfig {a.client4} {a.server4}", f"ifconfig-ipv6 {a.client6}/64 {a.server6}"]
        # In pull mode the server pushes ping/ping-restart; in P2P each side sets its own.
        if spec.keepalive:
            lines.append(f"keepalive {spec.keepalive[0]} {spec.keepalive[1]}")
    lines += _crypto_lines(spec, pki, is_server=False)
    if spec.proto == "udp" and spec.role == "server":
        # Lets the server drop the client at once when it stops, instead of after ping-restart.
        lines.append("explicit-exit-notify 1")
    lines += _common_tail(spec, impl)
    return "\n".join(lines) + "\n"


def write_script(path: Path, text: str) -> Path:
    """A shell script the VPN under test runs (script-security 2): written and made executable."""
    path.write_text(text)
    path.chmod(0o755)
    return path


def vpn_argv(impl: Impl, config: str | os.PathLike[str]) -> list[str]:
    """How to run an implementation on a config file."""
    if impl == "openvpn":
        return ["openvpn", "--config", str(config)]
    return [sys.executable, "-m", "pyovpn", "--config", str(config)]


@dataclass
class Tunnel:
    """A running server (ns b) / client (ns a) pair; see :func:`start_tunnel`."""

    net: Netns
    spec: TunnelSpec
    server_impl: Impl
    client_impl: Impl
    server: Proc
    client: Proc
    addrs: InnerAddrs
    stopped: dict[str, int] = field(default_factory=dict)

    @property
    def procs(self) -> list[Proc]:
        return [self.server, self.client]

    def logs(self, lines: int = 60) -> str:
        return logs_tail(self.procs, lines)

    def openvpn_log(self) -> str:
        """Log text of the stock openvpn end (server if both are openvpn)."""
        if self.server_impl == "openvpn":
            return self.server.text()
        if self.client_impl == "openvpn":
            return self.client.text()
        raise HarnessError("no openvpn end in this tunnel")

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """Stop client then server; return ``{"client": rc, "server": rc}``."""
        self.stopped["client"] = self.client.stop(timeout)
        self.stopped["server"] = self.server.stop(timeout)
        return dict(self.stopped)


def spawn_tunnel(
    net: Netns,
    pki: Pki,
    spec: TunnelSpec,
    server_impl: Impl,
    client_impl: Impl,
    *,
    server_extra: str = "",
    client_extra: str = "",
    init_timeout: float | None = None,
    server_argv: list[str] | None = None,
    listen_timeout: float = 10.0,
) -> tuple[Proc, Proc]:
    """Write s.conf/c.conf (plus extra lines), start the server in ns b, then the client in ns a.

    Unlike :func:`start_tunnel` it waits for the init lines only when given ``init_timeout``
    (then up to that many seconds for both); otherwise the caller decides what to wait for (a
    refused login, a privilege drop, ...). ``server_argv`` runs the server some other way on
    ``net.workdir / "s.conf"`` (see :meth:`Netns.start_server`), given ``listen_timeout`` seconds
    to open its port.
    """
    (net.workdir / "s.conf").write_text(
        server_config(spec, pki, impl=server_impl, local=net.outer("b", spec.family)) + server_extra
    )
    (net.workdir / "c.conf").write_text(
        client_config(spec, pki, impl=client_impl, remote=net.outer("b", spec.family)) + client_extra
    )
    server = net.start_server(
        server_impl,
        net.workdir / "s.conf",
        proto=spec.proto,
        port=spec.port,
        timeout=listen_timeout,
        argv=server_argv,
    )
    client = net.spawn("a", vpn_argv(client_impl, net.workdir / "c.conf"), f"client-{client_impl}")
    if init_timeout is not None:
        wait_for_lines([server, client], INIT_LINE, init_timeout)
    return server, client


def start_tunnel(
    net: Netns,
    pki: Pki,
    spec: TunnelSpec,
    *,
    server_impl: Impl,
    client_impl: Impl,
    timeout: float = 30.0,
    tag: str = "",
) -> Tunnel:
    """Start the server in ns b and the client in ns a; wait for both init lines.

    Fails with both log tails as soon as either side exits, or after ``timeout`` s.
    """
    prefix = f"{tag}-" if tag else ""
    server_cfg = net.workdir / f"{prefix}server-{server_impl}.conf"
    client_cfg = net.workdir / f"{prefix}client-{client_impl}.conf"
    server_cfg.write_text(server_config(spec, pki, impl=server_impl, local=net.outer("b", spec.family)))
    client_cfg.write_text(client_config(spec, pki, impl=client_impl, remote=net.outer("b", spec.family)))
    deadline = time.monotonic() + timeout
    server = net.spawn("b", vpn_argv(server_impl, server_cfg), f"{prefix}server-{server_impl}")
    try:
        wait_listening(net.b, spec.proto, spec.port, timeout=timeout, proc=server)
    except WaitTimeout as e:
        raise WaitTimeout(f"{e}\n(server never opened its port; is the config accepted?)") from None
    client = net.spawn("a", vpn_argv(client_impl, client_cfg), f"{prefix}client-{client_impl}")
    tunnel = Tunnel(net, spec, server_impl, client_impl, server, client, inner_addrs(spec))
    wait_for_lines(tunnel.procs, INIT_LINE, max(1.0, deadline - time.monotonic()))
    return tunnel


# ---------------------------------------------------------------------------------------
# Traffic
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PingResult:
    ok: bool
    transmitted: int
    received: int
    output: str


def vm_rss_kib(pid: int) -> int:
    """The resident memory of process ``pid`` (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def ping(ns: str, addr: str, count: int = 3, timeout: float = 10.0) -> PingResult:
    """Ping ``addr`` from inside ``ns`` until ``count`` replies or ``timeout`` s.

    ``-w`` makes ping keep sending until it has ``count`` replies, so one early loss
    (ARP/ND still resolving right after the tunnel came up) does not fail the check.
    """
    argv = [*netns_exec(ns), "ping", "-n", "-c", str(count), "-i", "0.2", "-w", str(int(timeout)), addr]
    res = _run(argv, check=False, timeout=timeout + 10)
    out = res.stdout + res.stderr
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    tx, rx = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return PingResult(res.returncode == 0 and rx >= count, tx, rx, out)


# The longest zero-progress stretch a tunnel transfer may show. Inside the qemu guest the CPUs
# are emulated (TCG, a small fraction of native speed, ~10 Mbit/s through a tunnel) and a whole
# 1 s iperf3 report can come up empty with nothing wrong in the tunnel (seen on the code before
# the edge redesign as well); natively 2 s already means a stuck rekey or a lost key.
MAX_STALL_SECONDS = 3.0 if os.environ.get("PYOVPN_GUEST") == "1" else 2.0


def max_stall_seconds(intervals: Sequence[Mapping[str, float]]) -> float:
    """Longest run of consecutive zero-byte intervals, in seconds."""
    worst = cur = 0.0
    for iv in intervals:
        if iv["bytes"] <= 0:
            cur += iv["end"] - iv["start"]
            worst = max(worst, cur)
        else:
            cur = 0.0
    return worst


def iperf3_transfer(
    client_ns: str,
    server_ns: str,
    server_addr: str,
    *,
    nbytes: int | None = None,
    seconds: float | None = None,
    reverse: bool = False,
    port: int = IPERF_PORT,
    timeout: float | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    parallel: int = 1,
    udp_rate: str | None = None,
    length: int | None = None,
) -> dict[str, Any]:
    """One iperf3 run (``-J -i 1``) from ``client_ns`` to a one-off server in ``server_ns``.

    Give ``nbytes`` (``-n``) or ``seconds`` (``-t``); ``reverse`` makes the server send.
    TCP by default; ``parallel`` streams (``-P``). ``udp_rate`` (e.g. ``"500M"``) makes it a
    UDP run at that offered rate (``-u -b``); ``length`` sets the datagram/buffer size
    (``-l``). A UDP result also has ``"udp": {"packets", "lost_packets", "lost_percent",
    "bytes_received", "seconds"}`` from the receiver's side.
    Returns ``{"bytes", "bytes_sent", "bytes_received", "seconds", "bits_per_second",
    "intervals": [{"start", "end", "bytes"}...], "max_stall", "raw"}`` where intervals are
    the client's 1 s reports and ``max_stall`` is the longest zero-progress stretch.

    ``bytes`` is what the sender got through (``sum_sent``): in forward mode iperf3's
    own receiver count stops at TEST_END while data is still queued, so it reads a few
    MB short even over a perfect tunnel (seen: 46-48 of 50 MB over stock openvpn).
    TCP keeps the sender within a socket buffer of what the receiver acknowledged, so
    a finished ``-n 50M`` run means ~50 MB crossed the tunnel.
    Raises :class:`HarnessError` (with iperf3's output) on failure or timeout.
    """
    if (nbytes is None) == (seconds is None):
        raise ValueError("give exactly one of nbytes or seconds")
    if timeout is None:
        timeout = (seconds + 30.0) if seconds is not None else 90.0
    own_logdir = log_dir is None
    logdir = Path(tempfile.mkdtemp(prefix="pov-iperf-")) if log_dir is None else Path(log_dir)
    # A fresh log per run: an old "Server listening" line must not count as ready.
    log_path = logdir / f"iperf3-server-{port}-{next(_IPERF_RUNS)}.log"
    server = Proc(
        server_ns, ["iperf3", "-s", "-1", "-p", str(port), "--forceflush"], log_path, name="iperf3-server"
    )
    try:
        server.wait_for_line(r"Server listening", timeout=10)
        argv = [*netns_exec(client_ns), "iperf3", "-c", server_addr, "-p", str(port), "-J", "-i", "1"]
        argv += ["--connect-timeout", "5000"]
        argv += ["-n", str(nbytes)] if nbytes is not None else ["-t", str(seconds)]
        if reverse:
            argv.append("-R")
        if parallel > 1:
            argv += ["-P", str(parallel)]
        if udp_rate is not None:
            argv += ["-u", "-b", udp_rate]
        if length is not None:
            argv += ["-l", str(length)]
        try:
            res = _run(argv, check=False, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            msg = f"iperf3 to {server_addr} did not finish in {timeout:.0f}s"
            raise HarnessError(f"{msg}\n{tail_text(out, 40)}\n{server.tail(20)}") from None
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise HarnessError(
                f"iperf3 exited {res.returncode} without JSON: {res.stdout[-2000:]}{res.stderr[-2000:]}"
            ) from None
        if res.returncode != 0 or "error" in data:
            raise HarnessError(
                f"iperf3 to {server_addr} failed: {data.get('error', res.stderr)}\n{server.tail(20)}"
            )
    finally:
        server.stop(timeout=3)
        if own_logdir:
            shutil.rmtree(logdir, ignore_errors=True)
    end = data["end"]
    intervals = [
        {"start": float(iv["sum"]["start"]), "end": float(iv["sum"]["end"]), "bytes": int(iv["sum"]["bytes"])}
        for iv in data.get("intervals", [])
    ]
    extra: dict[str, Any] = {}
    if udp_rate is not None:
        rcv = end["sum_received"]
        extra["udp"] = {
            "packets": int(rcv.get("packets", 0)),
            "lost_packets": int(rcv.get("lost_packets", 0)),
            "lost_percent": float(rcv.get("lost_percent", 0.0)),
            "bytes_received": int(rcv["bytes"]),
            "seconds": float(rcv["seconds"]),
        }
    return {
        **extra,
        "bytes": int(end["sum_sent"]["bytes"]),
        "bytes_sent": int(end["sum_sent"]["bytes"]),
        "bytes_received": int(end["sum_received"]["bytes"]),
        "seconds": float(end["sum_received"]["seconds"]),
        "bits_per_second": float(end["sum_received"]["bits_per_second"]),
        "intervals": intervals,
        "max_stall": max_stall_seconds(intervals),
        "raw": data,
    }


def describe_iperf(result: Mapping[str, Any]) -> str:
    """One line per interval, for assertion messages."""
    rows = [f"{iv['start']:6.1f}-{iv['end']:6.1f}s {iv['bytes'] / 1e6:9.2f} MB" for iv in result["intervals"]]
    head = (
        f"sent {result['bytes_sent'] / 1e6:.1f} MB, received {result['bytes_received'] / 1e6:.1f} MB"
        f" in {result['seconds']:.1f}s ({result['bits_per_second'] / 1e6:.1f} Mbit/s),"
        f" max stall {result['max_stall']:.1f}s"
    )
    return "\n".join([head, *rows])


# ---------------------------------------------------------------------------------------
# OpenVPN log parsing
# ---------------------------------------------------------------------------------------

# openvpn 2.6 prints this pair every time it installs a data-channel key, for the first
# key of a session (key_id 0) and for every renegotiated one (key_id 1..7, wrapping):
#   Outgoing Data Channel: Cipher 'AES-256-GCM' initialized with 256 bit key
#   Incoming Data Channel: Cipher 'AES-256-GCM' initialized with 256 bit key
# (in mode server prefixed with "client/ADDR:PORT "). No verb-4 line carries the key_id,
# so the first key of each session is subtracted using the line printed once per new
# peer session and never on renegotiation:
#   [client] Peer Connection Initiated with [AF_INET]172.31.254.1:54458
# A renegotiation that fails before the new key is installed prints neither, so the
# count is of completed renegotiations only. (The initiating side also logs
# "TLS: soft reset sec=10/10 ...", but the responder does not, so that line is no count.)
KEY_INSTALLED_PATTERN = re.compile(r"Outgoing Data Channel: Cipher '[^']+' initialized")
SESSION_PATTERN = re.compile(r"Peer Connection Initiated with")


def count_rekeys(openvpn_log_text: str) -> int:
    """Completed data-channel renegotiations (keys with key_id > 0) in a stock openvpn log.

    Needs ``verb`` 3 or more. Works on either end and in P2P or server mode.
    """
    keys = len(KEY_INSTALLED_PATTERN.findall(openvpn_log_text))
    sessions = len(SESSION_PATTERN.findall(openvpn_log_text))
    return max(0, keys - sessions)
