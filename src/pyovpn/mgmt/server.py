"""The management interface's listener: TCP or unix socket, several clients at once.

OpenVPN serves one management client at a time; pyovpn serves every connected client, and
each gets the notifications it asked for (``state on``, ``log on``, ``bytecount N``). What a
command does to the tunnel goes through :class:`ManagementHost`, which the daemon implements;
the reply text comes from :mod:`pyovpn.mgmt.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyovpn.config import split_words
from pyovpn.edge.host import ExternalAuth
from pyovpn.errors import ConfigError
from pyovpn.mgmt import protocol as p

log = logging.getLogger("pyovpn")

_SIGNALS = ("SIGHUP", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
# parameters a command must have (number, "at least"), checked first with OpenVPN's own reply
_NEEDS = {
    "signal": (1, False),
    "kill": (1, False),
    "log": (1, True),
    "echo": (1, True),
    "bytecount": (1, False),
    "client-kill": (1, True),
    "client-deny": (3, True),
    "client-auth-nt": (2, False),
    "client-auth": (2, False),
    "client-pending-auth": (4, False),
}


class ManagementHost(Protocol):
    """What management commands reach in the daemon."""

    def status_text(self, version: int) -> Awaitable[str]: ...

    def signal(self, name: str) -> None: ...

    def load_stats(self) -> Awaitable[tuple[int, int, int]]: ...  # clients, bytes in, bytes out

    def bytecounts(self) -> Awaitable[list[tuple[int | None, int, int]]]: ...  # (cid or None, in, out)

    def kill(self, target: str) -> Awaitable[str]: ...  # the reply line

    def client_kill(self, cid: int, message: str) -> Awaitable[str]: ...

    @property
    def status_version(self) -> int: ...

    @property
    def verb(self) -> int: ...

    def set_verb(self, level: int) -> None: ...

    def info(self) -> Awaitable[dict[str, object]]: ...  # `pyovpn-info` (pyovpn show), JSON-able

    @property
    def auth_retry(self) -> str: ...  # none | nointeract | interact

    def set_auth_retry(self, mode: str) -> None: ...

    def forget_passwords(self) -> None: ...  # `forget-passwords`: credentials and auth-token


@dataclass
class _Collecting:
    """A `client-auth CID KID` command waiting for its config lines and `END`."""

    cid: int
    kid: int
    lines: list[str] = field(default_factory=list)


@dataclass
class _Client:
    writer: asyncio.StreamWriter
    collecting: _Collecting | None = None
    state_on: bool = False
    log_on: bool = False
    echo_on: bool = False
    bytecount: asyncio.Task[None] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


class ManagementServer:
    """``management IP PORT [pw-file]`` / ``management PATH unix [pw-file]``."""

    def __init__(
        self,
        host: ManagementHost,
        *,
        address: tuple[str, int] | None = None,
        unix_path: str | None = None,
        password: str | None = None,
        hold: bool = False,
        log_cache: int = 1000,
        forget_on_disconnect: bool = False,
    ) -> None:
        if (address is None) == (unix_path is None):
            raise ValueError("give a TCP address or a unix socket path")
        self.host = host
        self.address = address
        self.unix_path = unix_path
        self.password = password
        self.states = p.History(log_cache)
        self.logs = p.History(log_cache)
        self.echoes = p.History(log_cache)
        self.clients: list[_Client] = []
        self._server: asyncio.AbstractServer | None = None
        self._holding = hold
        self._released = asyncio.Event()
        if not hold:
            self._released.set()
        self._mute = 0
        # management-client-auth: verdicts awaited per (CID, KID)
        self._auth: dict[tuple[int, int], asyncio.Future[ExternalAuth]] = {}
        self._pending_extended: dict[tuple[int, int], bool] = {}  # client-pending-auth seen
        # management-query-passwords: the question outstanding and who waits for its answers
        self._query: p.PasswordQuery | None = None
        self._query_answered: asyncio.Future[None] | None = None
        self._forget_on_disconnect = forget_on_disconnect  # management-forget-disconnect

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
            self._server = await asyncio.start_unix_server(self._serve, path=self.unix_path)
            os.chmod(self.unix_path, 0o600)
            where = f"unix:{self.unix_path}"
        else:
            assert self.address is not None
            self._server = await asyncio.start_server(self._serve, self.address[0], self.address[1])
            where = f"[AF_INET]{self.address[0]}:{self.address[1]}"
        log.info("MANAGEMENT: %s listening on %s", "unix socket" if self.unix_path else "TCP socket", where)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for c in list(self.clients):
                c.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        if self.unix_path is not None:
            # after a privilege drop the socket's root-owned directory may not let us remove it;
            # a leftover socket of a dead process is skipped by `pyovpn show` and swept at start
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)

    async def wait_hold_release(self) -> None:
        """``management-hold``: the tunnel starts only after a client says ``hold release``."""
        if not self._released.is_set():
            self._broadcast_all(">HOLD:Waiting for hold release:0")
            log.info("MANAGEMENT: waiting for hold release")
        await self._released.wait()

    # ------------------------------------------------------------------ events from the daemon

    def state(self, entry: p.StateEntry) -> None:
        text = entry.text()
        self.states.add(text)
        data = p.line(f">STATE:{text}")
        for c in self.clients:
            if c.state_on:
                c.send(data)

    def log_record(self, record: logging.LogRecord) -> None:
        if record.name.startswith("asyncio"):
            return
        text = f"{int(record.created)},{p.log_flags(record.levelno)},{record.getMessage()}"
        self.logs.add(text)
        data = p.line(f">LOG:{text}")
        for c in self.clients:
            if c.log_on:
                c.send(data)

    async def client_auth(self, cid: int, kid: int, env: dict[str, str], timeout: float) -> ExternalAuth:
        """`>CLIENT:CONNECT` to every management client; the first `client-auth`/`client-deny` decides."""
        fut: asyncio.Future[ExternalAuth] = asyncio.get_running_loop().create_future()
        self._auth[(cid, kid)] = fut
        self._client_event(f">CLIENT:CONNECT,{cid},{kid}", env)
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), timeout)
                except TimeoutError:
                    if not self._pending_extended.pop((cid, kid), False):
                        return ExternalAuth(False, reason="no answer from the management interface")
        finally:
            self._auth.pop((cid, kid), None)

    def client_event(self, event: str, cid: int, env: dict[str, str] | None) -> None:
        """`>CLIENT:ESTABLISHED,CID` / `>CLIENT:DISCONNECT,CID` with the client's environment."""
        self._client_event(f">CLIENT:{event},{cid}", env or {})

    def _client_event(self, head: str, env: dict[str, str]) -> None:
        out = [head, *(f">CLIENT:ENV,{k}={v}" for k, v in env.items()), ">CLIENT:ENV,END"]
        self._broadcast_all_lines(out)

    def _broadcast_all_lines(self, texts: list[str]) -> None:
        data = p.lines(texts)
        for c in self.clients:
            c.send(data)

    def _broadcast_all(self, text: str) -> None:
        data = p.line(text)
        for c in self.clients:
            c.send(data)

    # ------------------------------------------------------------------ one client

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        try:
            if self.password is not None and not await self._authenticate(reader, writer):
                return
            self.clients.append(client)
            client.send(p.line(p.GREETING))
            if not self._released.is_set():
                client.send(p.line(">HOLD:Waiting for hold release:0"))
            if self._query is not None:
                client.send(p.line(self._query.prompt()))  # a late client still sees the question
            splitter = p.LineSplitter()
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for item in splitter.feed(data):
                    if item is p.TOO_LONG:
                        client.send(p.line(f"ERROR: command line too long (limit {p.MAX_LINE} bytes)"))
                    elif isinstance(item, str) and client.collecting is not None:
                        self._collect(client, item)
                    elif isinstance(item, str) and item and not await self._command(client, item):
                        return
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            if client in self.clients:
                self.clients.remove(client)
                self._client_left()
            if client.bytecount is not None:
                client.bytecount.cancel()
            writer.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        for _ in range(3):
            writer.write(p.PASSWORD_PROMPT.encode())
            await writer.drain()
            try:
                raw = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                return False
            if not raw:
                return False
            if raw.decode("utf-8", "replace").rstrip("\r\n") == self.password:
                writer.write(p.line("SUCCESS: password is correct"))
                return True
            writer.write(p.line("ERROR: bad password"))
        log.warning("MANAGEMENT: client gave a wrong password three times; disconnected")
        return False

    async def _command(self, c: _Client, text: str) -> bool:
        """Run one command line; False when the client asked to leave."""
        try:
            words = split_words(text)
        except ConfigError as e:
            c.send(p.line(f"ERROR: {e}"))
            return True
        if not words:
            return True
        cmd, args = words[0].lower(), words[1:]
        handler = self._handlers().get(cmd)
        if handler is None:
            c.send(p.line(p.UNKNOWN))
            return True
        if cmd in ("exit", "quit"):
            return False
        need, at_least = _NEEDS.get(cmd, (0, False))
        if len(args) < need:
            many = f"{'at least ' if at_least else ''}{need} parameter{'s' if need > 1 else ''}"
            c.send(p.line(f"ERROR: the '{cmd}' command requires {many}; 'help' shows its form"))
            return True
        try:
            reply = await handler(c, args)
        except Exception as e:  # a command never takes the daemon down
            log.warning("MANAGEMENT: '%s' failed: %s", cmd, e)
            reply = p.line(f"ERROR: {cmd} failed: {e}")
        if reply:
            c.send(reply)
        return True

    def _handlers(self) -> dict[str, Callable[[_Client, list[str]], Awaitable[bytes]]]:
        return {
            "help": self._help,
            "version": self._version,
            "pid": self._pid,
            "state": self._state,
            "log": self._log,
            "echo": self._echo,
            "bytecount": self._bytecount,
            "status": self._status,
            "load-stats": self._load_stats,
            "kill": self._kill,
            "client-kill": self._client_kill,
            "hold": self._hold,
            "signal": self._signal,
            "verb": self._verb,
            "mute": self._mute_cmd,
            "pyovpn-info": self._info,
            "client-auth": self._client_auth,
            "client-auth-nt": self._client_auth_nt,
            "client-deny": self._client_deny,
            "client-pending-auth": self._client_pending_auth,
            "username": self._username,
            "password": self._password,
            "forget-passwords": self._forget_passwords,
            "auth-retry": self._auth_retry,
            "needok": self._needok,
            "needstr": self._needstr,
            "exit": self._help,
            "quit": self._help,
        }

    # ------------------------------------------------------------------ commands

    async def _help(self, c: _Client, args: list[str]) -> bytes:
        return p.lines(p.HELP.splitlines())

    async def _version(self, c: _Client, args: list[str]) -> bytes:
        return p.lines(p.version_lines())

    async def _pid(self, c: _Client, args: list[str]) -> bytes:
        return p.line(f"SUCCESS: pid={os.getpid()}")

    def _history_cmd(self, c: _Client, args: list[str], what: str, history: p.History, flag: str) -> bytes:
        """``state``/``log``/``echo`` with ``on``, ``off``, ``all``, ``N``, ``on all``."""
        if not args:
            return p.lines([*history.last(1 if what == "state" else None), "END"])
        word = args[0].lower()
        if word in ("on", "off"):
            setattr(c, flag, word == "on")
            head = f"SUCCESS: real-time {what} notification set to {word.upper()}"
            if word == "on" and len(args) > 1 and args[1].lower() == "all":
                return p.lines([head, *history.last(None), "END"])
            return p.line(head)
        if word == "all":
            return p.lines([*history.last(None), "END"])
        if word.isdigit():
            return p.lines([*history.last(int(word)), "END"])
        return p.line(f"ERROR: {what} parameter must be 'on' or 'off' or some number n or 'all'")

    async def _state(self, c: _Client, args: list[str]) -> bytes:
        return self._history_cmd(c, args, "state", self.states, "state_on")

    async def _log(self, c: _Client, args: list[str]) -> bytes:
        return self._history_cmd(c, args, "log", self.logs, "log_on")

    async def _echo(self, c: _Client, args: list[str]) -> bytes:
        return self._history_cmd(c, args, "echo", self.echoes, "echo_on")

    async def _bytecount(self, c: _Client, args: list[str]) -> bytes:
        if len(args) != 1 or not args[0].isdigit():
            return p.line("ERROR: bytecount needs one number of seconds (0 turns it off)")
        if c.bytecount is not None:
            c.bytecount.cancel()
            c.bytecount = None
        seconds = int(args[0])
        if seconds > 0:
            c.bytecount = asyncio.create_task(self._bytecount_loop(c, seconds))
        return p.line("SUCCESS: bytecount interval changed")

    async def _bytecount_loop(self, c: _Client, seconds: int) -> None:
        while not c.writer.is_closing():
            await asyncio.sleep(seconds)
            for cid, rx, tx in await self.host.bytecounts():
                c.send(p.line(f">BYTECOUNT:{rx},{tx}" if cid is None else f">BYTECOUNT_CLI:{cid},{rx},{tx}"))

    async def _status(self, c: _Client, args: list[str]) -> bytes:
        version = self.host.status_version
        if args:
            if args[0] not in ("1", "2", "3"):
                return p.line("ERROR: status: version must be 1, 2 or 3")
            version = int(args[0])
        text = await self.host.status_text(version)
        return p.lines(text.rstrip("\n").split("\n"))

    async def _load_stats(self, c: _Client, args: list[str]) -> bytes:
        n, rx, tx = await self.host.load_stats()
        return p.line(f"SUCCESS: nclients={n},bytesin={rx},bytesout={tx}")

    async def _kill(self, c: _Client, args: list[str]) -> bytes:
        if len(args) != 1:
            return p.line("ERROR: kill needs a common name or IP:port")
        return p.line(await self.host.kill(args[0]))

    async def _client_kill(self, c: _Client, args: list[str]) -> bytes:
        if not args or not args[0].isdigit():
            # OpenVPN's words first (tools match them), then what to do
            return p.line("ERROR: cannot parse CID: give the number in the Client ID column of 'status 2'")
        return p.line(await self.host.client_kill(int(args[0]), " ".join(args[1:])))

    async def _hold(self, c: _Client, args: list[str]) -> bytes:
        if not args:
            return p.line(f"SUCCESS: hold={1 if self._holding else 0}")
        word = args[0].lower()
        if word in ("on", "off"):
            self._holding = word == "on"
            return p.line(f"SUCCESS: hold flag set to {word.upper()}")
        if word == "release":
            self._released.set()
            return p.line("SUCCESS: hold release succeeded")
        return p.line("ERROR: bad hold command parameter: use 'on', 'off' or 'release'")

    async def _signal(self, c: _Client, args: list[str]) -> bytes:
        name = args[0].upper() if args else ""
        if name not in _SIGNALS:
            return p.line("ERROR: signal '%s' is not a known signal type" % (args[0] if args else ""))
        if name == "SIGUSR2":
            text = await self.host.status_text(self.host.status_version)
            for row in text.splitlines():
                log.info("%s", row)
        else:
            self.host.signal(name)
        return p.line(f"SUCCESS: signal {name} thrown")

    async def _verb(self, c: _Client, args: list[str]) -> bytes:
        if not args:
            return p.line(f"SUCCESS: verb={self.host.verb}")
        if not args[0].isdigit() or int(args[0]) > 11:
            return p.line("ERROR: verb level must be a number from 0 to 11")
        self.host.set_verb(int(args[0]))
        return p.line(f"SUCCESS: verb level changed to {args[0]}")

    async def _info(self, c: _Client, args: list[str]) -> bytes:
        """pyovpn's own command (no OpenVPN tool sends it): everything `pyovpn show` prints, as JSON."""
        return p.lines([json.dumps(await self.host.info(), sort_keys=True), "END"])

    def _verdict_for(self, args: list[str], what: str) -> tuple[asyncio.Future[ExternalAuth] | None, str]:
        if len(args) < 2 or not args[0].isdigit() or not args[1].isdigit():
            return None, f"ERROR: {what} needs CID and KID"
        fut = self._auth.get((int(args[0]), int(args[1])))
        if fut is None or fut.done():
            return (
                None,
                f"ERROR: {what} command failed: no pending authentication for client {args[0]} key {args[1]}",
            )
        return fut, ""

    async def _client_auth(self, c: _Client, args: list[str]) -> bytes:
        fut, err = self._verdict_for(args, "client-auth")
        if fut is None:
            return p.line(err)
        c.collecting = _Collecting(int(args[0]), int(args[1]))
        return b""  # the reply comes after END

    def _collect(self, c: _Client, text: str) -> None:
        col = c.collecting
        assert col is not None
        if text.strip() != "END":
            col.lines.append(text.strip())
            return
        c.collecting = None
        fut = self._auth.get((col.cid, col.kid))
        if fut is None or fut.done():
            c.send(p.line(f"ERROR: client-auth command failed: client {col.cid} is no longer waiting"))
            return
        fut.set_result(ExternalAuth(True, config=tuple(x for x in col.lines if x)))
        c.send(p.line("SUCCESS: client-auth command succeeded"))

    async def _client_auth_nt(self, c: _Client, args: list[str]) -> bytes:
        fut, err = self._verdict_for(args, "client-auth-nt")
        if fut is None:
            return p.line(err)
        fut.set_result(ExternalAuth(True))
        return p.line("SUCCESS: client-auth command succeeded")

    async def _client_deny(self, c: _Client, args: list[str]) -> bytes:
        fut, err = self._verdict_for(args, "client-deny")
        if fut is None:
            return p.line(err)
        reason = args[2] if len(args) > 2 else ""
        fut.set_result(ExternalAuth(False, reason=reason, client_reason=args[3] if len(args) > 3 else ""))
        return p.line("SUCCESS: client-deny command succeeded")

    async def _client_pending_auth(self, c: _Client, args: list[str]) -> bytes:
        """`client-pending-auth CID KID EXTRA TIMEOUT`: the verdict comes later; keep the client waiting."""
        fut, err = self._verdict_for(args, "client-pending-auth")
        if fut is None:
            return p.line(err)
        self._pending_extended[(int(args[0]), int(args[1]))] = True
        return p.line("SUCCESS: client-pending-auth command succeeded")

    async def _mute_cmd(self, c: _Client, args: list[str]) -> bytes:
        if not args:
            return p.line(f"SUCCESS: mute={self._mute}")
        if not args[0].isdigit():
            return p.line("ERROR: mute level must be a number")
        self._mute = int(args[0])
        return p.line(f"SUCCESS: mute level changed to {args[0]}")


    # ------------------------------------------------------------------ the password dialogue

    async def query_password(self, query: p.PasswordQuery) -> p.PasswordQuery:
        """`>PASSWORD:Need …` to every management client (and to any that connects later); the
        answers once a client has given all of them. Cancelling (a signal) withdraws the question."""
        log.info("MANAGEMENT: Need password(s) from management interface, waiting...")
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._query, self._query_answered = query, answered
        self._broadcast_all(query.prompt())
        try:
            await answered
        finally:
            self._query = self._query_answered = None
        return query

    def _client_left(self) -> None:
        if self._forget_on_disconnect and self._server is not None:  # not when the daemon exits
            self.host.forget_passwords()

    def auth_failure(self, kind: str, reason: str | None = None) -> None:
        self._broadcast_all(p.verification_failed(kind, reason))

    def auth_token(self, token: str) -> None:
        self._broadcast_all(p.auth_token(token))

    def _answer(self, what: str, args: list[str]) -> bytes:
        query, answered = self._query, self._query_answered
        if query is None or answered is None or answered.done():
            return self._unasked(what, args, what)
        reply = query.answer(what, args)
        if query.complete:
            answered.set_result(None)
        return p.line(reply)

    async def _username(self, c: _Client, args: list[str]) -> bytes:
        return self._answer("username", args)

    async def _password(self, c: _Client, args: list[str]) -> bytes:
        return self._answer("password", args)

    async def _forget_passwords(self, c: _Client, args: list[str]) -> bytes:
        self.host.forget_passwords()
        return p.line("SUCCESS: Passwords were forgotten")

    async def _auth_retry(self, c: _Client, args: list[str]) -> bytes:
        if not args:
            return p.line(f"SUCCESS: auth-retry={self.host.auth_retry}")
        if args[0] not in p.AUTH_RETRY_MODES:
            # OpenVPN prints the option parser's complaint to the client before the ERROR line
            complaint = "--auth-retry method must be 'interact', 'nointeract', or 'none'"
            return p.lines([complaint, "ERROR: bad auth-retry parameter"])
        self.host.set_auth_retry(args[0])
        return p.line("SUCCESS: auth-retry parameter changed")

    @staticmethod
    def _unasked(command: str, args: list[str], what: str) -> bytes:
        """An answer (`command TYPE VALUE`) to a question that is not outstanding: OpenVPN's error."""
        return p.line(p.missing_parameters(command, 2) if len(args) < 2 else p.not_needed(what))

    async def _needok(self, c: _Client, args: list[str]) -> bytes:
        # pyovpn never asks a NEED-OK/NEED-STR question, so an answer is never needed (OpenVPN's reply)
        return self._unasked("needok", args, "needok-confirmation")

    async def _needstr(self, c: _Client, args: list[str]) -> bytes:
        return self._unasked("needstr", args, "needstr-string")


class ManagementLogHandler(logging.Handler):
    """Feeds every log record to the management interface (``log on``, ``log all``)."""

    def __init__(self, server: ManagementServer) -> None:
        super().__init__(logging.DEBUG)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.server.log_record(record)
