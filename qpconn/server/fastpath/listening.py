"""Listeners that fail start-up when their port cannot be bound.

``StreamServerEndpointService`` logs a failed ``listen()`` and lets the process run on,
deaf, unless its private ``_raiseSynchronously`` switch is on: then ``startService``
raises, and twistd exits with the error, which is what an administrator needs when port
25 is taken. ``twisted.application.strports.service`` sets the same switch; Twisted
offers no public way to ask for it, so it is set here, in the one fenced place, and a
Twisted release without it gets the plain behaviour (the error is logged).
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService

__all__ = ["fail_start_on_bind_error"]


def fail_start_on_bind_error(service: StreamServerEndpointService) -> bool:
    """Make ``service.startService`` raise a bind error; False where Twisted cannot."""
    if not hasattr(service, "_raiseSynchronously"):
        return False
    service._raiseSynchronously = True
    return True
