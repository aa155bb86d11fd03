"""multipart/related both ways and Accept headers as PS3.18 writes them."""

from __future__ import annotations

import pytest

from dicomweb.errors import HttpError
from dicomweb.multipart import Choice, Part, acceptable, build, media_matches, parse


def test_built_messages_parse_back() -> None:
    parts = [Part("application/dicom", b"\r\n--tricky\r\n\x00" * 3), Part("application/dicom", b"")]
    body, content_type = build(parts, "application/dicom")
    declared, back = parse(body, content_type)
    assert declared == "application/dicom"
    assert [p.body for p in back] == [p.body for p in parts]
    assert all(p.content_type == "application/dicom" for p in back)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"x", "application/json", 415),
        (b"x", "", 415),
        (b"x", 'multipart/related; type="application/dicom"', 400),  # no boundary
        (b"no delimiters here", "multipart/related; boundary=b", 400),
        (
            b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM",
            "multipart/related; boundary=b",
            400,
        ),
        (b"--b\r\nno separator--b--", "multipart/related; boundary=b", 400),
    ],
)
def test_malformed_bodies_are_refused(body: bytes, content_type: str, status: int) -> None:
    with pytest.raises(HttpError) as err:
        parse(body, content_type)
    assert err.value.status == status and err.value.reason


def test_accept_choices_in_preference_order() -> None:
    header = (
        'multipart/related; type="application/dicom"; '
        "transfer-syntax=1.2.840.10008.1.2.4.50; q=0.5, "
        'multipart/related; type="application/dicom"; transfer-syntax=*, '
        "image/png; q=0"
    )
    assert acceptable(header, "application/dicom") == [
        Choice("application/dicom", "*", True),
        Choice("application/dicom", "1.2.840.10008.1.2.4.50", True),
    ]
    assert acceptable(None, "application/dicom") == [Choice("application/dicom", None, True)]
    assert acceptable("*/*", "application/octet-stream") == [
        Choice("application/octet-stream", None, True)
    ]
    with pytest.raises(HttpError):
        acceptable("image/png; q=high", "image/png")


def test_media_ranges() -> None:
    assert media_matches("image/jpeg", "image/*")
    assert media_matches("application/dicom", "*/*")
    assert not media_matches("application/dicom", "image/*")
