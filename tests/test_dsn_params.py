"""DSN parameters (RFC 3461) and xtext: the pure functions, then end to end."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from qpconn.mail.dsn import (
    DSNError,
    check_mail_dsn,
    check_rcpt_dsn,
    forward_mail_params,
    forward_rcpt_params,
    xtext_decode,
    xtext_encode,
)
from qpconn.plugins import Plugin
from tests.e2e_client import ehlo, plugin_of
from tests.support.server import in_thread


def test_xtext_round_trip() -> None:
    for text in ("plain", "a+b=c", "spaces and\ttabs", "100%", "~!"):
        assert xtext_decode(xtext_encode(text)) == text
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("rfc822+3Bx") == "rfc822;x"


@pytest.mark.parametrize("bad", ["a+2", "a+zz", "a+2b", "a=b", "a b", "a\x7fb", "é", "+"])
def test_xtext_bad_escapes_and_characters(bad: str) -> None:
    with pytest.raises(DSNError):
        xtext_decode(bad)


def test_mail_params() -> None:
    assert check_mail_dsn({"RET": "hdrs", "ENVID": "QQ+2B1"}).ret == "HDRS"
    assert check_mail_dsn({"ENVID": "QQ+2B1"}).envid == "QQ+1"
    assert check_mail_dsn({}).ret is None
    for bad in ({"RET": "ALL"}, {"RET": None}, {"ENVID": "x" * 101}, {"ENVID": "a+0A"},
                {"ENVID": "a+G1"}):
        with pytest.raises(DSNError):
            check_mail_dsn(bad)


def test_rcpt_params() -> None:
    dsn = check_rcpt_dsn({"NOTIFY": "success,Delay", "ORCPT": "rfc822;u+2Bx@example.org"})
    assert dsn.notify == {"SUCCESS", "DELAY"}
    assert dsn.orcpt == ("rfc822", "u+x@example.org")
    assert check_rcpt_dsn({"NOTIFY": "never"}).never
    utf8 = check_rcpt_dsn({"ORCPT": "utf-8;j\\x{E9}r\u00f4me@example.org"}, utf8=True)
    assert utf8.orcpt == ("utf-8", "j\u00e9r\u00f4me@example.org")
    for bad in (
        {"NOTIFY": "NEVER,SUCCESS"},
        {"NOTIFY": "FAILURE,NEVER"},
        {"NOTIFY": "SOMETIMES"},
        {"NOTIFY": "SUCCESS,SUCCESS"},
        {"NOTIFY": None},
        {"ORCPT": "rfc822"},
        {"ORCPT": ";x@y"},
        {"ORCPT": "rfc822;bad+escape"},
        {"ORCPT": "rfc822;" + "x" * 500},
        {"ORCPT": "utf-8;j\\x{D800}x@y"},
        {"ORCPT": "utf-8;j\\xE9x@y"},
    ):
        with pytest.raises(DSNError):
            check_rcpt_dsn(bad)
    with pytest.raises(DSNError):
        check_rcpt_dsn({"ORCPT": "utf-8;j\u00e9@y"}, utf8=False)


def test_forward_params_keep_the_clients_text() -> None:
    assert forward_mail_params({"RET": "FULL", "ENVID": "a+2B", "SIZE": "9"}) == [
        "RET=FULL", "ENVID=a+2B"]
    assert forward_rcpt_params({"NOTIFY": "NEVER", "ORCPT": "rfc822;a@b"}) == [
        "NOTIFY=NEVER", "ORCPT=rfc822;a@b"]


class Keep(Plugin):
    """Keeps what the queue hook saw of the DSN request."""

    def register(self) -> None:
        self.seen: list[Any] = []

    def hook_queue_pre(self, transaction: Any) -> Any:
        self.seen.append((transaction.dsn, [(r.address, r.dsn) for r in transaction.recipients]))


@pytest_twisted.ensureDeferred
async def test_dsn_end_to_end(qpconn_server):
    server = qpconn_server(plugins=[Keep, "relay", "rcpt_ok", "queue/maildir maildir"])

    def client():
        with ehlo(server) as smtp:
            offered = "DSN" in smtp.cmd("EHLO again.test").lines
            bad = [
                smtp.cmd("MAIL FROM:<a@example.org> RET=EVERYTHING"),
                smtp.cmd("MAIL FROM:<a@example.org> ENVID=bad+escape"),
            ]
            assert smtp.code("MAIL FROM:<a@example.org> RET=HDRS ENVID=id+2B42") == 250
            bad += [
                smtp.cmd("RCPT TO:<u@mx.test> NOTIFY=NEVER,FAILURE"),
                smtp.cmd("RCPT TO:<u@mx.test> ORCPT=rfc822;x+y"),
                smtp.cmd("RCPT TO:<u@mx.test> NOTIFY=SOMETIMES"),
            ]
            good = [
                smtp.code("RCPT TO:<u@mx.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+40x@b"),
                smtp.code("RCPT TO:<v@mx.test> NOTIFY=NEVER"),
            ]
            assert smtp.code("DATA") == 354
            reply = smtp.message(b"Subject: x\r\n\r\nhi\r\n")
            return offered, bad, good, reply

    offered, bad, good, reply = await in_thread(client)
    assert offered
    assert [(r.code, r.last[:5]) for r in bad] == [(501, "5.5.4")] * 5
    assert "NEVER cannot be combined" in bad[2].last
    assert good == [250, 250]
    assert reply.code == 250
    ((mail, rcpts),) = plugin_of(server, Keep).seen
    assert (mail.ret, mail.envid) == ("HDRS", "id+42")
    assert rcpts[0][0] == "u@mx.test"
    assert rcpts[0][1].notify == {"SUCCESS", "FAILURE"}
    assert rcpts[0][1].orcpt == ("rfc822", "u@x@b")
    assert rcpts[1][1].never
