"""`AET@HOST:PORT` parsing and formatting (`dicom_io.destinations`): each wrong text is refused with
the text and the reason, and what is accepted formats back to itself."""

from __future__ import annotations

import pytest

from dicom_io.destinations import (
    BadDestination,
    Destination,
    format_destination,
    parse_destination,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@pacs.example.org:104", Destination("PACS", "pacs.example.org", 104)),
        ("ORTHANC@127.0.0.1:4242", Destination("ORTHANC", "127.0.0.1", 4242)),
        ("PACS@[::1]:11112", Destination("PACS", "::1", 11112)),
        ("PACS@[fe80::1:2]:65535", Destination("PACS", "fe80::1:2", 65535)),
        ("MY AE@pacs_1:1", Destination("MY AE", "pacs_1", 1)),  # spaces inside a title are fine
        ("AE@2@host:104", Destination("AE@2", "host", 104)),  # the last @ separates the host
        ("SIXTEEN_CHARS_AE@h:104", Destination("SIXTEEN_CHARS_AE", "h", 104)),
    ],
)
def test_good_destinations_parse_and_format_back(text: str, expected: Destination) -> None:
    parsed = parse_destination(text)
    assert parsed == expected
    assert (parsed.aet, parsed.host, parsed.port) == tuple(expected)
    assert format_destination(parsed) == text


def test_surrounding_spaces_are_not_part_of_it() -> None:
    assert parse_destination("  PACS@host:104 \n") == ("PACS", "host", 104)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "needed"),
        ("PACS", "needed"),
        ("PACS@host", "needed"),
        ("pacs.example.org:104", "needed"),
        ("@host:104", "AE title is empty"),
        ("   @host:104", "AE title is empty"),
        ("SEVENTEEN_CHARS_A@host:104", "17 characters"),
        ("PA\\CS@host:104", "backslash"),
        ("PA\tCS@host:104", "printable ASCII"),
        ("PÄCS@host:104", "printable ASCII"),
        ("PACS@:104", "host is empty"),
        ("PACS@pacs host:104", "not a host name"),
        ("PACS@http://pacs:104", "not a host name"),
        ("PACS@-pacs:104", "not a host name"),
        ("PACS@::1:104", "in brackets"),
        ("PACS@[::1:104", "closing bracket"),
        ("PACS@[::1]", "needed"),
        ("PACS@[not-v6]:104", "not an IPv6 address"),
        ("PACS@host:", "not a number"),
        ("PACS@host:abc", "not a number"),
        ("PACS@host:-1", "not a number"),
        ("PACS@host:+104", "not a number"),
        ("PACS@host:1_04", "not a number"),
        ("PACS@host: 104", "not a number"),
        ("PACS@host:١٠٤", "not a number"),  # Arabic-Indic digits: int() would take them
        ("PACS@host:0", "outside 1-65535"),
        ("PACS@host:65536", "outside 1-65535"),
    ],
)
def test_bad_destinations_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(BadDestination, match="AET@HOST:PORT") as info:
        parse_destination(text)
    message = str(info.value)
    assert repr(text.strip()) in message or repr(text) in message
    assert why in message
    assert isinstance(info.value, ValueError)  # settings validators report it as bad input


def test_ipv6_formats_in_brackets() -> None:
    assert format_destination(("PACS", "127.0.0.1", 104)) == "PACS@127.0.0.1:104"
    assert format_destination(("PACS", "::1", 11112)) == "PACS@[::1]:11112"
