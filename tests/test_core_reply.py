"""Reply formatting: the one place codes and text become wire bytes."""

from __future__ import annotations

import re

import pytest

from qpconn.core.reply import Reply

WIRE_LINE = re.compile(rb"^[2-5]\d\d([ -][^\r\n]*)?\r\n$")


def wire_lines(reply):
    data = reply.to_bytes()
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    for line in lines:
        assert WIRE_LINE.match(line + b"\r\n"), line
    return lines


def test_single_line():
    assert Reply(250, "OK").to_bytes() == b"250 OK\r\n"


def test_empty_text_gives_the_bare_code():
    assert Reply(250).to_bytes() == b"250\r\n"


def test_multi_line_uses_dash_on_all_but_the_last_line():
    reply = Reply(250, ["mail.example", "PIPELINING", "8BITMIME"])
    assert reply.to_bytes() == b"250-mail.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    assert Reply(250, "a\nb").to_bytes() == b"250-a\r\n250 b\r\n"


def test_enhanced_code_is_taken_from_the_start_of_the_text():
    reply = Reply(550, "5.7.1 relaying denied")
    assert reply.enhanced == "5.7.1"
    assert reply.lines == ("relaying denied",)
    assert reply.to_bytes() == b"550 5.7.1 relaying denied\r\n"


def test_an_enhanced_code_of_another_class_stays_text():
    reply = Reply(250, "5.7.1 odd")
    assert reply.enhanced is None
    assert reply.to_bytes() == b"250 5.7.1 odd\r\n"


def test_enhanced_code_needs_a_separator_and_ascii_digits():
    assert Reply(250, "2.0.0x").enhanced is None
    assert Reply(250, "2.\u0661.0 arabic digit").enhanced is None
    assert Reply(250, "2.0.0").to_bytes() == b"250 2.0.0\r\n"


def test_enhanced_code_is_written_on_every_line():
    reply = Reply(451, ["4.3.0 first", "second", "third"])
    assert reply.to_bytes() == b"451-4.3.0 first\r\n451-4.3.0 second\r\n451 4.3.0 third\r\n"


def test_enhanced_code_written_by_the_plugin_on_every_line_appears_once():
    reply = Reply(550, ["5.7.1 first", "5.7.1 second"])
    assert reply.to_bytes() == b"550-5.7.1 first\r\n550 5.7.1 second\r\n"


def test_explicit_enhanced_code():
    reply = Reply(250, "queued", enhanced="2.0.0")
    assert reply.to_bytes() == b"250 2.0.0 queued\r\n"


@pytest.mark.parametrize(
    "text",
    [
        "ok\r\n550 injected",
        "ok\r550 injected",
        "ok\n550 injected",
        "ok\x85550 injected",
        "ok\u2028550 injected",
    ],
)
def test_line_breaks_in_plugin_text_cannot_forge_a_reply_line(text):
    lines = wire_lines(Reply(250, text))
    assert lines == [b"250-ok", b"250 550 injected"]


def test_control_characters_are_replaced():
    reply = Reply(250, "a\x00b\x1bc\x7fd\x9be\tf")
    assert reply.to_bytes() == b"250 a?b?c?d?e\tf\r\n"
    wire_lines(Reply(250, ["x\x00", "\x1b[2J", "\x0b\x0c"]))


def test_non_ascii_text_is_encoded_without_failing():
    assert Reply(250, "café").to_bytes() == "250 café\r\n".encode()
    assert Reply(250, "lone \udc80 surrogate").to_bytes() == b"250 lone ? surrogate\r\n"


@pytest.mark.parametrize("code", [0, 199, 600, 1000])
def test_codes_outside_200_to_599_are_refused(code):
    with pytest.raises(ValueError):
        Reply(code, "x")


def test_text_properties_and_equality():
    reply = Reply(250, ["2.0.0 a", "b"])
    assert reply.text == "a\nb"
    assert reply.is_positive
    assert Reply(354, "go").is_positive
    assert not Reply(450, "later").is_positive
    assert reply == Reply(250, "2.0.0 a\nb")
    assert hash(reply) == hash(Reply(250, "a\nb", enhanced="2.0.0"))
    assert reply != Reply(250, "a\nb")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("554 5.7.1 no thanks", Reply(554, "5.7.1 no thanks")),
        ("421", Reply(421, "")),
        ("250-multi", Reply(250, "multi")),
        ("just text", Reply(550, "just text")),
        ("5500 not a code", Reply(550, "5500 not a code")),
        ("099 too low", Reply(550, "099 too low")),
        ("600 too high", Reply(550, "600 too high")),
        ("\u00b250 superscript", Reply(550, "\u00b250 superscript")),
        ("", Reply(550, "")),
    ],
)
def test_parse_line_takes_a_leading_code_or_uses_the_default(text, expected):
    assert Reply.parse_line(text, 550) == expected


def test_a_changed_reply_is_sent_as_changed():
    # Replies made from the same text share their wire bytes; one that is changed after
    # it was sent (by a plugin, say) must not send the old bytes, nor change the others.
    first = Reply(250, "2.0.0 OK")
    second = Reply(250, "2.0.0 OK")
    assert first.to_bytes() == b"250 2.0.0 OK\r\n"
    first.code = 251
    assert first.to_bytes() == b"251 2.0.0 OK\r\n"
    assert second.to_bytes() == b"250 2.0.0 OK\r\n"
    first.lines = ("changed",)
    assert first.to_bytes() == b"251 2.0.0 changed\r\n"
    first.enhanced = None
    assert first.to_bytes() == b"251 changed\r\n"
    assert second.to_bytes() == b"250 2.0.0 OK\r\n"
    assert Reply(250, "2.0.0 OK").to_bytes() == b"250 2.0.0 OK\r\n"
