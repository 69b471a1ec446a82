"""greylist_lite [DELAY [LIFETIME]]: greylisting kept in the server process's memory.

The first time a (client IP, sender, recipient) triplet is seen, the recipient gets a
temporary refusal (450 4.7.1). A real mail server retries later; once DELAY seconds
(default 300) have passed since the first attempt, the triplet is let through, and the
message that gets through first carries an ``X-Greylist`` header saying how long it was
held up. A triplet not seen for LIFETIME seconds (default 14400, four hours) is
forgotten and greylisted afresh.

Clients allowed to relay (``connection.relay_client``, set by the ``relay`` plugin) are
never greylisted. List it in ``config/plugins`` after ``relay`` and *before* ``rcpt_ok``:
``rcpt_ok`` answers OK for local recipients, and a ``rcpt`` hook run stops at the first
plugin that decides::

    relay
    docs.examples.greylist_lite 300
    rcpt_ok
    queue/maildir ./maildir

"Lite" because the list lives in this process only: it is lost on restart and not
shared between several server processes. That shared state sits on ``self`` on purpose;
what belongs to one session goes into ``transaction.notes``.
"""

from __future__ import annotations

import time
from typing import Any

from qpconn import DECLINED, DENYSOFT, Address, Plugin, Transaction
from qpconn.hooks.types import HookResult, Params

Triplet = tuple[str, str, str]

#: transaction.notes key: the longest time a recipient of this message was held up
NOTE = "greylist_waited"


class GreylistLite(Plugin):
    """Temporarily refuses unknown (IP, sender, recipient) triplets."""

    #: the clock deciding how long a triplet has waited (tests replace it)
    clock = staticmethod(time.monotonic)
    #: forget expired triplets at most this often (seconds)
    prune_interval = 60.0

    def register(self, delay: str = "300", lifetime: str = "14400") -> None:
        # A ValueError here stops the server at start-up with the plugins line quoted.
        self.delay = float(delay)
        self.lifetime = float(lifetime)
        if self.delay < 0 or self.lifetime <= self.delay:
            raise ValueError("need 0 <= DELAY < LIFETIME")
        #: triplet -> [time of the first attempt, time of the latest attempt, passed yet?]
        self.seen: dict[Triplet, list[Any]] = {}
        self.last_prune = self.clock()

    def triplet(self, transaction: Transaction, recipient: Address) -> Triplet:
        sender = transaction.sender.address if transaction.sender is not None else ""
        ip = transaction.connection.remote_ip or "unix"
        return ip, sender.lower(), recipient.address.lower()

    def hook_rcpt(self, transaction: Transaction, recipient: Address, params: Params) -> HookResult:
        if transaction.connection.relay_client:
            return DECLINED
        now = self.clock()
        self.prune(now)
        key = self.triplet(transaction, recipient)
        entry = self.seen.get(key)
        if entry is None:
            self.seen[key] = [now, now, False]
            self.log.info("greylisted {triplet}", triplet=key)
            return DENYSOFT, "4.7.1 Greylisted, please try again later"
        first, _, passed = entry
        entry[1] = now
        waited = now - first
        if not passed:
            if waited < self.delay:
                return DENYSOFT, f"4.7.1 Greylisted, try again in {int(self.delay - waited) + 1}s"
            entry[2] = True
            # Per-message state goes into the transaction's notes, never onto self.
            notes = transaction.notes
            notes[NOTE] = max(notes.get(NOTE, 0.0), waited)
        # DECLINED, not OK: rcpt_ok still decides whether we take mail for this address.
        return DECLINED

    def hook_data_post(self, transaction: Transaction) -> HookResult:
        waited = transaction.notes.get(NOTE)
        if waited is not None and transaction.header is not None:
            transaction.header.add("X-Greylist", f"delayed {int(waited)} seconds by greylist_lite")
        # Returning None is DECLINED: the other data_post plugins and the queue carry on.
        return None

    def prune(self, now: float) -> None:
        """Forget triplets whose latest attempt is older than LIFETIME."""
        if now - self.last_prune < self.prune_interval:
            return
        self.last_prune = now
        horizon = now - self.lifetime
        for key in [key for key, (_, last, _) in self.seen.items() if last < horizon]:
            del self.seen[key]
