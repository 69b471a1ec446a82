"""End-to-end: the session limits while BDAT (RFC 3030) carries the message.

* ``data_timeout`` applies while a chunk's octets are read (they are message text, as
  after ``354``), the idle ``timeout`` between commands, chunks included.
* ``max_errors`` is reset by a message accepted with ``BDAT ... LAST`` exactly as by one
  accepted after DATA, and by nothing less (an accepted non-LAST chunk, a refused LAST).
* ``smtputf8 no``: SMTPUTF8 is not offered and its MAIL parameter gets 555.

Raw sockets and smtplib against the real server on loopback.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config, ConfigError
from qpconn.server.factory import SMTPFactory
from qpconn.server.peerinfo import LookupSettings
from tests.e2e_client import Client, ehlo, watch_errors
from tests.support.server import in_thread, write_config
from tests.support.timing import assert_data_timed_out, assert_within_timeout, timed_reply

RCPT = "<user@mx.test>"


@pytest.fixture(autouse=True)
def errors() -> Iterator[list[dict[str, Any]]]:
    yield from watch_errors()


def first_word(reply: Any) -> tuple[int, str]:
    return reply.code, reply.last.split(" ", 1)[0]


def envelope(smtp: Client) -> None:
    assert smtp.cmd("MAIL FROM:<a@example.org>").code == 250
    assert smtp.cmd(f"RCPT TO:{RCPT}").code == 250


# -- data_timeout during a chunk ----------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_stalling_inside_a_chunk_gets_421_after_data_timeout(qpconn_server):
    # A long idle timeout and a short DATA one: the stall is inside a chunk, so the
    # short one must be the one that fires.
    server = qpconn_server(files={"timeout": "30", "data_timeout": "0.3"})

    def client() -> tuple[Any, float, bool]:
        with ehlo(server) as smtp:
            envelope(smtp)
            smtp.send(b"BDAT 100 LAST\r\nSubject: half\r\n\r\n")
            return timed_reply(smtp, 30.0)

    # 0.3 s, not the 30 s idle timeout
    await assert_data_timed_out(server, await in_thread(client), fired=0.3, instead_of=30)


@pytest_twisted.ensureDeferred
async def test_a_pause_inside_a_chunk_is_data_time_and_between_chunks_idle_time(qpconn_server):
    # The converse: a short idle timeout, a long DATA one. A pause inside a chunk longer
    # than the idle timeout is fine; the same pause after the chunk's reply is not.
    server = qpconn_server(files={"timeout": "0.4", "data_timeout": "10"})
    text = b"Subject: slow\r\n\r\nfirst half, second half\r\n"
    cut = 20

    def client() -> tuple[Any, Any, Any, float, bool]:
        with ehlo(server) as smtp:
            envelope(smtp)
            smtp.send(b"BDAT %d\r\n" % len(text) + text[:cut])
            time.sleep(0.8)  # the behaviour under test: a pause twice the idle timeout
            smtp.send(text[cut:])
            chunk = smtp.reply()
            smtp.send(b"BDAT 0 LAST\r\n")
            stored = smtp.reply()
            return chunk, stored, *timed_reply(smtp, 10.0)

    chunk, stored, idle, waited, closed = await in_thread(client)
    assert chunk.code == 250, chunk
    assert stored.code == 250, stored
    assert first_word(idle) == (421, "4.4.2")
    assert_within_timeout(waited, fired=0.4, instead_of=10)  # the idle timeout, not DATA's
    assert closed
    (message,) = server.messages()
    assert message.endswith(b"first half, second half\n")


# -- max_errors and BDAT LAST --------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_message_accepted_by_bdat_last_resets_the_error_count(qpconn_server):
    # The rule documented for DATA (docs/config.md, max_errors): a message accepted for
    # delivery resets the count. Two errors, a delivery, two more: still below 3.
    server = qpconn_server(files={"max_errors": "3"})

    def client() -> list[int]:
        with ehlo(server) as smtp:
            codes = [smtp.code("BOGUS"), smtp.code("BOGUS")]
            envelope(smtp)
            smtp.send(b"BDAT 12\r\nSubject: x\r\n")
            codes.append(smtp.reply().code)
            smtp.send(b"BDAT 6 LAST\r\n\r\nbody")
            codes.append(smtp.reply().code)
            codes += [smtp.code("BOGUS"), smtp.code("BOGUS"), smtp.code("NOOP")]
            return codes

    assert await in_thread(client) == [500, 500, 250, 250, 500, 500, 250]
    assert len(server.messages()) == 1


@pytest_twisted.ensureDeferred
async def test_only_an_accepted_last_chunk_resets_the_error_count(qpconn_server):
    # An accepted chunk that is not LAST delivers nothing, and a LAST chunk refused (over
    # databytes) delivers nothing either: neither resets, so the third error is the end.
    server = qpconn_server(files={"max_errors": "3", "databytes": "20"})

    def not_last() -> tuple[list[int], Any, bool]:
        with ehlo(server) as smtp:
            codes = [smtp.code("BOGUS"), smtp.code("BOGUS")]
            envelope(smtp)
            smtp.send(b"BDAT 4\r\ns: x")
            codes.append(smtp.reply().code)
            smtp.send(b"BOGUS\r\n")
            codes.append(smtp.reply().code)
            return codes, smtp.reply(), smtp.is_closed()

    def refused_last() -> tuple[list[int], Any, bool]:
        with ehlo(server) as smtp:
            codes = [smtp.code("BOGUS")]
            envelope(smtp)
            text = b"s: x\r\n\r\n" + b"y" * 21
            smtp.send(b"BDAT %d LAST\r\n" % len(text) + text)
            codes.append(smtp.reply().code)  # 552: the second error
            smtp.send(b"BOGUS\r\n")
            codes.append(smtp.reply().code)
            return codes, smtp.reply(), smtp.is_closed()

    codes, closing, closed = await in_thread(not_last)
    assert codes == [500, 500, 250, 500]
    assert first_word(closing) == (421, "4.7.0") and closed
    codes, closing, closed = await in_thread(refused_last)
    assert codes == [500, 552, 500]
    assert first_word(closing) == (421, "4.7.0") and closed
    assert server.messages() == []


# -- a wrong size: more octets than announced ---------------------------------------------
@pytest_twisted.ensureDeferred
async def test_octets_past_the_announced_size_are_read_as_commands(qpconn_server):
    # smtplib's raw send(): exactly the announced octets are the message; what follows
    # is a command line (refused here), never message text.
    server = qpconn_server()
    text = b"Subject: sized\r\n\r\nexactly this"

    def client() -> tuple[Any, Any, Any]:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@example.org")[0] == 250
            assert smtp.rcpt("user@mx.test")[0] == 250
            smtp.send(b"BDAT %d LAST\r\n" % len(text) + text + b"MAIL FROM:<x@evil.test>\r\n")
            return smtp.getreply(), smtp.getreply(), smtp.noop()

    stored, extra, noop = await in_thread(client)
    assert stored[0] == 250, stored
    # A MAIL command, read as one: a new transaction may begin (250), nothing smuggled.
    assert extra[0] == 250, extra
    assert noop[0] == 250
    (message,) = server.messages()
    assert message.endswith(b"\n\nexactly this")
    assert b"evil" not in message


# -- smtputf8 no ---------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_smtputf8_off_is_not_offered_and_its_parameter_is_555(qpconn_server):
    server = qpconn_server(files={"smtputf8": "no"})

    def client() -> tuple[Any, ...]:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            smtp.ehlo("client.test")
            offered = smtp.has_extn("smtputf8"), smtp.has_extn("chunking")
            mail = smtp.docmd("MAIL", "FROM:<a@example.org> SMTPUTF8")
            smtp.command_encoding = "utf-8"  # send the raw UTF-8 line anyway
            utf8_address = smtp.docmd("MAIL", "FROM:<jörg@example.org>")
            # smtplib itself refuses to send SMTPUTF8 mail to a server that lacks it
            try:
                smtp.sendmail("jörg@example.org", ["user@mx.test"], b"s: x\r\n\r\nx",
                              mail_options=["SMTPUTF8"])  # fmt: skip
            except smtplib.SMTPNotSupportedError:
                refused_by_client = True
            else:
                refused_by_client = False
            # Plain ASCII mail still goes through.
            plain = smtp.sendmail("a@example.org", ["user@mx.test"], b"s: x\r\n\r\nx")
            return offered, mail, utf8_address, refused_by_client, plain

    offered, mail, utf8_address, refused_by_client, plain = await in_thread(client)
    assert offered == (False, True)
    assert mail == (555, b"5.5.4 Unsupported option: SMTPUTF8")
    assert utf8_address[0] == 500 and utf8_address[1].startswith(b"5.5.2")
    assert refused_by_client
    assert plain == {}
    assert len(server.messages()) == 1


@pytest_twisted.ensureDeferred
async def test_smtputf8_on_by_default_and_with_yes(qpconn_server):
    for files in ({}, {"smtputf8": "yes"}):
        server = qpconn_server(files=files)

        def client(server: Any = server) -> tuple[bool, Any]:
            with smtplib.SMTP(*server.address, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.command_encoding = "utf-8"
                return smtp.has_extn("smtputf8"), smtp.docmd("MAIL", "FROM:<jörg@x.test> SMTPUTF8")

        offered, mail = await in_thread(client)
        assert offered and mail[0] == 250, (files, mail)


def test_a_bad_smtputf8_value_stops_the_server(tmp_path):
    config = Config(write_config(str(tmp_path / "config"), {"smtputf8": "maybe"}))
    with pytest.raises(ConfigError, match="smtputf8"):
        SMTPFactory(config, [], lookups=LookupSettings(rdns=False))
