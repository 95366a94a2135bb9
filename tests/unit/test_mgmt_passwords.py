"""management-query-passwords without sockets: the `>PASSWORD` dialogue's state and texts
(mgmt/protocol.py), how answers are lexed, and the credentials the answers feed (edge/credentials.py).

The texts are those OpenVPN 2.6's manage.c prints; tests/netns/test_management_passwords.py
checks them against the real `openvpn` binary."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyovpn.config import no_effect_reason, parse_args, parse_config_text, split_words
from pyovpn.daemon import _auth_failed_reason, session_config
from pyovpn.edge.credentials import AnswerLater, Credentials, StaticChallenge, answer_later
from pyovpn.mgmt import protocol as p
from pyovpn.tools.pki import Pki, make_pki
from tests.unit.test_keymaterial import _encrypted_key


def nm_quote(text: str) -> str:
    """How NetworkManager-openvpn quotes a secret before sending it (space, backslash, quote escaped)."""
    return "".join("\\" + ch if ch in ' \\"' else ch for ch in text)


def test_prompts() -> None:
    assert p.PasswordQuery().prompt() == ">PASSWORD:Need 'Auth' username/password"
    assert (
        p.PasswordQuery(p.PRIVATE_KEY, password_only=True).prompt() == ">PASSWORD:Need 'Private Key' password"
    )
    sc = p.PasswordQuery(challenge=("Enter PIN", True))
    assert sc.prompt() == ">PASSWORD:Need 'Auth' username/password SC:1,Enter PIN"
    assert p.verification_failed(p.AUTH) == ">PASSWORD:Verification Failed: 'Auth'"
    assert p.verification_failed(p.AUTH, "expired") == ">PASSWORD:Verification Failed: 'Auth' ['expired']"
    assert p.auth_token("tok") == ">PASSWORD:Auth-Token:tok"


def test_dialogue_needs_username_and_password_of_the_asked_type() -> None:
    q = p.PasswordQuery()
    assert q.answer("password", ["Auth"]) == "ERROR: the 'password' command requires 2 parameters"
    assert q.answer("username", ["HTTP Proxy", "u"]) == (
        "ERROR: username of type 'HTTP Proxy' entered, but we need one of type 'Auth'"
    )
    assert (
        q.answer("password", ["Auth", "secret"]) == "SUCCESS: 'Auth' password entered, but not yet verified"
    )
    assert not q.complete  # a password alone does not answer a username/password question
    assert q.answer("username", ["Auth", ""]) == "SUCCESS: 'Auth' username entered, but not yet verified"
    assert not q.complete  # nor does an empty username
    q.answer("username", ["Auth", "alice"])
    assert q.complete and (q.username, q.password) == ("alice", "secret")


def test_blank_password_completes_and_password_only_refuses_a_username() -> None:
    q = p.PasswordQuery()
    q.answer("username", ["Auth", "alice"])
    q.answer("password", ["Auth", ""])
    assert q.complete and q.password == ""
    k = p.PasswordQuery(p.PRIVATE_KEY, password_only=True)
    assert k.answer("username", ["Private Key", "x"]) == p.not_needed("username")
    assert k.answer("password", ["Private Key", "pw"]).startswith("SUCCESS: 'Private Key' password")
    assert k.complete


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40))
def test_networkmanager_quoting_round_trips(secret: str) -> None:
    line = f'password "Auth" "{nm_quote(secret)}"'
    words = split_words(line)
    q = p.PasswordQuery()
    q.answer("username", ["Auth", "u"])
    assert q.answer(words[0], words[1:]).startswith("SUCCESS")
    assert q.password == secret


def test_openvpn_escapes_and_unquoted_words() -> None:
    assert split_words(r'username "Auth" "al\ ice"') == ["username", "Auth", "al ice"]
    assert split_words(r"password Auth p\\w\"x") == ["password", "Auth", 'p\\w"x']
    assert split_words("password 'Auth' 'a b\\c'") == ["password", "Auth", "a b\\c"]  # no escapes in '…'


def test_credentials_take_management_answers_once_with_nocache() -> None:
    c = Credentials(None, None, nocache=True, retry="interact", ask=_never)
    assert c.needs_answers()
    c.supply("alice", "pw1")
    assert not c.needs_answers()
    assert c.for_connection() == ("alice", "pw1")
    assert c.needs_answers()  # auth-nocache: asked again for the next connection
    c.token_received("tok")
    assert not c.needs_answers() and c.for_connection() == ("alice", "tok")


def test_credentials_cached_answers_retry_and_forget() -> None:
    c = Credentials("fromfile", None, retry="interact", ask=_never)
    c.supply("alice", "pw1")
    assert c.for_connection() == ("alice", "pw1")
    assert not c.needs_answers()  # cached: reconnects reuse it
    assert c.auth_failed() and c.needs_answers()  # interact: a rejected password is asked again
    c.supply("alice", "pw2")
    c.for_connection()
    c.token_received("tok")
    c.forget()  # `forget-passwords`: back to what the config gave, token gone
    assert c.needs_answers()
    nointeract = Credentials(None, None, retry="nointeract", ask=_never)
    nointeract.supply("bob", "pw")
    nointeract.for_connection()
    assert nointeract.auth_failed() and not nointeract.needs_answers()  # the same answers again


def test_static_challenge_is_asked_every_time_and_sent_as_given() -> None:
    c = Credentials(None, None, challenge=StaticChallenge("PIN", False), ask=_never)
    c.supply("alice", "SCRV1:cHc=:MTIz")
    assert c.for_connection() == ("alice", "SCRV1:cHc=:MTIz")
    assert c.needs_answers()


def test_auth_failed_reason_from_the_stop_message() -> None:
    msg = "server said AUTH_FAILED,session expired: check auth-user-pass credentials / client certificate"
    assert _auth_failed_reason(msg) == "session expired"
    assert _auth_failed_reason("server said AUTH_FAILED: check auth-user-pass credentials") is None


def _never(prompt: str, echo: bool) -> str:
    raise AssertionError(f"asked {prompt!r} on the terminal although the management interface answers")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_encrypted_key_waits_for_the_management_interface(pki: Pki, tmp_path: Path) -> None:
    """management-query-passwords: the passphrase is not asked on the terminal at start-up but left
    for the management interface; an askpass file still wins, and a plain key needs no question."""
    key = tmp_path / "enc.key"
    key.write_bytes(_encrypted_key(pki, b"sesame"))
    base = f"client\ndev tun\nremote 192.0.2.1 1194\nca {pki.ca_crt}\ncert {pki.client_crt}\n"
    with pytest.raises(AnswerLater):
        session_config(parse_config_text(base + f"key {key}\n"), answer_later)
    askpass = tmp_path / "pass"
    askpass.write_text("sesame\n")
    assert session_config(
        parse_config_text(base + f"key {key}\naskpass {askpass}\n"), answer_later
    ).tls_context
    assert session_config(parse_config_text(base + f"key {pki.client_key}\n"), answer_later).tls_context
    answered = session_config(parse_config_text(base + f"key {key}\n"), lambda prompt, echo: "sesame")
    assert answered.tls_context is not None


def test_networkmanager_command_line_parses(pki: Pki, tmp_path: Path) -> None:
    """NetworkManager-openvpn 1.10's command line for a "password with certificates" connection, and
    its optional `--max-routes` (which OpenVPN 2.6 ignores with a warning, as pyovpn does)."""
    jail = tmp_path / "chroot"
    (jail / "tmp").mkdir(parents=True)
    helper = "/usr/libexec/nm-openvpn-service-openvpn-helper --debug 0 4242 --bus-name org.x.C_1 --tun --"
    argv = [
        "--remote", "192.0.2.1", "1194", "udp", "--explicit-exit-notify", "--nobind", "--dev", "tun",
        "--auth-nocache", "--syslog", "nm-openvpn", "--script-security", "2", "--up", helper,
        "--up-restart", "--persist-key", "--persist-tun",
        "--management", "/var/run/NetworkManager/nm-openvpn-0ad4", "unix",
        "--management-client-user", "root", "--management-client-group", "root",
        "--management-query-passwords", "--auth-retry", "interact", "--route-noexec", "--ifconfig-noexec",
        "--client", "--ca", str(pki.ca_crt), "--cert", str(pki.client_crt), "--key", str(pki.client_key),
        "--auth-user-pass", "--user", "nobody", "--group", "nogroup", "--chroot", str(jail),
        "--max-routes", "200",
    ]  # fmt: skip
    o = parse_args(argv, cwd=str(tmp_path))
    assert o.management_unix == "/var/run/NetworkManager/nm-openvpn-0ad4" and o.management_query_passwords
    assert (o.management_client_user, o.management_client_group) == ("root", "root")
    assert o.auth_retry == "interact" and o.auth_nocache and o.auth_user_pass == (None, None)
    assert o.route_noexec and o.ifconfig_noexec and o.up_restart and o.chroot == str(jail)
    assert o.up == helper and (o.user, o.group) == ("nobody", "nogroup")
    assert [name for name, _, _ in o.ignored] == ["max-routes"] and no_effect_reason("max-routes")
