"""The SMTP command layer: each command becomes hook runs and one reply; no transport here.

:mod:`~qpconn.smtp.commands` holds the handlers for the base commands, :mod:`~qpconn.smtp.security`
STARTTLS and AUTH, :mod:`~qpconn.smtp.extensions` BDAT, DSN and SMTPUTF8, :mod:`~qpconn.smtp.limits`
the per-session limits read from the config directory.
"""

# Before the subpackage layout this package was one module; its names still import from
# here (``from qpconn.smtp import HandlerResult``), loaded on first use.
_MOVED_NAMES = {'SMTPCommands', 'HandlerResult', 'SOFTWARE'}


def __getattr__(name: str) -> object:
    if name in _MOVED_NAMES:
        import importlib

        return getattr(importlib.import_module("qpconn.smtp.commands"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
