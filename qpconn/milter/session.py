"""The MTA side of one milter conversation, without I/O: what to send, what may come back.

A milter tells the MTA at option negotiation which steps it does not want (``SMFIP_NO*``:
the step is not sent at all), which replies it will not give (``SMFIP_NR_*``: the step is
sent and the MTA goes on without waiting) and which macros it wants at each stage. This
module keeps those rules in one place:

* :meth:`MilterSession.negotiation` and :meth:`MilterSession.negotiated` open the
  conversation and check the milter's answer (a version we do not speak, or actions we
  did not offer, end it: Postfix does the same);
* :meth:`MilterSession.command` turns a step into the bytes to send (the stage's macros
  first, even when the step itself is skipped, as Postfix sends them) and says whether a
  reply must be awaited;
* :meth:`MilterSession.receive` collects the replies to that step into one
  :class:`Answer`: any number of ``progress`` packets, at the end of the message the
  changes the milter asks for, then exactly one decision. A decision that is not allowed
  after that step (changes before the end of the message, a change whose action was not
  negotiated, a reply nobody asked for) is a :class:`MilterProtocolError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qpconn.milter import codec
from qpconn.milter.codec import Actions, MilterProtocolError, Stage, Steps

__all__ = ["MilterSession", "Answer", "DEFAULT_MACROS", "OFFERED_STEPS", "PROGRESS"]

#: the changes qpconn can make, all offered
OFFERED_ACTIONS = Actions.ALL
#: every step may be skipped and every reply waived; SMFIP_RCPT_REJ is not offered
#: (qpconn does not show a milter the recipients other plugins refused)
OFFERED_STEPS = (
    Steps.NO_CONNECT | Steps.NO_HELO | Steps.NO_MAIL | Steps.NO_RCPT | Steps.NO_BODY
    | Steps.NO_HEADERS | Steps.NO_EOH | Steps.NR_HEADER | Steps.NO_UNKNOWN | Steps.NO_DATA
    | Steps.SKIP | Steps.NR_CONNECT | Steps.NR_HELO | Steps.NR_MAIL | Steps.NR_RCPT
    | Steps.NR_DATA | Steps.NR_UNKNOWN | Steps.NR_EOH | Steps.NR_BODY
    | Steps.HEADER_LEADING_SPACE
)  # fmt: skip

#: the macros sent at each stage unless the milter asks for others (Postfix's defaults,
#: with the client's address, name and port at connect, which milters commonly want)
DEFAULT_MACROS: dict[int, tuple[str, ...]] = {
    Stage.CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "v", "_",
                    "{client_addr}", "{client_name}", "{client_port}", "{client_ptr}"),
    Stage.HELO: ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}",
                 "{cert_issuer}"),
    Stage.MAIL: ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}",
                 "{mail_host}", "{mail_mailer}"),
    Stage.RCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    Stage.DATA: ("i",),
    Stage.EOH: ("i",),
    Stage.EOM: ("i",),
}  # fmt: skip

#: what each step is skipped by, what waives its reply, and its macro stage
_STEPS: dict[type[codec.Message], tuple[int, int, int | None]] = {
    codec.Connect: (Steps.NO_CONNECT, Steps.NR_CONNECT, Stage.CONNECT),
    codec.Helo: (Steps.NO_HELO, Steps.NR_HELO, Stage.HELO),
    codec.Mail: (Steps.NO_MAIL, Steps.NR_MAIL, Stage.MAIL),
    codec.Rcpt: (Steps.NO_RCPT, Steps.NR_RCPT, Stage.RCPT),
    codec.Data: (Steps.NO_DATA, Steps.NR_DATA, Stage.DATA),
    codec.HeaderField: (Steps.NO_HEADERS, Steps.NR_HEADER, None),
    codec.EndOfHeaders: (Steps.NO_EOH, Steps.NR_EOH, Stage.EOH),
    codec.BodyChunk: (Steps.NO_BODY, Steps.NR_BODY, None),
    codec.EndOfMessage: (0, 0, Stage.EOM),
}

#: the action a change needs to have been negotiated
_EDIT_ACTIONS: dict[type[codec.Message], int] = {
    codec.AddHeader: Actions.ADD_HEADERS,
    codec.InsertHeader: Actions.ADD_HEADERS,
    codec.ChangeHeader: Actions.CHANGE_HEADERS,
    codec.ReplaceBody: Actions.CHANGE_BODY,
    codec.AddRecipient: Actions.ADD_RECIPIENTS,
    codec.AddRecipientWithArgs: Actions.ADD_RECIPIENTS_WITH_ARGS,
    codec.DeleteRecipient: Actions.DELETE_RECIPIENTS,
    codec.ChangeSender: Actions.CHANGE_SENDER,
}
_DECISIONS = (codec.Continue, codec.Accept, codec.Reject, codec.Tempfail, codec.Discard,
              codec.ReplyCode, codec.Skip, codec.Shutdown, codec.ConnectionFailure)  # fmt: skip

#: what :meth:`MilterSession.receive` returns for a progress packet: restart the timer
PROGRESS = "progress"


@dataclass(frozen=True)
class Answer:
    """The milter's reply to one step: its decision, and at the end of a message the
    changes it asked for (in order) and the quarantine reason if it asked for one."""

    decision: codec.Message
    edits: tuple[codec.Message, ...] = ()
    quarantine: str | None = None


@dataclass
class _Pending:
    step: type[codec.Message]
    edits: list[codec.Message] = field(default_factory=list)
    quarantine: str | None = None


class MilterSession:
    """One conversation: negotiate, then one step at a time."""

    def __init__(self) -> None:
        self.version = 0
        self.actions = 0
        self.steps = 0
        self.macro_names: dict[int, tuple[str, ...]] = dict(DEFAULT_MACROS)
        self.reader = codec.PacketReader()
        self._pending: _Pending | None = None
        self.negotiating = False
        self._skip_body = False

    # -- negotiation ----------------------------------------------------------------------
    def negotiation(self) -> bytes:
        """The SMFIC_OPTNEG packet that opens the conversation."""
        self.negotiating = True
        return codec.OptionNegotiation(
            codec.PROTOCOL_VERSION, OFFERED_ACTIONS, OFFERED_STEPS
        ).encode()

    def negotiated(self, reply: codec.Message) -> None:
        """Take the milter's answer to SMFIC_OPTNEG; MilterProtocolError if unusable."""
        self.negotiating = False
        if not isinstance(reply, codec.OptionNegotiation):
            raise MilterProtocolError(f"{type(reply).__name__} instead of option negotiation")
        if not 2 <= reply.version <= codec.PROTOCOL_VERSION:
            raise MilterProtocolError(f"protocol version {reply.version} (2 to 6 spoken)")
        if reply.actions & ~OFFERED_ACTIONS:
            raise MilterProtocolError(
                f"actions 0x{reply.actions:x} beyond those offered (0x{OFFERED_ACTIONS:x})"
            )
        self.version, self.actions = reply.version, reply.actions
        self.steps = reply.protocol & OFFERED_STEPS
        # Steps older versions do not know are not sent to them (DATA came with version 4).
        if self.version < 4:
            self.steps |= Steps.NO_DATA
        for stage, names in reply.macros:
            if stage in Stage.NAMES:
                self.macro_names[stage] = tuple(names.split())

    # -- steps ----------------------------------------------------------------------------
    def wants(self, step: type[codec.Message]) -> bool:
        """Whether the milter wants this step sent (it may still want its macros)."""
        skipped_by = _STEPS.get(step, (0, 0, None))[0]
        if step is codec.BodyChunk and self._skip_body:
            return False
        return not self.steps & skipped_by

    def command(
        self, message: codec.Message, macros: Mapping[str, str | None] | None = None
    ) -> tuple[bytes, bool]:
        """The bytes for one step, and whether its reply must be awaited.

        ``macros`` holds every value known at this stage; the ones the milter wants
        (:attr:`macro_names`) that have a value go out first in one SMFIC_MACRO.
        """
        if self._pending is not None or self.negotiating:
            raise RuntimeError("a step is sent while the previous one awaits its reply")
        step = type(message)
        _, waived_by, stage = _STEPS.get(step, (0, 0, None))
        out = b""
        if stage is not None and macros is not None:
            pairs = tuple(
                (name, str(macros[name]))
                for name in self.macro_names.get(stage, ())
                if macros.get(name) is not None
            )
            if pairs:
                out = codec.DefineMacros(message.code, pairs).encode()
        if step is codec.EndOfMessage:
            self._skip_body = False  # SMFIR_SKIP lasts until the end of that message
        elif not self.wants(step):
            return out, False
        out += message.encode()
        if step not in _STEPS or self.steps & waived_by:
            return out, False  # abort and quit never get a reply
        self._pending = _Pending(step)
        return out, True

    @property
    def waiting(self) -> bool:
        """A step was sent and its decision has not come yet."""
        return self._pending is not None or self.negotiating

    # -- replies --------------------------------------------------------------------------
    def receive(self, reply: codec.Message) -> Answer | str | None:
        """Take one reply: the :class:`Answer` once the decision came, :data:`PROGRESS`,
        or None when it was a change (more follows)."""
        pending = self._pending
        if pending is None:
            raise MilterProtocolError(f"{type(reply).__name__} when no reply was due")
        if isinstance(reply, codec.Progress):
            return PROGRESS
        if isinstance(reply, codec.Quarantine):
            self._needs(Actions.QUARANTINE, reply)
            pending.quarantine = reply.reason
            return None
        needed = _EDIT_ACTIONS.get(type(reply))
        if needed is not None:
            if pending.step is not codec.EndOfMessage:
                raise MilterProtocolError(
                    f"{type(reply).__name__} in reply to {pending.step.__name__}: changes "
                    "are allowed only at the end of the message"
                )
            self._needs(needed, reply)
            pending.edits.append(reply)
            return None
        if not isinstance(reply, _DECISIONS):
            raise MilterProtocolError(f"{type(reply).__name__} in reply to a step")
        self._pending = None
        decision: codec.Message = reply
        if isinstance(reply, codec.Skip):
            if pending.step is codec.BodyChunk:
                self._skip_body = True
            decision = codec.Continue()  # nothing else to skip: go on (as Postfix does)
        elif isinstance(reply, codec.Discard) and pending.step in (codec.Connect, codec.Helo):
            decision = codec.Continue()  # there is no message yet to discard
        return Answer(decision, tuple(pending.edits), pending.quarantine)

    def _needs(self, action: int, reply: codec.Message) -> None:
        if not self.actions & action:
            raise MilterProtocolError(
                f"{type(reply).__name__} without negotiating action 0x{action:x}"
            )
