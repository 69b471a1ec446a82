"""Per-recipient outcomes for LMTP (RFC 2033): what a queue plugin tells each recipient.

Over LMTP the end of the message gets one reply per accepted recipient, so a delivery
plugin can say "delivered" to one and "mailbox full" to another. It does so with
:func:`set_recipient_reply` (stored in ``transaction.notes["recipient_replies"]``);
recipients without one get the message's overall reply (the ``queue`` hook's verdict,
or a refusal from ``data_post`` etc.). Over SMTP the notes are ignored: SMTP has a single
reply for the whole message.

Pure Python: no Twisted here.
"""

from __future__ import annotations

from typing import Any

from qpconn.core.reply import Reply

__all__ = ["set_recipient_reply", "recipient_replies", "NOTE"]

#: the transaction note holding ``{address: "CODE text"}``
NOTE = "recipient_replies"


def set_recipient_reply(transaction: Any, recipient: Any, reply: str) -> None:
    """Give ``recipient`` (an Address or ``user@host`` text) its own ``"CODE text"`` reply."""
    address = recipient if isinstance(recipient, str) else recipient.address
    if not (reply[:3].isdigit() and 200 <= int(reply[:3]) <= 599):
        raise ValueError(f"a recipient reply must start with its code: {reply!r}")
    transaction.notes.setdefault(NOTE, {})[address] = reply


def recipient_replies(transaction: Any, overall: Reply) -> list[Reply]:
    """One reply per recipient, in RCPT order: its own if a plugin set one, else ``overall``.

    Replies are normally set by the queue hook, the last to run; a message refused
    before it (size, ``data_post``) leaves none, so that refusal goes to everyone.
    """
    own: dict[str, str] = transaction.notes.get(NOTE) or {}
    replies = []
    for rcpt in transaction.recipients:
        text = own.get(rcpt.address)
        if text is None:
            replies.append(overall)
            continue
        replies.append(Reply.parse_line(text, overall.code))
    return replies
