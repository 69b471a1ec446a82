"""The config directory: its file format, and the forms a ``relayclients`` entry takes.

The format is qpsmtpd's (one value per line, ``#`` comments, blank lines ignored), so its
users can bring their directory; ``relayclients`` takes single addresses, CIDR networks
and qpsmtpd's textual prefixes, for IPv4 and IPv6. The relay cases run through the real
``relay`` plugin, and end to end over both loopback families.
"""

from __future__ import annotations

import smtplib
from typing import Any

import pytest
import pytest_twisted

from qpconn.config import Config, ConfigError
from qpconn.mail.connection import Connection
from qpconn.mail.transaction import Transaction
from qpconn.plugins import PluginLoadError, load_plugin
from tests.support.process import ipv6_loopback
from tests.support.server import in_thread


def test_values_comments_blank_lines_and_spaces(tmp_path):
    (tmp_path / "rcpthosts").write_text(
        "# our domains\n\n  example.com   # the main one\n\t.example.net\t\n#last\n"
    )
    (tmp_path / "databytes").write_text("\n# in octets\n1000 # one kB\n2000\n")
    config = Config(tmp_path)
    assert config.lines("rcpthosts") == ["example.com", ".example.net"]
    assert config.get("databytes") == "1000" and config.get_int("databytes", 0) == 1000


def test_missing_file_is_the_default_and_an_empty_file_is_no_value(tmp_path):
    (tmp_path / "rcpthosts").write_text("# nothing here\n\n")
    config = Config(tmp_path)
    assert config.lines("rcpthosts") == []
    assert Config(tmp_path / "..").lines("timeout") == ["300"]
    assert config.get_float("timeout", 0.0) == 300.0
    assert config.get("smtpgreeting") is None


def test_a_bad_number_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "databytes").write_text("fifty megabytes\n")
    (tmp_path / "timeout").write_text("soon\n")
    config = Config(tmp_path)
    with pytest.raises(ConfigError, match="databytes"):
        config.get_int("databytes", 0)
    with pytest.raises(ConfigError, match="timeout"):
        config.get_float("timeout", 0.0)


def test_files_are_read_once(tmp_path):
    (tmp_path / "me").write_text("mx.example.com\n")
    config = Config(tmp_path)
    assert config.me == "mx.example.com"
    (tmp_path / "me").write_text("other.example.com\n")
    assert config.me == "mx.example.com"


def test_hostname_override_replaces_me(tmp_path):
    (tmp_path / "me").write_text("mx.example.com\n")
    assert Config(tmp_path, overrides={"me": "mx.example.org"}).me == "mx.example.org"


def relay_verdict(tmp_path: Any, entries: list[str], ip: str | None, *, more: bool = False) -> bool:
    """What the real relay plugin decides for a client at ``ip``."""
    (tmp_path / ("morerelayclients" if more else "relayclients")).write_text(
        "".join(f"{entry}\n" for entry in entries)
    )
    plugin = load_plugin(Config(tmp_path), "relay")
    connection = Connection(remote_ip=ip)
    plugin.hook_connect(Transaction(connection))
    return connection.relay_client


@pytest.mark.parametrize(
    ("entry", "ip", "relays"),
    [
        ("192.0.2.7", "192.0.2.7", True),
        ("192.0.2.7", "192.0.2.70", False),
        ("10.0.0.0/8", "10.200.3.4", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("192.168.", "192.168.44.1", True),
        ("192.168.", "192.16.8.1", False),
        ("2001:db8::25", "2001:db8::25", True),
        ("2001:db8::25", "2001:db8::26", False),
        ("2001:db8::/32", "2001:db8:ffff::1", True),
        ("2001:db8::/32", "2001:db9::1", False),
        ("2001:db8:", "2001:db8::1", True),  # the compressed form
        ("2001:0db8:0000:", "2001:db8::1", True),  # the full form
        ("2001:db8:", "2001:db9::1", False),
        ("::1", "::1", True),
        ("127.0.0.1", None, False),  # a Unix socket has no address
    ],
)
def test_relayclients_entries(tmp_path, entry, ip, relays):
    assert relay_verdict(tmp_path, [entry], ip) is relays


# "192.168.1" is neither an address nor a prefix (no trailing dot): refused, not guessed.
@pytest.mark.parametrize("entry", ["192.168.1", "not-an-address", "10.0.0.0/33", "2001:db8::/129"])
def test_a_bad_relayclients_entry_stops_the_start(tmp_path, entry):
    with pytest.raises((PluginLoadError, ValueError), match="relayclients"):
        relay_verdict(tmp_path, [entry], "192.0.2.1")


def test_morerelayclients_adds_to_relayclients(tmp_path):
    (tmp_path / "relayclients").write_text("192.0.2.1\n")
    assert relay_verdict(tmp_path, ["198.51.100.0/24"], "198.51.100.9", more=True)
    assert relay_verdict(tmp_path, ["198.51.100.0/24"], "192.0.2.1", more=True)


@pytest.mark.parametrize(
    ("interface", "entries"),
    [
        ("127.0.0.1", ["127."]),
        ("::1", ["::1/128"]),
        ("::1", ["0000:0000:0000:0000:0000:0000:0000:"]),  # a prefix of the full form
    ],
)
@pytest_twisted.ensureDeferred
async def test_relay_client_may_send_anywhere_over_both_families(qpconn_server, interface, entries):
    if ":" in interface and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    relaying = qpconn_server(files={"relayclients": entries}, interface=interface)

    def client(server: Any) -> tuple[int, bytes]:
        with smtplib.SMTP(server.host, server.address[1], timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("a@example.org")
            return smtp.rcpt("someone@elsewhere.example")

    code, text = await in_thread(client, relaying)
    assert (code, text) == (250, b"2.1.5 <someone@elsewhere.example>, recipient ok")
