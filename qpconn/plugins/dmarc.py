"""dmarc: DMARC (RFC 7489) for the domain in ``From``, from the SPF and DKIM results.

List it after ``sender_permitted_from`` and ``dkim``: it reads their results
(``transaction.notes["spf"]`` and ``["dkim"]``) at ``data_post``, so it asks DNS for one
thing only, the policy record ``_dmarc.<From domain>`` (else ``_dmarc.<organizational
domain>``, RFC 7489 §6.6.3), through the server's resolver and DNS timeout.

The message passes when SPF passed for a domain *aligned* with the From domain, or a DKIM
signature passed for one (``aspf``/``adkim``: ``r`` relaxed, the same organizational
domain, the default; ``s`` strict, the same name). Organizational domains come from the
Public Suffix List (:mod:`qpconn.kit.psl`; setting ``public_suffix_list``).

When it fails, the policy decides (``sp=`` for a subdomain whose record is the
organizational domain's, ``pct=`` samples):

* ``p=reject``: ``550 5.7.1`` (with ``reject 1``, the default; ``reject 0`` only records);
  a message left out of the ``pct`` sample is quarantined instead (§6.6.4);
* ``p=quarantine``: accepted, with ``X-Quarantine: DMARC policy of <domain>`` on top and
  ``transaction.notes["quarantine"]`` set, for the queue or a filter to file it as spam;
* ``p=none``: accepted.

A policy lookup that fails (timeout, SERVFAIL) gives ``dmarc=temperror`` and, with
``reject 1``, ``452 4.7.1`` when the message would fail; no record, several records or a
record without a valid ``p=`` mean no DMARC policy (``dmarc=none``). Every outcome goes
into ``Authentication-Results`` (``dmarc=fail header.from=example.org``) and is recorded
as a verdict. Relay clients and authenticated users are not checked.

An internationalized From domain (``a@bücher.example``, RFC 6532) is checked in its
A-label form (``xn--bcher-kva.example``), as DNS knows it (RFC 8616 §5); SPF and DKIM
domains are compared in that form too, and replies and ``Authentication-Results`` name
the A-label form, which any client can read.

Arguments: ``reject 1|0``.
"""

from __future__ import annotations

import random
import re
from email.utils import getaddresses
from typing import Any

from qpconn.hooks.results import DECLINED, DENYSOFT, DONE
from qpconn.hooks.verdicts import record
from qpconn.kit import authresults, psl
from qpconn.kit.policy import ask, parse_options
from qpconn.mail.address import Address, AddressError
from qpconn.plugins import Plugin

__all__ = ["Dmarc", "NOTE", "parse_record", "aligned", "ascii_domain", "author_domain"]

#: transaction.notes key: {"result", "domain", "policy", "disposition", "reason"}
NOTE = "dmarc"
QUARANTINE_FIELD = "X-Quarantine"
_POLICIES = ("none", "quarantine", "reject")
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}\.)*[a-z0-9-]{1,63}\Z")


def ascii_domain(domain: str) -> str | None:
    """``domain`` lower-cased, with U-labels turned into A-labels; None if it is no
    valid domain name. DNS, and the SPF and DKIM results, only know the A-label form."""
    domain = domain.strip().rstrip(".")
    try:
        converted = Address("x", domain).host_ascii if domain else None
    except AddressError:
        return None
    if converted is None:
        return None
    converted = converted.lower()
    labels_ok = all(converted.split("."))
    return converted if labels_ok and _DOMAIN.match(converted) else None


def author_domain(transaction: Any) -> str | None:
    """The domain of the single address in the single ``From`` field, in A-label form."""
    header = transaction.header
    values = header.get_all("From") if header is not None else []
    addresses = [addr for _, addr in getaddresses(values) if addr]
    if len(values) != 1 or len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return ascii_domain(addresses[0].rsplit("@", 1)[1])


def parse_record(text: str) -> dict[str, str] | None:
    """The tags of a DMARC record, or None when it is not one with a valid ``p=``."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or not text.strip().startswith("v"):
        return None
    if tags.get("p", "").lower() not in _POLICIES:
        return None
    return tags


def aligned(domain: str, author: str, mode: str, suffixes: psl.SuffixList) -> bool:
    """Whether an authenticated ``domain`` aligns with the From ``author`` domain."""
    domain, author = ascii_domain(domain) or "", ascii_domain(author) or ""
    if not domain or not author:
        return False
    if mode == "s":
        return domain == author
    return suffixes.organizational_domain(domain) == suffixes.organizational_domain(author)


class Dmarc(Plugin):
    """Applies the From domain's DMARC policy at ``data_post``."""

    def register(self, *args: str) -> None:
        options = parse_options(self.name, args, {"reject": "1"}, {"reject": ("0", "1")})
        self.reject = options["reject"] == "1"
        self.psl_path = self.config.get("public_suffix_list") or psl.DEFAULT_PATH
        self.random = random.Random()

    def attach(self, server: Any) -> None:
        super().attach(server)
        if psl.load(self.psl_path).rules is None:
            self.log.warn(
                "dmarc: no Public Suffix List at {path}; organizational domains are the last"
                " two labels",
                path=self.psl_path,
            )

    async def _policy(self, domain: str, suffixes: psl.SuffixList) -> tuple[str, Any, str]:
        """("ok", tags, where) or ("none"|"temperror", None, where)."""
        names = [domain]
        org = suffixes.organizational_domain(domain)
        if org and org != domain:
            names.append(org)
        for name in names:
            answer = await ask(self.server, f"_dmarc.{name}", "TXT")
            if answer.temporary:
                return "temperror", None, name
            found = [str(v) for v in answer.values if str(v).lower().startswith("v=dmarc1")]
            if answer.status == "ok" and found:
                if len(found) > 1:  # §6.6.3: several records mean no policy
                    return "none", None, name
                tags = parse_record(found[0])
                return ("ok", tags, name) if tags else ("none", None, name)
        return "none", None, domain

    async def hook_data_post(self, transaction: Any) -> Any:
        conn = transaction.connection
        if conn.relay_client or conn.auth_user:
            record(transaction, self.name, "skip", "relay client or authenticated user")
            return DECLINED
        author = author_domain(transaction)
        if author is None:
            record(transaction, self.name, "skip", "no single From domain")
            return DECLINED
        suffixes = psl.load(self.psl_path)
        status, tags, where = await self._policy(author, suffixes)
        props = {"header.from": author}
        if status != "ok":
            transaction.notes[NOTE] = {"result": status, "domain": author}
            authresults.record(transaction, "dmarc", status, None, props)
            authresults.write_header(transaction, self.server.me)
            record(transaction, self.name, status, f"no usable policy for {author}")
            failing = not self._passes(transaction, author, None, suffixes)
            if status == "temperror" and self.reject and failing:
                return DENYSOFT, f"4.7.1 DMARC policy of {author} could not be found; try later"
            return DECLINED
        passed = self._passes(transaction, author, tags, suffixes)
        policy = tags["p"].lower()
        if where != author and "sp" in tags and tags["sp"].lower() in _POLICIES:
            policy = tags["sp"].lower()
        disposition = "none"
        if not passed:
            disposition = policy
            if policy != "none" and not self._sampled(tags):
                disposition = "quarantine" if policy == "reject" else "none"
        result = "pass" if passed else "fail"
        reason = f"p={policy}" + ("" if passed else f" disposition={disposition}")
        transaction.notes[NOTE] = {
            "result": result, "domain": author, "policy": policy, "disposition": disposition,
            "reason": reason,
        }  # fmt: skip
        authresults.record(transaction, "dmarc", result, reason, props)
        authresults.write_header(transaction, self.server.me)
        if disposition == "reject" and self.reject:
            record(transaction, self.name, "fail", reason, action="reject", domain=author)
            # a whole reply: DENY at data_post would be 552, "storage exceeded"
            return DONE, f"550 5.7.1 Unauthenticated mail from {author} refused by its DMARC policy"
        if disposition == "quarantine":
            transaction.notes["quarantine"] = f"DMARC policy of {author}"
            transaction.header.add(QUARANTINE_FIELD, f"DMARC policy of {author}", index=0)
        action = "quarantine" if disposition == "quarantine" else "accept"
        record(transaction, self.name, result, reason, action=action, domain=author)
        return DECLINED

    @staticmethod
    def _passes(transaction: Any, author: str, tags: Any, suffixes: psl.SuffixList) -> bool:
        """An aligned SPF pass or an aligned DKIM pass (RFC 7489 §4.2)."""
        tags = tags or {}
        aspf = tags.get("aspf", "r").lower()
        adkim = tags.get("adkim", "r").lower()
        spf = transaction.notes.get("spf") or {}
        if spf.get("result") == "pass" and aligned(spf.get("domain", ""), author, aspf, suffixes):
            return True
        for entry in transaction.notes.get("dkim") or ():
            if entry.get("result") == "pass" and aligned(entry["domain"], author, adkim, suffixes):
                return True
        return False

    def _sampled(self, tags: dict[str, str]) -> bool:
        try:
            pct = int(tags.get("pct", "100"))
        except ValueError:
            pct = 100
        return pct >= 100 or self.random.randrange(100) < max(0, pct)
