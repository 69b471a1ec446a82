"""The MTA side of the Sendmail/Postfix milter protocol (version 6).

Milters (rspamd, OpenDKIM, OpenDMARC, clamav-milter...) are the filters mail
administrators already run behind Postfix and Sendmail. No Python library speaks the MTA
side of their protocol, so qpconn has its own, in layers:

* :mod:`qpconn.milter.codec`: the packets, both ways, as bytes and as small immutable
  messages. No I/O, no Twisted; strict about what it accepts.
* :mod:`qpconn.milter.session`: the MTA side's rules, also without I/O: the option
  negotiation, which steps are sent (a milter may skip steps and waive replies), which
  replies a step may get, and the macros each stage carries.
* :mod:`qpconn.milter.client`: the Twisted transport around one session, with the
  connect, command and content timeouts.
* :mod:`qpconn.milter.edits`: a milter's end-of-message changes applied to the
  :class:`~qpconn.mail.transaction.Transaction`.

The plugin that hooks all this into an SMTP session is :mod:`qpconn.plugins.milter`.
"""
