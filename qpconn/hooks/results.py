"""Hook results and the SMTP reply each one gives at each hook.

The numbers are qpsmtpd's, so that logs and habits carry over. The table ``_REPLIES`` is
the single place that says, for instance, that a DENY at ``rcpt`` is ``550 5.7.1 relaying
denied`` while a DENY at ``data_post`` is ``552``: the command handlers only look it up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from qpconn.core.reply import Reply

__all__ = [
    "Result",
    "OK",
    "DENY",
    "DENYSOFT",
    "DECLINED",
    "DONE",
    "DENY_DISCONNECT",
    "DENYSOFT_DISCONNECT",
    "HookOutcome",
    "normalize",
    "reply_for",
    "ERROR_REPLY",
]


class Result(enum.IntEnum):
    """What a plugin says about the stage it hooked; DECLINED passes to the next plugin."""

    OK = 900
    DENY = 901
    DENYSOFT = 902
    DENY_DISCONNECT = 903
    DENYSOFT_DISCONNECT = 904
    DECLINED = 909
    DONE = 910

    @property
    def is_deny(self) -> bool:
        return self in _DENIALS

    @property
    def disconnects(self) -> bool:
        return self in (Result.DENY_DISCONNECT, Result.DENYSOFT_DISCONNECT)


OK = Result.OK
DENY = Result.DENY
DENYSOFT = Result.DENYSOFT
DECLINED = Result.DECLINED
DONE = Result.DONE
DENY_DISCONNECT = Result.DENY_DISCONNECT
DENYSOFT_DISCONNECT = Result.DENYSOFT_DISCONNECT
_DENIALS = frozenset({DENY, DENYSOFT, DENY_DISCONNECT, DENYSOFT_DISCONNECT})


@dataclass(frozen=True, slots=True)
class HookOutcome:
    """The decision a hook run came to, and which plugin made it (None: nobody decided)."""

    result: Result
    message: str | None = None
    plugin: str | None = None
    #: set when the plugin failed (raised, timed out, returned nonsense): the reply is 451.
    error: bool = False


DECLINED_OUTCOME = HookOutcome(DECLINED)
#: (result, plugin) -> the shared outcome without a message (see normalize)
_BARE: dict[tuple[Result, str | None], HookOutcome] = {}


def normalize(value: Any, plugin: str | None = None) -> HookOutcome:
    """Accept what plugin authors naturally return: a Result, (Result, message), or None.

    None counts as DECLINED, so a hook that only looks at things may simply not return.
    Anything else is a programming error and is reported as such by the caller.
    """
    if value is None:
        value = DECLINED
    if isinstance(value, Result):
        # The same few (result, plugin) pairs, over and over: they are immutable, so share.
        key = (value, plugin)
        outcome = _BARE.get(key)
        if outcome is None:
            outcome = HookOutcome(value, None, plugin)
            if len(_BARE) < 4096:  # bounded: plugin names are few, but be safe
                _BARE[key] = outcome
        return outcome
    if isinstance(value, tuple) and value and isinstance(value[0], Result):
        message = value[1] if len(value) > 1 else None
        if isinstance(message, (list, tuple)):
            message = "\n".join(str(part) for part in message)
        elif message is not None:
            message = str(message)
        return HookOutcome(value[0], message, plugin)
    if isinstance(value, int) and value in Result._value2member_map_:
        return HookOutcome(Result(value), None, plugin)
    raise TypeError(f"plugin {plugin!r} returned {value!r}, not a hook result")


# hook -> result -> (code, enhanced code, default text, disconnect)
_Row = tuple[int, str, str, bool]
_CONNECT: dict[Result, _Row] = {
    DENY: (550, "5.7.1", "Connection from you denied, bye bye.", True),
    DENY_DISCONNECT: (550, "5.7.1", "Connection from you denied, bye bye.", True),
    DENYSOFT: (450, "4.7.1", "Connection from you temporarily denied, bye bye.", True),
    DENYSOFT_DISCONNECT: (450, "4.7.1", "Connection from you temporarily denied, bye bye.", True),
}
_HELO: dict[Result, _Row] = {
    DENY: (550, "5.7.1", "HELO/EHLO denied", False),
    DENYSOFT: (450, "4.7.1", "HELO/EHLO temporarily denied", False),
    DENY_DISCONNECT: (550, "5.7.1", "HELO/EHLO denied", True),
    DENYSOFT_DISCONNECT: (421, "4.7.1", "HELO/EHLO temporarily denied", True),
}
_MAIL: dict[Result, _Row] = {
    DENY: (550, "5.7.1", "sender denied", False),
    DENYSOFT: (450, "4.7.1", "sender temporarily denied", False),
    DENY_DISCONNECT: (550, "5.7.1", "sender denied", True),
    DENYSOFT_DISCONNECT: (421, "4.7.1", "sender temporarily denied", True),
}
_RCPT_PRE: dict[Result, _Row] = {
    DENY: (550, "5.7.1", "relaying denied", False),
    DENYSOFT: (450, "4.7.1", "relaying denied", False),
    DENY_DISCONNECT: (550, "5.7.1", "relaying denied", True),
    DENYSOFT_DISCONNECT: (421, "4.7.1", "relaying denied", True),
}
# At rcpt, silence is not consent: with no plugin deciding, the recipient is refused.
_RCPT: dict[Result, _Row] = {
    **_RCPT_PRE,
    DECLINED: (450, "4.7.1", "No plugin decided if relaying is allowed", False),
}
_DATA: dict[Result, _Row] = {
    DENY: (554, "5.7.1", "Message denied", False),
    DENYSOFT: (451, "4.7.1", "Message denied temporarily", False),
    DENY_DISCONNECT: (554, "5.7.1", "Message denied", True),
    DENYSOFT_DISCONNECT: (421, "4.7.1", "Message denied temporarily", True),
}
_MESSAGE: dict[Result, _Row] = {
    DENY: (552, "5.7.1", "Message denied", False),
    DENYSOFT: (452, "4.7.1", "Message denied temporarily", False),
    DENY_DISCONNECT: (552, "5.7.1", "Message denied", True),
    DENYSOFT_DISCONNECT: (421, "4.7.1", "Message denied temporarily", True),
}
# OK at queue has no row: the handler answers 250 with the plugin's text or the queue id.
_QUEUE: dict[Result, _Row] = {
    **_MESSAGE,
    DECLINED: (451, "4.3.0", "Queuing declined or disabled; try again later", False),
}
_UNRECOGNIZED: dict[Result, _Row] = {
    DENY: (500, "5.5.1", "Unrecognized command", False),
    DENYSOFT: (500, "5.5.1", "Unrecognized command", False),
    DENY_DISCONNECT: (521, "5.5.1", "Unrecognized command", True),
    DENYSOFT_DISCONNECT: (421, "4.5.1", "Unrecognized command", True),
    DECLINED: (500, "5.5.1", "Unrecognized command", False),
}
_VRFY: dict[Result, _Row] = {
    DENY: (554, "5.7.1", "Access Denied", False),
    DENYSOFT: (450, "4.7.1", "Access Denied", False),
    DENY_DISCONNECT: (554, "5.7.1", "Access Denied", True),
    DENYSOFT_DISCONNECT: (421, "4.7.1", "Access Denied", True),
    OK: (250, "2.1.5", "User OK", False),
    DECLINED: (252, "2.5.2", "Just try sending a mail and we'll see how it turns out ...", False),
}
_SIMPLE: dict[Result, _Row] = {
    DENY: (500, "5.7.1", "Access denied", False),
    DENYSOFT: (450, "4.7.1", "Access denied", False),
    DENY_DISCONNECT: (550, "5.7.1", "Access denied", True),
    DENYSOFT_DISCONNECT: (421, "4.7.1", "Access denied", True),
}
# AUTH (RFC 4954 §6). OK has no row: the handler answers 235 and records the user. With
# no plugin deciding, the credentials are refused: silence is not consent.
_AUTH: dict[Result, _Row] = {
    DENY: (535, "5.7.8", "Authentication credentials invalid", False),
    DENYSOFT: (454, "4.7.0", "Temporary authentication failure", False),
    DENY_DISCONNECT: (535, "5.7.8", "Authentication credentials invalid", True),
    DENYSOFT_DISCONNECT: (421, "4.7.0", "Temporary authentication failure", True),
    DECLINED: (535, "5.7.8", "Authentication credentials invalid", False),
}
_REPLIES: dict[str, dict[Result, _Row]] = {
    "pre-connection": _CONNECT,
    "connect": _CONNECT,
    "helo": _HELO,
    "ehlo": _HELO,
    "mail_pre": _MAIL,
    "mail": _MAIL,
    "rcpt_pre": _RCPT_PRE,
    "rcpt": _RCPT,
    "data": _DATA,
    "data_headers_end": _MESSAGE,
    "data_post": _MESSAGE,
    "queue_pre": _MESSAGE,
    "queue": _QUEUE,
    "unrecognized_command": _UNRECOGNIZED,
    "vrfy": _VRFY,
    "noop": _SIMPLE,
    "help": _SIMPLE,
    "auth-plain": _AUTH,
    "auth-login": _AUTH,
    "auth-cram-md5": _AUTH,
    "auth": _AUTH,
    # quit: as in qpsmtpd, only DONE (with the reply to send) changes the 221.
}

ERROR_REPLY = (451, "4.3.0", "Internal error - try again later")


def reply_for(hook: str, outcome: HookOutcome) -> tuple[Reply, bool] | None:
    """The reply a hook's outcome gives, and whether to disconnect after it.

    None means the outcome does not decide the reply at this hook (e.g. OK at ``mail``:
    the command handler then gives its own success reply). A plugin's message replaces
    the default text; an enhanced code at its start replaces the default one.

    DONE with a message is a whole reply the plugin wrote ("CODE text"); the command's
    effect then follows that code as with any other reply (a 2xx to MAIL sets the
    sender). DONE without a message stops the plugin chain and counts as OK.
    """
    if outcome.error:
        code, enhanced, text = ERROR_REPLY
        return Reply(code, text, enhanced), hook in ("connect", "pre-connection")
    result = outcome.result
    if result is DONE:
        if outcome.message:
            return Reply.parse_line(outcome.message, 250), False
        result = OK
    row = _REPLIES.get(hook, {}).get(result)
    if row is None:
        return None
    code, enhanced, text, close = row
    return Reply(code, outcome.message or text, enhanced), close
