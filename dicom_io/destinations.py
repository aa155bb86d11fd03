"""DICOM destinations written `AET@HOST:PORT`: parsed with a reason when the text is wrong, and
formatted back to the same text (an IPv6 host in brackets: `PACS@[::1]:104`).

Formatted destinations are stored (`exports.destination`) and compared (settings), so
`format_destination(parse_destination(text))` gives back `text` for any text the parser accepts
that has no spaces around its parts.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

# A host name or an IPv4 address: letters, digits, dots, hyphens (and underscores, which some
# container networks use); anything else (spaces, slashes, a scheme) is a typo, not a host.
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
MAX_AE_TITLE = 16


class Destination(NamedTuple):
    aet: str
    host: str  # an IPv6 address without brackets
    port: int


class BadDestination(ValueError):
    """The text is not `AET@HOST:PORT`; the message quotes it and says what is wrong."""


def _check_ae_title(aet: str) -> str:
    # PS3.5 6.2 (AE): at most 16 characters of the default repertoire, no backslash, no control
    # characters; leading and trailing spaces are not significant and all spaces is no title.
    aet = aet.strip(" ")
    if not aet:
        raise ValueError("the AE title is empty")
    if len(aet) > MAX_AE_TITLE:
        raise ValueError(f"the AE title has {len(aet)} characters, at most {MAX_AE_TITLE}")
    if not all(" " <= c <= "~" for c in aet) or "\\" in aet:
        raise ValueError("the AE title may hold only printable ASCII without backslash")
    return aet


def _check_host(host: str) -> str:
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("an IPv6 address needs its closing bracket")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
        return host[1:-1]
    if not host:
        raise ValueError("the host is empty")
    if _HOST.fullmatch(host):
        return host
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not a host name or address") from None
    raise ValueError("write an IPv6 address in brackets, e.g. PACS@[::1]:104")


def _check_port(port: str) -> int:
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"the port {port!r} is not a number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"the port {number} is outside 1-65535")
    return number


def parse_destination(text: str) -> Destination:
    """`AET@HOST:PORT` as a `Destination`; raise `BadDestination` quoting the text and the reason.

    The AE title may itself hold an `@` (the last one separates it from the host)."""
    aet, at, address = text.strip().rpartition("@")
    host, colon, port = address.rpartition(":")
    try:
        if not at or not colon or address.endswith("]"):
            raise ValueError("an AE title, a host and a port are needed")
        return Destination(_check_ae_title(aet), _check_host(host), _check_port(port))
    except ValueError as exc:
        raise BadDestination(
            f"not a DICOM destination of the form AET@HOST:PORT: {text!r} ({exc})"
        ) from None


def format_destination(destination: tuple[str, str, int]) -> str:
    """`AET@HOST:PORT`, with an IPv6 host in brackets."""
    aet, host, port = destination
    if ":" in host:
        host = f"[{host}]"
    return f"{aet}@{host}:{port}"
