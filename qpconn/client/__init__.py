"""Outbound SMTP and LMTP: what the forwarding queue plugins use to talk to a next hop.

:mod:`qpconn.client.smtp` is a small asynchronous client (replies, pipelining, dot-stuffing,
STARTTLS, LMTP's per-recipient replies); :mod:`qpconn.client.pool` keeps a few of its
connections open per destination so a burst of messages does not pay a TCP handshake and an
EHLO each.
"""
