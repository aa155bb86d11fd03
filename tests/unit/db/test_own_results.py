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


def test_a_result_stored_back_into_the_node_is_read_from_the_nodes_copy(sqlite_db) -> None:  # noqa: ANN001
    from db import Instance, Series, Study
    from db.own_results import result_file

    with sqlite_db.session() as s:
        study = Study(study_uid="1.2.3", state="DONE", modalities="", instance_count=0)
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.2.3.4")
        s.add(series)
        s.flush()
        s.add(
            Instance(
                study_id=study.id,
                series_id=series.id,
                sop_instance_uid="1.2.3.4.5",
                sop_class_uid=SEGMENTATION,
                archive_path="/node/archive/seg.dcm",
                sha256="0" * 64,
                size=1,
                transfer_syntax="1.2.840.10008.1.2.1",
                calling_ae="RADAI",
            )
        )
        s.flush()
        url = "https://node/dicomweb/studies/1.2.3/series/1.2.3.4/instances/"
        assert result_file(s, url + "1.2.3.4.5", "1.2.3.4.5") == "/node/archive/seg.dcm"
        assert result_file(s, url + "9.9", "9.9") == url + "9.9"  # not on the node: as recorded
        assert result_file(s, "/worker/outputs/seg.dcm", "1.2.3.4.5") == "/worker/outputs/seg.dcm"
