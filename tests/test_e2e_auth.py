"""End-to-end: SMTP AUTH (RFC 4954) with the shipped ``auth/flat_file`` plugin.

``smtplib.login()`` proves each mechanism works with a real client; raw sockets prove the
error replies (cancel, bad base64, wrong credentials, out of place, too many failures).
A log observer sees every event the server emits during whole sessions and proves no
password, in clear or in base64, ever reaches a log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from qpconn.config import Config
from qpconn.hooks.results import DECLINED, OK
from qpconn.plugins import Plugin, PluginLoadError, load_plugin
from qpconn.plugins.auth.flat_file import hash_password
from tests.e2e_client import Client, ehlo, split_message, watch_errors
from tests.support.server import in_thread
from tests.support.tlscerts import TlsFiles

ALICE_PW = "correct horse battery"
BOB_PW = "b0b-s3cret!"
CRAM_SECRET = "alice-cram-secret"
FOREIGN = "someone@far.example"
MSG = "Subject: auth\r\n\r\nrelayed\r\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def password_file(tmp_path: Any) -> str:
    path = tmp_path / "passwords"
    path.write_text(
        "# user:scrypt hash[:CRAM-MD5 secret]\n"
        f"alice@mx.test:{hash_password(ALICE_PW, log2n=12)}:{CRAM_SECRET}\n"
        f"bob:{hash_password(BOB_PW, log2n=12)}\n"
    )
    return str(path)


def auth_files(tmp_path: Any, password_file: str, pki: TlsFiles | None, **extra: str) -> dict:
    files: dict[str, Any] = {
        "plugins": [
            "relay",
            f"auth/flat_file {password_file}",
            "rcpt_ok",
            f"queue/maildir {tmp_path / 'maildir'}",
        ],
        **extra,
    }
    if pki is not None:
        files.update(tls_cert=pki.cert, tls_key=pki.key)
    return files


@pytest.fixture
def tls_auth_server(qpconn_server: Any, tmp_path: Any, password_file: str, pki: TlsFiles) -> Any:
    return qpconn_server(files=auth_files(tmp_path, password_file, pki))


@pytest.fixture
def clear_auth_server(qpconn_server: Any, tmp_path: Any, password_file: str) -> Any:
    """AUTH allowed without TLS (tls_before_auth 0): the error tests talk in clear text."""
    return qpconn_server(files=auth_files(tmp_path, password_file, None, tls_before_auth="0"))


def upgrade(client: Client, pki: TlsFiles) -> None:
    assert client.code("STARTTLS") == 220
    client.sock = pki.client_context().wrap_socket(client.sock, server_hostname="localhost")
    assert client.code("EHLO client.test") == 250


# -- offered only after TLS ------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_auth_is_offered_after_starttls_only_and_refused_before_with_538(
    tls_auth_server, pki
):
    def client() -> tuple[tuple[str, ...], Any, tuple[str, ...]]:
        with Client(tls_auth_server.address) as smtp:
            clear = smtp.cmd("EHLO client.test").lines
            early = smtp.cmd(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + BOB_PW)}")
            assert smtp.code("STARTTLS") == 220
            smtp.sock = pki.client_context().wrap_socket(smtp.sock, server_hostname="localhost")
            return clear, early, smtp.cmd("EHLO client.test").lines

    clear, early, encrypted = await in_thread(client)
    assert not any(line.startswith("AUTH") for line in clear)
    assert (early.code, early.last) == (
        538,
        "5.7.11 Encryption required for requested authentication mechanism",
    )
    assert "AUTH PLAIN LOGIN CRAM-MD5" in encrypted


@pytest.mark.parametrize(
    ("mechanism", "user", "password"),
    [
        ("PLAIN", "bob", BOB_PW),
        ("LOGIN", "bob", BOB_PW),
        ("CRAM-MD5", "alice@mx.test", CRAM_SECRET),
    ],
)
@pytest_twisted.ensureDeferred
async def test_smtplib_login_then_relay_for_each_mechanism(
    tls_auth_server, pki, mechanism, user, password
):
    def client() -> tuple[int, int, Any]:
        with smtplib.SMTP(*tls_auth_server.address, timeout=5) as smtp:
            smtp.starttls(context=pki.client_context())
            smtp.ehlo("client.test")
            smtp.mail("a@example.org")
            refused, _ = smtp.rcpt(FOREIGN)
            smtp.rset()
            smtp.esmtp_features["auth"] = mechanism  # make login() use this one
            code, _ = smtp.login(user, password)
            smtp.sendmail("a@example.org", [FOREIGN], MSG)
            return refused, code, smtp.docmd("AUTH", "PLAIN")

    refused, code, again = await in_thread(client)
    assert refused == 550
    assert code == 235
    assert again[0] == 503 and again[1] == b"5.5.1 Error: already authenticated"
    (message,) = tls_auth_server.messages()
    fields = b" ".join(split_message(message)[0]).replace(b"\n\t", b" ")
    assert b" with ESMTPSA (" in fields
    assert f"Delivered-To: {FOREIGN}".encode() in fields


# -- errors, over raw sockets --------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_star_cancels_with_501_and_bad_base64_gets_501(clear_auth_server):
    def client() -> list[Any]:
        with ehlo(clear_auth_server) as smtp:
            out = [smtp.cmd("AUTH PLAIN"), smtp.cmd("*")]
            out += [smtp.cmd("AUTH LOGIN"), smtp.cmd(b64("bob")), smtp.cmd("*")]
            out += [smtp.cmd("AUTH PLAIN not%base64!")]
            out += [smtp.cmd("AUTH LOGIN"), smtp.cmd("@@@@")]
            out += [smtp.cmd(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + BOB_PW)}")]
            return out

    (plain_go, cancel, login_go, login_user, cancel2, bad, login_go2, bad2, ok) = await in_thread(
        client
    )
    assert (plain_go.code, plain_go.last) == (334, "")
    assert (cancel.code, cancel.last) == (501, "5.0.0 Authentication cancelled")
    assert (login_go.code, login_go.last) == (334, b64("Username:"))
    assert (login_user.code, login_user.last) == (334, b64("Password:"))
    assert cancel2.code == 501
    assert (bad.code, bad.last) == (501, "5.5.2 Cannot decode response")
    assert login_go2.code == 334 and (bad2.code, bad2.last) == (501, "5.5.2 Cannot decode response")
    assert ok.code == 235  # cancelled and malformed exchanges are not failures


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_get_535_and_the_session_goes_on(clear_auth_server):
    def client() -> list[Any]:
        with ehlo(clear_auth_server) as smtp:
            wrong = smtp.cmd(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + 'guess')}")
            unknown = smtp.cmd(f"AUTH PLAIN {b64(chr(0) + 'mallory' + chr(0) + BOB_PW)}")
            return [wrong, unknown, smtp.cmd("NOOP")]

    wrong, unknown, noop = await in_thread(client)
    assert (wrong.code, wrong.last) == (535, "5.7.8 Authentication credentials invalid")
    assert (unknown.code, unknown.last) == (535, "5.7.8 Authentication credentials invalid")
    assert noop.code == 250


@pytest_twisted.ensureDeferred
async def test_auth_twice_in_a_transaction_or_before_ehlo_gets_503(clear_auth_server):
    plain = f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + BOB_PW)}"

    def client() -> list[Any]:
        with Client(clear_auth_server.address) as smtp:
            before = smtp.cmd(plain)
            assert smtp.code("EHLO client.test") == 250
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            in_transaction = smtp.cmd(plain)
            assert smtp.code("RSET") == 250
            first = smtp.cmd(plain)
            return [before, in_transaction, first, smtp.cmd(plain), smtp.cmd("AUTH LOGIN")]

    before, in_transaction, first, twice, login = await in_thread(client)
    assert (before.code, before.last) == (503, "5.5.1 Error: send EHLO first")
    assert (in_transaction.code, in_transaction.last) == (
        503,
        "5.5.1 Error: MAIL transaction in progress",
    )
    assert (first.code, first.last) == (235, "2.7.0 Authentication successful")
    assert (twice.code, twice.last) == (503, "5.5.1 Error: already authenticated")
    assert login.code == 503


@pytest_twisted.ensureDeferred
async def test_unknown_mechanism_504_and_cram_md5_with_an_initial_response_501(clear_auth_server):
    def client() -> list[Any]:
        with ehlo(clear_auth_server) as smtp:
            return [smtp.cmd("AUTH GSSAPI"), smtp.cmd("AUTH CRAM-MD5 abcd"), smtp.cmd("NOOP")]

    unknown, initial, noop = await in_thread(client)
    assert (unknown.code, unknown.last) == (504, "5.5.4 Unrecognized authentication type")
    assert initial.code == 501
    assert noop.code == 250


@pytest_twisted.ensureDeferred
async def test_third_failed_auth_gets_421_and_the_connection_is_closed(clear_auth_server):
    def client() -> tuple[list[Any], bool]:
        with ehlo(clear_auth_server) as smtp:
            replies = [
                smtp.cmd(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + f'guess{n}')}")
                for n in range(3)
            ]
            return replies, smtp.is_closed()

    replies, closed = await in_thread(client)
    assert [r.code for r in replies] == [535, 535, 421]
    assert replies[2].last == "4.7.0 Too many failed authentication attempts"
    assert closed


@pytest_twisted.ensureDeferred
async def test_auth_max_failures_is_configurable(qpconn_server, tmp_path, password_file):
    server = qpconn_server(
        files=auth_files(tmp_path, password_file, None, tls_before_auth="0", auth_max_failures="1")
    )

    def client() -> tuple[Any, bool]:
        with ehlo(server) as smtp:
            assert smtp.code("AUTH LOGIN " + b64("bob")) == 334
            return smtp.cmd(b64("nope")), smtp.is_closed()

    reply, closed = await in_thread(client)
    assert reply.code == 421 and closed


@pytest_twisted.ensureDeferred
async def test_cram_md5_with_a_wrong_digest_is_535(clear_auth_server):
    def client() -> tuple[Any, Any]:
        with ehlo(clear_auth_server) as smtp:
            challenge = smtp.cmd("AUTH CRAM-MD5")
            ticket = base64.b64decode(challenge.last)
            wrong = hmac.new(b"not the secret", ticket, hashlib.md5).hexdigest()
            bad = smtp.cmd(b64(f"alice@mx.test {wrong}"))
            challenge = smtp.cmd("AUTH CRAM-MD5")
            ticket = base64.b64decode(challenge.last)
            right = hmac.new(CRAM_SECRET.encode(), ticket, hashlib.md5).hexdigest()
            return bad, smtp.cmd(b64(f"alice@mx.test {right}"))

    bad, good = await in_thread(client)
    assert bad.code == 535
    assert good.code == 235


@pytest_twisted.ensureDeferred
async def test_starttls_forgets_an_auth_made_in_clear_text(
    qpconn_server, tmp_path, password_file, pki
):
    server = qpconn_server(files=auth_files(tmp_path, password_file, pki, tls_before_auth="0"))

    def client() -> tuple[int, int, tuple[str, ...], int]:
        with ehlo(server) as smtp:
            assert smtp.code(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + BOB_PW)}") == 235
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            relayed = smtp.code(f"RCPT TO:<{FOREIGN}>")
            assert smtp.code("RSET") == 250
            assert smtp.code("STARTTLS") == 220
            smtp.sock = pki.client_context().wrap_socket(smtp.sock, server_hostname="localhost")
            lines = smtp.cmd("EHLO client.test").lines
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            return relayed, smtp.code(f"RCPT TO:<{FOREIGN}>"), lines, smtp.code("QUIT")

    relayed, after_tls, lines, _ = await in_thread(client)
    assert relayed == 250
    assert after_tls == 550
    assert "AUTH PLAIN LOGIN CRAM-MD5" in lines


# -- the hooks --------------------------------------------------------------------------------
class GenericAuth(Plugin):
    """Judges through the generic ``auth`` hook; records the arguments it was given."""

    def register(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def hook_auth(self, transaction: Any, mechanism: str, user: str, *rest: Any) -> Any:
        self.calls.append((mechanism, user, *rest))
        return OK if (user, rest[0]) == ("carol", "carol-pw") else DECLINED


@pytest_twisted.ensureDeferred
async def test_auth_hook_judges_what_the_mechanism_hooks_declined(
    qpconn_server, tmp_path, password_file
):
    generic = GenericAuth(Config(), "generic")
    server = qpconn_server(
        files={"tls_before_auth": "0"},
        plugins=[f"auth/flat_file {password_file}", generic, "rcpt_ok", "queue/discard"],
    )

    def client() -> list[int]:
        with ehlo(server) as smtp:
            codes = [smtp.code("AUTH LOGIN"), smtp.code(b64("carol"))]
            codes.append(smtp.code(b64("carol-pw")))
            return codes

    assert await in_thread(client) == [334, 334, 235]
    assert generic.calls == [("LOGIN", "carol", "carol-pw", None, None)]


@pytest_twisted.ensureDeferred
async def test_no_auth_plugin_means_no_auth(server):
    def client() -> tuple[tuple[str, ...], int]:
        with Client(server.address) as smtp:
            lines = smtp.cmd("EHLO client.test").lines
            return lines, smtp.code("AUTH PLAIN AGJvYgBw")

    lines, code = await in_thread(client)
    assert not any(line.startswith("AUTH") for line in lines)
    assert code == 500


@pytest_twisted.ensureDeferred
async def test_cram_md5_is_offered_only_when_some_user_has_a_secret(qpconn_server, tmp_path):
    path = tmp_path / "hashes-only"
    path.write_text(f"bob:{hash_password(BOB_PW, log2n=10)}\n")
    server = qpconn_server(files=auth_files(tmp_path, str(path), None, tls_before_auth="0"))

    def client() -> tuple[str, ...]:
        with Client(server.address) as smtp:
            return smtp.cmd("EHLO client.test").lines

    assert "AUTH PLAIN LOGIN" in await in_thread(client)


# -- the password file -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "line",
    ["bob:plaintext", "bob", ":scrypt$14$8$1$AAAA$AAAA", "bob:scrypt$99$8$1$AAAA$AAAA"],
)
def test_a_password_file_without_salted_hashes_stops_the_server(tmp_path, line):
    path = tmp_path / "pw"
    path.write_text(line + "\n")
    with pytest.raises(PluginLoadError, match="line 1"):
        load_plugin(Config(), "auth/flat_file", str(path))


@pytest_twisted.ensureDeferred
async def test_the_hash_tool_makes_a_line_the_server_accepts(qpconn_server, tmp_path):
    made = subprocess.run(
        [sys.executable, "-m", "qpconn.plugins.auth.flat_file", "dave@mx.test"],
        input="dave pw\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert made.startswith("dave@mx.test:scrypt$14$8$1$") and "dave pw" not in made
    path = tmp_path / "pw"
    path.write_text(made)
    server = qpconn_server(files={"plugins": [f"auth/flat_file {path}"], "tls_before_auth": "0"})

    def client() -> list[int]:
        with ehlo(server) as smtp:
            return [
                smtp.code(f"AUTH PLAIN {b64(chr(0) + 'dave@mx.test' + chr(0) + 'dave pw')}"),
            ]

    assert await in_thread(client) == [235]


# -- logs ------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_passwords_never_appear_in_the_logs(clear_auth_server):
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    secrets = [BOB_PW, CRAM_SECRET, "wrong-guess-1", "wrong-guess-2"]

    def client() -> list[int]:
        codes = []
        with ehlo(clear_auth_server) as smtp:
            codes.append(smtp.code(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + 'wrong-guess-1')}"))
            codes.append(smtp.code("AUTH LOGIN " + b64("bob")))
            codes.append(smtp.code(b64("wrong-guess-2")))
            # An over-long line and a malformed PLAIN, both carrying a password.
            codes.append(smtp.code(f"AUTH PLAIN {b64(BOB_PW)}"))
            codes.append(smtp.code(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + BOB_PW)}"))
            codes.append(smtp.code("QUIT"))
        with ehlo(clear_auth_server) as smtp:
            challenge = smtp.cmd("AUTH CRAM-MD5")
            digest = hmac.new(
                CRAM_SECRET.encode(), base64.b64decode(challenge.last), hashlib.md5
            ).hexdigest()
            codes.append(smtp.code(b64(f"alice@mx.test {digest}")))
            codes.append(smtp.code("AUTH PLAIN " + b64(BOB_PW) * 2000))
            codes.append(smtp.code("QUIT"))
        return codes

    try:
        codes = await in_thread(client)
        await clear_auth_server.wait_sessions_closed()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert codes == [535, 334, 535, 501, 235, 221, 235, 500, 221]
    text = "\n".join(formatEvent(e) + repr(sorted(e.items(), key=str)) for e in events)
    # The sessions were logged (users, mechanisms, outcomes), only not their secrets.
    assert "AUTH PLAIN failed for bob: 535" in text
    assert "AUTH LOGIN failed for bob: 535" in text
    assert "AUTH PLAIN succeeded for bob" in text
    assert "AUTH CRAM-MD5 succeeded for alice@mx.test" in text
    for secret in secrets:
        for form in (secret, b64(secret), b64(chr(0) + "bob" + chr(0) + secret)):
            assert form not in text, f"{form!r} found in the logs"


# -- swaks, when installed ---------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
@pytest_twisted.ensureDeferred
async def test_swaks_starttls_auth_and_relay(tls_auth_server):
    host, port = tls_auth_server.address

    def client() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "swaks", "--server", host, "--port", str(port), "--helo", "client.test",
                "--tls", "--auth", "LOGIN", "--auth-user", "bob", "--auth-password", BOB_PW,
                "--from", "a@example.org", "--to", FOREIGN, "--timeout", "10",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    result = await in_thread(client)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  235 2.7.0 Authentication successful" in result.stdout
    (message,) = tls_auth_server.messages()
    assert f"Delivered-To: {FOREIGN}".encode() in message
