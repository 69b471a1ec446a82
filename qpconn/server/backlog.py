"""The listen backlog of qpconn's TCP listeners: deeper than Twisted's default of 50.

The backlog is how many connections the kernel completes for a listener before the server
accepts them. Twisted's endpoints default to 50; an MX meets bursts much larger than that
(a botnet's wave, a hundred slow clients arriving together, a queue flushed at a
restart). Past the backlog Linux drops the client's SYN, and the client tries again only
after its retransmission timeout: one second, then three. So every connection arriving
behind a full queue waits a second or more for its greeting, however idle the server is
a few milliseconds later. Measured with ``bench/run --workloads hostile`` (220 attackers
connecting at once, beside the load): the first fresh client after the attackers got its
greeting after 1.26 s, and 11 of 200 attackers were still not accepted 5 s in.

:func:`with_default_backlog` gives ``tcp:``, ``tcp6:`` and ``ssl:`` endpoint strings that
name no backlog :data:`DEFAULT_BACKLOG`; a ``backlog=`` of their own is kept. Linux caps
it at ``net.core.somaxconn`` (4096 since 5.4). A waiting connection costs the kernel a
socket, and qpconn nothing until it is accepted.
"""

from __future__ import annotations

from qpconn.server.tlsendpoint import split_description

__all__ = ["DEFAULT_BACKLOG", "with_default_backlog"]

#: Connections the kernel may hold for a listener before qpconn accepts them.
DEFAULT_BACKLOG = 1024

#: endpoint kinds whose parsers take ``backlog=`` (the others have none, or, like
#: ``systemd:``, a socket someone else made)
_WITH_BACKLOG = ("tcp", "tcp6", "ssl")


def with_default_backlog(description: str) -> str:
    """``description`` with ``backlog=`` :data:`DEFAULT_BACKLOG` when it is a TCP
    listener that does not say its backlog (``tcp:25`` -> ``tcp:25:backlog=1024``).

    Strings that give more than the port positionally are left alone: Twisted's ``tcp``
    and ``tcp6`` parsers take their backlog positionally in different places.
    """
    kind, sep, rest = description.partition(":")
    if not sep or kind not in _WITH_BACKLOG:
        return description
    positional, keywords = split_description(rest)
    if "backlog" in keywords or len(positional) > 1:
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"
