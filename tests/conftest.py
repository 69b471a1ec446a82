"""Shared fixtures: a real qpconn on a loopback port per test."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support.compiled import check_compiled_imports
from tests.support.server import RunningServer, start_server
from tests.support.tlscerts import TlsFiles, make_pki

ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once when the strict editable install (setup.cfg) lacks a module file of
    the checkout: the servers the tests start in subprocesses would fail to import it,
    with tracebacks that do not say why."""
    trees = [Path(entry) for entry in sys.path if "__editable__.qpconn-" in entry]
    if not trees or not (trees[0] / "qpconn").is_dir():
        return  # a plain install, or another editable mode: nothing to compare
    linked = {path.relative_to(trees[0]) for path in (trees[0] / "qpconn").rglob("*.py")}
    missing = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "qpconn").rglob("*.py")
        if path.relative_to(ROOT) not in linked
    )
    if missing:
        pytest.exit(
            f"the editable install does not have {', '.join(missing)} (new module files): "
            "run `.venv/bin/pip install -e '.[test]'` again (docs/getting-started.md)",
            returncode=4,
        )


def pytest_configure(config: pytest.Config) -> None:
    """Under ``QPCONN_EXPECT_COMPILED=1`` (.ci/run's second pass), stop before any test
    when a module of the compiled build imports as Python source: the run would test the
    pure build twice."""
    problem = check_compiled_imports()
    if problem:
        raise pytest.UsageError(problem)


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in its own directory: defaults like ./maildir must not land in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def qpconn_server(tmp_path: Any) -> Iterator[Callable[..., RunningServer]]:
    """Call it (with start_server's keywords) to get a running server; all stop at teardown."""
    started: list[RunningServer] = []

    def start(**kwargs: Any) -> RunningServer:
        server = start_server(tmp_path, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        pytest_twisted.blockon(server.stop())
        pytest_twisted.blockon(server.wait_sessions_closed())


@pytest.fixture
def server(qpconn_server: Callable[..., RunningServer]) -> RunningServer:
    """A server with the default test config: relay, rcpt_ok (mx.test, localhost), maildir."""
    return qpconn_server()


@pytest.fixture
def pki(tmp_path: Any) -> TlsFiles:
    """A test CA and a localhost/127.0.0.1 server certificate it signed (see tlscerts)."""
    return make_pki(str(tmp_path / "pki"))
