"""queue/lmtp HOST PORT | unix:/path [option=value ...]: deliver to a mailbox store (RFC 2033).

LMTP is SMTP for the last step (Dovecot, Cyrus): LHLO instead of EHLO, and after the
message one reply per recipient, since each mailbox may fail on its own (over quota,
gone). SMTP gives our client a single reply per message, so those replies are folded
into one by the rule that loses nothing (details in :mod:`qpconn.client.forward`):

* every recipient accepted: 250;
* a recipient failed temporarily: 451 (4xx) and the client retries the whole message;
  recipients already delivered then receive it twice -- a duplicate, logged as an error,
  is the price of never losing mail for the one that failed;
* recipients failed permanently and none temporarily: the first permanent reply (with
  how many recipients did get the message), so the sender hears of the failure at once
  and no retry loop piles up duplicates. Recipients refused at RCPT, before anything is
  sent, stop the delivery there: nothing is duplicated at all.

Why not accept and bounce, as ``queue/smtp-forward`` does: a mailbox store does not
carry mail to the outside world, so there is no way here to send the bounce.

Options as ``queue/smtp-forward``: ``starttls``, ``tls_ca``, ``timeout``, ``pool``, ``idle``.
There is no default port (LMTP has none): give PORT, or a Unix socket.
"""

from __future__ import annotations

from qpconn.client.forward import ForwardingQueue
from qpconn.client.pool import Destination

__all__ = ["LMTP"]


class LMTP(ForwardingQueue):
    """Deliver over LMTP; see the module docstring."""

    lmtp = True

    def _destination(self, words: list[str], starttls: str, tls_ca: str | None) -> Destination:
        if len(words) == 1 and not words[0].startswith("unix:"):
            raise ValueError("expects HOST PORT or unix:/path (LMTP has no default port)")
        return super()._destination(words, starttls, tls_ca)
