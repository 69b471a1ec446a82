"""Tests for qpconn.mail.address: RFC 5321 / 6531 path parsing, formatting and parameter parsing."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qpconn.mail.address import Address, AddressError, parse_params, split_path_and_params


def reject(text: str, **kwargs: bool) -> AddressError:
    with pytest.raises(AddressError) as info:
        Address.parse(text, **kwargs)
    return info.value


# --- brackets, null path, postmaster -------------------------------------------------------


def test_parse_simple_mailbox_gives_user_and_host() -> None:
    address = Address.parse("<user@example.com>")
    assert (address.user, address.host) == ("user", "example.com")
    assert not address.is_null and not address.is_postmaster


@pytest.mark.parametrize(
    "text", ["user@example.com", "", "postmaster", "<user@example.com", "<", "user@example.com>"]
)
def test_path_without_both_brackets_rejected_by_default(text: str) -> None:
    assert reject(text).utf8 is False


def test_bare_mailbox_accepted_when_brackets_not_required() -> None:
    assert Address.parse("user@example.com", require_brackets=False) == Address(
        "user", "example.com"
    )


def test_bracketed_path_still_accepted_when_brackets_not_required() -> None:
    assert Address.parse("<user@example.com>", require_brackets=False) == Address(
        "user", "example.com"
    )


@pytest.mark.parametrize("text", ["", "<user@example.com", "user@example.com>", "<>x"])
def test_half_bracketed_or_empty_path_rejected_even_when_brackets_not_required(text: str) -> None:
    reject(text, require_brackets=False)


def test_null_path_has_no_user_and_formats_as_empty_brackets() -> None:
    address = Address.parse("<>")
    assert address.is_null and address.user is None and address.host is None
    assert (address.address, str(address), address.format()) == ("", "", "<>")
    assert address == Address()


@pytest.mark.parametrize("text", ["< >", "<<>>", "<@>", "<@example.com>"])
def test_near_null_paths_rejected(text: str) -> None:
    reject(text)


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_postmaster_without_domain_accepted_in_any_case(text: str) -> None:
    address = Address.parse(text)
    assert address.is_postmaster and address.host is None and address.domain is None
    assert address.user == text[1:-1]
    assert address.format() == text


def test_postmaster_with_domain_is_an_ordinary_mailbox() -> None:
    address = Address.parse("<postmaster@example.com>")
    assert not address.is_postmaster and address.host == "example.com"


@pytest.mark.parametrize(
    "text",
    ["<user>", "<postmaster2>", '<"postmaster">', "<@relay.example:postmaster>", "<postmaster@>"],
)
def test_mailbox_without_domain_rejected_unless_plain_postmaster(text: str) -> None:
    reject(text)


# --- source routes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<@relay.example:user@example.com>",
        "<@relay.example,@b.example:user@example.com>",
        "<@a.example.,@b:user@example.com>",
    ],
)
def test_source_route_is_accepted_and_dropped(text: str) -> None:
    address = Address.parse(text)
    assert address == Address("user", "example.com")
    assert address.format() == "<user@example.com>"


@pytest.mark.parametrize(
    "text",
    [
        "<@relay.example>",
        "<@relay.example user@example.com>",
        "<@relay.example:>",
        "<@:user@example.com>",
        "<@relay.example,b.example:user@example.com>",
        "<@relay.example,,@b.example:user@example.com>",
        "<@relay..example:user@example.com>",
        "<@-relay.example:user@example.com>",
        "<@[192.0.2.1]:user@example.com>",
        "<@relay.example;user@example.com>",
        "<@relay.example::user@example.com>",
        "<user@example.com:other@example.net>",
    ],
)
def test_malformed_source_route_rejected(text: str) -> None:
    reject(text)


# --- local part -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "local",
    ["a", "first.last", "user+tag", "a.b.c", "0", "!#$%&'*+-/=?^_`{|}~", "x!y%z", "UPPER"],
)
def test_dot_string_local_part_accepted_verbatim(local: str) -> None:
    assert Address.parse(f"<{local}@example.com>").user == local


@pytest.mark.parametrize(
    "local",
    [
        ".user",
        "user.",
        "us..er",
        "us er",
        "us(er",
        "us)er",
        "us,er",
        "us;er",
        "us:er",
        "us[er",
        "us]er",
        "us<er",
        "us>er",
        "us\\er",
        'us"er',
    ],
)
def test_malformed_dot_string_local_part_rejected(local: str) -> None:
    reject(f"<{local}@example.com>")


@pytest.mark.parametrize(
    ("quoted", "user"),
    [
        ('"a b"', "a b"),
        ('"a\\"b"', 'a"b'),
        ('"a\\\\b"', "a\\b"),
        ('"\\a\\b"', "ab"),
        ('"a@b"', "a@b"),
        ('".a."', ".a."),
        ('"(comment)<x>,[y];:"', "(comment)<x>,[y];:"),
        ('""', ""),
    ],
)
def test_quoted_local_part_gives_its_unquoted_form(quoted: str, user: str) -> None:
    assert Address.parse(f"<{quoted}@example.com>").user == user


@pytest.mark.parametrize(
    "local",
    ['"abc', '"abc\\"', '"a"b', '"a".b', 'a."b"', '"a\\'],
)
def test_malformed_quoted_local_part_rejected(local: str) -> None:
    reject(f"<{local}@example.com>")


def test_unquoted_at_sign_in_local_part_rejected() -> None:
    assert "@" in str(reject("<user@other.example@local>"))


def test_local_part_of_64_octets_accepted_and_65_rejected() -> None:
    assert Address.parse(f"<{'a' * 64}@example.com>").user == "a" * 64
    reject(f"<{'a' * 65}@example.com>")


def test_local_part_length_counts_quotes_and_escapes() -> None:
    Address.parse(f'<"{"a" * 62}"@example.com>')
    reject(f'<"{"a" * 63}"@example.com>')
    reject(f'<"\\{"a" * 62}"@example.com>')


def test_local_part_length_counts_utf8_octets() -> None:
    Address.parse(f"<{'é' * 32}@example.com>", allow_utf8=True)
    reject(f"<{'é' * 32}a@example.com>", allow_utf8=True)


# --- domain --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain", ["example.com", "a-b.c1.example", "a--b.example", "123.example", "x", "EXAMPLE.Com"]
)
def test_valid_domain_kept_as_given(domain: str) -> None:
    assert Address.parse(f"<u@{domain}>").host == domain


def test_one_trailing_dot_removed_from_domain() -> None:
    assert Address.parse("<u@Example.COM.>").host == "Example.COM"


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "example.com..",
        ".example.com",
        "a..b",
        "-a.example",
        "a-.example",
        "a.-b",
        "a_b.example",
        "a b.example",
        "a,b",
        "*.example",
    ],
)
def test_malformed_domain_rejected(domain: str) -> None:
    reject(f"<u@{domain}>")


def test_domain_label_of_63_octets_accepted_and_64_rejected() -> None:
    Address.parse(f"<u@{'a' * 63}.example>")
    reject(f"<u@{'a' * 64}.example>")


def test_domain_longer_than_255_octets_as_a_labels_rejected() -> None:
    # 22 labels of 10 octets fit in a 256-octet path, but each grows to 16 as an A-label.
    domain = ".".join(["aaaaaaaaé"] * 22)
    reject(f"<u@{domain}>", allow_utf8=True)


def test_domain_is_lowercased_host() -> None:
    assert Address.parse("<User@Example.COM>").domain == "example.com"


# --- address literals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "ip"),
    [
        ("[127.0.0.1]", ipaddress.IPv4Address("127.0.0.1")),
        ("[IPv6:::1]", ipaddress.IPv6Address("::1")),
        ("[ipv6:2001:DB8::1]", ipaddress.IPv6Address("2001:db8::1")),
        ("[IPV6:::ffff:192.0.2.1]", ipaddress.IPv6Address("::ffff:192.0.2.1")),
    ],
)
def test_address_literal_kept_with_brackets_and_gives_ip(
    host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    address = Address.parse(f"<u@{host}>")
    assert address.host == host and address.is_ip_literal and address.ip == ip
    assert address.host_ascii == host


@pytest.mark.parametrize(
    "host",
    [
        "[256.0.0.1]",
        "[1.2.3]",
        "[1.2.3.4.5]",
        "[01.2.3.4]",
        "[::1]",
        "[IPv6:1.2.3.4]",
        "[IPv6:fe80::1%eth0]",
        "[IPv6:::g]",
        "[IPv4:1.2.3.4]",
        "[x-tag:anything]",
        "[127.0.0.1",
        "[]",
        "[127.0.0.1].",
        "[ 127.0.0.1]",
        "[127.0.0.1]x",
    ],
)
def test_malformed_or_general_address_literal_rejected(host: str) -> None:
    reject(f"<u@{host}>")


def test_domain_host_is_not_an_ip_literal() -> None:
    address = Address.parse("<u@192.0.2.1>")
    assert not address.is_ip_literal and address.ip is None


def test_ip_of_constructed_bad_literal_is_none() -> None:
    assert Address("u", "[not an ip]").ip is None


# --- whole path, control characters, UTF-8 ---------------------------------------------------


def test_path_of_256_octets_accepted_and_257_rejected() -> None:
    domain = ".".join(["a" * 63] * 2 + ["b" * 58])  # 186 octets; "<" + 64 + "@" + 186 + ">" = 253
    assert len(f"<{'u' * 64}@{domain}>") == 253
    Address.parse(f"<{'u' * 64}@{domain}ccc>")
    assert "256" in str(reject(f"<{'u' * 64}@{domain}cccc>"))


def test_bare_path_length_counts_the_brackets_it_lacks() -> None:
    domain = ".".join(["a" * 63] * 2 + ["b" * 61])
    Address.parse(f"{'u' * 64}@{domain}", require_brackets=False)
    reject(f"{'u' * 64}@{domain}b", require_brackets=False)


@pytest.mark.parametrize("char", ["\x00", "\r", "\n", "\t", "\x1b", "\x7f", "\x85", "\udcff"])
@pytest.mark.parametrize("allow_utf8", [False, True])
def test_control_characters_always_rejected_and_not_as_a_utf8_problem(
    char: str, allow_utf8: bool
) -> None:
    for text in (
        f"<us{char}er@example.com>",
        f'<"us{char}er"@example.com>',
        f"<user@exa{char}mple.com>",
        f"<user@example.com>{char}",
    ):
        assert reject(text, allow_utf8=allow_utf8).utf8 is False


@pytest.mark.parametrize(
    "text",
    [
        "<jörg@example.com>",
        '<"jö rg"@example.com>',
        "<user@bücher.example>",
        "<@bücher.example:u@example.com>",
    ],
)
def test_non_ascii_without_utf8_rejected_as_utf8_problem(text: str) -> None:
    assert reject(text).utf8 is True
    Address.parse(text, allow_utf8=True)


@pytest.mark.parametrize(
    "text",
    ["<jörg@@example.com>", "<jörg@example..com>", "jörg@example.com", '<"jö\x00rg"@example.com>'],
)
def test_non_ascii_with_another_fault_is_not_a_utf8_problem(text: str) -> None:
    assert reject(text).utf8 is False


def test_utf8_mailbox_keeps_u_labels_and_converts_host_to_a_labels() -> None:
    address = Address.parse("<jörg@Bücher.example>", allow_utf8=True)
    assert (address.user, address.host, address.domain) == (
        "jörg",
        "Bücher.example",
        "bücher.example",
    )
    assert address.host_ascii == "xn--bcher-kva.example"
    assert address.format() == "<jörg@Bücher.example>"


def test_host_ascii_of_ascii_host_and_null_path() -> None:
    assert Address.parse("<u@Example.com>").host_ascii == "Example.com"
    assert Address().host_ascii is None and Address.parse("<postmaster>").host_ascii is None


@pytest.mark.parametrize(
    "domain",
    [
        "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",
        "bücher\u3002example",
        "bücher\uff0eexample",
        "bücher\uff61example",
        "straße.example",
        "bü cher.example",
        "bü\u3000cher.example",
        "-bücher.example",
        "bücher-.example",
        "bü_cher.example",
    ],
)
def test_domain_that_is_no_real_u_label_rejected(domain: str) -> None:
    # Fullwidth letters would be mapped to "example" by IDNA and the extra dots would split the
    # label; IDNA 2003 (Python's codec) maps "ß" to "ss", where IDNA 2008 keeps it. Each way
    # the domain checked for relaying would not be the one mail goes to.
    reject(f"<u@{domain}>", allow_utf8=True)


# --- relay tricks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "user", "host"),
    [
        ("<user%other.example@local>", "user%other.example", "local"),
        ("<other.example!user@local>", "other.example!user", "local"),
        ("<@local:user@other.example>", "user", "other.example"),
        ('<"user@other.example"@local>', "user@other.example", "local"),
        ('<"user%other.example"@local>', "user%other.example", "local"),
    ],
)
def test_relay_trick_parses_to_the_mailbox_it_literally_is(text: str, user: str, host: str) -> None:
    address = Address.parse(text)
    assert (address.user, address.host) == (user, host)


@pytest.mark.parametrize(
    "text",
    [
        "<user@other.example@local>",
        '<"user"@other.example@local>',
        "<user@[127.0.0.1]@local>",
        "<@other.example:user@local@x>",
    ],
)
def test_relay_trick_with_two_at_signs_rejected(text: str) -> None:
    assert "more than one" in str(reject(text))


def test_quoted_at_sign_is_requoted_when_formatted() -> None:
    address = Address.parse('<"user@other.example"@local>')
    assert address.address == '"user@other.example"@local'
    assert str(address) == address.address


# --- formatting and value semantics -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "formatted"),
    [
        ('<"a b"@example.com>', '<"a b"@example.com>'),
        ('<"a\\"b"@example.com>', '<"a\\"b"@example.com>'),
        ('<"a\\\\b"@example.com>', '<"a\\\\b"@example.com>'),
        ('<"abc"@example.com>', "<abc@example.com>"),
        ('<"a.b"@example.com>', "<a.b@example.com>"),
        ('<"\\a"@example.com>', "<a@example.com>"),
        ('<".a"@example.com>', '<".a"@example.com>'),
        ('<"a..b"@example.com>', '<"a..b"@example.com>'),
        ('<""@example.com>', '<""@example.com>'),
        ('<"jö rg"@example.com>', '<"jö rg"@example.com>'),
    ],
)
def test_quoted_local_part_formats_canonically_and_round_trips(text: str, formatted: str) -> None:
    address = Address.parse(text, allow_utf8=True)
    assert address.format() == formatted
    assert Address.parse(formatted, allow_utf8=True) == address


def test_constructed_address_quotes_local_part_that_needs_it() -> None:
    assert Address('say "hi"\\', "example.com").format() == '<"say \\"hi\\"\\\\"@example.com>'


def test_equality_ignores_host_case_but_not_user_case() -> None:
    assert Address.parse("<user@EXAMPLE.com>") == Address("user", "example.COM")
    assert Address.parse("<User@example.com>") != Address("user", "example.com")
    assert len({Address("u", "A.example"), Address("u", "a.EXAMPLE")}) == 1


def test_address_does_not_equal_its_string() -> None:
    assert Address("u", "example.com") != "u@example.com"


def test_repr_rebuilds_an_equal_address() -> None:
    address = Address.parse('<"a b"@example.com>')
    assert repr(address) == "Address(user='a b', host='example.com')"
    assert eval(repr(address)) == address


def test_host_without_user_refused_by_constructor() -> None:
    with pytest.raises(ValueError):
        Address(None, "example.com")


def test_address_error_is_a_value_error_that_does_not_echo_input() -> None:
    error = reject("<us\r\ner@example.com>")
    assert isinstance(error, ValueError) and "\r" not in str(error) and "us" not in str(error)


# --- split_path_and_params -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<a@b> SIZE=10 BODY=8BITMIME", ("<a@b>", "SIZE=10 BODY=8BITMIME")),
        (" <a@b>", ("<a@b>", "")),
        ("   <a@b>   SIZE=1", ("<a@b>", "SIZE=1")),
        ('<"a b"@c> SIZE=1', ('<"a b"@c>', "SIZE=1")),
        ('<"a>b"@c> SIZE=1', ('<"a>b"@c>', "SIZE=1")),
        ('<"a\\"> b"@c> SIZE=1', ('<"a\\"> b"@c>', "SIZE=1")),
        ("<@r.example:a@b> X", ("<@r.example:a@b>", "X")),
        ("a@b SIZE=1", ("a@b", "SIZE=1")),
        ("a@b", ("a@b", "")),
        ("<>", ("<>", "")),
        ("<> SIZE=1", ("<>", "SIZE=1")),
        ("<a@b> ", ("<a@b>", "")),
        ("", ("", "")),
    ],
)
def test_split_path_and_params(arg: str, expected: tuple[str, str]) -> None:
    assert split_path_and_params(arg) == expected


@pytest.mark.parametrize(
    "arg", ["<a@b>SIZE=1", "<a b@c> SIZE=1", '<"a b@c> SIZE=1', "<a@b SIZE=1", '<"a"b c"@d>']
)
def test_split_leaves_malformed_path_for_parse_to_reject(arg: str) -> None:
    path, _ = split_path_and_params(arg)
    reject(path)


# --- parse_params -------------------------------------------------------------------------------


def test_parse_params_upper_cases_keywords_and_keeps_values() -> None:
    assert parse_params("size=10 Body=8bitmime SMTPUTF8 X-Foo1=a") == {
        "SIZE": "10",
        "BODY": "8bitmime",
        "SMTPUTF8": None,
        "X-FOO1": "a",
    }


def test_parse_params_of_nothing_is_empty() -> None:
    assert parse_params("") == {} and parse_params("   ") == {}


def test_parse_params_tolerates_runs_of_spaces() -> None:
    assert parse_params(" SIZE=1   BODY=7BIT ") == {"SIZE": "1", "BODY": "7BIT"}


def test_parse_params_accepts_every_value_character_but_equals() -> None:
    value = "".join(chr(code) for code in range(33, 127) if code != 61)
    assert parse_params(f"X={value}") == {"X": value}


@pytest.mark.parametrize(
    "text",
    [
        "SIZE=1 SIZE=2",
        "SIZE=1 size=1",
        "SIZE=",
        "=10",
        "-X=1",
        "SI_ZE=1",
        "A=b=c",
        "A=\x01",
        "SIZE=1\tBODY=7BIT",
        "SIZE=1\r\n",
        "A=\x7f",
    ],
)
def test_malformed_params_rejected(text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_params(text)
    assert info.value.utf8 is False


def test_non_ascii_param_value_needs_utf8() -> None:
    with pytest.raises(AddressError) as info:
        parse_params("ORCPT=rfc822;jörg@example.com")
    assert info.value.utf8 is True
    assert parse_params("ORCPT=rfc822;jörg@example.com", allow_utf8=True) == {
        "ORCPT": "rfc822;jörg@example.com"
    }


@pytest.mark.parametrize("allow_utf8", [False, True])
def test_non_ascii_param_keyword_rejected_even_with_utf8(allow_utf8: bool) -> None:
    with pytest.raises(AddressError) as info:
        parse_params("SÏZE=1", allow_utf8=allow_utf8)
    assert info.value.utf8 is False


# --- properties -------------------------------------------------------------------------------

_SMTP_ALPHABET = st.sampled_from(
    [*'<>@".\\:,[]-! ab1é\uff45\u3002\x00', "IPv6:", "postmaster", "127.0.0.1", "::1"]
)
_ARBITRARY = st.one_of(st.text(), st.lists(_SMTP_ALPHABET, max_size=40).map("".join))


def _check_round_trip(address: Address, allow_utf8: bool) -> None:
    again = Address.parse(address.format(), allow_utf8=allow_utf8)
    assert again == address
    assert (again.user, again.host) == (address.user, address.host)


@given(text=_ARBITRARY, allow_utf8=st.booleans(), require_brackets=st.booleans())
def test_parse_raises_only_address_error_and_round_trips(
    text: str, allow_utf8: bool, require_brackets: bool
) -> None:
    try:
        address = Address.parse(text, allow_utf8=allow_utf8, require_brackets=require_brackets)
    except AddressError:
        return
    _check_round_trip(address, allow_utf8)
    assert address.host_ascii is None or address.host_ascii.isascii()


@given(text=_ARBITRARY, allow_utf8=st.booleans())
def test_split_never_raises_and_parse_params_raises_only_address_error(
    text: str, allow_utf8: bool
) -> None:
    path, params = split_path_and_params(text)
    assert path == "" or path in text
    try:
        parse_params(params, allow_utf8=allow_utf8)
    except AddressError:
        pass


_ATOM = st.text(
    alphabet=string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~é", min_size=1, max_size=6
)
_DOT_STRING = st.lists(_ATOM, min_size=1, max_size=4).map(".".join)
_QUOTED_CHAR = st.tuples(
    st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("éß"), st.booleans()
)


@st.composite
def _quoted(draw: st.DrawFn) -> tuple[str, str]:
    """A quoted local part, escaping optional characters at random, and its logical value."""
    chars = draw(st.lists(_QUOTED_CHAR, max_size=20))
    text = "".join("\\" + c if (escape and c.isascii()) or c in '"\\' else c for c, escape in chars)
    return f'"{text}"', "".join(c for c, _ in chars)


_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True) | st.just(
    "bücher"
)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_LITERAL = st.sampled_from(
    ["[127.0.0.1]", "[IPv6:::1]", "[ipv6:2001:DB8::1]", "[IPv6:::ffff:10.0.0.1]"]
)


@given(
    local=st.one_of(_DOT_STRING.map(lambda s: (s, s)), _quoted()),
    domain=_DOMAIN | _LITERAL,
    trailing_dot=st.booleans(),
    route=st.lists(_DOMAIN, max_size=2),
)
def test_generated_valid_paths_parse_to_their_parts_and_round_trip(
    local: tuple[str, str], domain: str, trailing_dot: bool, route: list[str]
) -> None:
    written, user = local
    host = domain + ("." if trailing_dot and not domain.startswith("[") else "")
    prefix = ",".join("@" + hop for hop in route) + ":" if route else ""
    path = f"<{prefix}{written}@{host}>"
    address = Address.parse(path, allow_utf8=True)
    assert (address.user, address.host) == (user, domain)
    _check_round_trip(address, allow_utf8=True)
    if path.isascii():
        assert Address.parse(path) == address
    else:
        assert reject(path).utf8 is True
