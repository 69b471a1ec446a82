"""sender_permitted_from: SPF (RFC 7208) for the envelope sender, as qpsmtpd's plugin.

Why pyspf: it is the reference Python implementation (maintained by an author of the
SPF RFCs' test suite, used by Debian's postfix-policyd-spf-python), and implements what a
receiver needs exactly: macros, ``exp=``, the processing limits (10 DNS-querying terms,
2 void lookups: "too many lookups" is a permerror) and every result. checkdmarc's engine
is built to audit a domain's records, not to give a receiver's verdict for one client.

pyspf is synchronous and asks DNS itself. The check runs in the bounded ``auth`` worker
pool (:mod:`qpconn.kit.threads`) and pyspf's DNS function is replaced by a dispatcher: in our
workers it sends every question back to the reactor, to the server's resolver with the
server's DNS timeout; anywhere else in the process pyspf keeps its own behaviour. A
resolver that fails or times out gives ``temperror``, never a hang: each question is
bounded, and so is the whole check (``timeout``, 20 s by default, RFC 7208 §4.6.4).

The verdict is taken at ``mail`` (pyspf needs only the client's IP, the sender and the
HELO name); the result goes into ``Authentication-Results`` at ``data_post``.
"""

from __future__ import annotations

import threading
from typing import Any

import spf

from qpconn.hooks.results import DECLINED, DENY, DENYSOFT, Result
from qpconn.hooks.verdicts import record
from qpconn.kit import authresults
from qpconn.kit.dns import TYPES
from qpconn.kit.policy import parse_options
from qpconn.kit.threads import DNSFunction, dns_bridge, run_in_pool
from qpconn.mail.address import Address
from qpconn.plugins import Plugin

__all__ = ["SenderPermittedFrom", "NOTE"]

#: transaction.notes key: {"result", "identity", "domain", "explanation"}
NOTE = "spf"

_local = threading.local()
_original_lookup = spf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """pyspf's ``DNSLookup``: our workers' lookup when one is set for this thread."""
    lookup = getattr(_local, "lookup", None)
    if lookup is None:
        return _original_lookup(name, qtype, strict, timeout)  # type: ignore[no-any-return]
    return _answers(lookup, name, qtype)


spf.DNSLookup = _dispatch


def _answers(lookup: DNSFunction, name: str, qtype: str) -> list[Any]:
    """One question in the shape pyspf expects: ``[((name, type), value), ...]``."""
    if qtype not in TYPES:  # type 99 (SPF) is only asked in pyspf's "harsh" mode
        return []
    answer = lookup(name, qtype)
    if answer.temporary:
        raise spf.TempError(f"DNS {answer.status} for {name} {qtype}")
    if answer.status != "ok":
        return []
    if qtype == "TXT":
        return [((name, qtype), (value.encode("utf-8"),)) for value in answer.values]
    return [((name, qtype), value) for value in answer.values]


#: (level from which the result refuses, result, enhanced code, text); RFC 7372 codes
_POLICY: tuple[tuple[int, str, Result, str], ...] = (
    (2, "temperror", DENYSOFT, "4.7.24 SPF temporary error"),
    (3, "fail", DENY, "5.7.23 SPF fail"),
    (4, "permerror", DENY, "5.7.24 SPF permanent error"),
    (6, "softfail", DENY, "5.7.23 SPF softfail"),
    (5, "softfail", DENYSOFT, "4.7.23 SPF softfail"),
)


class SenderPermittedFrom(Plugin):
    """SPF check at ``mail``; ``reject 0..6`` chooses which results refuse."""

    def register(self, *args: str) -> None:
        options = parse_options(
            self.name,
            args,
            {"reject": "1", "timeout": "20"},
            {"reject": tuple("0123456")},
            numbers=["timeout"],
        )
        self.reject = int(options["reject"])
        self.querytime = float(options["timeout"])
        if self.querytime <= 0:
            raise ValueError("timeout must be positive")
        # the hook may take the whole check plus the last question's own timeout
        self.timeout = self.querytime + 10

    def check(self, lookup: DNSFunction, ip: str, sender: str, helo: str) -> tuple[str, str]:
        """In a worker: pyspf's (result, explanation), its DNS going to ``lookup``."""
        _local.lookup = lookup
        try:
            query = spf.query(
                i=ip,
                s=sender,
                h=helo,
                receiver=self.server.me,
                timeout=self.querytime,
                querytime=self.querytime,
            )
            result, _code, explanation = query.check()
        finally:
            _local.lookup = None
        return str(result), str(explanation)

    async def hook_mail(self, transaction: Any, sender: Any, params: Any) -> Any:
        conn = transaction.connection
        if conn.relay_client or conn.auth_user:
            record(
                transaction, self.name, "skip", "relay client or authenticated user", stage="mail"
            )
            return DECLINED
        if not conn.remote_ip:
            return DECLINED
        helo = conn.hello_host or ""
        if sender.is_null:
            identity, domain, address = "helo", helo, helo
        else:
            # SMTPUTF8: SPF works on the A-label domain (what DNS holds).
            ascii_host = (sender.host_ascii or "").lower()
            address = Address(sender.user, ascii_host).address if ascii_host else sender.address
            identity, domain = "mailfrom", ascii_host
        bridge = dns_bridge(self.server)
        result, explanation = await run_in_pool(
            "auth", self.check, bridge, conn.remote_ip, "" if sender.is_null else address, helo
        )
        transaction.notes[NOTE] = {
            "result": result,
            "identity": identity,
            "domain": domain.lower(),
            "explanation": explanation,
        }
        prop = "smtp.mailfrom" if identity == "mailfrom" else "smtp.helo"
        authresults.record(transaction, "spf", result, explanation or None, {prop: address})
        reason = explanation or f"{identity} {domain}"
        for level, refused, decision, text in _POLICY:
            if self.reject >= level and result == refused:
                action = "reject" if decision is DENY else "tempfail"
                record(transaction, self.name, result, reason, stage="mail", action=action)
                detail = f": {explanation}" if explanation else ""
                return decision, f"{text} for {domain}{detail}"
        record(transaction, self.name, result, reason, stage="mail", action="accept")
        return DECLINED

    def hook_data_post(self, transaction: Any) -> None:
        if NOTE in transaction.notes:
            authresults.write_header(transaction, self.server.me)
