"""queue/amqp against a real RabbitMQ (Debian's rabbitmq-server), a private node per module.

The node (tests/support/rabbitmq.py) takes 5-15 s to start, so one serves the whole module;
each test uses queues of its own. What the plugin published is read back with pika's
blocking client, as a consumer would. The broker's failures are real: SIGKILL for a crash,
SIGSTOP for a broker that hangs, a full ``reject-publish`` queue for a ``basic.nack``, a
queue that does not exist for a returned message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import Client
from tests.support.process import free_port
from tests.support.rabbitmq import RabbitNode, rabbitmq_missing, rabbitmq_node
from tests.support.server import in_thread

pika = pytest.importorskip("pika", reason="pika is not installed (pip install 'qpconn[amqp]')")

TEXT = b"Subject: to the broker\r\nMessage-ID: <{n}@client.test>\r\n\r\nline one\r\n..dot"
QUEUED = re.compile(r"2\.0\.0 Queued as (\S+) \(AMQP 127\.0\.0\.1:\d+ confirmed\)")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: Any) -> Iterator[RabbitNode]:
    reason = rabbitmq_missing()
    if reason:
        pytest.skip(reason)
    with rabbitmq_node(str(tmp_path_factory.mktemp("rabbitmq"))) as node:
        yield node


@pytest.fixture
def amqp_server(qpconn_server: Any) -> Iterator[Any]:
    """Call it with the plugin's arguments; the plugins' broker links close at teardown."""
    started: list[Any] = []

    def start(*args: str) -> Any:
        line = " ".join(["queue/amqp", *args])
        server = qpconn_server(plugins=["relay", "rcpt_ok", line])
        started.append(server)
        return server

    yield start
    for server in started:
        for plugin in server.factory.plugins:
            if getattr(plugin, "_link", None) is not None:
                pytest_twisted.blockon(plugin._link.close())


def send(address: tuple[str, int], n: int = 1, rcpts: tuple[str, ...] = ("<u@mx.test>",)) -> Any:
    """One message; the reply to the end of DATA."""
    with Client(address, timeout=60) as client:
        assert client.cmd("EHLO client.test").code == 250
        reply = client.transaction("<a@example.org>", list(rcpts), TEXT.replace(b"{n}", b"%d" % n))
        client.cmd("QUIT")
    return reply


def drain(url: str, queue: str, limit: int = 5000) -> list[tuple[Any, bytes]]:
    """Every message in ``queue`` (properties, body), consumed and acknowledged."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        found = []
        for _ in range(limit):
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            found.append((properties, body))
        return found
    finally:
        connection.close()


def drain_until_quiet(broker: Any, queue: str, seconds: float = 20.0) -> list[tuple[Any, bytes]]:
    """Drain ``queue`` until it stays empty for a second (bounded): a broker that has just
    recovered from a crash may still be bringing messages back when the first drain runs."""
    found: list[tuple[Any, bytes]] = []
    deadline = time.monotonic() + seconds
    quiet_since = None
    while time.monotonic() < deadline:
        batch = drain(broker.url, queue)
        found += batch
        now = time.monotonic()
        if batch:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= 1.0:
            break
        time.sleep(0.2)
    return found


def broker_recovery_lines(broker: Any) -> list[str]:
    """What the broker's log says about recovering or dropping messages (for a failure)."""
    try:
        with open(broker.log_path, encoding="utf-8", errors="replace") as log:
            return [
                line.strip()
                for line in log
                if re.search(r"dropped|crashed|unclean|Restarting", line)
            ][-20:]
    except OSError as exc:
        return [f"no broker log: {exc}"]


def declare(url: str, queue: str, **arguments: Any) -> None:
    """Declare a classic durable queue as an administrator would (for declare=no)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(queue, durable=True, arguments=arguments)
    finally:
        connection.close()


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
@pytest_twisted.ensureDeferred
async def test_250_after_the_confirm_with_the_text_as_body_and_the_envelope_in_headers(
    broker, amqp_server, queue_type
):
    queue = f"basic-{queue_type}"
    server = amqp_server(broker.url, f"queue={queue}", f"queue_type={queue_type}")
    reply = await in_thread(send, server.address, 7, ("<u@mx.test>", "<v@mx.test>"))
    assert reply.code == 250, reply.text
    queue_id = QUEUED.fullmatch(reply.text).group(1)
    # the 250 came after the confirm: the message is in the queue now, and only once
    ((properties, body),) = await in_thread(drain, broker.url, queue)
    assert body.startswith(b"Received: from client.test (unknown [127.0.0.1])")
    assert f"id {queue_id}".encode() in body.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    assert body.endswith(b"\r\nMessage-ID: <7@client.test>\r\n\r\nline one\r\n.dot\r\n")
    assert properties.delivery_mode == 2
    assert properties.content_type == "message/rfc822"
    assert properties.message_id == queue_id
    assert properties.app_id == "qpconn"
    assert abs(properties.timestamp - time.time()) < 600
    headers = properties.headers
    # the broker adds its own x- headers (a quorum queue counts deliveries): ours are not x-
    assert {name for name in headers if name.startswith("x-")} <= {"x-delivery-count"}
    headers = {name: value for name, value in headers.items() if not name.startswith("x-")}
    port = headers.pop("qpconn-client-port")
    assert isinstance(port, int) and 0 < port < 65536
    # pika decodes AMQP long strings ('S') to str, byte arrays ('x') to bytes: all are 'S'
    assert headers == {
        "qpconn-sender": "a@example.org",
        "qpconn-recipients": ["u@mx.test", "v@mx.test"],
        "qpconn-queue-id": queue_id,
        "qpconn-client-ip": "127.0.0.1",
        "qpconn-client-host": "",
        "qpconn-helo": "client.test",
        "qpconn-auth-user": "",
        "qpconn-host": "mx.test",
    }
    listed = broker.ctl("list_queues", "name", "type", "durable", "--no-table-headers", "-q")
    row = [line.split() for line in listed.stdout.decode().splitlines() if line.startswith(queue)]
    assert row == [[queue, queue_type, "true"]], listed


@pytest_twisted.ensureDeferred
async def test_a_killed_broker_gives_451_then_250_after_its_restart_and_loses_nothing(
    broker, amqp_server
):
    server = amqp_server(broker.url, "queue=crash", "timeout=10")
    replies: list[tuple[int, int, str]] = []
    stop = threading.Event()

    def client(first: int) -> None:
        """Messages one after another until told to stop (bounded in count and time)."""
        deadline = time.monotonic() + 120
        for n in range(first, first + 2000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            reply = send(server.address, n)
            replies.append((n, reply.code, reply.text))
            if reply.code != 250:
                stop.wait(0.1)  # as a client's queue would, not at once

    assert (await in_thread(send, server.address, 0)).code == 250  # connected
    threads = [threading.Thread(target=client, args=(10_000 * (i + 1),)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:

        def count(code: int) -> int:
            return sum(1 for _, c, _ in replies if c == code)

        def wait_for(condition: Any, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert condition(), replies[-5:]

        await in_thread(wait_for, lambda: count(250) >= 10, 60)
        await in_thread(broker.kill)
        accepted_before = count(250)
        await in_thread(wait_for, lambda: count(451) >= 5, 60)  # the outage, answered at once
        await in_thread(broker.start)
        await in_thread(wait_for, lambda: count(250) >= accepted_before + 10, 60)  # reconnected
    finally:
        stop.set()
        for thread in threads:
            await in_thread(thread.join, 120)
    failures = [text for _, code, text in replies if code == 451]
    assert all(text.startswith("4.") and "try again later" in text for text in failures)
    assert any("Broker 127.0.0.1" in text for text in failures)
    assert {code for _, code, _ in replies} <= {250, 451}
    acknowledged = {QUEUED.fullmatch(text).group(1) for _, code, text in replies if code == 250}
    stored = {props.message_id for props, _ in await in_thread(drain_until_quiet, broker, "crash")}
    missing = acknowledged - stored
    # every 250 is in the queue, across the crash (the broker's own recovery lines, if any,
    # say whether it dropped messages itself)
    assert missing == set(), (sorted(missing), broker_recovery_lines(broker))


@pytest_twisted.ensureDeferred
async def test_no_confirm_within_the_timeout_is_451_and_the_link_recovers(broker, amqp_server):
    server = amqp_server(broker.url, "queue=slow", "timeout=2")
    assert (await in_thread(send, server.address, 1)).code == 250
    broker.freeze()  # the sockets stay open; nothing is answered
    try:
        began = time.monotonic()
        reply = await in_thread(send, server.address, 2)
        took = time.monotonic() - began
    finally:
        broker.thaw()
    assert reply.code == 451
    assert reply.text.startswith("4.4.1 Broker 127.0.0.1:")
    assert "(no confirm within 2s)" in reply.text
    assert 1.5 < took < 30
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # bounded: the thawed broker answers again
        reply = await in_thread(send, server.address, 3)
        if reply.code == 250:
            break
    assert reply.code == 250, reply.text


@pytest_twisted.ensureDeferred
async def test_a_nack_from_a_full_queue_is_451(broker, amqp_server):
    declare(broker.url, "full", **{"x-max-length": 1, "x-overflow": "reject-publish"})
    server = amqp_server(broker.url, "queue=full", "declare=no")
    assert (await in_thread(send, server.address, 1)).code == 250
    reply = await in_thread(send, server.address, 2)
    assert reply.code == 451
    assert reply.text.startswith("4.3.0 Broker 127.0.0.1:")
    assert "refused the message (nack)" in reply.text
    assert len(await in_thread(drain, broker.url, "full")) == 1


@pytest_twisted.ensureDeferred
async def test_a_returned_message_is_451(broker, amqp_server):
    server = amqp_server(broker.url, "queue=nobody-declared-this", "declare=no")
    reply = await in_thread(send, server.address, 1)
    assert reply.code == 451
    assert reply.text.startswith("4.3.0 Broker 127.0.0.1:")
    assert "312 NO_ROUTE" in reply.text


@pytest_twisted.ensureDeferred
async def test_publishing_through_an_exchange_binds_the_queue(broker, amqp_server):
    server = amqp_server(broker.url, "queue=bound", "exchange=amq.direct", "routing_key=mail")
    assert (await in_thread(send, server.address, 1)).code == 250
    ((properties, _),) = await in_thread(drain, broker.url, "bound")
    assert properties.headers["qpconn-sender"] == "a@example.org"


@pytest_twisted.ensureDeferred
async def test_a_broker_that_is_down_costs_a_451_at_once(amqp_server):
    port = free_port()  # nothing listens there
    server = amqp_server(f"amqp://guest:guest@127.0.0.1:{port}/%2F", "timeout=20")
    began = time.monotonic()
    first = await in_thread(send, server.address, 1)
    second = await in_thread(send, server.address, 2)
    assert time.monotonic() - began < 15  # refused, not waited for
    assert [first.code, second.code] == [451, 451]
    assert "cannot connect" in first.text and "cannot connect" in second.text


def test_arguments_are_checked_at_load_time():
    bad = [
        ("amqps://127.0.0.1/",), ("queue_type=stream",), ("declare=maybe",), ("timeout=0",),
        ("timeout=soon",), ("colour=blue",), ("amqp://a/", "amqp://b/"),
    ]  # fmt: skip
    for args in bad:
        with pytest.raises(PluginLoadError):
            load_plugin(Config(None), "queue/amqp", *args)
    plugin = load_plugin(Config(None), "queue/amqp")
    assert (plugin.url, plugin.queue, plugin.queue_type) == (
        "amqp://guest:guest@127.0.0.1:5672/%2F", "qpconn", "classic"
    )


def test_without_pika_the_plugin_names_the_extra():
    code = (
        "import sys; sys.modules['pika'] = None\n"
        "from qpconn.config import Config\n"
        "from qpconn.plugins import PluginLoadError, load_plugin\n"
        "try:\n"
        "    load_plugin(Config(None), 'queue/amqp')\n"
        "except PluginLoadError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pip install 'qpconn[amqp]'" in done.stdout
