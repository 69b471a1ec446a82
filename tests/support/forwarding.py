"""The two qpconns of the queue/smtp-forward extension tests: a front that forwards, and
a next hop (a second real qpconn) that stores what arrives in its own Maildir.

A qpconn next hop offers DSN, SMTPUTF8 and CHUNKING, so these tests see what the forward
client passes on to a capable server, and what the hop's own refusals turn into.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tests.e2e_client import Client, Reply
from tests.support.server import start_server


def deliver(address: Any, mail: str, rcpts: Sequence[str], body: bytes,
            bdat: bool = False) -> Reply:  # fmt: skip
    """One message; MAIL and every RCPT (with their parameters) must be accepted.

    ``bdat`` sends the text as one ``BDAT n LAST`` chunk instead of DATA.
    """
    with Client(address, timeout=15) as smtp:
        assert smtp.cmd("EHLO client.test").code == 250
        reply = smtp.cmd(f"MAIL FROM:{mail}".encode())
        assert reply.code == 250, reply
        for rcpt in rcpts:
            reply = smtp.cmd(f"RCPT TO:{rcpt}".encode())
            assert reply.code == 250, reply
        if bdat:
            smtp.send(b"BDAT %d LAST\r\n" % len(body) + body)
            return smtp.reply()
        assert smtp.code("DATA") == 354
        return smtp.message(body)


def front(qpconn_server: Any, port: int, domains: Sequence[str]) -> Any:
    """A qpconn that relays ``domains`` and forwards everything to 127.0.0.1:``port``."""
    return qpconn_server(
        plugins=["relay", "rcpt_ok", f"queue/smtp-forward 127.0.0.1 {port} idle=0.1"],
        files={"rcpthosts": list(domains)},
    )


@contextlib.asynccontextmanager
async def next_hop_qpconn(
    tmp_path: Any, plugin: Any, domains: Sequence[str]
) -> AsyncIterator[Any]:
    """A second qpconn under ``tmp_path/hop`` with ``plugin`` first; stopped afterwards."""
    hop = start_server(
        tmp_path / "hop",
        plugins=[plugin, "relay", "rcpt_ok", f"queue/maildir {tmp_path / 'hop' / 'maildir'}"],
        files={"rcpthosts": list(domains)},
    )
    try:
        yield hop
    finally:
        await hop.stop()
        await hop.wait_sessions_closed()
