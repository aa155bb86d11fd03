"""A remote worker's prior read by WADO-RS: when the archive refuses the prior's SEG (404), the
follow-up says so in `prior_reason` with the status (it said only "follow-up failed (HTTPError)"
when the client let requests' exception out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from db import Instance, Job, Output, Series, Study, StudyState
from db.findings import Findings
from db.session import Database
from dicom_io.archive import ArchiveClient, ArchiveSettings, SeriesCache
from dicom_io.series import Volume
from tests.kit.dicomweb import refusing_archive
from workers.pipeline.analysers import Analysis
from workers.pipeline.claim import JobTicket
from workers.pipeline.followup import run_follow_up
from workers.pipeline.prior import PriorSources, PriorUnusable, load_local

ROOT = "1.2.826.0.1.3680043.8.498"
PRIOR, CURRENT = f"{ROOT}.20", f"{ROOT}.30"
CT_SERIES, SEG_SERIES, SEG_SOP = f"{ROOT}.21", f"{ROOT}.22", f"{ROOT}.22.1"
CT_SOPS = [f"{ROOT}.21.{i}" for i in range(1, 4)]
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _study(db: Database, uid: str, day: str) -> int:
    with db.session() as s:
        study = Study(
            study_uid=uid,
            patient_id="PAT-1",
            study_date=day,
            modalities="CT",
            state=StudyState.DONE,
        )
        s.add(study)
        s.flush()
        return study.id


def _prior_analysed_by_a_remote_worker(db: Database, archive_url: str) -> None:
    """The prior's CT series in the database and a DONE job whose SEG row names its WADO-RS
    address, as a remote worker records it."""
    study_id = _study(db, PRIOR, "20240101")
    with db.session() as s:
        series = Series(study_id=study_id, series_uid=CT_SERIES)
        s.add(series)
        s.flush()
        for sop in CT_SOPS:
            s.add(
                Instance(
                    study_id=study_id, series_id=series.id, sop_instance_uid=sop,
                    sop_class_uid=CT_CLASS, archive_path=f"/elsewhere/{sop}.dcm",
                    sha256="0" * 64, size=1, transfer_syntax="1.2.840.10008.1.2.1",
                    calling_ae="TEST",
                )
            )  # fmt: skip
        findings = Findings(0.1, 3, 4000.0, series_uid=CT_SERIES, slices=len(CT_SOPS))
        job = Job(
            study_id=study_id, pipeline="baseline", pipeline_version="1", input_hash="h",
            state=StudyState.DONE, findings=findings.to_json(),
        )  # fmt: skip
        s.add(job)
        s.flush()
        seg_url = f"{archive_url}/studies/{PRIOR}/series/{SEG_SERIES}/instances/{SEG_SOP}"
        s.add(
            Output(
                job_id=job.id, study_id=study_id, modality="SEG", path=seg_url,
                sop_instance_uid=SEG_SOP, series_uid=SEG_SERIES, sha256="0" * 64,
            )
        )  # fmt: skip


def _client(url: str, tmp_path: Path) -> ArchiveClient:
    """A client whose cache already holds the prior's CT series: only the SEG is fetched."""
    cache = SeriesCache(tmp_path / "cache", 1 << 20)
    cache.series(PRIOR, CT_SERIES, CT_SOPS, lambda: [(sop, sop.encode()) for sop in CT_SOPS])
    return ArchiveClient(ArchiveSettings(url, token="t"), cache)


def test_a_prior_seg_the_archive_lacks_makes_the_prior_unusable_with_the_status(
    sqlite_db: Database, tmp_path: Path
) -> None:
    with refusing_archive(404) as archive:
        _prior_analysed_by_a_remote_worker(sqlite_db, archive.url)
        client = _client(archive.url, tmp_path)
        with pytest.raises(PriorUnusable) as caught:
            load_local(sqlite_db, PRIOR, "20240101", client)
    assert archive.asked == [f"/dicomweb/studies/{PRIOR}/series/{SEG_SERIES}"]
    reason = caught.value.reason
    assert "cannot be read from the archive" in reason and "HTTP 404" in reason
    assert SEG_SERIES in reason


def test_the_follow_up_records_why_the_prior_was_not_compared(
    sqlite_db: Database, tmp_path: Path
) -> None:
    current_id = _study(sqlite_db, CURRENT, "20240701")
    shape = (len(CT_SOPS), 8, 8)
    volume = Volume(
        hu=np.zeros(shape, np.float32), spacing_zyx=(2.0, 1.0, 1.0), origin_xyz=(0.0, 0.0, 0.0),
        row_cosine=(1.0, 0.0, 0.0), column_cosine=(0.0, 1.0, 0.0), datasets=[], paths=[],
    )  # fmt: skip
    analysis = Analysis(
        lung_mask=np.zeros(shape, bool), lesion_labels=np.zeros(shape, np.uint8), lesions=[],
        lesion_probabilities=[], lung_volume_ml=0.0, screening_probability=0.1,
        triage_score=0.1, priority=3, saliency=np.zeros(shape, np.float16),
    )  # fmt: skip
    with refusing_archive(404) as archive:
        _prior_analysed_by_a_remote_worker(sqlite_db, archive.url)
        sources = PriorSources(archive=_client(archive.url, tmp_path))
        ticket = JobTicket(
            job_id=0, study_id=current_id, study_uid=CURRENT, input_hash="", attempt=1
        )
        result = run_follow_up(sqlite_db, ticket, volume, analysis, None, sources)  # type: ignore[arg-type]
    assert result.prior_study_uid is None
    assert result.prior_reason is not None
    assert result.prior_reason.startswith(f"prior {PRIOR}: the prior cannot be read")
    assert "HTTP 404" in result.prior_reason
