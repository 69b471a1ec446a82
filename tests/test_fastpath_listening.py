"""qpconn.server.fastpath.listening: a port that cannot be bound stops the start.

With Twisted's private switch, startService raises; without it (a Twisted release that
dropped it) the function says so and the service keeps Twisted's plain behaviour.
"""

from __future__ import annotations

import socket

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol

from qpconn.server.fastpath.listening import fail_start_on_bind_error


def test_a_taken_port_makes_start_service_raise():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
        service = StreamServerEndpointService(endpoint, Factory.forProtocol(Protocol))
        assert fail_start_on_bind_error(service) is True
        with pytest.raises(CannotListenError):
            service.startService()
    finally:
        taken.close()


def test_without_twisteds_switch_nothing_is_set():
    class OlderService:
        """A service of a Twisted release without the private switch."""

    service = OlderService()
    assert fail_start_on_bind_error(service) is False  # type: ignore[arg-type]
    assert not hasattr(service, "_raiseSynchronously")
