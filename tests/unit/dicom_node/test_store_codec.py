"""The node's hand-built encodings are byte for byte pynetdicom's own."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

from dicom_node import store_codec

_UIDS = st.from_regex(r"\A[1-9][0-9]{0,3}(\.(0|[1-9][0-9]{0,5})){1,9}\Z")
_SYNTAXES = st.sampled_from(
    [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    ]
)


@settings(max_examples=200, deadline=None)
@given(_UIDS, _UIDS, _SYNTAXES, st.sampled_from([PYNETDICOM_IMPLEMENTATION_VERSION, "RADAI_1"]))
def test_part10_header_is_pynetdicom_s(sop_class, sop_instance, syntax, version):
    meta = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(syntax),
        implementation_uid=UID(PYNETDICOM_IMPLEMENTATION_UID),
        implementation_version=version,
    )
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    built = store_codec.part10_header(
        sop_class, sop_instance, syntax, PYNETDICOM_IMPLEMENTATION_UID, version
    )
    assert built == expected


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    _UIDS,
    _UIDS,
    st.sampled_from([0x0000, 0xA700, 0xA900, 0xC000, 0xB000, 0x0110, 0xA902]),
)
def test_c_store_rsp_is_pynetdicom_s(message_id, sop_class, sop_instance, status):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    expected = encode(message.command_set, True, True)
    assert store_codec.c_store_rsp(message_id, sop_class, sop_instance, status) == expected
