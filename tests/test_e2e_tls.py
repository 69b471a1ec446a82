"""End-to-end: STARTTLS (RFC 3207) and implicit TLS (RFC 8314) with a certificate made here.

The certificate is signed by a CA generated for the test; clients trust only that CA and
check the host name, as a real client would. The injection tests prove the CVE-2011-0411
rule: clear text sent after STARTTLS (in the same write) is never answered and has no
effect, and the session after the handshake starts over from nothing.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python import usage

from qpconn.app.options import Options, makeService
from qpconn.plugins import Plugin
from qpconn.server.tlscontext import read_tls_policy
from qpconn.server.tlsendpoint import parse_ssl_listen, ssl_endpoint
from tests.e2e_client import Client, ehlo, split_message, watch_errors
from tests.support.server import in_thread
from tests.support.tlscerts import TlsFiles, make_pki

MSG = "Subject: tls\r\n\r\nover TLS\r\n"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def tls_server(qpconn_server: Any, pki: TlsFiles) -> Any:
    return qpconn_server(files={"tls_cert": pki.cert, "tls_key": pki.key})


def upgrade(client: Client, pki: TlsFiles) -> None:
    """After a 220 to STARTTLS: handshake on the same socket (nothing may be unread)."""
    assert client._buf == b"", client._buf
    client.sock = pki.client_context().wrap_socket(client.sock, server_hostname="localhost")


def received_field(message: bytes) -> bytes:
    fields = split_message(message)[0]
    return b" ".join(f for f in fields if f.startswith(b"Received:")).replace(b"\n\t", b" ")


class Recorder(Plugin):
    """Keeps what the hooks saw of the connection: the object, its TLS details, notes."""

    def register(self) -> None:
        self.seen: list[tuple[str, int, Any, str | None, Any]] = []

    def _note(self, hook: str, transaction: Any) -> None:
        conn = transaction.connection
        self.seen.append((hook, id(conn), conn.tls, conn.hello, dict(conn.notes)))

    def hook_connect(self, transaction: Any) -> None:
        transaction.connection.notes["from_connect"] = "kept"
        self._note("connect", transaction)

    def hook_mail(self, transaction: Any, sender: Any, params: Any) -> None:
        self._note("mail", transaction)


# -- STARTTLS ------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_starttls_is_offered_only_with_a_certificate(server, tls_server):
    def client(target: Any) -> tuple[list[str], int]:
        with Client(target.address) as smtp:
            lines = list(smtp.cmd("EHLO client.test").lines)
            return lines, smtp.code("STARTTLS")

    plain_lines, plain_code = await in_thread(client, server)
    assert "STARTTLS" not in plain_lines
    assert plain_code == 500
    tls_lines, _ = await in_thread(client, tls_server)
    assert "STARTTLS" in tls_lines


@pytest_twisted.ensureDeferred
async def test_smtplib_starttls_delivers_and_received_says_esmtps_with_the_cipher(
    tls_server, pki
):
    def client() -> tuple[Any, bool, bool, Any]:
        with smtplib.SMTP(*tls_server.address, timeout=5) as smtp:
            smtp.ehlo("client.test")
            before = smtp.has_extn("starttls")
            smtp.starttls(context=pki.client_context())
            smtp.ehlo("client.test")
            after = smtp.has_extn("starttls")
            cipher = smtp.sock.cipher()
            smtp.sendmail("a@example.org", ["user@mx.test"], MSG)
            return cipher, before, after, smtp.sock.version()

    cipher, before, after, version = await in_thread(client)
    assert before and not after
    (message,) = tls_server.messages()
    received = received_field(message)
    assert b" with ESMTPS (" in received
    assert f"({version} cipher {cipher[0]})".encode() in received


@pytest_twisted.ensureDeferred
async def test_command_in_the_same_write_as_starttls_is_never_answered_nor_run(tls_server, pki):
    def client() -> tuple[Any, Any, Any, Any]:
        with ehlo(tls_server) as smtp:
            smtp.send("STARTTLS\r\nMAIL FROM:<a@b.example>\r\n")
            ready = smtp.reply()
            # Had the MAIL been answered, its clear-text reply would sit here and break
            # the handshake below.
            upgrade(smtp, pki)
            hello = smtp.cmd("EHLO client.test")
            # Had the MAIL been run, RCPT would be accepted and MAIL be "nested".
            rcpt = smtp.cmd("RCPT TO:<user@mx.test>")
            mail = smtp.cmd("MAIL FROM:<c@d.example>")
            return ready, hello, rcpt, mail

    ready, hello, rcpt, mail = await in_thread(client)
    assert (ready.code, ready.last) == (220, "2.0.0 Ready to start TLS")
    assert hello.code == 250 and hello.lines[0].startswith("mx.test ")
    assert (rcpt.code, rcpt.last) == (503, "5.5.1 Error: need MAIL command")
    assert mail.code == 250


@pytest_twisted.ensureDeferred
async def test_rset_injected_after_starttls_gets_no_reply(tls_server, pki):
    def client() -> tuple[Any, Any, Any]:
        with ehlo(tls_server) as smtp:
            smtp.send(b"STARTTLS\r\nRSET\r\nNOOP injected\r\n")
            ready = smtp.reply()
            upgrade(smtp, pki)
            # Pipelined after the handshake: the first reply must be this NOOP's.
            smtp.send("NOOP\r\nEHLO client.test\r\n")
            return ready, smtp.reply(), smtp.reply()

    ready, noop, hello = await in_thread(client)
    assert ready.code == 220
    # Before EHLO the session is back at its start, so even NOOP is judged afresh: it is
    # legal in every state and answered 250; the next reply is EHLO's, nothing else.
    assert (noop.code, noop.last) == (250, "2.0.0 OK")
    assert hello.code == 250 and "PIPELINING" in hello.lines


@pytest_twisted.ensureDeferred
async def test_after_starttls_the_client_must_ehlo_again_and_the_connection_is_a_clone(
    qpconn_server, pki
):
    recorder_holder: list[Recorder] = []

    class Rec(Recorder):
        def register(self) -> None:
            super().register()
            recorder_holder.append(self)

    tls_server = qpconn_server(
        files={"tls_cert": pki.cert, "tls_key": pki.key},
        plugins=[Rec, "rcpt_ok", "queue/discard"],
    )

    def client() -> tuple[int, int, int]:
        with ehlo(tls_server) as smtp:
            assert smtp.code("STARTTLS") == 220
            upgrade(smtp, pki)
            before_ehlo = smtp.code("MAIL FROM:<a@example.org>")
            assert smtp.code("EHLO client.test") == 250
            return before_ehlo, smtp.code("MAIL FROM:<a@example.org>"), smtp.code("QUIT")

    before_ehlo, after_ehlo, _ = await in_thread(client)
    assert before_ehlo == 503
    assert after_ehlo == 250
    (recorder,) = recorder_holder
    (connect, mail) = recorder.seen
    assert connect[2] is None and connect[3] is None
    _, conn_id, tls, hello, notes = mail
    assert conn_id != connect[1]  # connection.clone(): a new object after TLS
    assert tls is not None and tls["version"].startswith("TLSv1.")
    assert hello == "ehlo"
    assert notes == {"from_connect": "kept"}


@pytest_twisted.ensureDeferred
async def test_second_starttls_503_and_starttls_with_an_argument_501(tls_server, pki):
    def client() -> tuple[Any, Any, Any, Any, Any]:
        with Client(tls_server.address) as smtp:
            early = smtp.cmd("STARTTLS")
            assert smtp.code("EHLO client.test") == 250
            with_arg = smtp.cmd("STARTTLS now")
            assert smtp.code("MAIL FROM:<a@example.org>") == 250
            in_transaction = smtp.cmd("STARTTLS")
            assert smtp.code("RSET") == 250
            assert smtp.code("STARTTLS") == 220
            upgrade(smtp, pki)
            assert smtp.code("EHLO client.test") == 250
            second = smtp.cmd("STARTTLS")
            return early, with_arg, in_transaction, second, smtp.cmd("NOOP")

    early, with_arg, in_transaction, second, noop = await in_thread(client)
    assert (early.code, early.last) == (503, "5.5.1 Error: send EHLO first")
    assert (with_arg.code, with_arg.last) == (501, "5.5.4 Syntax: STARTTLS takes no argument")
    assert in_transaction.code == 503
    assert (second.code, second.last) == (503, "5.5.1 Error: TLS already active")
    assert noop.code == 250


@pytest_twisted.ensureDeferred
async def test_tls_required_refuses_mail_in_clear_text_with_530(qpconn_server, pki):
    server = qpconn_server(files={"tls_cert": pki.cert, "tls_key": pki.key, "tls_required": "1"})

    def client() -> tuple[Any, int]:
        with ehlo(server) as smtp:
            clear = smtp.cmd("MAIL FROM:<a@example.org>")
            assert smtp.code("STARTTLS") == 220
            upgrade(smtp, pki)
            assert smtp.code("EHLO client.test") == 250
            return clear, smtp.code("MAIL FROM:<a@example.org>")

    clear, encrypted = await in_thread(client)
    assert (clear.code, clear.last) == (530, "5.7.0 Must issue a STARTTLS command first")
    assert encrypted == 250


@pytest_twisted.ensureDeferred
async def test_clear_text_after_the_220_is_never_answered_and_ends_the_connection(
    tls_server, pki
):
    def client() -> tuple[bool, int]:
        with ehlo(tls_server) as bad:
            assert bad.code("STARTTLS") == 220
            # Commands instead of a ClientHello: not a single SMTP reply comes back.
            bad.send(b"RSET\r\nMAIL FROM:<x@y.example>\r\n")
            closed = bad.is_closed()
        with ehlo(tls_server) as good:
            return closed, good.code("NOOP")

    assert await in_thread(client) == (True, 250)


@pytest_twisted.ensureDeferred
async def test_tls_cert_alone_may_hold_the_key_too(qpconn_server, pki):
    server = qpconn_server(files={"tls_cert": pki.combined})

    def client() -> str:
        with smtplib.SMTP(*server.address, timeout=5) as smtp:
            smtp.starttls(context=pki.client_context())
            smtp.ehlo("client.test")
            return str(smtp.sock.version())

    assert (await in_thread(client)).startswith("TLSv1.")


# -- implicit TLS --------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_implicit_tls_on_an_ssl_endpoint_from_the_first_byte(qpconn_server, pki, tmp_path):
    holder: list[Recorder] = []

    class Rec(Recorder):
        def register(self) -> None:
            super().register()
            holder.append(self)

    maildir = str(tmp_path / "implicit-maildir")
    server = qpconn_server(plugins=[Rec, "rcpt_ok", f"queue/maildir {maildir}"])
    # as `--listen ssl:...` makes it: qpconn's TLS context, not Twisted's (tlsendpoint.py)
    listen = parse_ssl_listen(f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}")
    assert listen is not None
    endpoint = ssl_endpoint(reactor, listen, read_tls_policy(server.factory.config))
    port = await endpoint.listen(server.factory)
    address = ("127.0.0.1", port.getHost().port)

    def client() -> tuple[bool, int, Any]:
        with smtplib.SMTP_SSL(*address, context=pki.client_context(), timeout=5) as smtp:
            smtp.ehlo("client.test")
            offered = smtp.has_extn("starttls")
            code, _ = smtp.docmd("STARTTLS")
            smtp.sendmail("a@example.org", ["user@mx.test"], MSG)
            return offered, code, smtp.sock.cipher()

    try:
        offered, starttls, cipher = await in_thread(client)
    finally:
        await port.stopListening()
    assert not offered and starttls == 503
    (recorder,) = holder
    connect_tls = recorder.seen[0][2]
    assert connect_tls is not None and connect_tls["cipher"] == cipher[0]
    new = os.path.join(maildir, "new")
    (name,) = os.listdir(new)
    with open(os.path.join(new, name), "rb") as handle:
        received = received_field(handle.read())
    assert f"with ESMTPS ({connect_tls['version']} cipher {cipher[0]})".encode() in received


# -- configuration ------------------------------------------------------------------------
def test_tls_cert_and_key_options_build_a_starttls_server(pki, tmp_path):
    options = Options()
    options.parseOptions(
        ["--listen", "tcp:0:interface=127.0.0.1", "--tls-cert", pki.cert, "--tls-key", pki.key]
    )
    assert makeService(options).factory.security.tls is not None
    plain = Options()
    plain.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    assert makeService(plain).factory.security.tls is None


@pytest.mark.parametrize(
    "files",
    [
        {"tls_cert": "missing.pem"},
        {"tls_key": "key.pem"},
        {"tls_cert": "cert.pem", "tls_key": "ca.pem"},
        {"tls_cert": "cert.pem", "tls_key": "other/key.pem"},
    ],
)
def test_bad_tls_files_stop_the_server_at_start(pki, tmp_path, files):
    make_pki(os.path.join(os.path.dirname(pki.cert), "other"))
    config = tmp_path / "cfg"
    config.mkdir()
    for name, value in files.items():
        (config / name).write_text(os.path.join(os.path.dirname(pki.cert), value) + "\n")
    with pytest.raises(usage.UsageError, match="tls_"):
        Options().parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--config", str(config)])


def test_a_tls_flag_that_is_not_yes_or_no_stops_the_server(tmp_path):
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "tls_required").write_text("maybe\n")
    with pytest.raises(usage.UsageError, match="tls_required"):
        Options().parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--config", str(config)])


# -- openssl s_client, when installed --------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest_twisted.ensureDeferred
async def test_openssl_s_client_starttls_smtp(tls_server, pki):
    host, port = tls_server.address

    def client() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl", "s_client", "-starttls", "smtp", "-connect", f"{host}:{port}",
                "-CAfile", pki.ca_cert, "-verify_return_error", "-quiet", "-ign_eof",
            ],
            input="EHLO client.test\r\nQUIT\r\n",
            capture_output=True,
            text=True,
            timeout=10,
        )

    result = await in_thread(client)
    assert "250-mx.test Hi" in result.stdout, result.stderr
    assert "250-STARTTLS" not in result.stdout
    assert "221 2.0.0 mx.test closing connection" in result.stdout

