"""What ``queue/maildir`` stores, read by the programs that read Maildirs.

A Maildir file has LF line endings (qmail, Postfix's local and virtual, Dovecot and mutt
write and expect them) and, in ``new/``, the name carries ``,S=<size>``, the file's size,
which Dovecot trusts instead of a ``stat``. Python's :mod:`mailbox` and a real Dovecot
(``doveadm fetch``) read what a real server stored; ``line_endings=crlf`` keeps the
octets as received, and the size in the name is then that file's.
"""

from __future__ import annotations

import mailbox
import os
import smtplib

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st

from qpconn.plugins.queue.maildir import lf_lines
from tests.support.dovecot_reader import dovecot_reader, missing
from tests.support.server import in_thread

TEXT = (
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: a folded\r\n subject\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that starts with a dot\r\n"  # smtplib dot-stuffs it, the server unstuffs
    b"\r\n"
    b"last line\r\n"
)
#: the body as a reader of the stored file sees it
BODY = b"first line\n.a line that starts with a dot\n\nlast line\n"


async def deliver(qpconn_server, line: str) -> tuple[str, bytes]:
    server = qpconn_server(plugins=["rcpt_ok", line])

    def client() -> dict:
        with smtplib.SMTP(*server.address, timeout=10) as smtp:
            return smtp.sendmail("a@example.org", ["user@mx.test"], TEXT)

    assert await in_thread(client) == {}
    new = os.path.join(server.factory.plugins[1].template, "new")
    (name,) = os.listdir(new)
    with open(os.path.join(new, name), "rb") as handle:
        return name, handle.read()


@pytest_twisted.ensureDeferred
async def test_stored_with_lf_line_endings_and_its_size_in_the_name(qpconn_server, tmp_path):
    name, data = await deliver(qpconn_server, f"queue/maildir {tmp_path / 'box'}")
    assert b"\r" not in data
    assert data.startswith(b"Return-Path: <a@example.org>\nDelivered-To: user@mx.test\nReceived: ")
    assert data.endswith(b"\n\n" + BODY)
    assert name.endswith(f",S={len(data)}") and ":" not in name

    box = mailbox.Maildir(tmp_path / "box", create=False)
    (message,) = list(box)
    assert message["Subject"] == "a folded\n subject"
    assert message["Return-Path"] == "<a@example.org>"
    assert message.get_payload(decode=False).encode() == BODY
    assert message.get_subdir() == "new"


@pytest_twisted.ensureDeferred
async def test_line_endings_crlf_keeps_the_octets_as_received(qpconn_server, tmp_path):
    name, data = await deliver(qpconn_server, f"queue/maildir {tmp_path / 'box'} line_endings=crlf")
    assert data.count(b"\n") == data.count(b"\r\n")
    assert data.endswith(b"\r\n\r\n" + BODY.replace(b"\n", b"\r\n"))
    assert name.endswith(f",S={len(data)}")


def test_an_unknown_line_ending_is_refused_at_start_up(tmp_path):
    from qpconn.config import Config
    from qpconn.plugins import PluginLoadError, load_plugin

    with pytest.raises(PluginLoadError, match="line_endings must be lf or crlf"):
        load_plugin(Config(), "queue/maildir", str(tmp_path / "box"), "line_endings=cr")


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=8))
def test_lf_lines_turns_every_crlf_into_lf_wherever_the_chunks_split(data, cuts):
    data = data.replace(b"x", b"\r\n")  # plenty of CRLFs, some next to lone CR or LF
    points = sorted({min(cut, len(data)) for cut in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert b"".join(lf_lines(chunks)) == data.replace(b"\r\n", b"\n")


# -- Dovecot ------------------------------------------------------------------------------
needs_dovecot = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def fields(output: str) -> dict[str, str]:
    """``doveadm fetch`` output (``name: value`` lines, ``body:`` last) as a dict."""
    head, _, body = output.partition("body:\n")
    values: dict[str, str] = {}
    name = ""
    for line in head.splitlines():
        if line[:1] in (" ", "\t"):
            values[name] += "\n" + line  # a folded field goes on, as doveadm prints it
        else:
            name, _, values[name] = line.partition(": ")
    values["body"] = body
    return values


@needs_dovecot
@pytest.mark.parametrize("option", ["", " line_endings=crlf"], ids=["lf", "crlf"])
@pytest_twisted.ensureDeferred
async def test_dovecot_reads_the_message_its_size_and_its_text(qpconn_server, tmp_path, option):
    box = tmp_path / "box"
    name, data = await deliver(qpconn_server, f"queue/maildir {box}{option}")
    with dovecot_reader(str(box)) as dovecot:
        fetched = dovecot.fetch("size.physical size.virtual hdr.subject body")
        search = dovecot.fetch("uid", "body", "dot")
    assert fetched.stderr == ""  # a wrong S= size shows here as "Broken physical size"
    found = fields(fetched.stdout)
    assert int(found["size.physical"]) == len(data)
    # The virtual size is the RFC 5322 size, with CRLF: the same whichever way it is stored.
    assert int(found["size.virtual"]) == len(data.replace(b"\r\n", b"\n")) + data.count(b"\n")
    assert found["hdr.subject"] == "a folded\n subject"
    assert found["body"].encode() == BODY  # doveadm prints lines with LF either way
    assert "uid: 1" in search.stdout
    assert name.endswith(f",S={len(data)}")
