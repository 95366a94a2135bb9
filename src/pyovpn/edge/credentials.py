"""A client's username/password across connections: asking the user for what the config lacks
(terminal or systemd-ask-password, or a management client with management-query-passwords),
auth-nocache, auth-retry, static-challenge and the server's auth-token, which stands in for the
password on every reconnect.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import subprocess
import termios
from collections.abc import Callable
from dataclasses import dataclass

from pyovpn.errors import ConfigError

log = logging.getLogger("pyovpn")

USERNAME_PROMPT = "Enter Auth Username:"
PASSWORD_PROMPT = "Enter Auth Password:"

#: asks the user one question: (prompt, echo the answer) -> answer
Asker = Callable[[str, bool], str]


class AnswerLater(Exception):
    """Raised by :func:`answer_later`: the question goes to the management interface once it runs."""


def answer_later(prompt: str, echo: bool) -> str:
    """The asker while the management interface is not up yet (management-query-passwords)."""
    raise AnswerLater(prompt)


def static_challenge_password(password: str, response: str) -> str:
    """The password field OpenVPN sends for `static-challenge`: both parts base64, SCRV1-tagged."""
    b64 = base64.b64encode
    return f"SCRV1:{b64(password.encode()).decode()}:{b64(response.encode()).decode()}"


def _ask_terminal(prompt: str, echo: bool) -> str:
    """One line from the controlling terminal, echo off for secrets (stdin may be redirected)."""
    fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, (prompt + " ").encode())
        saved = termios.tcgetattr(fd)
        if not echo:
            quiet = termios.tcgetattr(fd)
            quiet[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
        line = b""
        try:
            while not line.endswith(b"\n"):
                chunk = os.read(fd, 1)
                if not chunk:
                    raise ConfigError(f"no answer to '{prompt}' (end of input on the terminal)")
                line += chunk
        finally:
            if not echo:
                termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
                os.write(fd, b"\n")
    finally:
        os.close(fd)
    return line.decode(errors="replace").rstrip("\r\n")


def _has_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _ask_systemd(prompt: str, echo: bool) -> str:
    binary = shutil.which("systemd-ask-password")
    assert binary is not None
    argv = [binary, *(["--echo"] if echo else []), prompt]
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    except subprocess.CalledProcessError:
        raise ConfigError(f"systemd-ask-password got no answer to '{prompt}'") from None
    return done.stdout.rstrip("\n")


def ask_user(prompt: str, echo: bool) -> str:
    """Ask on the terminal, else through systemd-ask-password (as OpenVPN does), else refuse."""
    if _has_terminal():
        return _ask_terminal(prompt, echo)
    if shutil.which("systemd-ask-password"):
        return _ask_systemd(prompt, echo)
    raise ConfigError(
        f"cannot ask '{prompt}': there is no terminal and no systemd-ask-password; put the answer in a "
        "file (`auth-user-pass FILE` with the username on line 1 and the password on line 2; "
        "`askpass FILE` for a key passphrase)"
    )


@dataclass(frozen=True)
class StaticChallenge:
    text: str
    echo: bool


class Credentials:
    """What the client sends as username/password on each connection, and what it forgets."""

    def __init__(
        self,
        username: str | None,
        password: str | None,
        *,
        nocache: bool = False,
        retry: str = "none",
        challenge: StaticChallenge | None = None,
        ask: Asker = ask_user,
    ) -> None:
        self._username = username
        self._password = password
        self._nocache = nocache
        self.retry = retry
        self._challenge = challenge
        self._ask = ask
        self._token: str | None = None
        self._token_user: str | None = None
        self._given = (username, password)  # what the config said: `forget-passwords` keeps it
        self._supplied: tuple[str, str] | None = None  # answers a management client gave

    def needs_answers(self) -> bool:
        """With management-query-passwords: must this connection's credentials be asked for?

        A static challenge's response is asked every time, as OpenVPN does; an auth-token
        stands in for everything."""
        if self._token is not None or self._supplied is not None:
            return False
        return self._password is None or self._challenge is not None

    @property
    def challenge(self) -> StaticChallenge | None:
        return self._challenge

    def supply(self, username: str, password: str) -> None:
        """A management client's answers, used by the next :meth:`for_connection` (its password is
        already in final form: with a static challenge the client builds the SCRV1 string)."""
        self._supplied = (username, password)

    def forget(self) -> None:
        """`forget-passwords`: drop what was asked for and the auth-token; keep the config's part."""
        self._username, self._password = self._given
        self._supplied = None
        self._token = self._token_user = None

    def for_connection(self) -> tuple[str, str]:
        """The (username, password) for the next connection, asking only for what is missing."""
        if self._token is not None:
            return self._token_user or self._username or "", self._token
        if self._supplied is not None:
            supplied, self._supplied = self._supplied, None
            self._username = supplied[0]
            if not self._nocache and self._challenge is None:
                self._password = supplied[1]
            return supplied
        if self._username is None:
            self._username = self._ask(USERNAME_PROMPT, True)
        password = self._password
        if password is None:
            password = self._ask(PASSWORD_PROMPT, False)
            if not self._nocache:
                self._password = password
        if self._challenge is not None:
            # a challenge response (typically a one-time code) is never reused: asked every login
            response = self._ask(f"CHALLENGE: {self._challenge.text}", self._challenge.echo)
            password = static_challenge_password(password, response)
        return self._username, password

    def token_received(self, token: str | None, token_user: str | None = None) -> None:
        """The server pushed an auth-token: the next connections send it instead of the password."""
        if token is not None and token != self._token:
            log.info("auth-token received: reconnects use it instead of the password")
            self._token = token
        if token_user is not None:
            with contextlib.suppress(ValueError):
                self._token_user = base64.b64decode(token_user, validate=True).decode()

    def auth_failed(self) -> bool:
        """The server said AUTH_FAILED: True to try again (per auth-retry), False to give up."""
        if self._token is not None:
            # an expired or rejected token: back to the real password, as OpenVPN does
            self._token = self._token_user = None
            return True
        if self.retry == "none":
            return False
        if self.retry == "interact":
            self._password = None
            if self._challenge is None:
                self._username = None
        return True


def key_passphrase(askpass: str | None, *, ask: Asker = ask_user) -> bytes:
    """A private key's passphrase: the first line of the askpass file, or asked of the user."""
    if askpass:
        try:
            with open(askpass, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n").encode()
        except OSError as exc:
            raise ConfigError(f"askpass: cannot read {askpass}: {exc.strerror}") from None
    return ask("Enter Private Key Password:", False).encode()
