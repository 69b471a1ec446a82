"""qpconn: an SMTP server framework on Twisted, in the tradition of qpsmtpd and Haraka.

The names most plugin authors need are importable from here.
"""

from qpconn.results import (
    DECLINED,
    DENY,
    DENY_DISCONNECT,
    DENYSOFT,
    DENYSOFT_DISCONNECT,
    DONE,
    OK,
    Result,
)

__version__ = "0.1.0"

__all__ = [
    "DECLINED",
    "DENY",
    "DENY_DISCONNECT",
    "DENYSOFT",
    "DENYSOFT_DISCONNECT",
    "DONE",
    "OK",
    "Result",
    "__version__",
]
