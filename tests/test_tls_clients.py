"""TLS that every client can use: real clients against the real server on loopback.

Each test runs against both kinds of TLS listener, STARTTLS on a plain port and implicit
TLS on an ``ssl:`` port made the way ``twistd qpconn --listen ssl:...`` makes it
(:mod:`qpconn.server.tlsendpoint`), on one server. The clients are ``openssl s_client``,
Python's ``ssl`` and Postfix's ``posttls-finger`` when installed. What they pin:

* a client offering ALPN completes the handshake, with no protocol selected (Twisted 24.7+
  would answer such a client with alert 80 on a context Twisted built);
* TLS 1.1, static-RSA key exchange and CBC suites are refused by default, and the config
  settings ``tls_min_version`` and ``tls_ciphers`` let an administrator allow them;
* a second connection resumes the first one's session (``Reused``);
* every failed handshake is logged with the client's address and OpenSSL's reason.

The server certificate is RSA, so that static-RSA suites could be negotiated at all if
the server allowed them: a refusal then proves the policy, not the key type.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage

from qpconn.app.options import Options
from qpconn.app.service import make_service
from qpconn.server.tlscontext import read_tls_policy
from qpconn.server.tlsendpoint import parse_ssl_listen, ssl_endpoint
from tests.e2e_client import watch_errors
from tests.support.process import free_port
from tests.support.server import RunningServer, in_thread
from tests.support.tlscerts import TlsFiles, make_pki

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")


@dataclass(frozen=True)
class Target:
    """One TLS listener of the test server."""

    address: tuple[str, int]
    #: STARTTLS on a plain listener; False: implicit TLS (``ssl:``)
    starttls: bool
    pki: TlsFiles

    @property
    def kind(self) -> str:
        return "starttls" if self.starttls else "implicit"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


@pytest.fixture
def rsa_pki(tmp_path: Any) -> TlsFiles:
    return make_pki(str(tmp_path / "rsa-pki"), rsa_server=True)


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    """The server's "TLS handshake failed" log events while the test runs."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "TLS handshake failed" in (event.get("log_format") or ""):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


async def wait_for(events: list[dict[str, Any]], count: int = 1, timeout: float = 10.0) -> None:
    """Until ``count`` events were logged: the server logs once its side of the connection is
    gone, which may be a moment after the client has exited."""
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.02, lambda: None)
    assert len(events) >= count, events


@pytest.fixture
def tls_servers(
    qpconn_server: Callable[..., RunningServer], rsa_pki: TlsFiles
) -> Iterator[Callable[..., Coroutine[Any, Any, tuple[Target, Target]]]]:
    """Await it with config ``files`` to get (STARTTLS target, implicit-TLS target)."""
    ports: list[Any] = []

    async def start(files: dict[str, str] | None = None) -> tuple[Target, Target]:
        server = qpconn_server(
            files={"tls_cert": rsa_pki.cert, "tls_key": rsa_pki.key, **(files or {})}
        )
        listen = parse_ssl_listen(
            f"ssl:0:interface=127.0.0.1:privateKey={rsa_pki.key}:certKey={rsa_pki.cert}"
        )
        assert listen is not None
        endpoint = ssl_endpoint(reactor, listen, read_tls_policy(server.factory.config))
        port = await endpoint.listen(server.factory)
        ports.append(port)
        return (
            Target(server.address, True, rsa_pki),
            Target(("127.0.0.1", port.getHost().port), False, rsa_pki),
        )

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@pytest.fixture(params=["starttls", "implicit"])
def target(request: Any, tls_servers: Any) -> Target:
    """Each TLS listener kind in turn, with the default TLS settings."""
    starttls, implicit = pytest_twisted.blockon(defer.Deferred.fromCoroutine(tls_servers()))
    return starttls if request.param == "starttls" else implicit


# -- openssl s_client ------------------------------------------------------------------------
def s_client(target: Target, *args: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` to ``target`` (STARTTLS or not), trusting the test CA; QUIT."""
    host, port = target.address
    command = [
        OPENSSL or "openssl", "s_client", "-connect", f"{host}:{port}",
        "-servername", "localhost", "-CAfile", target.pki.ca_cert, "-ign_eof",
    ]  # fmt: skip
    if target.starttls:
        command += ["-starttls", "smtp"]
    return subprocess.run(
        [*command, *args], input="QUIT\r\n", capture_output=True, text=True, timeout=30
    )


def assert_session(result: subprocess.CompletedProcess[str]) -> None:
    """The handshake completed, the certificate verified, and the session got to QUIT."""
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verify return code: 0 (ok)" in result.stdout, result.stdout
    assert "221 2.0.0" in result.stdout, result.stdout


@needs_openssl
@pytest.mark.parametrize("alpn", [None, "smtp", "h2,http/1.1"])
@pytest_twisted.ensureDeferred
async def test_s_client_with_and_without_alpn_completes_with_no_protocol(target, alpn):
    result = await in_thread(s_client, target, *(["-alpn", alpn] if alpn else []))
    assert_session(result)
    assert "No ALPN negotiated" in result.stdout, result.stdout
    assert "alert" not in result.stderr, result.stderr


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_s_client_gets_tls13_or_a_forward_secret_aead_suite(target):
    tls13 = await in_thread(s_client, target, "-tls1_3")
    assert_session(tls13)
    assert "New, TLSv1.3, Cipher is TLS_" in tls13.stdout, tls13.stdout
    tls12 = await in_thread(s_client, target, "-tls1_2")
    assert_session(tls12)
    assert "New, TLSv1.2, Cipher is ECDHE-RSA-AES256-GCM-SHA384" in tls12.stdout, tls12.stdout


def _refused(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "221 2.0.0" not in result.stdout


@needs_openssl
@pytest.mark.parametrize(
    ("client_args", "reason"),
    [
        # The client is told to offer TLS 1.1 even though its own OpenSSL would not.
        pytest.param(["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"], "unsupported protocol",
                     id="tls1.1"),
        pytest.param(["-tls1_2", "-cipher", "AES128-SHA256"], "no shared cipher",
                     id="static-rsa-cbc"),
        pytest.param(["-tls1_2", "-cipher", "AES128-GCM-SHA256"], "no shared cipher",
                     id="static-rsa-aead"),
        pytest.param(["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"], "no shared cipher",
                     id="ecdhe-cbc"),
    ],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_old_versions_static_rsa_and_cbc_are_refused_and_logged_with_the_reason(
    target, failures, client_args, reason
):
    result = await in_thread(s_client, target, *client_args)
    assert _refused(result), result.stdout + result.stderr
    await wait_for(failures)
    (event,) = failures
    text = formatEvent(event)
    assert text.startswith(f"{event['conn_id']} TLS handshake failed from 127.0.0.1:"), text
    assert text.endswith(f": {reason}"), text
    assert event["remote_ip"] == "127.0.0.1" and isinstance(event["remote_port"], int)


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_a_forward_secret_aead_suite_named_by_the_client_is_accepted(target):
    result = await in_thread(s_client, target, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
    assert_session(result)
    assert "Cipher is ECDHE-RSA-AES128-GCM-SHA256" in result.stdout


@needs_openssl
@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
@pytest_twisted.ensureDeferred
async def test_s_client_resumes_its_session_on_both_listeners(target, tmp_path, version):
    session = str(tmp_path / f"{target.kind}{version}.session")
    first = await in_thread(s_client, target, version, "-sess_out", session)
    assert_session(first)
    assert "New, TLSv1." in first.stdout
    assert os.path.getsize(session) > 0
    second = await in_thread(s_client, target, version, "-sess_in", session)
    assert_session(second)
    assert "Reused, TLSv1." in second.stdout, second.stdout


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_tls_session_timeout_0_turns_resumption_off(tls_servers, tmp_path):
    for target in await tls_servers({"tls_session_timeout": "0"}):
        for version in ("-tls1_2", "-tls1_3"):
            session = str(tmp_path / f"{target.kind}{version}.session")
            assert_session(await in_thread(s_client, target, version, "-sess_out", session))
            if not os.path.exists(session):
                continue  # the server gave no session id or ticket: nothing to resume
            second = await in_thread(s_client, target, version, "-sess_in", session)
            assert_session(second)
            assert "New, TLSv1." in second.stdout, second.stdout


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_settings_let_an_administrator_allow_old_clients(tls_servers):
    """docs/config.md's example, ``tls_min_version TLSv1`` and ``tls_ciphers
    DEFAULT:@SECLEVEL=0`` (without level 0 OpenSSL 3 refuses TLS 1.1 itself), admits the
    TLS 1.1 and static-RSA clients refused above."""
    targets = await tls_servers({"tls_min_version": "TLSv1", "tls_ciphers": "DEFAULT:@SECLEVEL=0"})
    for target in targets:
        old = await in_thread(s_client, target, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
        assert_session(old)
        assert "TLSv1.1" in old.stdout
        rsa = await in_thread(
            s_client, target, "-tls1_2", "-cipher", "AES128-SHA256:@SECLEVEL=0"
        )
        assert_session(rsa)
        assert "Cipher is AES128-SHA256" in rsa.stdout, rsa.stdout


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_dhe_suites_need_tls_dhparams(tls_servers, tmp_path):
    dh = str(tmp_path / "dh.pem")
    made = subprocess.run(
        [OPENSSL or "openssl", "genpkey", "-genparam", "-algorithm", "DH",
         "-pkeyopt", "group:ffdhe2048", "-out", dh],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    dhe = ("-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256")
    without, _ = await tls_servers()
    assert _refused(await in_thread(s_client, without, *dhe))
    for target in await tls_servers({"tls_dhparams": dh}):
        result = await in_thread(s_client, target, *dhe)
        assert_session(result)
        assert "Cipher is DHE-RSA-AES128-GCM-SHA256" in result.stdout, result.stdout


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_tls_ciphersuites_limits_the_tls13_suites(tls_servers):
    for target in await tls_servers({"tls_ciphersuites": "TLS_CHACHA20_POLY1305_SHA256"}):
        result = await in_thread(s_client, target, "-tls1_3")
        assert_session(result)
        assert "Cipher is TLS_CHACHA20_POLY1305_SHA256" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("files", "named"),
    [
        pytest.param({"tls_ciphers": "NOT-A-CIPHER"}, "tls_ciphers", id="ciphers"),
        pytest.param({"tls_ciphersuites": "TLS_NOPE"}, "tls_ciphersuites", id="ciphersuites"),
        pytest.param({"tls_min_version": "SSLv3"}, "tls_min_version", id="min-version"),
        pytest.param({"tls_session_timeout": "-1"}, "tls_session_timeout", id="timeout"),
        pytest.param({"tls_session_timeout": "soon"}, "tls_session_timeout", id="timeout-nan"),
        pytest.param({"tls_dhparams": "missing.pem"}, "tls_dhparams", id="dhparams-missing"),
        pytest.param({"tls_dhparams": "ca.pem"}, "tls_dhparams", id="dhparams-not-dh"),
    ],
)
@pytest.mark.parametrize("listener", ["starttls", "ssl", "none"])
def test_bad_tls_settings_stop_the_server_at_start_naming_the_file(
    tmp_path, rsa_pki, files, named, listener
):
    config = tmp_path / "cfg"
    config.mkdir()
    for name, value in files.items():
        if name == "tls_dhparams":
            value = os.path.join(os.path.dirname(rsa_pki.cert), value)
        (config / name).write_text(value + "\n")
    argv = ["--config", str(config), "--listen", "tcp:0:interface=127.0.0.1"]
    if listener == "starttls":
        argv += ["--tls-cert", rsa_pki.cert, "--tls-key", rsa_pki.key]
    elif listener == "ssl":
        argv += ["--listen", f"ssl:0:interface=127.0.0.1:privateKey={rsa_pki.key}"
                 f":certKey={rsa_pki.cert}"]  # fmt: skip
    with pytest.raises(usage.UsageError, match=f"^{named}: "):
        Options().parseOptions(argv)


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("ssl:465:sslmethod=TLSv1_2_METHOD", "tls_min_version"),
        ("ssl:465:privateKey=k.pem:colour=blue", "unknown ssl: argument colour"),
        ("ssl:465:4650", "one port number"),
        ("ssl:privateKey=k.pem", "one port number"),
        ("ssl:smtps", "must be numbers"),
    ],
)
def test_malformed_ssl_endpoints_are_usage_errors(description, message):
    with pytest.raises(usage.UsageError, match=message):
        Options().parseOptions(["--listen", description])


def test_ssl_endpoint_strings_follow_twisteds_syntax():
    listen = parse_ssl_listen(
        r"ssl:port=465:interface=\:\:1:backlog=7:privateKey=/k\:1.pem:extraCertChain=c.pem"
    )
    assert listen is not None
    assert (listen.port, listen.interface, listen.backlog) == (465, "::1", 7)
    assert (listen.private_key, listen.cert, listen.chain) == ("/k:1.pem", None, "c.pem")
    assert parse_ssl_listen("tcp:465") is None


# -- Python's ssl module ---------------------------------------------------------------------
@dataclass
class PythonSession:
    """What a Python client saw; ``resume`` is what a second connection needs to resume."""

    alpn: str | None
    version: str | None
    reused: bool
    resume: tuple[ssl.SSLContext, ssl.SSLSession | None]


def python_client(
    target: Target,
    alpn: list[str] | None,
    resume: tuple[ssl.SSLContext, ssl.SSLSession | None] | None = None,
) -> PythonSession:
    """A verifying Python client: EHLO and NOOP over TLS, then QUIT.

    ``resume`` (an earlier result's) offers that session again; Python insists that the
    context be the same one.
    """
    if resume is None:
        context = target.pki.client_context()
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        session = None
    else:
        context, session = resume
    if target.starttls:
        smtp = smtplib.SMTP(*target.address, timeout=10)
        smtp.ehlo("client.test")
        code, _ = smtp.docmd("STARTTLS")
        assert code == 220
        smtp.sock = context.wrap_socket(
            smtp.sock, server_hostname="localhost", session=session
        )
        smtp.file = None
    else:
        raw = socket.create_connection(target.address, timeout=10)
        smtp = smtplib.SMTP(timeout=10)
        smtp.sock = context.wrap_socket(raw, server_hostname="localhost", session=session)
        smtp.file = None
        code, _ = smtp.getreply()
        assert code == 220
    with smtp:
        smtp.ehlo("client.test")
        # TLS 1.3 tickets arrive after the handshake: a round trip makes sure they are read.
        assert smtp.noop()[0] == 250
        sock = smtp.sock
        return PythonSession(
            sock.selected_alpn_protocol(), sock.version(), sock.session_reused,
            (context, sock.session),
        )  # fmt: skip


@pytest.mark.parametrize("alpn", [None, ["smtp"], ["h2", "http/1.1"]])
@pytest_twisted.ensureDeferred
async def test_python_ssl_with_and_without_alpn_gets_a_session(target, alpn):
    seen = await in_thread(python_client, target, alpn)
    assert seen.alpn is None
    assert seen.version in ("TLSv1.2", "TLSv1.3")


@pytest_twisted.ensureDeferred
async def test_python_ssl_resumes_its_session(target):
    first = await in_thread(python_client, target, ["smtp"])
    assert first.resume[1] is not None and not first.reused
    second = await in_thread(python_client, target, ["smtp"], first.resume)
    assert second.reused


@pytest_twisted.ensureDeferred
async def test_a_client_that_rejects_the_certificate_is_logged_with_its_reason(
    target, failures, tmp_path
):
    """The client trusts another CA, so it aborts the handshake with an alert: the server
    logs the alert it received, on the implicit-TLS listener as on STARTTLS."""
    other = make_pki(str(tmp_path / "other-ca"))
    stranger = Target(target.address, target.starttls, other)
    with pytest.raises(ssl.SSLCertVerificationError):
        await in_thread(python_client, stranger, None)
    await wait_for(failures)
    (event,) = failures
    assert event["remote_ip"] == "127.0.0.1"
    assert formatEvent(event).endswith(": tlsv1 alert unknown ca"), formatEvent(event)


@pytest_twisted.ensureDeferred
async def test_a_client_that_hangs_up_mid_handshake_is_logged(target, failures):
    def client() -> None:
        with socket.create_connection(target.address, timeout=10) as sock:
            if target.starttls:
                sock.recv(1024)
                sock.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
                deadline = time.monotonic() + 10
                seen = b""
                while b"220 2.0.0" not in seen and time.monotonic() < deadline:
                    seen += sock.recv(1024)
            sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing

    await in_thread(client)
    await wait_for(failures)
    (event,) = failures
    text = formatEvent(event)
    assert text.endswith(": the connection closed before the handshake completed"), text


# -- the real service: twistd's --listen ssl: ------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_an_ssl_listener_made_by_make_service_serves_alpn_clients_and_resumes(rsa_pki):
    port = free_port()
    service = make_service(
        [f"ssl:{port}:interface=127.0.0.1:privateKey={rsa_pki.key}:certKey={rsa_pki.cert}"]
    )
    service.startService()
    try:
        target = Target(("127.0.0.1", port), False, rsa_pki)
        first = await in_thread(python_client, target, ["smtp"])
        assert first.alpn is None
        second = await in_thread(python_client, target, ["smtp"], first.resume)
        assert second.reused
    finally:
        await service.stopService()


# -- posttls-finger (Postfix's TLS client) ------------------------------------------------------
POSTTLS_FINGER = shutil.which("posttls-finger") or (
    "/usr/sbin/posttls-finger" if os.access("/usr/sbin/posttls-finger", os.X_OK) else None
)


@pytest.mark.skipif(POSTTLS_FINGER is None, reason="posttls-finger (Debian's postfix) is absent")
@pytest_twisted.ensureDeferred
async def test_posttls_finger_verifies_and_reuses_the_session(target):
    host, port = target.address
    command = [
        POSTTLS_FINGER or "posttls-finger", "-c", "-l", "secure", "-F", target.pki.ca_cert,
        "-r", "1", "-t", "10", "-T", "10", *([] if target.starttls else ["-w"]),
        f"[{host}]:{port}", "localhost",
    ]  # fmt: skip

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    result = await in_thread(run)
    output = result.stdout + result.stderr
    assert "Verified TLS connection established" in output, output
    assert "Reconnecting after 1 seconds" in output, output
    # Postfix logs this when OpenSSL says the handshake resumed the cached session
    assert f"127.0.0.1[127.0.0.1]:{port}: Reusing old session" in output, output


def test_an_ssl_listener_whose_key_does_not_fit_its_certificate_stops_the_server(
    rsa_pki, tmp_path
):
    other = make_pki(str(tmp_path / "other"))
    description = f"ssl:0:interface=127.0.0.1:privateKey={other.key}:certKey={rsa_pki.cert}"
    with pytest.raises(usage.UsageError, match=r"^privateKey: .* does not fit "):
        Options().parseOptions(["--listen", description])


@needs_openssl
@pytest_twisted.ensureDeferred
async def test_an_ssl_listener_sends_its_extra_chain(rsa_pki):
    """``extraCertChain=`` certificates follow the server's own in the handshake."""
    port = free_port()
    listen = (
        f"ssl:{port}:interface=127.0.0.1:privateKey={rsa_pki.key}:certKey={rsa_pki.cert}"
        f":extraCertChain={rsa_pki.ca_cert}"
    )
    service = make_service([listen])
    service.startService()
    try:
        target = Target(("127.0.0.1", port), False, rsa_pki)
        result = await in_thread(s_client, target, "-showcerts")
    finally:
        await service.stopService()
    assert_session(result)
    assert " 1 s:CN = qpconn test CA" in result.stdout, result.stdout
