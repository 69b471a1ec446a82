"""Connection: start(), notes in both forms, clone() and reset()."""

from __future__ import annotations

import pytest

from qpconn.mail.connection import Connection, Notes

PEER = {
    "remote_ip": "127.0.0.9",
    "remote_port": 40000,
    "local_ip": "127.0.0.1",
    "local_port": 25,
    "remote_host": "peer.test",
    "remote_host_verified": True,
    "remote_info": "alice",
    "relay_client": True,
}


def full_connection() -> Connection:
    connection = Connection(**PEER, hello="ehlo", hello_host="client.test")
    connection.notes["spam_score"] = 3
    connection.notes["seen"] = ["dnsbl"]
    return connection


def test_new_connection_knows_nothing_but_its_id():
    connection = Connection()
    assert connection.id
    assert connection.remote_ip is None and connection.remote_host is None
    assert connection.remote_host_verified is False and connection.relay_client is False
    assert connection.hello is None and connection.hello_host is None
    assert connection.notes == {} and isinstance(connection.notes, Notes)
    assert connection.remote_host_or_unknown == "unknown"


def test_ids_are_unique():
    assert len({Connection().id for _ in range(100)}) == 100


def test_start_sets_fields_and_returns_the_connection():
    connection = Connection()
    assert connection.start(**PEER, notes={"a": 1}) is connection
    for name, value in PEER.items():
        assert getattr(connection, name) == value
    assert connection.notes == {"a": 1} and isinstance(connection.notes, Notes)
    assert connection.remote_host_or_unknown == "peer.test"


def test_start_refuses_unknown_names():
    connection = Connection()
    with pytest.raises(TypeError, match="remote_addr"):
        connection.start(remote_addr="127.0.0.1")
    with pytest.raises(TypeError, match="bogus"):
        Connection(remote_ip="127.0.0.1", bogus=1)
    assert connection.remote_ip is None  # nothing half-applied


def test_notes_are_a_mapping_and_a_qpsmtpd_call():
    notes = Connection().notes
    assert notes("missing") is None
    assert notes("key", "value") == "value"
    assert notes("key") == "value" and notes["key"] == "value"
    notes["other"] = 2
    assert notes("other") == 2
    assert notes("none", None) is None and "none" in notes  # None is a value, not a read


def test_clone_copies_the_physical_fields_and_notes_not_the_conversation():
    original = full_connection()
    clone = original.clone(no_reset=True)
    assert clone is not original and clone.id != original.id
    for name, value in PEER.items():
        assert getattr(clone, name) == value, name
    assert clone.hello is None and clone.hello_host is None
    assert clone.notes == {"spam_score": 3, "seen": ["dnsbl"]}
    assert isinstance(clone.notes, Notes) and clone.notes is not original.notes


def test_clone_notes_are_a_copy():
    original = full_connection()
    clone = original.clone(no_reset=True)
    clone.notes["spam_score"] = 99
    clone.notes("new", 1)
    del clone.notes["seen"]
    assert original.notes == {"spam_score": 3, "seen": ["dnsbl"]}
    original.notes["late"] = True
    assert "late" not in clone.notes


def test_clone_resets_the_original_by_default():
    original = full_connection()
    old_id = original.id
    clone = original.clone()
    assert clone.remote_ip == "127.0.0.9" and clone.notes["spam_score"] == 3
    assert original.id == old_id
    assert original.remote_ip is None and original.remote_host is None
    assert original.remote_host_verified is False and original.relay_client is False
    assert original.hello_host is None and original.notes == {}


def test_clone_with_no_reset_leaves_the_original_alone():
    original = full_connection()
    original.clone(no_reset=True)
    assert original.remote_ip == "127.0.0.9" and original.hello_host == "client.test"
    assert original.notes["spam_score"] == 3


def test_reset_forgets_everything_but_the_id():
    connection = full_connection()
    connection.tls = {"cipher": "x"}
    connection.auth_user = "bob"
    old_id = connection.id
    connection.reset()
    assert connection.id == old_id
    fresh = Connection()
    for name in (*PEER, "hello", "hello_host", "tls", "auth_user", "auth_mechanism"):
        assert getattr(connection, name) == getattr(fresh, name), name
    assert connection.notes == {} and isinstance(connection.notes, Notes)
