"""The parts of :mod:`qpconn.testing` the shipped plugins' kit tests rely on: ``Harness``
(several sessions, one server), ``early`` bytes, inline worker pools, and NODATA answers."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from twisted.internet import task

from qpconn import DECLINED
from qpconn.kit.threads import inline_pools, run_in_pool
from qpconn.plugins import Plugin
from qpconn.testing import DNSTable, Harness, run_session

DOC = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()


def test_the_harness_example_in_testing_md_passes(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
    (block,) = [b for b in blocks if "Harness" in b]
    namespace: dict[str, object] = {}
    exec(compile(block, "docs/testing.md", "exec"), namespace)
    namespace["test_a_retry_after_the_grey_period_passes"](tmp_path)  # type: ignore[operator]


class Counter(Plugin):
    """Counts sessions across runs: state a harness must keep."""

    def register(self, *args: str) -> None:
        self.seen: list[tuple[str, float]] = []

    def hook_connect(self, transaction):
        conn = transaction.connection
        self.seen.append((conn.remote_ip, self.server.clock.seconds()))
        return DECLINED


def test_a_harness_keeps_plugins_clock_and_dns_between_sessions():
    with Harness([Counter], dns_answers={("192.0.2.1", "PTR"): "c.example"}) as harness:
        harness.run(["NOOP"])
        harness.clock.advance(60)
        second = harness.run(["NOOP"], remote_ip="2001:db8::5")
        counter = harness.plugin("Counter")
        assert counter is harness.plugins[0]
        assert counter.seen == [("192.0.2.1", 0.0), ("2001:db8::5", 60.0)]
        assert second.connection["remote_ip"] == "2001:db8::5"
        assert second.dns is harness.dns and len(harness.dns.questions) >= 2
        config_dir = Path(harness.config.directory)
        assert (config_dir / "me").exists()
        with pytest.raises(KeyError):
            harness.plugin("nothere")
    assert not config_dir.exists()  # the temporary config directory is gone


class Early(Plugin):
    """Holds the greeting back a second (on the server's clock), then looks."""

    async def hook_connect(self, transaction):
        await task.deferLater(self.server.clock, 1, lambda: None)
        notes = transaction.connection.notes
        notes["seen_early"] = bool(notes.get("early_talker"))
        return DECLINED


def test_early_bytes_arrive_before_the_greeting_and_are_answered_after_it():
    result = run_session([Early], ["NOOP"], early=b"EHLO quick.example\r\n")
    assert result.codes == [220, 250, 250]  # greeting, the early EHLO, NOOP
    assert result.connection["hello_host"] == "quick.example"
    assert result.connection_notes["seen_early"] is True
    patient = run_session([Early], ["EHLO slow.example"])
    assert patient.connection_notes["seen_early"] is False
    assert patient.codes == [220, 250]
    # without a hook holding the greeting, it is out at once: the bytes are not early
    prompt = run_session([], ["NOOP"], early=b"EHLO quick.example\r\n")
    assert prompt.codes == [220, 250, 250]
    assert "early_talker" not in prompt.connection_notes


def test_inline_pools_run_in_the_callers_thread_only_inside_the_block():
    here = threading.get_ident()
    with inline_pools("greylist"):
        with inline_pools("greylist"):  # nested blocks: the outer one still holds
            pass
        done = run_in_pool("greylist", threading.get_ident)
        assert done.called and done.result == here
        failed = run_in_pool("greylist", lambda: 1 / 0)
        failed.addErrback(lambda failure: failure.trap(ZeroDivisionError))
    import qpconn.kit.threads as workers

    assert workers._INLINE == {}


def test_a_name_in_the_table_has_no_records_of_other_types():
    table = DNSTable({("example.org", "A"): "192.0.2.80"})
    empty = table.lookupMailExchange("example.org")
    assert empty.result == ([], [], [])
    missing = table.lookupMailExchange("nowhere.example")
    missing.addErrback(lambda failure: failure.type.__name__).addCallback(
        lambda name: setattr(missing, "seen", name)
    )
    assert missing.seen == "DNSNameError"
