"""dkim: verify DKIM signatures (RFC 6376) on incoming mail, sign mail from our own users.

Verification and signing use dkimpy, the maintained Python DKIM library (also behind
Debian's dkimpy-milter). dkimpy is synchronous and does its own DNS, so both run in the
bounded ``auth`` worker pool (:mod:`qpconn.kit.threads`) with a ``dnsfunc`` that asks the
server's resolver, with the server's DNS timeout, from the reactor. A resolver that
fails gives ``temperror`` for that signature, never a hang.

Incoming mail (neither a relay client nor an authenticated user): every
``DKIM-Signature`` field (at most ``MAX_SIGNATURES``) is verified and each result goes
into ``Authentication-Results`` (``dkim=pass header.d=example.org header.s=sel``;
``dkim=none`` without a signature) and into ``transaction.notes["dkim"]`` for ``dmarc``.
With ``reject 1`` a message whose signatures all fail is refused.

Mail from relay clients and authenticated users is signed, when the config directory has
a key for the domain of its ``From`` address (or a parent domain): ``dkim/<domain>/private``
(a PEM RSA key) and ``dkim/<domain>/selector`` (the selector's name). List ``dkim`` after
the plugins that change signed fields (``From``, ``Subject``, ...).
"""

from __future__ import annotations

import os
import re
from email.utils import getaddresses
from typing import Any

import dkim as dkimpy
from dkim.util import parse_tag_value

from qpconn.hooks.results import DECLINED, DENY, DENYSOFT
from qpconn.hooks.verdicts import record
from qpconn.kit import authresults
from qpconn.kit.policy import parse_options
from qpconn.kit.threads import DNSFunction, dns_bridge, run_in_pool
from qpconn.plugins import Plugin

__all__ = ["DKIM", "NOTE", "MAX_SIGNATURES"]

#: transaction.notes key: one {"result", "domain", "selector", "reason"} per signature
NOTE = "dkim"
#: signatures verified per message; more only cost DNS queries and CPU (RFC 6376 §6.1)
MAX_SIGNATURES = 5
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}\.)*[a-z0-9-]{1,63}\Z")


def message_bytes(transaction: Any) -> bytes:
    """The message as stored (header with the fields added so far, blank line, body)."""
    return b"".join(transaction.message_chunks())


def from_domain(transaction: Any) -> str | None:
    """The domain of the single address in the single ``From`` field, else None."""
    header = transaction.header
    values = header.get_all("From") if header is not None else []
    addresses = [addr for _, addr in getaddresses(values) if addr]
    if len(values) != 1 or len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = addresses[0].rsplit("@", 1)[1].strip().lower().rstrip(".")
    return domain if _DOMAIN.match(domain) else None


def verify_one(lookup: DNSFunction, message: bytes, index: int, timeout: float) -> tuple[str, str]:
    """(result, reason) for signature ``index``; runs in a worker."""
    problems: list[str] = []

    def dnsfunc(name: bytes | str, timeout: float = timeout) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        answer = lookup(text.rstrip("."), "TXT")
        if answer.temporary:
            problems.append(f"temporary: DNS {answer.status} for {text.rstrip('.')}")
            raise dkimpy.DnsTimeoutError(answer.status)
        if answer.status != "ok":
            problems.append(f"permanent: no key at {text.rstrip('.')}")
            return None
        record = str(answer.values[0]).encode("utf-8")
        problem = key_problem(text.rstrip("."), record)
        if problem:
            problems.append(f"permanent: {problem}")
        return record

    try:
        verified = dkimpy.DKIM(message, minkey=1024, timeout=timeout).verify(index, dnsfunc)
    except dkimpy.ValidationError as exc:
        kind = "fail" if "body hash mismatch" in str(exc) else "permerror"
        return kind, str(exc)
    except dkimpy.DKIMException as exc:
        return "permerror", str(exc)
    if verified:
        return "pass", "signature verified"
    for problem in problems:
        kind, _, reason = problem.partition(": ")
        return ("temperror" if kind == "temporary" else "permerror"), reason
    return "fail", "signature did not verify"


def key_problem(name: str, record: bytes) -> str | None:
    """Why the key record at ``name`` is unusable, or None.

    dkimpy only logs a bad key and reports the signature as not verified, which would
    read as ``fail`` (a forgery); a revoked or broken key is a ``permerror`` (RFC 6376
    §6.1.2 step 6: an empty ``p=`` means the key was revoked).
    """
    try:
        tags = parse_tag_value(record)
    except Exception:  # dkimpy raises its own and plain errors for broken tag lists
        return f"unreadable key record at {name}"
    if not tags.get(b"p", b"").strip():
        return f"key at {name} revoked (empty p=)"
    try:
        dkimpy.evaluate_pk(name, record)
    except dkimpy.DKIMException as exc:
        return f"bad key at {name}: {exc}"
    except Exception as exc:  # a malformed key can break the parser in other ways
        return f"bad key at {name}: {exc}"
    return None


def sign(message: bytes, domain: str, selector: str, key: bytes) -> str:
    """The value of a DKIM-Signature field for ``message`` (relaxed/relaxed, rsa-sha256)."""
    field = dkimpy.DKIM(message).sign(
        selector.encode("ascii"), domain.encode("ascii"), key, canonicalize=(b"relaxed", b"relaxed")
    )
    value = field.decode("ascii").split(":", 1)[1].strip()
    return value.replace("\r\n", "\n")


class DKIM(Plugin):
    """Verifies DKIM signatures of incoming mail; signs mail from relay clients and users."""

    def register(self, *args: str) -> None:
        options = parse_options(self.name, args, {"reject": "0"}, {"reject": ("0", "1")})
        self.reject = options["reject"] == "1"

    async def hook_data_post(self, transaction: Any) -> Any:
        conn = transaction.connection
        if conn.relay_client or conn.auth_user:
            return await self.sign_message(transaction)
        return await self.verify_message(transaction)

    # -- verifying --------------------------------------------------------------------
    async def verify_message(self, transaction: Any) -> Any:
        fields = transaction.header.get_all("DKIM-Signature")[:MAX_SIGNATURES]
        found: list[dict[str, str]] = []
        if fields:
            lookup = dns_bridge(self.server)
            message = await run_in_pool("auth", message_bytes, transaction)
            timeout = float(self.server.lookups.dns_timeout or 5.0)
            for index, value in enumerate(fields):
                result, reason = await run_in_pool(
                    "auth", verify_one, lookup, message, index, timeout
                )
                tags = _tags(value)
                found.append({"result": result, "reason": reason, **tags})
        transaction.notes[NOTE] = found
        if not found:
            authresults.record(transaction, "dkim", "none")
        for number, entry in enumerate(found):
            props = {"header.d": entry["domain"], "header.s": entry["selector"]}
            authresults.record(
                transaction, "dkim", entry["result"], entry["reason"], props, replace=number == 0
            )
            record(
                transaction, self.name, entry["result"], f"d={entry['domain']}: {entry['reason']}"
            )
        if not found:
            record(transaction, self.name, "none", "no DKIM-Signature")
        authresults.write_header(transaction, self.server.me)
        results = {entry["result"] for entry in found}
        if self.reject and found and "pass" not in results:
            if "temperror" in results:
                return DENYSOFT, "4.4.3 DKIM signature could not be checked; try again later"
            return DENY, "5.7.20 No passing DKIM signature found"
        return DECLINED

    # -- signing ----------------------------------------------------------------------
    def signing_key(self, domain: str) -> tuple[str, str, bytes] | None:
        """(domain, selector, key) for ``domain`` or its nearest parent with a key."""
        if self.config.directory is None:
            return None
        labels = domain.split(".")
        for start in range(len(labels) - 1):
            candidate = ".".join(labels[start:])
            folder = os.path.join(self.config.directory, "dkim", candidate)
            try:
                with open(os.path.join(folder, "private"), "rb") as handle:
                    key = handle.read()
                with open(os.path.join(folder, "selector"), encoding="ascii") as handle:
                    selector = next(
                        (line.strip() for line in handle if line.strip()[:1] not in ("", "#")), ""
                    )
            except FileNotFoundError:
                continue
            if not selector:
                raise ValueError(f"dkim/{candidate}/selector names no selector")
            return candidate, selector, key
        return None

    async def sign_message(self, transaction: Any) -> Any:
        domain = from_domain(transaction)
        if domain is None:
            record(transaction, self.name, "skip", "no single From domain to sign for")
            return DECLINED
        found = await run_in_pool("auth", self.signing_key, domain)
        if found is None:
            record(transaction, self.name, "skip", f"no key for {domain}")
            return DECLINED
        key_domain, selector, key = found
        message = await run_in_pool("auth", message_bytes, transaction)
        value = await run_in_pool("auth", sign, message, key_domain, selector, key)
        transaction.header.add("DKIM-Signature", value, index=0)
        transaction.notes["dkim_signed"] = {"domain": key_domain, "selector": selector}
        record(transaction, self.name, "signed", f"d={key_domain} s={selector}")
        return DECLINED


def _tags(value: str) -> dict[str, str]:
    """``d=`` (lower case) and ``s=`` of a DKIM-Signature value; empty when unreadable."""
    try:
        tags = parse_tag_value(value.encode("utf-8"))
    except Exception:  # dkimpy raises its own and plain errors for broken tag lists
        tags = {}
    return {
        "domain": tags.get(b"d", b"").decode("ascii", "replace").lower(),
        "selector": tags.get(b"s", b"").decode("ascii", "replace"),
    }
