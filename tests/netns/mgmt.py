"""A management-interface client for the tests: connects to a unix socket, reads whole lines."""

from __future__ import annotations

import re
import socket
import time


class Mgmt:
    """A management client on a unix socket that reads whole lines."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(15)
        self.buf = b""

    def line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("management socket closed")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\r\n", 1)
        return raw.decode()

    def until(self, pattern: str) -> list[str]:
        seen = []
        while True:
            text = self.line()
            seen.append(text)
            if re.search(pattern, text):
                return seen

    def command(self, text: str, multi: bool = False, notifications: list[str] | None = None) -> list[str]:
        """Send a command; its reply lines. Notifications (">...") in between go to
        ``notifications`` when given, else they are skipped."""
        self.sock.sendall(text.encode() + b"\n")
        out = []
        while True:
            text = self.line()
            if text.startswith(">"):
                if notifications is not None:
                    notifications.append(text)
                continue
            out.append(text)
            if not multi or text == "END":
                return out

    def close(self) -> None:
        self.sock.close()
