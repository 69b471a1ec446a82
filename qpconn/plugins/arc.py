"""arc: verify the ARC chain of incoming mail (RFC 8617); seal the mail qpconn forwards.

ARC lets a forwarder vouch for what it saw: each hop adds an ARC set (ARC-Seal,
ARC-Message-Signature, ARC-Authentication-Results), so the final receiver can believe the
first hop's SPF/DKIM results even after a mailing list or a forwarding hop broke them.
Verifying and sealing use dkimpy (as :mod:`qpconn.plugins.dkim` does) in the bounded
``auth`` worker pool, its key lookups sent to the server's resolver
(:func:`qpconn.kit.threads.dns_bridge`), so nothing blocks the reactor and every query
obeys the server's DNS servers and timeout.

Verifying (``data_post``, incoming mail: neither a relay client nor an authenticated
user): the chain's result goes into ``Authentication-Results`` (``arc=pass``, ``arc=fail``
with dkimpy's reason, ``arc=none`` without ARC headers; with ``smtp.remote-ip``) and into
``transaction.notes["arc"]``. A key that cannot be fetched makes the chain fail (RFC 8617
§5.2 knows only pass, fail and none); the reason says so.

Sealing (``queue_pre``, with ``sign selector=S domain=D key=FILE``): once every
``data_post`` plugin has written its results, the message gets the next ARC set, signed
with the key (a PEM RSA key; a relative path is taken from the config directory) and
carrying our ``Authentication-Results`` (the chain's result as ``cv=``). By default
(``seal=forward``) only when the message leaves this host through ``queue/smtp_forward``:
mail delivered here needs no seal, our own header already says what we saw.
``seal=always`` seals every message that was verified. Mail from relay clients and
authenticated users has no results of ours to vouch for and is not sealed (``dkim``
signs it). A seal that cannot be made is logged and the message goes on unsealed.
"""

from __future__ import annotations

import os
import re
from typing import Any

import dkim as dkimpy

from qpconn.hooks.results import DECLINED
from qpconn.hooks.verdicts import record
from qpconn.kit import authresults
from qpconn.kit.threads import DNSFunction, dns_bridge, run_in_pool
from qpconn.plugins import Plugin
from qpconn.plugins.dkim import message_bytes

__all__ = ["ARC", "NOTE", "verify_chain", "seal_fields"]

#: transaction.notes key: {"result", "reason", "instances"} of the chain's verification
NOTE = "arc"
_RESULTS = {dkimpy.CV_Pass: "pass", dkimpy.CV_Fail: "fail", dkimpy.CV_None: "none"}


def verify_chain(lookup: DNSFunction, message: bytes, timeout: float) -> tuple[str, str, int]:
    """(result, reason, number of ARC sets) for the chain of ``message``; runs in a worker."""
    problems: list[str] = []

    def dnsfunc(name: bytes | str, timeout: float = timeout) -> bytes | None:
        text = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).rstrip(".")
        answer = lookup(text, "TXT")
        if answer.status != "ok":
            kind = "temporary DNS failure" if answer.temporary else "no key"
            problems.append(f"{kind} ({answer.status}) at {text}")
            if answer.temporary:
                raise dkimpy.DnsTimeoutError(answer.status)
            return None
        return str(answer.values[0]).encode("utf-8")

    try:
        cv, sets, reason = dkimpy.ARC(message, minkey=1024, timeout=timeout).verify(dnsfunc)
    except dkimpy.DKIMException as exc:  # a malformed set, before any signature is checked
        return "fail", str(exc), 0
    # None: an earlier hop sealed with cv=fail, so the chain ended there (RFC 8617 §5.2)
    result = _RESULTS.get(cv, "fail")
    if result == "fail" and problems:
        reason = f"{reason}; {problems[0]}"
    return result, reason, len(sets)


def seal_fields(
    message: bytes, selector: str, domain: str, key: bytes, authserv_id: str
) -> list[tuple[str, str]]:
    """The next ARC set as (name, value) fields, topmost first; empty when dkimpy declines
    (no Authentication-Results of ours, or a chain without our arc= result)."""
    lines = dkimpy.arc_sign(
        message, selector.encode("ascii"), domain.encode("ascii"), key, authserv_id.encode()
    )
    fields = []
    for line in lines:
        name, _, value = line.decode("ascii").partition(":")
        fields.append((name, value.strip().replace("\r\n", "\n")))
    return fields


def _sign_options(plugin: str, args: tuple[str, ...]) -> dict[str, str] | None:
    """``sign selector=S domain=D key=FILE [seal=forward|always]``, or None without ``sign``."""
    if not args:
        return None
    if args[0] != "sign":
        raise ValueError(f"{plugin}: arguments are 'sign selector=S domain=D key=FILE': {args!r}")
    options = {"seal": "forward"}
    for word in args[1:]:
        key, equals, value = word.partition("=")
        if key not in ("selector", "domain", "key", "seal") or not equals or not value:
            raise ValueError(f"{plugin}: unknown or empty sign option {word!r}")
        options[key] = value
    missing = [name for name in ("selector", "domain", "key") if name not in options]
    if missing:
        raise ValueError(f"{plugin}: sign needs {', '.join(missing)}")
    if options["seal"] not in ("forward", "always"):
        raise ValueError(f"{plugin}: seal must be forward or always, not {options['seal']!r}")
    return options


class ARC(Plugin):
    """Verifies ARC chains of incoming mail; seals forwarded mail when given a key."""

    def register(self, *args: str) -> None:
        options = _sign_options(self.name, args)
        self.signing: tuple[str, str, bytes] | None = None
        self.seal_always = False
        if options is None:
            return
        path = options["key"]
        if not os.path.isabs(path) and self.config.directory is not None:
            path = os.path.join(self.config.directory, path)
        with open(path, "rb") as handle:  # at start-up: a missing key stops the server
            key = handle.read()
        try:
            dkimpy.crypto.parse_pem_private_key(key)
        except dkimpy.crypto.UnparsableKeyError as exc:
            raise ValueError(f"{self.name}: {path} is not a PEM RSA private key: {exc}") from None
        self.signing = (options["selector"], options["domain"].lower(), key)
        self.seal_always = options["seal"] == "always"

    async def hook_data_post(self, transaction: Any) -> Any:
        conn = transaction.connection
        if conn.relay_client or conn.auth_user:
            return DECLINED  # our own users' mail: nothing upstream to judge
        lookup = dns_bridge(self.server)
        message = await run_in_pool("auth", message_bytes, transaction)
        timeout = float(self.server.lookups.dns_timeout or 5.0)
        result, reason, sets = await run_in_pool("auth", verify_chain, lookup, message, timeout)
        transaction.notes[NOTE] = {"result": result, "reason": reason, "instances": sets}
        props = {"smtp.remote-ip": conn.remote_ip} if conn.remote_ip else {}
        authresults.record(transaction, "arc", result, None if result == "none" else reason, props)
        authresults.write_header(transaction, self.server.me)
        record(transaction, self.name, result, f"{sets} ARC sets: {reason}")
        return DECLINED

    def _leaves_by_forwarding(self) -> bool:
        from qpconn.plugins.queue.smtp_forward import SMTPForward

        return any(isinstance(plugin, SMTPForward) for plugin in self.server.plugins)

    async def hook_queue_pre(self, transaction: Any) -> Any:
        if self.signing is None or NOTE not in transaction.notes:
            return DECLINED
        if not (self.seal_always or self._leaves_by_forwarding()):
            return DECLINED
        selector, domain, key = self.signing
        message = await run_in_pool("auth", message_bytes, transaction)
        try:
            fields = await run_in_pool(
                "auth", seal_fields, message, selector, domain, key, self.server.me
            )
        except dkimpy.DKIMException as exc:
            self.log.warn(
                "{conn_id} ARC seal failed: {error}",
                conn_id=transaction.connection.id,
                error=str(exc),
            )
            record(transaction, self.name, "error", f"not sealed: {exc}")
            return DECLINED
        for name, value in reversed(fields):  # each on top: ARC-Seal ends up first
            transaction.header.add(name, value, index=0)
        if not fields:
            record(transaction, self.name, "skip", "dkimpy made no seal (chain ended)")
            return DECLINED
        match = re.search(r"\bi=(\d+)", fields[0][1])
        instance = int(match.group(1)) if match else 0
        transaction.notes["arc_sealed"] = {"domain": domain, "selector": selector, "i": instance}
        record(transaction, self.name, "sealed", f"i={instance} d={domain} s={selector}")
        return DECLINED
