"""Asking a next hop whether it would take a recipient, without sending anything.

``MAIL FROM:<sender>``, ``RCPT TO:<recipient>``, ``RSET``: the next hop answers the RCPT
exactly as it would for a real message (its recipient tables, its mailbox store for
LMTP), and RSET ends the transaction before any DATA. The connections come from the same
:class:`~qpconn.client.pool.ConnectionPool` the forwarding plugins use, so a burst of
recipients pays one greeting and EHLO per connection, not per recipient.

A connection is retired early, for the next hop's sake: Postfix counts every refused
RCPT as an error of the session and starts answering slowly after ten
(``smtpd_soft_error_limit``, a second each) and hangs up after twenty; RSET counts as a
"junk" command past a hundred. So a connection carries at most :data:`MAX_PROBES`
probes and :data:`MAX_REFUSALS` refusals, then is closed and a fresh one opened.
"""

from __future__ import annotations

import weakref
from typing import Any

from qpconn.client.pool import ConnectionPool
from qpconn.client.smtp import ClientReply, NextHopError, SMTPClient

__all__ = ["MAX_PROBES", "MAX_REFUSALS", "RecipientProbe", "Unverifiable"]

#: probes per connection (each costs up to two RSETs: ours and the pool's check on reuse)
MAX_PROBES = 40
#: refused recipients per connection, below Postfix's smtpd_soft_error_limit (10)
MAX_REFUSALS = 5


class Unverifiable(Exception):
    """This recipient cannot be asked about on this next hop (it needs SMTPUTF8, which the
    next hop lacks): no verdict either way."""


class RecipientProbe:
    """Probes recipients at one destination through ``pool``; see the module docstring."""

    def __init__(self, pool: ConnectionPool, sender: str = "<>") -> None:
        self.pool = pool
        self.sender = sender
        #: per connection: [probes, refusals]; forgotten with the connection
        self._uses: weakref.WeakKeyDictionary[SMTPClient, list[int]] = weakref.WeakKeyDictionary()

    async def ask(self, path: str, utf8: bool = False) -> ClientReply:
        """The next hop's reply to ``RCPT TO:path`` (``<user@host>``).

        ``utf8``: the path holds UTF-8 and needs MAIL's SMTPUTF8 parameter. Raises
        NextHopError when the next hop cannot be used (down, garbage, MAIL refused: no
        verdict on the recipient) and Unverifiable as said there.
        """
        client = await self.pool.acquire()
        reuse = False
        try:
            if utf8 and "SMTPUTF8" not in client.extensions:
                reuse = client.usable
                raise Unverifiable(f"{self.pool.destination.label} does not offer SMTPUTF8")
            mail, replies = await client.envelope(self.sender, [path], "SMTPUTF8" if utf8 else "")
            for reply in (mail, *replies):
                if not 200 <= reply.code < 600 or 300 <= reply.code < 400:
                    raise NextHopError(f"unexpected reply {reply}")
            if not mail.positive:
                raise NextHopError(f"MAIL FROM:{self.sender} refused: {mail}")
            if not replies:
                raise NextHopError("no reply to RCPT")
            reply = replies[0]
            uses = self._uses.setdefault(client, [0, 0])
            uses[0] += 1
            uses[1] += 0 if reply.positive else 1
            fresh = uses[0] < MAX_PROBES and uses[1] < MAX_REFUSALS
            reuse = fresh and await client.reset()
            return reply
        finally:
            self.pool.release(client, reuse)

    def close(self) -> Any:
        """QUIT the idle connections (a Deferred)."""
        return self.pool.close()
