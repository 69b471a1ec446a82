"""A milter's end-of-message changes, applied to the Transaction before the queue runs.

The changes come in the order the milter sent them and are applied in that order, after
all of them were checked: a change qpconn cannot make (a header name with a colon, a
value with a line break that is not a fold, an address that does not parse) fails the
whole answer as a protocol error, so a message is never left half changed.

What each change does, with the protocol's numbering (Sendmail's and Postfix's):

* add header: a field at the end of the header;
* insert header ``index``: a field at position ``index`` among all fields (0: on top; past
  the end: at the end);
* change header ``name`` ``index``: the ``index``-th field of that name (1-based; 0 taken
  as 1, as Postfix does) gets the value; an empty value removes it; an index past the
  last such field adds one at the end;
* replace body: the pieces, concatenated, become the body (line ends made CRLF);
* add recipient (with or without ESMTP arguments), delete recipient: the envelope's
  recipient list;
* change sender: the envelope sender, and its MAIL parameters when the milter gave some
  (without, the old ones stay: ``SIZE``, ``BODY`` and ``SMTPUTF8`` still describe the
  message).

The milter sees (and numbers) the header as qpconn holds it when the milter runs: with
the server's own ``Received`` field on top, unlike Postfix, which hides its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from qpconn.mail.address import Address, AddressError, parse_params
from qpconn.mail.header import Header
from qpconn.milter import codec
from qpconn.milter.codec import MilterProtocolError

__all__ = ["apply_edits", "header_value_for_milter"]


def header_value_for_milter(raw: bytes, leading_space: bool) -> str:
    """A field's value as milters expect it: folds as LF + white space (Sendmail's
    convention) and, unless SMFIP_HDR_LEADSPC was negotiated, one space after the colon
    eaten."""
    value = raw.replace(b"\r\n", b"\n")
    if not leading_space and value.startswith(b" "):
        value = value[1:]
    return value.decode("utf-8", "surrogateescape")


def _value(value: str) -> str:
    """A milter's value as Header takes it: CRLF folds made LF (Header writes CRLF)."""
    return value.replace("\r\n", "\n")


def _address(text: str, smtputf8: bool) -> Address:
    text = text.strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    try:
        return Address.parse(text, allow_utf8=smtputf8)
    except AddressError as exc:
        raise MilterProtocolError(f"address {text!r}: {exc}") from None


def _params(text: str | None, smtputf8: bool) -> dict[str, str | None] | None:
    if text is None:
        return None
    try:
        return parse_params(text.strip(), allow_utf8=smtputf8)
    except AddressError as exc:
        raise MilterProtocolError(f"ESMTP arguments {text!r}: {exc}") from None


def _check_header(name: str, value: str, space: bool) -> None:
    """Raise MilterProtocolError when Header would refuse this field."""
    try:
        Header().add(name, value, space=space)
    except ValueError as exc:
        raise MilterProtocolError(f"header {name!r}: {exc}") from None


def apply_edits(
    transaction: Any, edits: Sequence[codec.Message], leading_space: bool = False
) -> list[str]:
    """Apply a milter's changes to ``transaction``; a short description of each, for the
    log. MilterProtocolError (and nothing changed) if one cannot be made."""
    space = not leading_space
    utf8 = bool(getattr(transaction, "smtputf8", False))
    steps: list[Callable[[], None]] = []
    done: list[str] = []
    body: list[bytes] = []
    header = transaction.header
    for edit in edits:
        if isinstance(edit, codec.ReplaceBody):
            body.append(edit.data)
        elif isinstance(edit, (codec.AddHeader, codec.InsertHeader)):
            value = _value(edit.value)
            _check_header(edit.name, value, space)
            index = edit.index if isinstance(edit, codec.InsertHeader) else None
            steps.append(lambda n=edit.name, v=value, i=index: header.add(n, v, i, space=space))
            done.append(f"{'insert' if index is not None else 'add'} header {edit.name}")
        elif isinstance(edit, codec.ChangeHeader):
            value = _value(edit.value)
            if value:
                _check_header(edit.name, value, space)
            steps.append(lambda e=edit, v=value: _change(header, e, v, space))
            done.append(f"{'change' if value else 'delete'} header {edit.name}")
        elif isinstance(edit, codec.DeleteRecipient):
            address = _address(edit.address, utf8)
            steps.append(lambda a=address: transaction.remove_recipient(a))
            done.append(f"delete recipient {address.format()}")
        elif isinstance(edit, (codec.AddRecipient, codec.AddRecipientWithArgs)):
            address = _address(edit.address, utf8)
            args = edit.args if isinstance(edit, codec.AddRecipientWithArgs) else None
            params = _params(args, utf8) or {}
            steps.append(lambda a=address, p=params: transaction.add_recipient(a, p))
            done.append(f"add recipient {address.format()}")
        elif isinstance(edit, codec.ChangeSender):
            address = (
                _address(edit.address, utf8) if edit.address.strip("<> ") else Address(None, None)
            )
            params = _params(edit.args, utf8)
            steps.append(lambda a=address, p=params: _change_sender(transaction, a, p))
            done.append(f"change sender {address.format()}")
        else:
            raise MilterProtocolError(f"{type(edit).__name__} is not a change")
    for step in steps:
        step()
    if body:
        text = b"".join(body).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        transaction.replace_body([text])
        done.append(f"replace body ({len(text)} octets)")
    return done


def _change(header: Any, edit: codec.ChangeHeader, value: str, space: bool) -> None:
    occurrence = max(edit.index, 1)
    if not header.change(edit.name, occurrence, value or None, space=space) and value:
        header.add(edit.name, value, space=space)


def _change_sender(transaction: Any, sender: Address, params: dict[str, str | None] | None) -> None:
    transaction.sender = sender
    if params is not None:
        transaction.mail_params = params
