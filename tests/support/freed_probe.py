"""Child process for tests/test_session_freed.py: are finished sessions freed at once?

Logging is begun as twistd begins it (to a file), so nothing in the process keeps log
events, and with them the protocols they name. A real server on 127.0.0.1 serves real
sessions with the garbage collector off; after each, the script prints a JSON line saying
whether its protocol object still exists.

Usage: python -m tests.support.freed_probe TMPDIR
"""

from __future__ import annotations

import gc
import json
import pathlib
import smtplib
import socket
import sys
import weakref
from typing import Any

from twisted.internet import defer, task
from twisted.logger import globalLogBeginner, textFileLogObserver

from tests.support.server import in_thread, start_server


def mail_and_quit(address: tuple[str, int]) -> None:
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("a@mx.test", ["b@mx.test"], b"Subject: freed\r\n\r\nbody\r\n")


def vanish_mid_data(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@mx.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
        received = b""
        while b"354" not in received:
            received += sock.recv(1024)
        sock.sendall(b"Subject: cut\r\n\r\nhalf a mes")


def refused_helo(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"HELO\r\nNOOP\r\nQUIT\r\n")
        while sock.recv(1024):
            pass


async def main(reactor: Any, tmp: str) -> None:
    server = start_server(pathlib.Path(tmp))
    started = server.factory.session_started
    seen: list[weakref.ref[Any]] = []

    def spy(session: Any) -> None:
        seen.append(weakref.ref(session))
        started(session)

    server.factory.session_started = spy
    gc.collect()
    gc.disable()
    for talk in (mail_and_quit, vanish_mid_data, refused_helo):
        await in_thread(talk, server.address)
        await server.wait_sessions_closed()
        (ref,) = seen
        # Twisted's end-of-turn work may still hold it for a few turns; the collector is
        # off, so whatever frees it meanwhile is reference counting. Bounded: 10 s.
        for _ in range(500):
            if ref() is None:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        seen.clear()
        print(json.dumps({"session": talk.__name__, "alive": ref() is not None}), flush=True)
    gc.enable()
    print(json.dumps({"stored": len(server.messages())}), flush=True)
    await server.stop()


if __name__ == "__main__":
    with open(pathlib.Path(sys.argv[1]) / "qpconn.log", "a", encoding="utf-8") as log:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log)], redirectStandardIO=False)
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1])))
