"""What a forwarding queue passes on of SMTPUTF8 and DSN, depending on the next hop.

* **SMTPUTF8** (RFC 6531 §3.2): a message whose MAIL carried SMTPUTF8 gets the parameter
  again when the next hop offers it. When it does not, the message goes on without it
  if it can (only U-label domains: they travel as A-labels); if it cannot (a UTF-8 local
  part, or UTF-8 in the header), our client gets a permanent failure that says why:
  ``553 5.6.7`` for an address, ``554 5.6.9`` for the header. Never a 4xx: retrying would
  meet the same next hop.
* **DSN** (RFC 3461 §5.2): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT are passed on
  as the client sent them when the next hop offers DSN, and dropped otherwise (the next
  hop would refuse them with 555; RFC 3461 §6.2 then makes us responsible for the
  notifications, which a relay that answers synchronously is anyway).
"""

from __future__ import annotations

from typing import Any

from qpconn.mail.dsn import forward_mail_params, forward_rcpt_params
from qpconn.mail.smtputf8 import ascii_path, needs_smtputf8

__all__ = ["smtputf8_refusal", "envelope_lines", "extension_mail_params"]


def _offers(client: Any, keyword: str) -> bool:
    return keyword in client.extensions


def _utf8(txn: Any) -> bool:
    return "SMTPUTF8" in txn.mail_params


def smtputf8_refusal(client: Any, txn: Any, label: str) -> str | None:
    """A ``CODE text`` permanent failure when the message needs SMTPUTF8 and the next hop
    does not offer it; None when it may go on."""
    if not _utf8(txn) or _offers(client, "SMTPUTF8") or not needs_smtputf8(txn):
        return None
    people = [txn.sender, *txn.recipients]
    if any(a is not None and a.user is not None and not a.user.isascii() for a in people):
        return (
            f"553 5.6.7 Next hop {label} does not support SMTPUTF8, which the UTF-8 "
            "addresses of this message need; not delivered"
        )
    return (
        f"554 5.6.9 Next hop {label} does not support SMTPUTF8, which the UTF-8 header "
        "of this message needs; not delivered"
    )


def envelope_lines(client: Any, txn: Any) -> tuple[str, list[str]]:
    """The MAIL path and each RCPT's path with its parameters, as this next hop takes them."""
    utf8 = _utf8(txn) and _offers(client, "SMTPUTF8")
    sender = "<>" if txn.sender is None else txn.sender.format() if utf8 else ascii_path(
        txn.sender
    )
    dsn = _offers(client, "DSN")
    lines = []
    for rcpt in txn.recipients:
        path = rcpt.format() if utf8 else ascii_path(rcpt)
        params = forward_rcpt_params(rcpt.params) if dsn else []
        lines.append(" ".join([path, *params]))
    return sender, lines


def extension_mail_params(client: Any, txn: Any) -> list[str]:
    """SMTPUTF8, RET and ENVID for the next hop's MAIL, where it offers them."""
    params = []
    if _utf8(txn) and _offers(client, "SMTPUTF8"):
        params.append("SMTPUTF8")
    if _offers(client, "DSN"):
        params += forward_mail_params(txn.mail_params)
    return params


def binary_refusal(client: Any, txn: Any, label: str) -> str | None:
    """BODY=BINARYMIME needs a next hop with CHUNKING and BINARYMIME (RFC 3030 §3): DATA
    cannot carry it, so without them the message fails for good (5.6.3)."""
    if (txn.mail_params.get("BODY") or "").upper() != "BINARYMIME":
        return None
    if _offers(client, "CHUNKING") and _offers(client, "BINARYMIME"):
        return None
    return (
        f"554 5.6.3 Next hop {label} does not support BINARYMIME, which this message "
        "needs; not delivered"
    )


def use_bdat(client: Any, txn: Any) -> bool:
    """BDAT for BINARYMIME messages (DATA cannot carry them)."""
    return (txn.mail_params.get("BODY") or "").upper() == "BINARYMIME" and _offers(
        client, "CHUNKING"
    )


async def send_bdat(client: Any, chunks: Any, replies: int = 1) -> tuple[Any, list[Any]]:
    """The message as BDAT chunks, each answered before the next (a refused chunk ends
    it), then ``BDAT 0 LAST`` and its replies (one per recipient for LMTP). Returns the
    shape ``SMTPClient.data`` does: a refused chunk's reply alone, or (last, finals)."""
    protocol = client.protocol
    last = None
    for chunk in chunks:
        if not chunk:
            continue
        waiter = protocol.expect()
        protocol.write(b"BDAT %d\r\n" % len(chunk) + chunk)
        last = await waiter
        if not last.positive:
            return last, []
    waiters = [protocol.expect() for _ in range(replies)]
    protocol.write(b"BDAT 0 LAST\r\n")
    finals = [await waiter for waiter in waiters]
    client.messages += 1
    return (last or finals[0]), finals
