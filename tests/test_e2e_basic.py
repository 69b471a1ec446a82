"""A whole transaction over loopback with smtplib lands in the Maildir."""

from __future__ import annotations

import smtplib

import pytest_twisted

from tests.support.server import in_thread


@pytest_twisted.ensureDeferred
async def test_message_from_smtplib_lands_in_maildir_with_trace_headers(server):
    def client():
        with smtplib.SMTP(*server.address) as smtp:
            smtp.ehlo("client.test")
            return smtp.sendmail(
                "sender@example.org",
                ["user@mx.test"],
                b"Subject: hello\r\n\r\nfirst line\r\n.leading dot\r\n",
            )

    refused = await in_thread(client)
    assert refused == {}
    (message,) = server.messages()
    head, _, body = message.partition(b"\n\n")
    lines = head.split(b"\n")
    assert lines[0] == b"Return-Path: <sender@example.org>"
    assert lines[1] == b"Delivered-To: user@mx.test"
    assert lines[2].startswith(b"Received: from client.test (unknown [127.0.0.1])")
    assert b"by mx.test (qpconn" in head and b"with ESMTP id " in head
    assert b"for <user@mx.test>;" in head
    assert b"Subject: hello" in head
    assert body == b"first line\n.leading dot\n"  # stored as Maildir readers expect: LF
