"""queue/smtp-forward HOST [PORT] [option=value ...]: hand each message to the next MTA.

The next hop (Postfix, Exim, a smarthost) gets the message over SMTP, and our client gets
250 only once the next hop has said 250 to the end of DATA; that 250's text (its queue
id) is quoted in ours and logged. Its refusals become ours; rule by rule (down, slow,
partly refused recipients) in :mod:`qpconn.client.forward`, the short of it being that
nothing is ever acknowledged that the next hop did not take, and nothing refused goes
unreported: recipients the next hop refuses permanently while accepting the others are
bounced to the sender through the same next hop before the 250.

Options: ``starttls=no|yes|required`` (default no), ``tls_ca=FILE`` (trust for
``required``), ``timeout=SECONDS`` for a whole delivery (default 60), ``pool=N`` idle
connections kept (default 2), ``idle=SECONDS`` before an idle one is closed (default 30).
"""

from __future__ import annotations

from typing import Any

from qpconn.client.dsn import build_dsn, remote_mta_name
from qpconn.client.forward import ForwardingQueue, Verdict
from qpconn.client.smtp import ClientReply, NextHopError, SMTPClient
from qpconn.hooks.results import DONE
from qpconn.mail.dsn import wants_failure_notice

__all__ = ["SMTPForward"]


class SMTPForward(ForwardingQueue):
    """Forward over SMTP to HOST (port 25 unless given); see the module docstring."""

    lmtp = False
    default_port = 25

    async def report_refused(
        self, client: SMTPClient, txn: Any, refused: list[tuple[str, ClientReply]]
    ) -> Verdict | None:
        """Bounce the permanently refused recipients to the sender through the next hop.

        The message already went to the accepted recipients, so a failure here cannot
        be answered with a bounce of the whole message: a temporary one makes our client
        retry (a duplicate for them, never a loss); a permanent one (the next hop will
        not deliver to the sender either) is a double bounce, logged as an error, as any
        MTA drops a bounce that cannot be returned.
        """
        refused = [(rcpt, reply) for rcpt, reply in refused if wants_failure_notice(txn, rcpt)]
        if not refused:
            return None  # every one of them asked for no failure DSN (NOTIFY, RFC 3461)
        names = ", ".join(rcpt for rcpt, _ in refused)
        if txn.sender is None or txn.sender.is_null:
            self.log.warn(
                "{queue_id} {dest} refused {rcpts}; the sender is <> (a bounce), so no "
                "bounce is sent back",
                queue_id=txn.id,
                dest=self.destination.label,
                rcpts=names,
            )
            return None
        me = self.server.me if self.server is not None else self.config.me
        dsn = build_dsn(
            reporting_mta=me,
            sender=txn.sender.address,
            queue_id=txn.id,
            remote=self.destination.label,
            remote_mta=remote_mta_name(self.destination.host, me),
            arrival=txn.arrival_time,
            failures=refused,
            original_header=txn.header.as_bytes() if txn.header is not None else b"",
            # What the client asked to get back (RFC 3461 ENVID/ORCPT, RFC 3464 fields)
            envid=txn.dsn.envid,
            original_recipients={
                rcpt.format(): rcpt.dsn.orcpt for rcpt in txn.recipients if rcpt.dsn.orcpt
            },
        )
        mail, replies = await client.envelope("<>", [txn.sender.format()])
        reply = mail if not mail.positive else replies[0]
        if reply.positive:
            go_ahead, finals = await client.data([dsn])
            reply = finals[0] if finals else go_ahead
        if reply.positive:
            self.log.info(
                "{queue_id} bounce for {rcpts} sent to {sender}: {reply}",
                queue_id=txn.id,
                rcpts=names,
                sender=txn.sender.format(),
                reply=str(reply),
            )
            txn.notes.setdefault("forward", {})["bounce"] = str(reply)
            return None
        if reply.permanent:
            self.log.error(
                "{queue_id} double bounce: {dest} refused {rcpts} and the bounce to "
                "{sender} ({reply}); nobody can be told",
                queue_id=txn.id,
                dest=self.destination.label,
                rcpts=names,
                sender=txn.sender.format(),
                reply=str(reply),
            )
            return None
        if not 400 <= reply.code < 500:
            raise NextHopError(f"unexpected reply {reply}")
        self.log.error(
            "{queue_id} delivered, but the bounce for {rcpts} failed ({reply}); the client "
            "is told to retry, so the accepted recipients will receive a duplicate",
            queue_id=txn.id,
            rcpts=names,
            reply=str(reply),
        )
        return DONE, f"451 4.3.0 Could not report refused recipients ({reply}); try again later"
