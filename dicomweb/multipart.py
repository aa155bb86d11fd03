"""multipart/related bodies (RFC 2387) both ways, and the Accept header as PS3.18 8.7 reads it.

`stream` writes a body part by part as its parts are made (a file's part read in chunks), for a
response that is sent while it is produced; `build` is the same body in one piece.

A WADO-RS Accept names media ranges, each maybe with `type=` (inside multipart/related),
`transfer-syntax=` and `q=`: `acceptable` turns it into (media type, transfer syntax) choices in
the client's order of preference, which the handler takes the first it can give.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomweb.errors import HttpError, bad_request


@dataclass(frozen=True)
class Choice:
    media_type: str  # the part's type ("application/dicom"), or the whole body's when not multipart
    transfer_syntax: str | None  # None: not named; "*": as stored
    multipart: bool


def _params(text: str) -> tuple[str, dict[str, str]]:
    parts = [p.strip() for p in _split(text, ";")]
    media = parts[0].lower()
    params: dict[str, str] = {}
    for part in parts[1:]:
        name, _, value = part.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return media, params


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes (a type="..." may hold any character)."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(c)
    out.append("".join(current))
    return out


def acceptable(header: str | None, default_part: str) -> list[Choice]:
    """The Accept header's choices, best first; a missing header or */* asks for `default_part`
    in a multipart body with no transfer syntax named."""
    if not header or not header.strip():
        return [Choice(default_part, None, True)]
    ranked: list[tuple[float, int, Choice]] = []
    for index, item in enumerate(_split(header, ",")):
        if not item.strip():
            continue
        media, params = _params(item)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            raise bad_request(f"bad q value in Accept: {item.strip()!r}") from None
        if q <= 0:
            continue
        ts = params.get("transfer-syntax")
        if media == "multipart/related":
            part = params.get("type", default_part).lower()
            ranked.append((q, index, Choice(part, ts, True)))
        elif media in ("*/*", "multipart/*"):
            ranked.append((q, index, Choice(default_part, ts, True)))
        else:
            ranked.append((q, index, Choice(media, ts, False)))
    ranked.sort(key=lambda r: (-r[0], r[1]))
    return [c for _, _, c in ranked]


def media_matches(offered: str, wanted: str) -> bool:
    """Whether a part of type `offered` satisfies `wanted` (which may be type/* or */*)."""
    if wanted in ("*/*", "*"):
        return True
    if wanted.endswith("/*"):
        return offered.split("/")[0] == wanted.split("/")[0]
    return offered == wanted


@dataclass(frozen=True)
class Part:
    content_type: str
    body: bytes
    location: str | None = None


@dataclass(frozen=True)
class FilePart:
    """A part whose body is a file's bytes as they are, read while the body is sent."""

    content_type: str
    path: Path
    location: str | None = None


CHUNK = 1024 * 1024


def new_boundary() -> str:
    return secrets.token_hex(16)


def content_type(part_type: str, boundary: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def stream(parts: Iterable[Part | FilePart], boundary: str) -> Iterator[bytes]:
    """The body of a multipart/related message of `parts`, in pieces: each part's head, its
    body (a file in chunks of at most `CHUNK`), and the closing delimiter after the last. Parts
    are taken from `parts` one at a time, as the pieces are consumed."""
    for part in parts:
        head = f"--{boundary}\r\nContent-Type: {part.content_type}\r\n"
        if part.location:
            head += f"Content-Location: {part.location}\r\n"
        yield head.encode("ascii") + b"\r\n"
        if isinstance(part, FilePart):
            with part.path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        else:
            yield part.body
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def build(parts: Iterable[Part | FilePart], part_type: str) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/related message of `parts`."""
    boundary = new_boundary()
    return b"".join(stream(parts, boundary)), content_type(part_type, boundary)


def parse(body: bytes, content_type: str) -> tuple[str, list[Part]]:
    """(declared type, parts) of a multipart/related body; 415 if it is not one, 400 if it does
    not parse."""
    media, params = _params(content_type or "")
    if media != "multipart/related":
        raise HttpError(415, f"expected multipart/related, not {media or 'nothing'!r}")
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 200:
        raise bad_request("multipart/related without a boundary")
    declared = params.get("type", "").lower()
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(delimiter)
    if len(pieces) < 3:
        raise bad_request("the body holds no part delimited by its boundary")
    parts: list[Part] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # the closing delimiter
        piece = piece[2:] if piece.startswith(b"\r\n") else piece.lstrip(b"\n")
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            raise bad_request("a part has no header/body separator")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        part_type = headers.get("content-type", declared) or declared
        parts.append(Part(_params(part_type)[0], content, headers.get("content-location")))
    else:
        raise bad_request("the body ends without its closing boundary")
    return declared, parts
