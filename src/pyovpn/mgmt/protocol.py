"""The management protocol's text, as OpenVPN 2.6 writes it (management version 5): pure functions.

Tools written for OpenVPN's management interface (openvpn-monitor, OpenVPN GUI,
NetworkManager, openvpn-api) read exact byte layouts: every line ends in ``\\r\\n``, a
multi-line reply ends in ``END``, a one-line reply starts ``SUCCESS: `` or ``ERROR: ``, and
notifications start with ``>``. This module builds those lines and keeps the history buffers
(state, log, echo) that ``state all`` / ``log all`` replay; the asyncio side is
:mod:`pyovpn.mgmt.server`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from pyovpn.edge.status import TITLE
from pyovpn.rundir import RUN_DIR

GREETING = ">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info"
UNKNOWN = "ERROR: unknown command, enter 'help' for more options"
PASSWORD_PROMPT = "ENTER PASSWORD:"  # no line end: the client types on the same line
#: Where every running pyovpn answers `pyovpn show` (a management socket, root only).
CONTROL_DIR = str(RUN_DIR)
MAX_LINE = 4096  # a longer command line is refused (OpenVPN's own buffer is smaller)

HELP = """\
Management Interface for pyovpn (OpenVPN 2.6 management version 5 subset)
Commands:
auth-retry [mode]      : Show or set what a refused login does (none|nointeract|interact).
bytecount n            : Show bytes in/out, update every n secs (0=off).
echo [on|off] [N|all]  : Like log, but only show messages in echo buffer.
exit|quit              : Close management session.
forget-passwords       : Drop the answers given so far and any auth-token.
help                   : Print this message.
hold [on|off|release]  : Set/show hold flag to on/off state, or
                         release current hold and start tunnel.
kill cn                : Kill the client instance(s) having common name cn.
kill IP:port           : Kill the client instance connecting from IP:port.
client-kill CID [MSG]  : Kill client instance CID.
load-stats             : Show global server load stats.
log [on|off] [N|all]   : Turn on/off realtime log display
                         + show last N lines or 'all' for entire history.
mute [n]               : Set log mute level to n, or show level if n is absent.
needok type action     : Answer a >NEED-OK question (pyovpn asks none).
needstr type action    : Answer a >NEED-STR question (pyovpn asks none).
password type p        : Answer the outstanding >PASSWORD question of that type.
pid                    : Show process ID of the current OpenVPN process.
signal s               : Send signal s to daemon,
                         s = SIGHUP|SIGTERM|SIGUSR1|SIGUSR2.
state [on|off] [N|all] : Like log, but show state history.
status [n]             : Show current daemon status info using format #n.
username type u        : Give the username the outstanding >PASSWORD question needs.
verb [n]               : Set log verbosity level to n, or show if n is absent.
version                : Show current version number.
END"""


def line(text: str) -> bytes:
    """One protocol line: text plus ``\\r\\n`` (a reply of several lines is one write of these)."""
    return text.encode("utf-8", "replace") + b"\r\n"


def lines(texts: list[str]) -> bytes:
    return b"".join(line(t) for t in texts)


def version_lines() -> list[str]:
    return [f"OpenVPN Version: {TITLE}", "Management Version: 5", "END"]


@dataclass(frozen=True)
class StateEntry:
    """One ``>STATE`` record: ``ts,STATE,detail,tun4,remote_ip,remote_port,local_ip,local_port,tun6``."""

    when: int
    name: str
    detail: str = ""
    tun4: str = ""
    remote_ip: str = ""
    remote_port: str = ""
    local_ip: str = ""
    local_port: str = ""
    tun6: str = ""

    def text(self) -> str:
        return ",".join(
            (
                str(self.when),
                self.name,
                self.detail,
                self.tun4,
                self.remote_ip,
                self.remote_port,
                self.local_ip,
                self.local_port,
                self.tun6,
            )
        )


_LOG_FLAGS = {logging.DEBUG: "D", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "N"}


def log_flags(level: int) -> str:
    """OpenVPN's one-letter message class: I info, W warning, N non-fatal error, F fatal, D debug."""
    if level >= logging.CRITICAL:
        return "F"
    return _LOG_FLAGS.get(level, "N" if level > logging.WARNING else "I")


class History:
    """A bounded record of one kind of event (state, log, echo), for ``all`` and ``N`` replays."""

    def __init__(self, size: int) -> None:
        self._items: deque[str] = deque(maxlen=size)

    def add(self, text: str) -> None:
        self._items.append(text)

    def last(self, n: int | None) -> list[str]:
        """The last ``n`` entries (all with ``None``)."""
        items = list(self._items)
        return items if n is None else items[-n:] if n > 0 else []


TOO_LONG = object()  # what LineSplitter yields for a line over MAX_LINE bytes


class LineSplitter:
    """Bytes in, command lines out; an overlong line is reported once and skipped to its end."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[str | object]:
        out: list[str | object] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.limit:
                    if not self._discarding:
                        out.append(TOO_LONG)
                        self._discarding = True
                    self._buf.clear()
                return out
            raw = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._discarding:
                self._discarding = False  # the end of the overlong line
                continue
            if len(raw) > self.limit:
                out.append(TOO_LONG)
                continue
            out.append(raw.decode("utf-8", "replace").strip())


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------------------- the password dialogue
# `management-query-passwords`: the daemon announces what it needs with `>PASSWORD:Need …` and a
# management client answers with `username TYPE VALUE` / `password TYPE VALUE` (quoted and
# backslash-escaped like config lines, e.g. NetworkManager's `password "Auth" "pa\ ss"`). The reply
# texts and the rules (which answer is needed, what counts as complete) follow OpenVPN 2.6's
# manage.c so that clients written for it get the same lines.

#: OpenVPN's query types: the auth-user-pass credentials and a private key's passphrase.
AUTH = "Auth"
PRIVATE_KEY = "Private Key"
AUTH_RETRY_MODES = ("none", "nointeract", "interact")


def missing_parameters(command: str, n: int) -> str:
    return f"ERROR: the '{command}' command requires {n} parameter{'s' if n > 1 else ''}"


def not_needed(what: str) -> str:
    """The reply to an answer nothing asked for (`what`: username, password, needok-confirmation …)."""
    return f"ERROR: no {what} is currently needed at this time"


def verification_failed(kind: str, reason: str | None = None) -> str:
    """`>PASSWORD:Verification Failed: 'Auth'`, with the server's AUTH_FAILED reason when it gave one."""
    text = f">PASSWORD:Verification Failed: '{kind}'"
    return f"{text} ['{reason}']" if reason else text


def auth_token(token: str) -> str:
    """What OpenVPN tells management clients whenever the server pushes an auth-token."""
    return f">PASSWORD:Auth-Token:{token}"


@dataclass
class PasswordQuery:
    """One outstanding `>PASSWORD:Need …` question and the answers given to it so far.

    ``challenge``: a static challenge (its text and whether the answer is echoed); the
    management client then sends the whole ``SCRV1:…`` password itself, as with OpenVPN.
    """

    kind: str = AUTH
    password_only: bool = False
    challenge: tuple[str, bool] | None = None
    username: str = ""
    password: str | None = None

    def prompt(self) -> str:
        text = f">PASSWORD:Need '{self.kind}' {'password' if self.password_only else 'username/password'}"
        if self.challenge is not None and not self.password_only:
            text += f" SC:{int(self.challenge[1])},{self.challenge[0]}"
        return text

    @property
    def complete(self) -> bool:
        """Everything asked for is in: a non-empty username (unless password only) and a password."""
        return self.password is not None and (self.password_only or self.username != "")

    def answer(self, what: str, args: list[str]) -> str:
        """Take a ``username``/``password`` command's words (after the command); the reply line."""
        if len(args) < 2:
            return missing_parameters(what, 2)
        kind, value = args[0], args[1]
        if what == "username" and self.password_only:
            return not_needed(what)
        if kind != self.kind:
            return f"ERROR: {what} of type '{kind}' entered, but we need one of type '{self.kind}'"
        if what == "username":
            self.username = value
        else:
            self.password = value  # "" is a blank password, which OpenVPN passes on as such
        return f"SUCCESS: '{kind}' {what} entered, but not yet verified"
