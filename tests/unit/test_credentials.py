"""Client credentials across connections (edge/credentials.py) and the config options that feed them."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyovpn.config import parse_config_text
from pyovpn.edge.credentials import (
    PASSWORD_PROMPT,
    USERNAME_PROMPT,
    Credentials,
    StaticChallenge,
    key_passphrase,
    static_challenge_password,
)
from pyovpn.errors import ConfigError
from pyovpn.proto.push import parse_pushed_options


class ScriptedUser:
    """Answers prompts from a list and records what was asked (prompt, echo)."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, bool]] = []

    def __call__(self, prompt: str, echo: bool) -> str:
        self.asked.append((prompt, echo))
        return self.answers.pop(0)


def test_static_challenge_format_is_scrv1_with_both_parts_base64() -> None:
    sent = static_challenge_password("pässword", "123456")
    tag, pw, resp = sent.split(":")
    assert tag == "SCRV1"
    assert base64.b64decode(pw).decode() == "pässword"
    assert base64.b64decode(resp).decode() == "123456"
    assert sent == "SCRV1:cMOkc3N3b3Jk:MTIzNDU2"


def test_bare_auth_user_pass_asks_username_echoed_password_hidden() -> None:
    user = ScriptedUser("alice", "s3cret")
    creds = Credentials(None, None, ask=user)
    assert creds.for_connection() == ("alice", "s3cret")
    assert user.asked == [(USERNAME_PROMPT, True), (PASSWORD_PROMPT, False)]
    # cached: a reconnect asks nothing
    assert creds.for_connection() == ("alice", "s3cret")
    assert len(user.asked) == 2


def test_username_from_file_only_asks_the_password() -> None:
    user = ScriptedUser("pw")
    assert Credentials("bob", None, ask=user).for_connection() == ("bob", "pw")
    assert user.asked == [(PASSWORD_PROMPT, False)]


def test_auth_nocache_asks_again_on_reconnect() -> None:
    user = ScriptedUser("pw1", "pw2")
    creds = Credentials("bob", None, nocache=True, ask=user)
    assert creds.for_connection() == ("bob", "pw1")
    assert creds.for_connection() == ("bob", "pw2")


def test_pushed_auth_token_replaces_the_password_without_asking() -> None:
    user = ScriptedUser("pw1")
    creds = Credentials("bob", None, nocache=True, ask=user)
    creds.for_connection()
    pushed = parse_pushed_options(
        ["auth-token SESS_ID_AT_abc", "auth-token-user " + base64.b64encode(b"tok").decode()]
    )
    creds.token_received(pushed.auth_token, pushed.auth_token_user)
    assert creds.for_connection() == ("tok", "SESS_ID_AT_abc")
    assert len(user.asked) == 1
    # a refused token goes back to the password (asked again, nocache) without counting as a retry
    user.answers.append("pw2")
    assert creds.auth_failed() is True
    assert creds.for_connection() == ("bob", "pw2")


def test_static_challenge_prompts_for_the_response() -> None:
    user = ScriptedUser("pw", "424242")
    creds = Credentials("bob", None, challenge=StaticChallenge("Enter PIN", True), ask=user)
    assert creds.for_connection() == ("bob", static_challenge_password("pw", "424242"))
    assert user.asked[-1] == ("CHALLENGE: Enter PIN", True)
    # the password is cached, the one-time response is not
    user.answers.append("515151")
    assert creds.for_connection() == ("bob", static_challenge_password("pw", "515151"))


def test_static_challenge_with_password_from_file_still_asks_the_response() -> None:
    user = ScriptedUser("777")
    creds = Credentials("bob", "filepw", challenge=StaticChallenge("OTP", False), ask=user)
    assert creds.for_connection() == ("bob", static_challenge_password("filepw", "777"))
    assert user.asked == [("CHALLENGE: OTP", False)]


@pytest.mark.parametrize(
    ("retry", "again", "asks_again"),
    [("none", False, False), ("nointeract", True, False), ("interact", True, True)],
)
def test_auth_retry_modes(retry: str, again: bool, asks_again: bool) -> None:
    user = ScriptedUser("alice", "bad", "alice", "good")
    creds = Credentials(None, None, retry=retry, ask=user)
    assert creds.for_connection() == ("alice", "bad")
    assert creds.auth_failed() is again
    if again:
        assert creds.for_connection() == (("alice", "good") if asks_again else ("alice", "bad"))
        assert len(user.asked) == (4 if asks_again else 2)


def test_askpass_file_and_prompt(tmp_path: Path) -> None:
    f = tmp_path / "pass.txt"
    f.write_text("hunter2\nignored\n")
    assert key_passphrase(str(f)) == b"hunter2"
    user = ScriptedUser("typed")
    assert key_passphrase("", ask=user) == b"typed"
    assert user.asked == [("Enter Private Key Password:", False)]
    with pytest.raises(ConfigError, match="askpass: cannot read"):
        key_passphrase(str(tmp_path / "missing"))


CLIENT = "client\ndev tun\nremote 192.0.2.1 1194\n<ca>\nCA\n</ca>\nauth-user-pass\n"


def test_credential_options_parse() -> None:
    o = parse_config_text(
        CLIENT + "auth-nocache\nauth-retry interact\nstatic-challenge 'Your OTP' 0\naskpass\n"
    )
    assert o.auth_user_pass == (None, None)
    assert o.auth_nocache and o.auth_retry == "interact"
    assert o.static_challenge == ("Your OTP", False)
    assert o.askpass == ""


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("auth-retry sometimes", "use none, nointeract or interact"),
        ("static-challenge OTP yes", "ECHO must be 0 or 1"),
    ],
)
def test_bad_credential_options_say_what_to_do(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config_text(CLIENT + line + "\n")


def test_auth_user_pass_file_with_only_a_username(tmp_path: Path) -> None:
    f = tmp_path / "up.txt"
    f.write_text("carol\n")
    o = parse_config_text(CLIENT.replace("auth-user-pass\n", f"auth-user-pass {f}\n"))
    assert o.auth_user_pass == ("carol", None)


def _ask_without_terminal(tmp_path: Path, path_dirs: str) -> subprocess.CompletedProcess[str]:
    """ask_user in a new session (setsid: no controlling terminal), with PATH limited to path_dirs."""
    code = (
        "from pyovpn.edge.credentials import ask_user\n"
        "from pyovpn.errors import ConfigError\n"
        "try:\n    print('ANSWER=' + ask_user('Enter Auth Password:', False))\n"
        "except ConfigError as e:\n    print('ERROR=' + str(e))\n"
    )
    env = {"PATH": path_dirs, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [shutil.which("setsid") or "setsid", "-w", sys.executable, "-c", code],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_no_terminal_uses_systemd_ask_password(tmp_path: Path) -> None:
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) is missing: cannot start a process without a terminal")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    argv_log = tmp_path / "argv.txt"
    # stands in for systemd's agent, which needs a running systemd; it records how it was asked
    fake = bindir / "systemd-ask-password"
    fake.write_text(f'#!/bin/sh\necho "$@" > {argv_log}\necho from-agent\n')
    fake.chmod(0o755)
    done = _ask_without_terminal(tmp_path, f"{bindir}:/usr/bin:/bin")
    assert "ANSWER=from-agent" in done.stdout, done.stdout
    assert argv_log.read_text().strip() == "Enter Auth Password:"  # no --echo for a password


def test_no_terminal_and_no_agent_says_how_to_use_a_file(tmp_path: Path) -> None:
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) is missing: cannot start a process without a terminal")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _ask_without_terminal(tmp_path, str(empty))
    assert "ERROR=" in done.stdout and "auth-user-pass FILE" in done.stdout, done.stdout
