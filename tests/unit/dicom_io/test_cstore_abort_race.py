"""The association can end between our check and pynetdicom's (its abort after a timed-out store
runs in its own thread): the file then has no response, like the files after it, and the send
goes on reporting instead of raising pynetdicom's RuntimeError."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_io import cstore


class _EndsUnderUs:
    """An association that is established when looked at, and gone by the time a store runs."""

    def __init__(self) -> None:
        self.is_established = True

    def send_c_store(self, _dataset: object) -> object:
        self.is_established = False
        raise RuntimeError("The association with a peer SCP must be established")


class _Established:
    is_established = True

    def send_c_store(self, _dataset: object) -> object:
        raise RuntimeError("something else went wrong")


def test_an_association_that_ends_between_the_checks_gives_no_response() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    assert cstore._send_one(_EndsUnderUs(), path) is None  # type: ignore[arg-type]


def test_other_runtime_errors_still_raise() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    with pytest.raises(RuntimeError, match="something else"):
        cstore._send_one(_Established(), path)  # type: ignore[arg-type]
