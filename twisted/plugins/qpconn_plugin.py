"""Makes ``twistd qpconn`` available once qpconn is installed.

Twisted finds this module by scanning ``twisted/plugins`` directories on sys.path; it
must stay cheap to import, so it names the real code by string only.
"""

from twisted.application.service import ServiceMaker

qpconn = ServiceMaker(
    "qpconn",
    "qpconn.app.options",
    "An SMTP server framework with qpsmtpd-style plugins",
    "qpconn",
)
