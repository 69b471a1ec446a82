"""queue/exec end to end: a real qpconn piping messages to real commands (shell scripts).

The scripts are written by each test into its own directory and named in the plugin line
exactly as an administrator would; what they receive (arguments, environment, stdin) is
written to a file the test reads back.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from qpconn.config import Config
from qpconn.plugins import PluginLoadError, load_plugin
from tests.e2e_client import Client
from tests.support.server import in_thread
from tests.support.timing import wait_until

TEXT = b"Subject: piped\r\n\r\nline one\r\n..dotted"  # ".dotted" once unstuffed

#: $1 is the exit status, $2 the file to record into; the rest is the command line.
DELIVER = """#!/bin/sh
status=$1; out=$2; shift 2
{{
  printf 'ARGS:'; for a in "$@"; do printf ' [%s]' "$a"; done; printf '\\n'
  printf 'ENV: %s|%s|%s\\n' "$QPCONN_SENDER" "$QPCONN_RECIPIENTS" "$QPCONN_QUEUE_ID"
  cat
}} > "$out.part" && mv "$out.part" "$out"
{extra}
exit $status
"""


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "qpconn.plugin.queue/exec":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def script(directory: Path, text: str, name: str = "deliver.sh") -> str:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def exec_server(qpconn_server: Any, line: str) -> Any:
    return qpconn_server(plugins=["relay", "rcpt_ok", f"queue/exec {line}"])


def send(
    address: tuple[str, int], rcpts: list[str] | None = None, text: bytes = TEXT
) -> tuple[int, str]:
    with Client(address, timeout=15) as client:
        assert client.cmd("EHLO client.test").code == 250
        reply = client.transaction("<a@example.org>", rcpts or ["<user@mx.test>"], text)
        client.cmd("QUIT")
    return reply.code, reply.text


@pytest_twisted.ensureDeferred
async def test_exit_0_is_250_and_the_command_gets_envelope_and_message(qpconn_server, tmp_path):
    command = script(tmp_path, DELIVER.format(extra=""))
    out = tmp_path / "got"
    server = exec_server(qpconn_server, f"{command} 0 {out} -i -f %s -- %r")
    code, text = await in_thread(send, server.address, ["<user@mx.test>", "<-b@mx.test>"])
    assert code == 250 and text.startswith("2.0.0 Queued as ")
    queue_id = text.split()[3]
    args, env, message = out.read_bytes().split(b"\n", 2)
    # One argument per recipient, after --; a leading dash stays inside its argument.
    assert args == b"ARGS: [-i] [-f] [a@example.org] [--] [user@mx.test] [-b@mx.test]"
    assert env == f"ENV: a@example.org|user@mx.test -b@mx.test|{queue_id}".encode()
    # Unix line endings, dot-stuffing undone, our Received field on top.
    assert message.startswith(b"Received: from client.test")
    assert message.endswith(b"\nSubject: piped\n\nline one\n.dotted\n")
    assert b"\r" not in message


@pytest_twisted.ensureDeferred
async def test_crlf_option_keeps_crlf(qpconn_server, tmp_path):
    command = script(tmp_path, DELIVER.format(extra=""))
    out = tmp_path / "got"
    server = exec_server(qpconn_server, f"crlf=yes {command} 0 {out}")
    assert (await in_thread(send, server.address))[0] == 250
    assert out.read_bytes().endswith(b"\r\nSubject: piped\r\n\r\nline one\r\n.dotted\r\n")


@pytest.mark.parametrize(
    ("line", "expected_code", "expected_text"),
    [
        pytest.param("75 {out}", 451, "exited with 75 (temporary failure)", id="ex-tempfail"),
        pytest.param("tempfail=75,111 {cmd} 111 {out}", 451, "exited with 111", id="own-tempfail"),
        pytest.param("1 {out}", 554, "5.3.0 Delivery command failed (exit status 1)", id="exit-1"),
        pytest.param("100 {out}", 554, "(exit status 100)", id="exit-100"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_exit_status_is_the_verdict_and_stderr_is_logged(
    qpconn_server, tmp_path, events, line, expected_code, expected_text
):
    command = script(tmp_path, DELIVER.format(extra="echo 'queue is locked' >&2"))
    out = tmp_path / "got"
    if "{cmd}" not in line:
        line = "{cmd} " + line
    server = exec_server(qpconn_server, line.format(cmd=command, out=out))
    code, text = await in_thread(send, server.address)
    assert code == expected_code and expected_text in text, text
    assert out.exists()  # the command did run and read the message
    logged = [e for e in events if e.get("stream") == "stderr"]
    assert [e["text"] for e in logged] == ["queue is locked"]
    assert logged[0]["queue_id"]
    assert str(tmp_path) not in text  # the client is not told our file system layout


@pytest_twisted.ensureDeferred
async def test_command_killed_by_a_signal_is_451(qpconn_server, tmp_path):
    command = script(tmp_path, "#!/bin/sh\ncat >/dev/null\nkill -9 $$\n")
    server = exec_server(qpconn_server, command)
    code, text = await in_thread(send, server.address)
    assert code == 451 and "killed by signal 9" in text, text


@pytest_twisted.ensureDeferred
async def test_command_running_too_long_is_killed_and_451(qpconn_server, tmp_path):
    command = script(tmp_path, "#!/bin/sh\ncat >/dev/null\nexec sleep 30\n")
    server = exec_server(qpconn_server, f"timeout=0.5 {command}")
    started = time.monotonic()
    code, text = await in_thread(send, server.address)
    assert code == 451 and "did not finish in 0.5s" in text, text
    assert time.monotonic() - started < 15  # killed at 0.5 s, not left to its 30 s sleep


@pytest_twisted.ensureDeferred
async def test_command_exiting_without_reading_a_large_message(qpconn_server, tmp_path):
    command = script(tmp_path, "#!/bin/sh\nexit 1\n")
    server = qpconn_server(
        files={"size_threshold": "65536"},
        plugins=["relay", "rcpt_ok", f"queue/exec {command}"],
    )
    big = b"Subject: big\r\n\r\n" + b"y" * 100 + (b"\r\n" + b"z" * 998) * 3000
    code, _ = await in_thread(send, server.address, None, big)
    assert code == 554


@pytest_twisted.ensureDeferred
async def test_large_spooled_message_reaches_stdin_intact(qpconn_server, tmp_path):
    command = script(tmp_path, DELIVER.format(extra=""))
    out = tmp_path / "got"
    server = qpconn_server(
        files={"size_threshold": "65536"},
        plugins=["relay", "rcpt_ok", f"queue/exec {command} 0 {out}"],
    )
    body = b"".join(b"line %06d %s\r\n" % (i, b"q" * 70) for i in range(40000))
    code, _ = await in_thread(send, server.address, None, b"Subject: big\r\n\r\n" + body[:-2])
    assert code == 250
    assert out.read_bytes().endswith(b"\n\n" + body.replace(b"\r\n", b"\n"))


@pytest_twisted.ensureDeferred
async def test_a_slow_command_does_not_block_other_sessions(qpconn_server, tmp_path):
    # The command waits (bounded) for a gate that only another, complete session opens:
    # if running it blocked the reactor, that session could never be served.
    started, gate = tmp_path / "started", tmp_path / "gate"
    command = script(
        tmp_path,
        f"#!/bin/sh\ncat >/dev/null\ntouch {started}\n"
        f"i=0; while [ ! -e {gate} ] && [ $i -lt 1500 ]; do sleep 0.02; i=$((i+1)); done\n"
        f"[ -e {gate} ]\n",
    )
    server = exec_server(qpconn_server, command)
    slow = in_thread(send, server.address)

    def meanwhile() -> bool:
        assert wait_until(started.exists)
        with Client(server.address) as client:
            assert client.cmd("EHLO other.test").code == 250
            assert client.cmd("NOOP").code == 250
            client.cmd("QUIT")
        running = not slow.called  # the slow delivery was waiting all along
        gate.touch()
        return running

    assert await in_thread(meanwhile)
    assert (await slow)[0] == 250  # the command saw the gate: it exited 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "expects a COMMAND", id="nothing"),
        pytest.param(["timeout=3"], "expects a COMMAND", id="only-options"),
        pytest.param(["/nonexistent/sendmail"], "not an executable", id="missing"),
        pytest.param(["no-such-command-qpconn"], "not an executable", id="not-on-path"),
        pytest.param(["timeout=x", "sh"], "bad option value", id="bad-timeout"),
        pytest.param(["timeout=0", "sh"], "must be positive", id="zero-timeout"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(PluginLoadError, match=message):
        load_plugin(Config(None), "queue/exec", *args)


def test_command_is_found_on_the_path():
    plugin = load_plugin(Config(None), "queue/exec", "sh", "-c", "cat")
    assert os.path.isabs(plugin.command[0]) and plugin.command[1:] == ["-c", "cat"]




def test_placeholders_are_filled_in_one_pass():
    from qpconn.mail.address import Address
    from qpconn.mail.transaction import Transaction

    plugin = load_plugin(Config(None), "queue/exec", "sh", "-f%s", "%i", "--", "%r")
    txn = Transaction(None, id="Q1")
    txn.sender = Address.parse("<x%i@example.org>")
    txn.recipients = [Address.parse("<a@mx.test>"), Address.parse("<b@mx.test>")]
    assert plugin.argv(txn)[1:] == ["-fx%i@example.org", "Q1", "--", "a@mx.test", "b@mx.test"]
