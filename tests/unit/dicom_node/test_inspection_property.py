"""Property-based tests of the parsing boundary: whatever bytes arrive, inspection either returns
a checked object or raises Refusal with a failure status; it never crashes otherwise."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_node.inspection import inspect_received, valid_uid
from dicom_node.statuses import Refusal
from tests.helpers import CT_IMAGE, ct_dataset, encode, part10

UID = "1.2.826.0.1.3680043.8.498.77"
GOOD = encode(ct_dataset("1.2.3", "1.2.4", UID))


def _check(data: bytes) -> None:
    try:
        obj = inspect_received(data, CT_IMAGE, UID)
    except Refusal as refusal:
        assert refusal.status in range(0xA700, 0xD000) and refusal.reason
    else:
        assert valid_uid(obj.study_uid) and obj.sop_instance_uid == UID


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bodies_are_refused_or_accepted_cleanly(body):
    _check(part10(body, CT_IMAGE, UID))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_datasets(data):
    body = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    _check(part10(bytes(body[:cut]), CT_IMAGE, UID))


@given(st.text(max_size=80))
def test_uid_check_rejects_path_like_and_overlong(text):
    if valid_uid(text):
        assert len(text) <= 64 and set(text) <= set("0123456789.")
        assert ".." not in text and not text.startswith(".")


_CHARS = st.characters(codec="latin-1", exclude_characters="\\^=")
_NAME_CHARS = st.characters(codec="latin-1", exclude_characters="\\^= ")


@settings(max_examples=200, deadline=None)
@given(st.text(_CHARS, max_size=200), st.text(_NAME_CHARS, max_size=120))
def test_recorded_text_is_the_cleaned_value_within_its_limit(description, name):
    from dicom_node import statuses
    from dicom_node.inspection import NUL_REMOVED, TRUNCATED

    ds = ct_dataset("1.2.3", "1.2.4", UID)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDescription, ds.PatientName = description, name
    cleaned = {
        k: v.rstrip(" \x00").replace("\x00", "") for k, v in (("d", description), ("n", name))
    }
    try:
        obj = inspect_received(part10(encode(ds), CT_IMAGE, UID), CT_IMAGE, UID)
    except Refusal as refusal:
        # Only an identifying attribute beyond its limit is refused.
        assert refusal.status == statuses.VALUE_TOO_LONG and len(cleaned["n"]) > 64
        assert cleaned["n"] not in refusal.reason  # the reason never quotes the value
        return
    assert len(cleaned["n"]) <= 64 and (obj.patient_name or "") == cleaned["n"]
    stored = obj.study_description or ""
    assert stored == cleaned["d"][:64]
    changes = {(c.keyword, c.change) for c in obj.alterations}
    assert (("StudyDescription", TRUNCATED) in changes) == (len(cleaned["d"]) > 64)
    assert (("StudyDescription", NUL_REMOVED) in changes) == ("\x00" in description.rstrip(" \x00"))
