"""The exception hierarchy: every error pyovpn raises on bad input is one of these."""


class PyovpnError(Exception):
    """Base of all pyovpn errors; the message is meant for the user."""


class ProtocolError(PyovpnError):
    """A packet or control message from the peer is malformed or not acceptable.

    Parsers raise only this on bad input, never IndexError/struct.error.
    """


class AuthenticationError(ProtocolError):
    """A packet failed its HMAC/AEAD check (wrong key, corruption or forgery)."""


class ReplayError(ProtocolError):
    """A packet id was already seen or is too old for the replay window."""


class ConfigError(PyovpnError):
    """A configuration file or command line option is invalid or unsupported."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        self.source = source
        self.line = line
        where = ""
        if source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(where + message)


class BackendError(PyovpnError):
    """A data-channel backend could not carry out a command."""
