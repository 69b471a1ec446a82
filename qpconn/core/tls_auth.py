"""The session core's rules for STARTTLS (RFC 3207) and AUTH (RFC 4954).

Mixed into :class:`qpconn.core.session.ServerSession` (kept apart only so that module
stays short); like the rest of the core it does no I/O. What it guarantees:

* a ``220`` reply to STARTTLS drops every byte buffered after the STARTTLS line and
  every byte received until :meth:`TLSAuthRules.tls_started`: clear text a client (or a
  man in the middle) sent after asking for encryption is never interpreted
  (CVE-2011-0411, the bug aiosmtpd and Twisted's own server had). Then the session starts
  over: no HELO/EHLO, no AUTH, no transaction.
* a ``334`` reply to AUTH makes the next line an :class:`~qpconn.core.events.AuthResponse`,
  not a command, framed with the command rules (CRLF, no NUL, a length limit) but with
  RFC 4954's longer limit (``Limits.auth_line``). Credentials never appear in a
  ``ProtocolError``.
* STARTTLS once encrypted and AUTH once authenticated are refused with 503.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qpconn.core.buffer import take_line
from qpconn.core.events import AuthResponse, Command, Event, ProtocolError

if TYPE_CHECKING:
    from qpconn.core.session import Limits, State

__all__ = ["TLSAuthRules", "frame_response", "OVERFLOW"]

#: The refusal for an unfinished response already past the limit: the buffer has been
#: cleared, and the caller must discard the rest of the line as it arrives.
OVERFLOW = (500, "5.5.2 Line too long")


def frame_response(buf: bytearray, limit: int) -> AuthResponse | tuple[int, str] | None:
    """Take one SASL response line from ``buf``: the event, a refusal (code, text), or None.

    None means no whole line is buffered yet and the buffer is within ``limit``. A refusal
    ends the SASL exchange (the core sends it in place of the application's reply);
    :data:`OVERFLOW` means memory was about to grow past the limit (see there). Responses
    are base64 or ``*``, so anything not ASCII is refused here.
    """
    line = take_line(buf)
    if line is None:
        if len(buf) <= limit:
            return None
        buf.clear()
        return OVERFLOW
    if len(line) > limit:
        return 500, "5.5.2 Line too long"
    if len(line) < 2 or line[-2] != 13:
        return 500, "5.5.2 Bare LF received; lines must end with CRLF"
    body = line[:-2]
    if 0 in body:  # NUL (an int is looked for with memchr)
        return 500, "5.5.2 NUL character in response"
    if 13 in body:  # CR
        return 500, "5.5.2 Bare CR in response"
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return 501, "5.5.2 Cannot decode response"
    return AuthResponse(text.strip(" "))


def _states() -> type[State]:
    # Imported late: session.py imports this module while defining State.
    from qpconn.core.session import State

    return State


class TLSAuthRules:
    """STARTTLS and SASL state of a session; see the module docstring."""

    # Provided by ServerSession.
    state: State
    limits: Limits
    esmtp: bool
    rcpt_attempts: int
    _buf: bytearray
    _discarding: bool
    _pending: object
    #: the next line answers a 334 SASL challenge (an AuthResponse, not a command)
    _sasl: bool = False
    #: the session is encrypted (STARTTLS done, or implicit TLS): see tls_started()
    tls_active: bool = False
    #: a 235 reply to AUTH was sent (since the last TLS start)
    authenticated: bool = False

    def _protocol_error(self, code: int, text: str, line: bytes) -> ProtocolError:
        raise NotImplementedError  # ServerSession's

    def tls_started(self) -> None:
        """The TLS handshake is done: from here the session is encrypted.

        After STARTTLS the session starts over (RFC 3207 §4.2): no HELO/EHLO, no AUTH,
        and nothing buffered from before the handshake. With implicit TLS (called
        before the greeting) only ``tls_active`` changes.
        """
        State = _states()
        if self.state is State.GREETING:
            self.tls_active = True
            return
        if self.state is not State.STARTTLS:
            from qpconn.core.session import SessionError

            raise SessionError("tls_started() without a 220 reply to STARTTLS")
        self._buf = bytearray()
        self._discarding = self._sasl = False
        self.state = State.INIT
        self.esmtp = self.authenticated = False
        self.rcpt_attempts = 0
        self.tls_active = True

    def _line_budget(self, buf: bytearray) -> int:
        """How long an unfinished command line may grow before it is refused."""
        if buf[:5].upper() == b"AUTH ":
            return max(self.limits.auth_line, self.limits.command_line)
        return self.limits.command_line + self.limits.parameter_allowance

    def _tls_auth_refusal(self, verb: str, line: bytes) -> ProtocolError | None:
        """STARTTLS once TLS is on, AUTH once authenticated, either out of place: 503."""
        if verb not in ("STARTTLS", "AUTH"):
            return None
        State = _states()
        if verb == "STARTTLS" and self.tls_active:
            return self._protocol_error(503, "5.5.1 Error: TLS already active", line)
        if verb == "AUTH" and self.authenticated:
            return self._protocol_error(503, "5.5.1 Error: already authenticated", line)
        if self.state in (State.MAIL, State.RCPT):
            return self._protocol_error(503, "5.5.1 Error: MAIL transaction in progress", line)
        if self.state is State.INIT:
            return self._protocol_error(503, "5.5.1 Error: send EHLO first", line)
        return None

    def _next_sasl_event(self) -> Event | None:
        """The line answering a 334 challenge, as an AuthResponse (or the core's refusal)."""
        found = frame_response(self._buf, self.limits.auth_line)
        if found is None:
            return None
        self._sasl = False  # one line per challenge; another 334 asks for the next
        if isinstance(found, AuthResponse):
            self._pending = found
            return found
        if found is OVERFLOW:
            self._discarding = True  # the rest of the line goes, as for a command
        return self._protocol_error(*found, b"")  # never the line: it carries credentials

    def _tls_auth_transition(self, pending: Command | AuthResponse, code: int) -> bool:
        """The state change a reply to STARTTLS, AUTH or a SASL response makes.

        220 to STARTTLS drops everything buffered (the client's pipelined clear text) and
        ignores all input until ``tls_started()``. 334 makes the next line a response;
        235 marks the session authenticated. True when ``pending`` was one of these.
        """
        if isinstance(pending, AuthResponse) or pending.verb == "AUTH":
            self._sasl = code == 334
            if code == 235:
                self.authenticated = True
            return True
        if pending.verb == "STARTTLS":
            if code == 220:
                self.state = _states().STARTTLS
                self._buf = bytearray()
                self._discarding = False
            return True
        return False
