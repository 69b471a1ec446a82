"""The AUTH example of docs/plugins.md, run as written against a real server.

smtplib is the client; each mechanism the example judges (PLAIN, LOGIN, CRAM-MD5) is
tried with the right and a wrong password. ``tls_before_auth 0`` lets AUTH run over the
loopback connection in clear text (TLS itself is tested elsewhere).
"""

from __future__ import annotations

import smtplib
import sys
from pathlib import Path

import pytest
import pytest_twisted

from tests.support.server import in_thread

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture
def auth_module(tmp_path, monkeypatch):
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    start = text.index("<!-- example: auth -->\n```python\n") + len("<!-- example: auth -->\n")
    code = text[start + len("```python\n") : text.index("```", start + len("```python\n"))]
    package = tmp_path / "pythonpath" / "docsauth"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "users.py").write_text(code)
    monkeypatch.syspath_prepend(str(package.parent))
    yield "docsauth.users"
    for name in ("docsauth.users", "docsauth"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def authenticate(address, mechanism: str, user: str, password: str) -> tuple[int, bytes]:
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
        smtp.user, smtp.password = user, password
        method = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login}.get(
            mechanism, smtp.auth_cram_md5
        )
        try:
            return smtp.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest_twisted.ensureDeferred
async def test_auth_example_accepts_the_right_password_only(qpconn_server, auth_module, mechanism):
    server = qpconn_server(
        files={"users": ["alice:s3cret", "bob:other"], "tls_before_auth": "0"},
        plugins=[auth_module, "rcpt_ok", "queue/discard"],
    )
    good = await in_thread(authenticate, server.address, mechanism, "alice", "s3cret")
    wrong = await in_thread(authenticate, server.address, mechanism, "alice", "other")
    nobody = await in_thread(authenticate, server.address, mechanism, "carol", "s3cret")
    assert good == (235, b"2.7.0 Authentication successful")
    assert wrong == nobody == (535, b"5.7.8 Authentication credentials invalid")


@pytest_twisted.ensureDeferred
async def test_authenticated_session_is_traced_as_esmtpa(qpconn_server, auth_module, tmp_path):
    server = qpconn_server(
        files={"users": ["alice:s3cret"], "tls_before_auth": "0"},
        plugins=[auth_module, "rcpt_ok", f"queue/maildir {tmp_path / 'maildir'}"],
    )

    def client() -> None:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.login("alice", "s3cret")
            smtp.sendmail("alice@mx.test", ["user@mx.test"], b"Subject: x\r\n\r\ny\r\n")

    await in_thread(client)
    (message,) = server.messages()
    assert b" with ESMTPA id " in message
