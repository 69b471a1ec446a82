"""Delivery status notifications (bounces, RFC 3464) for recipients a next hop refused.

``queue/smtp-forward`` sends a message on to the recipients the next hop accepted and
answers our client 250. The recipients the next hop refused permanently would then be
lost without a word, since after DATA SMTP has one reply for the whole message. So the
refusal is reported the way every MTA reports a failure after accepting a message: a
bounce to the envelope sender, from the null sender (so it can never bounce back), sent
through the same next hop before our client gets its 250.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Mapping, Sequence

from qpconn.client.smtp import ClientReply

__all__ = ["build_dsn", "remote_mta_name"]

_ENHANCED_PREFIX = ("5.", "4.", "2.")


def _status(reply: ClientReply) -> str:
    """The enhanced status code of a reply, or one derived from its class."""
    first = reply.lines[0] if reply.lines else ""
    word = first.split(" ", 1)[0]
    parts = word.split(".")
    if word.startswith(_ENHANCED_PREFIX) and len(parts) == 3 and all(p.isdigit() for p in parts):
        return word
    return f"{reply.code // 100}.0.0"


def _clean(text: str) -> str:
    """One header-safe line: no line breaks, no control characters."""
    return "".join(ch if ch >= " " and ch != "\x7f" else " " for ch in text).strip()


def _original_recipient(kind: str, address: str) -> str:
    """``addr-type;address`` for an Original-Recipient field (RFC 3464 §2.3.1).

    The ORCPT address is given decoded from xtext, as the client meant it. This part is
    ``message/delivery-status``, which is ASCII, so a ``utf-8`` address (RFC 6533) keeps
    its non-ASCII characters as ``\\x{HEX}`` escapes (utf-8-addr-xtext).
    """
    utf8 = kind.lower() == "utf-8"
    text = "".join(
        ch if ch.isascii() and not (utf8 and ch == "\\") else f"\\x{{{ord(ch):X}}}"
        for ch in address
    )
    return f"{_clean(kind)};{_clean(text)}"


def remote_mta_name(host: str | None, me: str) -> str:
    """The name for ``Remote-MTA: dns; NAME`` of a next hop reached at ``host``.

    The host name it was contacted as, never the port (RFC 3464 §2.3.5). An address is
    given bare, ``127.0.0.1`` or ``::1``, as Postfix writes it for ``[127.0.0.1]:port``.
    A Unix socket (``host`` None) leads to an MTA on this machine, which Postfix names
    with its own host name: ``me`` here.
    """
    return host.strip("[]") if host else me


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    remote: str,
    failures: Sequence[tuple[str, ClientReply]],
    original_header: bytes,
    envid: str | None = None,
    original_recipients: Mapping[str, tuple[str, str]] | None = None,
    arrival: float | None = None,
    remote_mta: str | None = None,
) -> bytes:
    """The bounce message (CRLF line endings) telling ``sender`` which recipients failed.

    ``failures`` pairs each refused recipient (as ``<addr>`` or ``addr``) with the next
    hop's reply; ``original_header`` is the message's header, returned as the
    ``text/rfc822-headers`` part so the sender can tell which message it was.

    ``envid`` (the decoded ENVID of MAIL) and ``original_recipients`` (a failure's
    recipient string -> its decoded ORCPT ``(addr-type, address)``) are what the client
    asked to get back (RFC 3461 §4): they become ``Original-Envelope-Id`` and
    ``Original-Recipient`` (RFC 3464), so the sender's software can match the bounce to
    its own message and to the address it originally wrote, whatever was rewritten since.

    ``arrival`` is when the message arrived here (``time.time()``, the transaction's
    ``arrival_time``): ``Arrival-Date`` is that moment, not the bounce's (RFC 3464
    §2.2.5), so it matches our Received field; now only when unknown. ``remote_mta`` is
    the next hop's name for ``Remote-MTA: dns; NAME`` (RFC 3464 §2.3.5, a name and no
    port: see :func:`remote_mta_name`); ``remote`` (``host:port``) stays in the text.
    Without ``remote_mta`` the field is left out, as the RFC allows.
    """
    orcpts = original_recipients or {}
    boundary = f"{queue_id}.{int(time.time())}.{os.getpid()}/{reporting_mta}"
    bare = [(rcpt.strip("<>"), reply, orcpts.get(rcpt)) for rcpt, reply in failures]
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: <{queue_id}.dsn.{int(time.time() * 1000)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to the recipients below: the next mail",
        "server refused them permanently. It was delivered to the other recipients.",
        "",
    ]
    for rcpt, reply, _ in bare:
        lines.append(f"<{_clean(rcpt)}>: {remote} said: {_clean(str(reply))}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
    ]
    if envid:
        lines.append(f"Original-Envelope-Id: {_clean(envid)}")
    lines += [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}",
    ]
    for rcpt, reply, orcpt in bare:
        lines.append("")
        if orcpt is not None:
            lines.append(f"Original-Recipient: {_original_recipient(*orcpt)}")
        lines += [
            f"Final-Recipient: rfc822; {_clean(rcpt)}",
            "Action: failed",
            f"Status: {_status(reply)}",
        ]
        if remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(remote_mta)}")
        lines.append(f"Diagnostic-Code: smtp; {_clean(str(reply))}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    head = original_header if original_header.endswith(b"\r\n") or not original_header else (
        original_header + b"\r\n"
    )
    return text + head + f"\r\n--{boundary}--\r\n".encode()
