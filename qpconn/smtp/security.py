"""STARTTLS (RFC 3207) and AUTH (RFC 4954) command handlers, one part of SMTPCommands.

Like :mod:`qpconn.smtp.commands`, nothing here touches a socket. The session core decides when
these commands are legal and what a reply does to the state (a 220 to STARTTLS drops all
buffered input, a 334 to AUTH makes the next line a SASL response); this module decides
the replies: what is offered (EHLO), what each mechanism asks for, which hook judges the
credentials, and how the session starts over once TLS is up. The adapter
(:mod:`qpconn.server.tls`) does the TLS handshake itself and then calls
:meth:`TLSAuthCommands.tls_established`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qpconn.config import ConfigError
from qpconn.core import sasl as auth
from qpconn.core.reply import Reply
from qpconn.hooks.results import DECLINED, reply_for
from qpconn.mail.received import header_safe
from qpconn.smtp.context import CommandContext, HandlerResult

if TYPE_CHECKING:
    from qpconn.config import Config

__all__ = ["SecuritySettings", "TLSAuthCommands", "read_security_settings"]

_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})


def _flag(name: str, value: str | None, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}: {value!r} is not 1 or 0 (yes/no)")


@dataclass(frozen=True)
class SecuritySettings:
    """What a server offers and demands; shared by every session of a factory."""

    #: the TLS context for STARTTLS (a :class:`qpconn.server.tlscontext.ServerTLS` from
    #: ``tls_cert``/``tls_key``, or anything ``startTLS`` takes); None: not offered
    tls: Any = None
    #: MAIL before TLS is refused with 530 (config ``tls_required``)
    tls_required: bool = False
    #: AUTH only once the session is encrypted (config ``tls_before_auth``, qpsmtpd's name)
    tls_before_auth: bool = True
    #: failed AUTH attempts per session before 421 and a close; 0: no limit
    auth_max_failures: int = 3


def read_security_settings(config: Config, tls: Any = None) -> SecuritySettings:
    """The settings from the config directory (the TLS context is built by the caller)."""
    failures = config.get_int("auth_max_failures", 3)
    if failures < 0:
        raise ConfigError(f"auth_max_failures: {failures} is negative")
    return SecuritySettings(
        tls=tls,
        tls_required=_flag("tls_required", config.get("tls_required"), False),
        tls_before_auth=_flag("tls_before_auth", config.get("tls_before_auth"), True),
        auth_max_failures=failures,
    )


class TLSAuthCommands(CommandContext):
    """The handlers; see the module docstring."""

    _sasl_exchange: auth.Exchange | None = None
    _auth_failures = 0

    # -- what is offered ----------------------------------------------------------------
    def auth_mechanisms(self) -> list[str]:
        """Mechanisms some plugin can judge: its own ``auth-<mech>`` hook, or ``auth``."""
        return list(self.runner.auth_mechanisms)

    def auth_usable(self) -> bool:
        """AUTH may be used now: encrypted, or ``tls_before_auth`` is off."""
        return self.session.tls_active or not self.security.tls_before_auth

    def tls_auth_ehlo_lines(self) -> list[str]:
        """STARTTLS until the session is encrypted; AUTH where it may be used."""
        lines = []
        if self.security.tls is not None and not self.session.tls_active:
            lines.append("STARTTLS")
        mechanisms = self.auth_mechanisms()
        if mechanisms and self.auth_usable() and not self.session.authenticated:
            lines.append("AUTH " + " ".join(mechanisms))
        return lines

    def tls_refusal_for_mail(self) -> Reply | None:
        """530 for MAIL in clear text when ``tls_required`` is set (RFC 3207 §4)."""
        if self.security.tls_required and not self.session.tls_active:
            return Reply(530, "5.7.0 Must issue a STARTTLS command first")
        return None

    # -- STARTTLS -------------------------------------------------------------------------
    async def smtp_STARTTLS(self, arg: str) -> HandlerResult:
        """220, and the core drops everything after this line; the adapter then handshakes."""
        if self.security.tls is None:
            return await self.unrecognized_command("STARTTLS", arg)
        return Reply(220, "2.0.0 Ready to start TLS")

    def tls_established(self, details: dict[str, str]) -> None:
        """The handshake is done. After STARTTLS, forget everything from before it.

        The session continues with ``connection.clone()`` (the pre-TLS one is reset), as
        qpsmtpd's tls plugin does: HELO/EHLO, AUTH and any notes a plugin set on the old
        transaction are gone; the addresses, ``relay_client`` and the connection notes
        carry over. The id stays, so the log lines of one TCP connection stay together.
        With implicit TLS (before the greeting) only ``connection.tls`` is set.
        """
        from qpconn.core.session import State

        session = self.session
        if session.state is not State.GREETING:
            old = self.connection
            new = old.clone()
            new.id = old.id
            self.connection = new
            self.transaction.close()
            self.transaction = self.new_transaction()
            self._sasl_exchange = None
            self._verdict = None
        self.connection.tls = details
        session.tls_started()
        self.log.info(
            "{conn_id} TLS established: {version} {cipher}",
            version=details.get("version", "?"),
            cipher=details.get("cipher", "?"),
            **self.log_context(),
        )

    # -- AUTH -----------------------------------------------------------------------------
    async def smtp_AUTH(self, arg: str) -> HandlerResult:
        """Start a SASL exchange: 334 with a challenge, or the verdict at once."""
        mechanisms = self.auth_mechanisms()
        if not mechanisms:
            return await self.unrecognized_command("AUTH", arg)
        if not self.auth_usable():
            return Reply(538, "5.7.11 Encryption required for requested authentication mechanism")
        name, _, initial = arg.partition(" ")
        name = name.upper()
        if name not in mechanisms:
            return Reply(504, "5.5.4 Unrecognized authentication type")
        exchange = auth.start(name, self.me)
        try:
            result = exchange.first(initial.strip(" ") or None)
        except auth.SaslFailure as failure:
            return self._sasl_failed(failure, name)
        return await self._sasl_next(exchange, result)

    async def auth_response(self, data: str) -> HandlerResult:
        """The client's answer to a 334 challenge (an AuthResponse event)."""
        exchange, self._sasl_exchange = self._sasl_exchange, None
        if exchange is None:
            return Reply(503, "5.5.1 Error: no AUTH in progress")
        try:
            result = exchange.step(data)
        except auth.SaslFailure as failure:
            return self._sasl_failed(failure, exchange.mechanism)
        return await self._sasl_next(exchange, result)

    async def _sasl_next(
        self, exchange: auth.Exchange, result: bytes | auth.Credentials
    ) -> HandlerResult:
        if isinstance(result, bytes):
            self._sasl_exchange = exchange
            return Reply(334, auth.challenge_text(result))
        return await self.authenticate(result)

    async def authenticate(self, credentials: auth.Credentials) -> HandlerResult:
        """``auth-<mechanism>``, then ``auth`` if it declined; OK gives 235."""
        args = (
            credentials.mechanism,
            credentials.user,
            credentials.password,
            credentials.response,
            credentials.ticket,
        )
        hook = f"auth-{credentials.mechanism.lower()}"
        outcome = await self.run_hook(hook, *args)
        if outcome.result is DECLINED and not outcome.error:
            hook = "auth"
            outcome = await self.run_hook(hook, *args)
        decided = reply_for(hook, outcome)
        if decided is None or decided[0].code == 235:
            conn = self.connection
            conn.auth_user = credentials.user
            conn.auth_mechanism = credentials.mechanism
            self.log.info(
                "{conn_id} AUTH {mechanism} succeeded for {user} by {plugin}",
                mechanism=credentials.mechanism,
                user=header_safe(credentials.user, 128),
                plugin=outcome.plugin,
                **self.log_context(),
            )
            return decided or Reply(235, "2.7.0 Authentication successful")
        return self._auth_refused(credentials.mechanism, credentials.user, *decided)

    def _sasl_failed(self, failure: auth.SaslFailure, mechanism: str) -> HandlerResult:
        """A failure of the exchange itself (cancelled, bad base64, malformed)."""
        reply = Reply(failure.code, failure.text)
        if failure.code == 535:
            return self._auth_refused(mechanism, None, reply, False)
        self.log.info(
            "{conn_id} AUTH {mechanism} ended: {code} {text}",
            mechanism=mechanism,
            code=reply.code,
            text=reply.text,
            **self.log_context(),
        )
        return reply

    def _auth_refused(
        self, mechanism: str, user: str | None, reply: Reply, close: bool
    ) -> HandlerResult:
        """Count a permanent refusal; past ``auth_max_failures`` the session ends (421)."""
        if reply.code >= 500:
            self._auth_failures += 1
        limit = self.security.auth_max_failures
        self.log.info(
            "{conn_id} AUTH {mechanism} failed for {user}: {code} ({failures} failures)",
            mechanism=mechanism,
            user=header_safe(user or "-", 128),
            code=reply.code,
            failures=self._auth_failures,
            **self.log_context(),
        )
        if limit and self._auth_failures >= limit and not close:
            self.log.info(
                "{conn_id} closing after {failures} failed AUTH attempts",
                failures=self._auth_failures,
                **self.log_context(),
            )
            return Reply(421, "4.7.0 Too many failed authentication attempts"), True
        return reply, close
