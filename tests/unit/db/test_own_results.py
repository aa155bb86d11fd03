"""radai's own SEG and SR, stored back into a study, are recognised; nothing else is."""

from __future__ import annotations

from db.own_results import COMPREHENSIVE_3D_SR, SEGMENTATION, is_own_result

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_our_seg_and_sr_are_recognised() -> None:
    assert is_own_result(SEGMENTATION, "radai SEG - NOT FOR CLINICAL USE")
    assert is_own_result(COMPREHENSIVE_3D_SR, "radai SR - NOT FOR CLINICAL USE")


def test_other_objects_are_input() -> None:
    assert not is_own_result(SEGMENTATION, "Lung nodules (vendor X)")
    assert not is_own_result(SEGMENTATION, None)
    assert not is_own_result(CT, "radai SEG - NOT FOR CLINICAL USE")
    assert not is_own_result(None, None)
