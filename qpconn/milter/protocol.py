"""The milter protocol's numbers: version, limits, and the SMFIF/SMFIP/SMFIM flag sets.

From Sendmail's ``libmilter/mfdef.h`` and Postfix's ``milter8.c`` (the facts, not the code).
"""

from __future__ import annotations

__all__ = ["MilterProtocolError", "PROTOCOL_VERSION", "MAX_BODY_CHUNK", "MAX_PACKET",
           "Actions", "Steps", "Stage"]  # fmt: skip

#: the protocol version qpconn speaks (Sendmail 8.14 and later, Postfix 2.6 and later)
PROTOCOL_VERSION = 6
#: largest body chunk in one SMFIC_BODY packet (libmilter's MILTER_CHUNK_SIZE)
MAX_BODY_CHUNK = 65535
#: largest packet accepted from a peer: a body replacement chunk, a long header value.
#: libmilter itself refuses more than 64 KiB unless the larger sizes were negotiated.
MAX_PACKET = 1 << 20


class MilterProtocolError(Exception):
    """The peer sent something that is not a milter packet, or not one allowed here."""


class Actions:
    """SMFIF_*: the changes a milter may ask for at the end of a message."""

    ADD_HEADERS = 0x01
    CHANGE_BODY = 0x02
    ADD_RECIPIENTS = 0x04
    DELETE_RECIPIENTS = 0x08
    CHANGE_HEADERS = 0x10
    QUARANTINE = 0x20
    CHANGE_SENDER = 0x40
    ADD_RECIPIENTS_WITH_ARGS = 0x80
    SET_MACRO_LIST = 0x100
    ALL = 0x1FF


class Steps:
    """SMFIP_*: the steps a milter skips, and the replies it waives ("no reply")."""

    NO_CONNECT = 0x01
    NO_HELO = 0x02
    NO_MAIL = 0x04
    NO_RCPT = 0x08
    NO_BODY = 0x10
    NO_HEADERS = 0x20
    NO_EOH = 0x40
    NR_HEADER = 0x80
    NO_UNKNOWN = 0x100
    NO_DATA = 0x200
    SKIP = 0x400  # the MTA understands SMFIR_SKIP
    RCPT_REJECTED = 0x800  # the milter wants rejected recipients too
    NR_CONNECT = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKNOWN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HEADER_LEADING_SPACE = 0x100000
    MAX_DATA_256K = 0x10000000
    MAX_DATA_1M = 0x20000000


class Stage:
    """SMFIM_*: the stages a milter may ask for its own list of macros for."""

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6
    NAMES = {0: "connect", 1: "helo", 2: "mail", 3: "rcpt", 4: "data", 5: "eom", 6: "eoh"}
