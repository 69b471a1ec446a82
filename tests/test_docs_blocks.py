"""Every shell and Python block of README.md and docs/*.md is run or checked.

The rules (tests/support/docblocks.py reads the markers):

* every Python block compiles; a page's Python blocks are then run in order, as one
  module, in a fresh interpreter (a later block may use what an earlier one defined), and
  a ``test_*`` function a block defines without arguments is called;
* every shell block passes ``sh -n``, splits into words, and names only commands that exist:
  ``twistd`` with twistd's and qpconn's own options, ``python -m qpconn`` with a subcommand
  and options it has, a ``.venv/bin`` program this virtualenv has, or a program on PATH;
* a shell block without a marker that starts ``twistd`` is run: ``twistd -n ...`` lines
  start a real server (checked for its banner, stopped at the end), the other lines run
  while it serves and must succeed; the other shell blocks (a ``pip install``, a ``curl``)
  are the reader's to run and are checked only;
* a block marked ``<!-- not run: REASON -->`` is only checked; ``<!-- run by: PATH -->``
  and ``<!-- example: NAME -->`` name the test (or ``.ci/run``) that runs it, which must
  exist and read that page.

What a reader would change for their machine is changed for the test, always the same
way (:class:`Machine`): ``/etc/qpconn`` is a temporary config directory, the ports
(25, 465, 2525, 9125, ...) are free loopback ports and every address is loopback,
``/srv/mail`` and ``/run/qpconn`` are temporary directories, ``.venv`` is this
virtualenv and ``docs/`` this checkout's, and OpenTelemetry exports nowhere
(``OTEL_TRACES_EXPORTER=none``) unless the block says otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpconn.app.options import Options
from tests.support.docblocks import REPO, Block, blocks, commands, logical_lines
from tests.support.process import free_port, ipv6_loopback
from tests.support.timing import wait_until
from tests.support.tlscerts import make_pki

BLOCKS = blocks()
PYTHON = [block for block in BLOCKS if block.lang == "python"]
SHELL = [block for block in BLOCKS if block.lang == "sh"]
BIN = Path(sys.executable).parent
#: programs documented for the administrator's machine, not ours to ship
SYSTEM_TOOLS = {"ls", "curl", "jq", "grep", "printf", "kill", "systemctl", "pip", "python3"}


def ids(items: list[Block]) -> list[str]:
    return [block.where for block in items]


# -- markers ------------------------------------------------------------------------------
def test_every_marker_names_what_runs_the_block_or_why_nothing_does():
    tests_text = "".join(path.read_text(encoding="utf-8") for path in (REPO / "tests").glob("*.py"))
    marked = [block for block in BLOCKS if block.marker]
    assert marked, "no markers found: the parser is broken"
    for block in marked:
        if block.marker == "example":
            assert f"<!-- example: {block.value} -->" in tests_text, block.where
        elif block.marker == "run by":
            runner = REPO / block.value.split()[0]
            assert runner.is_file(), f"{block.where}: {runner} does not exist"
            text = runner.read_text(encoding="utf-8")
            page = Path(block.page).name
            assert page in text or any(line in text for line in logical_lines(block.text)), (
                f"{block.where}: {runner.name} neither reads {page} nor runs the block's lines"
            )
        else:
            assert len(block.value.split()) >= 3, f"{block.where}: say why it is not run"


def test_the_parser_sees_the_blocks_it_should():
    # guards against a parser that silently finds nothing (and so checks nothing)
    pages = {block.page for block in BLOCKS}
    assert {"README.md", "docs/running.md", "docs/plugins.md", "docs/testing.md"} <= pages
    assert len(PYTHON) >= 25 and len(SHELL) >= 25
    assert any(block.marker == "not run" for block in BLOCKS)


# -- Python -------------------------------------------------------------------------------
@pytest.mark.parametrize("block", PYTHON, ids=ids(PYTHON))
def test_python_block_compiles(block):
    compile(block.text, block.where, "exec")


HARNESS = textwrap.dedent(
    """
    import inspect, json, sys, traceback

    namespace = {"__name__": "docs_page"}
    results = []
    for where, code, call_tests in json.load(sys.stdin):
        before = set(namespace)
        try:
            exec(compile(code, where, "exec"), namespace)
            for name in sorted(set(namespace) - before) if call_tests else ():
                function = namespace[name]
                if name.startswith("test_") and callable(function):
                    needs = [p.name for p in inspect.signature(function).parameters.values()
                             if p.default is p.empty]
                    if needs:
                        raise AssertionError(f"{name} needs fixtures {needs}: mark the block "
                                             "with the test that runs it")
                    function()
            results.append([where, None])
        except BaseException:
            results.append([where, traceback.format_exc()])
    print(json.dumps(results))
    """
)
PAGES_WITH_PYTHON = sorted({block.page for block in PYTHON})


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON)
def test_python_blocks_of_the_page_run(page, machine):
    """A page's blocks, in order, as one module; ``not run`` blocks are left out."""
    chosen = [block for block in PYTHON if block.page == page and block.marker != "not run"]
    if not OTEL and any("qpconn.app.tracing" in block.text for block in chosen):
        pytest.skip(f"{page} has a block that traces: {NO_OTEL}")
    if not chosen:
        pytest.skip(f"{page}: every Python block is marked not run (each says why)")
    payload = [[block.where, machine.substitute(block.text), block.marker is None]
               for block in chosen]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", HARNESS], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=180, cwd=machine.cwd,
                          env=machine.env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    failed = [f"{where}:\n{error}" for where, error in json.loads(done.stdout) if error]
    assert not failed, "\n".join(failed)


# -- shell: checked -----------------------------------------------------------------------
def twistd_options() -> set[str]:
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    names = {"--" + name.rstrip("=") for name in options.longOpt}
    return names | {"-" + letter for letter in options.shortOpt if letter != ":"}


def qpconn_options() -> set[str]:
    options = Options()
    names = {"--" + name.rstrip("=") for name in options.longOpt}
    return names | {"-" + letter for letter in options.shortOpt if letter != ":"}


def qpconn_subcommands() -> dict[str, set[str]]:
    """``python -m qpconn`` subcommand -> its options, from its own help."""
    done = subprocess.run([sys.executable, "-m", "qpconn", "--help"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    listing = done.stdout + done.stderr
    names = re.findall(r"^  ([a-z][a-z-]*)\s", listing.split("commands:", 1)[-1], flags=re.M)
    found = {}
    for name in names:
        done = subprocess.run([sys.executable, "-m", "qpconn", name, "--help"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        text = done.stdout + done.stderr
        found[name] = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))
    return found


@pytest.fixture(scope="module")
def known() -> dict[str, object]:
    return {"twistd": twistd_options(), "qpconn": qpconn_options(),
            "subcommands": qpconn_subcommands()}  # fmt: skip


def option_name(word: str) -> str | None:
    """``--listen``, ``-n`` of an option word (``--logger=x`` -> ``--logger``); None else."""
    word = word.strip("[]")
    if not word.startswith("-") or word == "-":
        return None
    return word.split("=", 1)[0]


def check_command(words: list[str], known: dict[str, object], where: str) -> None:
    if words[0] == "sudo":  # the administrator's, not needed here: the command is what counts
        words = words[1:]
    program = words[0]
    name = Path(program).name
    if program.startswith(".venv/bin/"):
        assert (BIN / name).exists(), f"{where}: {program}: this virtualenv has no {name}"
    elif name not in ("twistd", "python", "python3") and name not in SYSTEM_TOOLS:
        assert shutil.which(program), f"{where}: no program {program!r}"
    if name == "twistd":
        ours = words.index("qpconn") if "qpconn" in words else len(words)
        for word in words[1:ours]:
            option = option_name(word)
            if option:
                assert option in known["twistd"], f"{where}: twistd has no option {option}"
        for word in words[ours + 1 :]:
            option = option_name(word)
            if option and word != "...":
                assert option in known["qpconn"], f"{where}: twistd qpconn has no {option}"
    elif name in ("python", "python3") and words[1:3] == ["-m", "qpconn"]:
        subcommands = known["subcommands"]
        assert isinstance(subcommands, dict)
        assert words[3] in subcommands, f"{where}: python -m qpconn has no {words[3]!r}"
        for word in words[4:]:
            option = option_name(word)
            if option:
                assert option in subcommands[words[3]], f"{where}: {words[3]} has no {option}"


@pytest.mark.parametrize("block", SHELL, ids=ids(SHELL))
def test_shell_block_parses_and_names_what_exists(block, known):
    syntax = subprocess.run(["sh", "-n"], input=block.text, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block.where}: {syntax.stderr}"
    lines = logical_lines(block.text)
    assert lines, f"{block.where}: an empty block"
    for line in lines:
        for words in commands(line):
            check_command(words, known, block.where)


def test_the_check_fails_on_a_wrong_option_or_command(known):
    """The checks above can fail: a misspelt option, subcommand or program is caught."""
    bad = [["twistd", "-n", "qpconn", "--listne", "tcp:25"], ["twistd", "--nodeamon", "qpconn"],
           ["python", "-m", "qpconn", "chekc"], ["python", "-m", "qpconn", "check", "--conf"],
           ["twsitd", "-n"], [".venv/bin/no-such-program"]]  # fmt: skip
    for words in bad:
        with pytest.raises(AssertionError):
            check_command(words, known, "test")
    assert commands("A=1 B='x y' twistd -n qpconn > log && curl -s u | grep ^q") == [
        ["twistd", "-n", "qpconn"], ["curl", "-s", "u"], ["grep", "^q"]]  # fmt: skip


# -- shell: run ---------------------------------------------------------------------------
class Machine:
    """The reader's machine, for a test: see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cwd = self.workdir("work")
        self.config = root / "etc-qpconn"
        self.config.mkdir()
        (self.config / "me").write_text("mx.example.com\n")
        pki = make_pki(str(root / "pki"))
        shutil.copy(pki.cert, self.config / "cert.pem")
        shutil.copy(pki.key, self.config / "key.pem")
        self.ports: dict[str, int] = {}
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        # no collector here: traces go nowhere unless a block names its exporter
        self.env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO),
                    "OTEL_TRACES_EXPORTER": "none"}  # fmt: skip

    def workdir(self, name: str) -> Path:
        """A working directory with this checkout's docs/ and this virtualenv as .venv."""
        path = self.root / name
        path.mkdir()
        (path / "docs").symlink_to(REPO / "docs")
        (path / ".venv").symlink_to(Path(sys.prefix))
        return path

    def port(self, documented: str) -> int:
        if documented not in self.ports:
            self.ports[documented] = free_port()
        return self.ports[documented]

    def substitute(self, text: str) -> str:
        text = text.replace("/etc/qpconn", str(self.config))
        for documented, ours in (("/srv/mail", "srv-mail"), ("/run/qpconn", "run-qpconn")):
            if documented in text:
                (self.root / ours).mkdir(exist_ok=True)
                text = text.replace(documented, str(self.root / ours))

        def endpoint(match: re.Match[str]) -> str:
            kind, port, rest = match.groups()
            rest = re.sub(r":interface=(?:\\:|[^:\s'\"])*", "", rest or "")
            interface = r"\:\:1" if kind == "tcp6" else "127.0.0.1"
            return f"{kind}:{self.port(port)}{rest}:interface={interface}"

        text = re.sub(r"\b(tcp6|tcp|ssl):(\d+)((?::(?:\\:|[^:\s'\"])+)*)", endpoint, text)
        return re.sub(r"\b127\.0\.0\.1:(\d+)/", lambda m: f"127.0.0.1:{self.port(m[1])}/", text)


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def connect(target: int | str) -> socket.socket:
    """A connection to a loopback port, or to a unix socket path."""
    if isinstance(target, int):
        return socket.create_connection(("127.0.0.1", target), timeout=30)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def banner(target: int | str, greeted: bool) -> bytes:
    with connect(target) as sock:
        return sock.recv(512) if greeted else b"(accepted)"


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The servers a block starts; each is stopped (its process group: sh, then twistd and
    its workers) when the test ends."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


#: the blocks that start a server; the others are checked above (a pip install, a curl, a
#: sudo on the reader's machine are theirs to run)
RUN = [block for block in SHELL if block.marker is None
       and any(Path(words[0]).name == "twistd" for line in logical_lines(block.text)
               for words in commands(line))]  # fmt: skip
OTEL = importlib.util.find_spec("opentelemetry") is not None
NO_OTEL = "the otel extra is not installed (pip install -e '.[otel]', as .ci/run does)"


@pytest.mark.parametrize("block", RUN, ids=ids(RUN))
def test_shell_block_runs_with_a_real_server(block, machine, servers):
    if "--tracing" in block.text and not OTEL:
        pytest.skip(f"{block.where} traces: {NO_OTEL}")
    if "tcp6:" in block.text and not ipv6_loopback():
        pytest.skip(f"{block.where} listens on IPv6 and this machine has no ::1")
    for number, line in enumerate(logical_lines(block.text)):
        ran = machine.substitute(line)
        words = commands(ran)[0]
        if Path(words[0]).name == "twistd" and "-n" in words:
            targets: list[int | str] = [int(p) for p in re.findall(r"\btcp6?:(\d+)", ran)]
            targets += re.findall(r"\bunix:(/[^:\s'\"]+)", ran)
            if not targets:  # the built-in default, which no option here replaces
                targets = [2525]
                if not wait_until(lambda: port_free(2525), 5):
                    pytest.skip(f"{block.where} needs port 2525, which is in use")
            log = machine.root / f"server-{number}.log"
            # each server in a directory of its own (its twistd.pid), as in a terminal of its own
            where = machine.cwd if number == 0 else machine.workdir(f"work-{number}")
            with open(log, "wb") as out:
                process = subprocess.Popen(["sh", "-c", ran], cwd=where, env=machine.env,
                                           stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # fmt: skip
            servers.append(process)
            up = wait_until(lambda p=process, at=targets[0]: p.poll() is not None or accepts(at),
                            60)  # fmt: skip
            assert up and process.poll() is None, f"{block.where}: {ran}\n{log.read_text()}"
            greeted = "--proxy-" not in ran  # a PROXY listener waits for the header first
            first = banner(targets[0], greeted)
            assert first.startswith(b"220 " if greeted else b"(accepted)"), (ran, first)
        else:
            done = subprocess.run(["sh", "-c", ran], cwd=machine.cwd, env=machine.env,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            assert done.returncode == 0, f"{block.where}: {ran}\n{done.stdout}{done.stderr}"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def accepts(target: int | str) -> bool:
    try:
        with connect(target):
            return True
    except OSError:
        return False


# -- the quick start ----------------------------------------------------------------------
QUICK_START = [block for block in SHELL if ".venv/bin/twistd -n qpconn" in block.text]
TRY_IT = [block for block in SHELL if "smtplib.SMTP('127.0.0.1', 2525)" in block.text]


def test_the_quick_start_blocks_agree_and_the_test_command_is_what_ci_runs():
    # README.md, docs/getting-started.md and docs/index.md
    assert len(QUICK_START) == 3 and len(TRY_IT) == 3
    assert len({block.text for block in TRY_IT}) == 1
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for block in BLOCKS:
        for line in logical_lines(block.text):
            if "python -m pytest" in line:
                assert f"\n{line}\n" in ci, f"{block.where}: .ci/run does not run {line!r}"


def test_the_quick_start_server_takes_the_try_it_message(machine, servers):
    """The quick start's server command (its installs are .ci/run's: this virtualenv is the
    one they made) and the "Try it" block, both as written, on port 2525; the stored file
    starts as docs/getting-started.md says."""
    if not wait_until(lambda: port_free(2525), 5):
        pytest.skip("the quick start listens on 127.0.0.1:2525, which is in use")
    (command,) = {line.rsplit("&& ", 1)[1] for block in QUICK_START
                  for line in logical_lines(block.text) if "twistd" in line}  # fmt: skip
    assert command == ".venv/bin/twistd -n qpconn"
    log = machine.root / "quick-start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["sh", "-c", command], cwd=machine.cwd, env=machine.env,
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    servers.append(process)
    assert wait_until(lambda: process.poll() is not None or accepts(2525), 60), log.read_text()
    assert process.poll() is None, log.read_text()
    done = subprocess.run(["sh", "-e", "-c", TRY_IT[0].text], cwd=machine.cwd, env=machine.env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (name,) = done.stdout.split()  # ls maildir/new: the one message
    stored = (machine.cwd / "maildir" / "new" / name).read_bytes()
    first, second, third = stored.splitlines()[:3]
    assert first == b"Return-Path: <me@example.org>"
    assert second == b"Delivered-To: you@localhost"
    assert third.startswith(b"Received: from ")
    assert stored.rstrip().endswith(b"\nhello")
    text = (REPO / "docs" / "getting-started.md").read_text(encoding="utf-8")
    assert "starts with the `Return-Path:`" in text and "`Delivered-To:`" in text


# -- transcripts --------------------------------------------------------------------------
def test_the_ehlo_reply_in_extensions_md_is_the_servers():
    """extensions.md's EHLO reply, from the real protocol class (qpconn.testing) with the
    page's settings: mx.example.org, databytes 10485760, a client at 192.0.2.7 whose name
    is client.example."""
    from qpconn.testing import run_session

    text = (REPO / "docs" / "extensions.md").read_text(encoding="utf-8")
    shown = text[text.index("```\n250-mx.example.org") + 4 :]
    shown = shown[: shown.index("```")].splitlines()
    answers = {("192.0.2.7", "PTR"): "client.example", ("client.example", "A"): "192.0.2.7"}
    result = run_session([], ["EHLO client.example"], remote_ip="192.0.2.7",
                         config={"me": "mx.example.org", "databytes": "10485760"},
                         dns_answers=answers)  # fmt: skip
    ehlo = result.replies[1]
    said = [f"250-{line}" for line in ehlo.lines[:-1]] + [f"250 {ehlo.lines[-1]}"]
    assert said == shown
