"""The cluster's SMTP clients; run by ``run`` inside the client host's namespace.

``load``: N clients, each on an address of its own, send M numbered messages through
HAProxy, several per session, as a sending MTA does. A message that does not get 250
(a node killed mid-session, a 4xx, a refused connection) is retried, a bounded number of
times, on a new session. Progress and the result are JSON lines on stdout.

``greylist``: from an address that is not a relay client, a triplet is greylisted on the
node HAProxy picks, and retried until HAProxy hands the retry to another node: with the
triplets in Redis, it passes there.

``abuse``: one address that is not a relay client sends more recipients than the ``limit``
plugin's per-address allowance, one per session, so that HAProxy spreads the sessions over
the nodes; each attempt's node and replies are reported, for ``run`` to check that the
count was one for the whole cluster. Its triplet is greylisted once first (and retried
past ``black_timeout``), as any MTA's first message to a greylisting MX is.

Standard library only: smtplib, threads, json.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import smtplib
import socket
import sys
import threading
import time
from typing import Any

DOMAIN = "cluster.test"
_print_lock = threading.Lock()
#: how the ``limit`` plugin's recipient refusals begin (its only limit in the cluster)
LIMIT_REFUSAL = b"4.7.1 Too many recipients"


def emit(**record: Any) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def message(n: int, client: str, prefix: str = "cluster") -> bytes:
    return (
        f"From: <load@client.test>\r\nTo: <user{n % 20}@{DOMAIN}>\r\n"
        f"Subject: message {n}\r\nMessage-ID: <{prefix}-{n}@client.test>\r\n"
        f"X-Cluster-Seq: {n}\r\nX-Cluster-Client: {client}\r\n\r\nmessage {n}\r\n"
    ).encode()


def connect(frontend: tuple[str, int], source: str) -> tuple[smtplib.SMTP, str]:
    """A session through HAProxy from ``source``; returns it and the node that greeted."""
    session = smtplib.SMTP(timeout=30, source_address=(source, 0))
    code, text = session.connect(*frontend)
    if code != 220:
        session.close()
        raise smtplib.SMTPConnectError(code, text)
    return session, text.decode(errors="replace").split()[0]


class Load:
    """The shared state of the load's client threads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.frontend = (args.frontend, 25)
        self.todo: queue.Queue[tuple[int, int]] = queue.Queue()
        for n in range(args.messages):
            self.todo.put((n, 0))
        self.lock = threading.Lock()
        self.acked: dict[int, list[str]] = {}
        self.given_up: list[int] = []
        self.limited = 0
        self.node_limited = 0
        self.failures: dict[str, int] = {}
        self.deadline = time.monotonic() + args.deadline

    def failed(self, kind: str, n: int | None, tries: int) -> None:
        with self.lock:
            self.failures[kind] = self.failures.get(kind, 0) + 1
            if n is None:
                return
            if tries + 1 >= self.args.retries:
                self.given_up.append(n)
            else:
                self.todo.put((n, tries + 1))

    def client(self, source: str) -> None:
        for _session in range(10 * self.args.messages):  # bounded; ends when nothing is left
            if time.monotonic() > self.deadline:
                return
            try:
                n, tries = self.todo.get(timeout=1)
            except queue.Empty:
                with self.lock:
                    if len(self.acked) + len(self.given_up) >= self.args.messages:
                        return
                continue
            if tries:
                time.sleep(min(2.0, 0.1 * tries))  # as a queue backs off before a retry
            self.session(source, n, tries)

    def session(self, source: str, n: int, tries: int) -> None:
        """One session: message ``n``, then more from the queue, up to ``per_session``."""
        try:
            smtp, node = connect(self.frontend, source)
        except smtplib.SMTPConnectError as exc:
            # at connect only the nodes' own (per-process) limits refuse: the cluster's
            # limit plugin has no connect limit
            if exc.smtp_code == 421 and b"from your address" in exc.smtp_error:
                with self.lock:
                    self.node_limited += 1
            self.failed(f"connect {exc.smtp_code}", n, tries)
            return
        except (OSError, smtplib.SMTPException) as exc:
            self.failed(f"connect {type(exc).__name__}", n, tries)
            return
        current: tuple[int, int] | None = (n, tries)
        try:
            smtp.ehlo("client.test")
            for _ in range(self.args.per_session):
                if current is None:
                    try:
                        current = self.todo.get_nowait()
                    except queue.Empty:
                        break
                number, _tries = current
                smtp.mail("load@client.test")
                code, text = smtp.rcpt(f"user{number % 20}@{DOMAIN}")
                if code == 450 and text.startswith(LIMIT_REFUSAL):
                    with self.lock:
                        self.limited += 1
                if code == 250:
                    code, _ = smtp.data(message(number, source))
                if code != 250:
                    smtp.rset()
                    self.failed(f"reply {code}", *current)
                else:
                    with self.lock:
                        self.acked[number] = [node, source]
                        acked = len(self.acked)
                    if acked % 10 == 0:
                        emit(progress=acked)
                current = None
            smtp.quit()
        except (OSError, smtplib.SMTPException) as exc:
            self.failed(f"session {type(exc).__name__}", *(current or (None, 0)))
        finally:
            smtp.close()


def run_load(args: argparse.Namespace) -> None:
    load = Load(args)
    started = time.monotonic()
    threads = [threading.Thread(target=load.client, args=(address,), daemon=True)
               for address in args.addresses.split(",")]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, load.deadline - time.monotonic() + 5))
    emit(result={
        "sent": args.messages, "acked": load.acked, "given_up": load.given_up,
        "limited": load.limited, "node_limited": load.node_limited, "failures": load.failures,
        "seconds": round(time.monotonic() - started, 3),
        "cpu": round(sum(os.times()[:2]), 2),
    })  # fmt: skip


def run_greylist(args: argparse.Namespace) -> None:
    """Each triplet: deferred on one node, retried until another node takes it."""
    frontend = (args.frontend, 25)
    stamp = int(time.time())
    for k in range(args.triplets):
        sender, rcpt = f"grey{k}-{stamp}@client.test", f"greyuser{k}@{DOMAIN}"
        record: dict[str, Any] = {"triplet": [args.address, sender, rcpt]}
        smtp, first = connect(frontend, args.address)
        smtp.ehlo("grey.client.test")
        smtp.mail(sender)
        record["first"], record["first_code"] = first, smtp.rcpt(rcpt)[0]
        smtp.quit()
        time.sleep(args.black + 0.2)  # a queue's retry interval: past black_timeout
        for _attempt in range(args.attempts):
            smtp, node = connect(frontend, args.address)
            if node == first:  # the same node again: come back on the next connection
                smtp.quit()
                continue
            smtp.ehlo("grey.client.test")
            smtp.mail(sender)
            record["second"], record["second_code"] = node, smtp.rcpt(rcpt)[0]
            if record["second_code"] == 250:
                record["data_code"] = smtp.data(message(k, args.address, "grey"))[0]
            smtp.quit()
            break
        emit(greylist=record)


def run_abuse(args: argparse.Namespace) -> None:
    """``--recipients`` sessions of one recipient each, one after another, from one address.

    One after another, so that HAProxy's round robin hands them to the nodes in turn: the
    allowance is used up on all of them together and each refuses what comes after.
    """
    frontend = (args.frontend, 25)
    sender, rcpt = f"abuse-{int(time.time())}@client.test", f"abused@{DOMAIN}"
    smtp, node = connect(frontend, args.address)
    smtp.ehlo("abuse.client.test")
    smtp.mail(sender)
    prime = {"node": node, "code": smtp.rcpt(rcpt)[0]}  # greylisted: not counted yet
    smtp.quit()
    time.sleep(args.black + 0.2)  # past black_timeout: the retries pass greylisting
    started, attempts = time.monotonic(), []
    for k in range(args.recipients):
        attempt: dict[str, Any] = {}
        try:
            smtp, attempt["node"] = connect(frontend, args.address)
        except smtplib.SMTPConnectError as exc:
            attempts.append({"connect": exc.smtp_code, "text": exc.smtp_error.decode()})
            continue
        except (OSError, smtplib.SMTPException) as exc:
            attempts.append({"error": type(exc).__name__})
            continue
        try:
            smtp.ehlo("abuse.client.test")
            smtp.mail(sender)
            code, text = smtp.rcpt(rcpt)
            attempt["rcpt"], attempt["text"] = code, text.decode(errors="replace")
            if code == 250:
                attempt["data"] = smtp.data(message(k, args.address, "limit"))[0]
            smtp.quit()
        except (OSError, smtplib.SMTPException) as exc:
            attempt["error"] = type(exc).__name__
        finally:
            smtp.close()
        attempts.append(attempt)
    emit(abuse={"prime": prime, "attempts": attempts,
                "seconds": round(time.monotonic() - started, 3)})


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    load = sub.add_parser("load")
    load.add_argument("--frontend", required=True)
    load.add_argument("--addresses", required=True)
    load.add_argument("--messages", type=int, required=True)
    load.add_argument("--per-session", type=int, default=10)
    load.add_argument("--retries", type=int, default=30)
    load.add_argument("--deadline", type=float, default=300)
    grey = sub.add_parser("greylist")
    grey.add_argument("--frontend", required=True)
    grey.add_argument("--address", required=True)
    grey.add_argument("--triplets", type=int, default=3)
    grey.add_argument("--black", type=float, required=True)
    grey.add_argument("--attempts", type=int, default=8)
    abuse = sub.add_parser("abuse")
    abuse.add_argument("--frontend", required=True)
    abuse.add_argument("--address", required=True)
    abuse.add_argument("--recipients", type=int, required=True)
    abuse.add_argument("--black", type=float, required=True)
    args = parser.parse_args()
    socket.setdefaulttimeout(30)
    {"load": run_load, "greylist": run_greylist, "abuse": run_abuse}[args.mode](args)


if __name__ == "__main__":
    main()
